"""`app.py --backend URL` and its client (llama_omni_hf/omni_client.py) against a stand-in for `vllm-omni serve`
(tests/omni_server_stub.py, which writes vllm-omni 0.30's streaming format): the client first, then the app through
gradio_client. No model is loaded anywhere here."""

from __future__ import annotations

import base64
import io
import re
import json
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from omni_server_stub import OmniServerStub  # noqa: E402
from test_app import QUESTION, launch_app, stop_app  # noqa: E402

from llama_omni_hf.omni_client import (  # noqa: E402
    OmniClient,
    ServerHTTPError,
    ServerStreamError,
    ServerTimeout,
    ServerUnreachable,
    decode_audio,
    question_message,
)

RATE = 16000
ROOT = Path(__file__).resolve().parents[1]
SERVE_PYTHON = ROOT / ".venv-serve" / "bin" / "python"  # vllm-omni's environment (scripts/setup_serving.sh)


@pytest.fixture(scope="module")
def stub():
    server = OmniServerStub().start()
    yield server
    server.stop()


@pytest.fixture
def fresh(stub):
    stub.reset("answer")
    stub.rate = RATE
    return stub


def tone(seconds=1.0, rate=RATE, frequency=220.0):
    return (0.3 * np.sin(2 * np.pi * frequency * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def ask(client, history=(), samples=None, rate=RATE):
    return client.stream(list(history), tone() if samples is None else samples, rate, temperature=0.2, top_p=0.7,
                         max_tokens=64)


def sent_audio(part) -> tuple[np.ndarray, int]:
    assert part["type"] == "input_audio" and part["input_audio"]["format"] == "wav"
    return soundfile.read(io.BytesIO(base64.b64decode(part["input_audio"]["data"])), dtype="float32")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the client --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("audio_format, rate", [("wav", 16000), ("pcm", 16000), ("wav", 24000)])
def test_client_yields_the_servers_text_and_audio_exactly(fresh, audio_format, rate):
    fresh.rate = rate
    chunks = list(ask(OmniClient(fresh.url, audio_format=audio_format)))
    assert "".join(c.text for c in chunks) == "".join(fresh.text)
    assert [c.text for c in chunks if c.text] == fresh.text  # one update per delta, as they came
    audio = [c for c in chunks if len(c.audio)]
    assert [len(c.audio) for c in audio] == [len(a) for a in fresh.audio_chunks()]
    assert np.array_equal(np.concatenate([c.audio for c in audio]), fresh.expected_audio())  # int16 / 32768, exact
    assert all(c.audio.dtype == np.float32 and c.sampling_rate == rate for c in audio)
    first_audio = next(i for i, c in enumerate(chunks) if len(c.audio))
    assert first_audio < max(i for i, c in enumerate(chunks) if c.text)  # speech comes while the text streams
    assert [c.is_final for c in chunks] == [False] * (len(chunks) - 1) + [True]
    final = chunks[-1]
    assert final.text == "" and len(final.audio) == 0 and final.completion_tokens == len(fresh.text)
    assert final.prompt_tokens == 350
    body = fresh.requests[-1]
    assert body["stream"] is True and body["modalities"] == ["text", "audio"] and "model" not in body
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.2, 0.7, 64)
    assert body["audio"] == {"format": audio_format}


def test_client_sends_the_conversation_as_audio_questions_and_text_answers(fresh):
    first, second = tone(0.5, 16000, 200), tone(0.7, 8000, 300)
    history = [SimpleNamespace(audio=first, rate=16000, text="Paris."),
               SimpleNamespace(audio=second, rate=8000, text="The ocean is deep.")]
    stereo = np.stack([tone(0.4, 22050, 250), np.zeros(int(0.4 * 22050), np.float32)])  # [channels, samples]
    list(ask(OmniClient(fresh.url, model="llama-omni"), history, stereo, 22050))
    body = fresh.requests[-1]
    assert body["model"] == "llama-omni"
    messages = body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert [messages[1]["content"], messages[3]["content"]] == ["Paris.", "The ocean is deep."]
    for message, (samples, rate) in zip(messages[::2], [(first, 16000), (second, 8000), (stereo.mean(0), 22050)]):
        assert len(message["content"]) == 1
        heard, heard_rate = sent_audio(message["content"][0])
        assert heard_rate == rate and heard.shape == samples.shape  # mono, at its own rate: the server resamples
        assert np.abs(heard - samples).max() <= 1 / 32767  # 16-bit WAV


@pytest.mark.parametrize("form", ["{url}", "{url}/", "{url}/v1", "{url}/v1/", "{host}"])
def test_client_takes_the_server_url_in_its_usual_forms(fresh, form):
    client = OmniClient(form.format(url=fresh.url, host=fresh.url.removeprefix("http://")))
    assert client.url == fresh.url
    assert client.models()[0]["id"] == "llama-omni-stub" and client.models()[0]["max_model_len"] == 2048
    with pytest.raises(ValueError, match="not a server URL: 'ftp://x'"):
        OmniClient("ftp://x")


@pytest.mark.parametrize("scenario, error, message", [
    ("http_error", ServerHTTPError, r"the server at {url} refused the question \(HTTP 400\): This model's maximum "
                                    r"context length is 2048 tokens\. However, you requested 2100 tokens"),
    ("stream_error", ServerStreamError, r"the server failed while answering: This model's maximum context length"),
    ("cut", ServerStreamError, r"the connection to the server at {url} broke during the answer \(peer closed "
                               r"connection without sending complete message body \(incomplete chunked read\)\): it "
                               r"may have stopped or restarted"),
    ("no_done", ServerStreamError, r"the server at {url} ended the answer's stream before its end \(no \[DONE\]\)"),
    ("malformed", ServerStreamError, r"the server sent an event that is not JSON: '\{\"choices\": \[\{\"index\": 0, "),
    ("not_sse", ServerStreamError, r"the server's answer is not a valid event stream \(line '<html>502 Bad Gateway"),
    ("stall", ServerTimeout, r"the server at {url} sent nothing for 0.5 s: it may be overloaded or stuck"),
])
def test_client_errors_say_what_happened(fresh, scenario, error, message):
    fresh.reset(scenario)
    with pytest.raises(error, match=message.replace("{url}", re.escape(fresh.url))) as caught:
        list(ask(OmniClient(fresh.url, read_timeout=0.5)))
    if scenario == "http_error":
        assert caught.value.status == 400 and caught.value.message == fresh.error


def test_client_says_when_the_server_is_not_there():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnreachable, match=rf"cannot reach the LLaMA-Omni server at {url} \(.*refused.*\): is "
                                                r"it running, and is the URL right\?"):
        list(ask(OmniClient(url)))
    with pytest.raises(ServerUnreachable):
        OmniClient(url).models()


def test_closing_the_stream_closes_the_connection(fresh):
    fresh.reset("endless")
    stream = ask(OmniClient(fresh.url))
    with closing(stream):
        text = "".join(next(stream).text for _ in range(10))
    assert text.startswith(" w0 w1")
    assert fresh.disconnected.wait(5) and fresh.ends == ["disconnected"]  # the server sees the client hang up


@pytest.mark.skipif(not (SERVE_PYTHON.exists() and list(ROOT.glob(".venv-serve/lib/python*/site-packages/vllm_omni"))),
                    reason="vllm-omni is not installed (.venv-serve: bash scripts/setup_serving.sh)")
def test_the_stub_writes_what_vllm_omni_writes_and_the_client_reads_both():
    """vllm-omni 0.30's own `chat_completion_stream_generator`, fed the stub's script by a fake engine, writes the
    stub's events byte for byte in content (all but `id` and `created`), WAV and raw PCM alike."""
    question = [question_message(tone(0.1), RATE)]
    bodies = [OmniClient("http://127.0.0.1:1", audio_format=audio_format).request(
        question, temperature=0.2, top_p=0.7, max_tokens=64) for audio_format in ("wav", "pcm")]
    run = subprocess.run([str(SERVE_PYTHON), str(ROOT / "tests" / "omni_server_stub.py"), "--upstream",
                          json.dumps(bodies)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    upstream = [line.removeprefix("data: ") for line in run.stdout.splitlines() if line.startswith("data: ")]
    stub = OmniServerStub()
    answers = [[json.dumps(e) for e in stub.events(body)] + ["[DONE]"] for body in bodies]
    normal = lambda data: data if data == "[DONE]" else {  # noqa: E731
        k: v for k, v in json.loads(data).items() if k not in ("id", "created")}
    assert [normal(d) for d in upstream] == [normal(d) for answer in answers for d in answer]
    for audio_format, answer in zip(("wav", "pcm"), np.split(np.array(upstream, object), 2)):
        chunks = list(OmniClient("http://127.0.0.1:1", audio_format=audio_format)._chunks(iter(answer)))
        assert "".join(c.text for c in chunks) == "".join(stub.text)
        assert np.array_equal(np.concatenate([c.audio for c in chunks]), stub.expected_audio())
        assert chunks[-1].is_final and chunks[-1].completion_tokens == len(stub.text)


def test_audio_chunks_are_checked_against_their_metadata():
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(160, np.float32), 16000, format="WAV")
    content = base64.b64encode(buffer.getvalue()).decode()
    samples, rate = decode_audio(content, {"format": "wav", "sample_rate_hz": 16000, "frame_count": 160}, "wav")
    assert rate == 16000 and samples.shape == (160,)
    with pytest.raises(ServerStreamError, match="holds 160 samples, its audio_metadata says 100"):
        decode_audio(content, {"format": "wav", "sample_rate_hz": 16000, "frame_count": 100}, "wav")
    with pytest.raises(ServerStreamError, match="says 24000 Hz in audio_metadata but 16000 Hz in its header"):
        decode_audio(content, {"format": "wav", "sample_rate_hz": 24000}, "wav")
    with pytest.raises(ServerStreamError, match="not valid base64"):
        decode_audio("not base64!", None, "wav")
    with pytest.raises(ServerStreamError, match="raw pcm audio chunk from the server has no"):
        decode_audio(base64.b64encode(b"\0\0").decode(), {"format": "pcm"}, "pcm")


# --- python app.py --backend URL, through gradio_client ----------------------------------------------------------

@pytest.fixture(scope="module")
def served(stub, tmp_path_factory):
    directory = tmp_path_factory.mktemp("app-backend")
    process, url, log = launch_app(directory, env={"LLAMA_OMNI_BACKEND": stub.url})
    yield SimpleNamespace(url=url, log=log, directory=directory)
    stop_app(process)
    print(log.read_text()[-3000:])


@pytest.fixture
def client(served):
    from gradio_client import Client

    return Client(served.url, verbose=False, download_files=False)  # a new session: a new conversation


def submit(client, path=QUESTION, max_new_tokens=256):
    from gradio_client import handle_file

    return client.submit(handle_file(str(path)) if path else None, 10, 0.2, 0.7, max_new_tokens, api_name="/answer")


def answer_text(outputs) -> str:
    return outputs[0][-1]["content"][0]["text"]


def whole_answer(outputs) -> tuple[np.ndarray, int]:
    return soundfile.read(io.BytesIO(httpx.get(outputs[3]["url"]).content), dtype="float32")


def test_app_page_names_the_server_and_loads_no_model(served, stub):
    config = httpx.get(served.url + "config").json()
    components = {c["props"].get("elem_id"): c["props"] for c in config["components"] if c["props"].get("elem_id")}
    assert config["title"] == "LLaMA-Omni"
    assert components["banner"]["value"] == (
        f"**Answers come from the LLaMA-Omni server at {stub.url}** (model `llama-omni-stub`, 2048 positions of "
        "context). Nothing is loaded in this process; the server's deploy config sets the chunk size Ω and the voice.")
    assert components["chunk-size"]["visible"] is False and components["voice"]["visible"] is False
    assert components["context-info"]["value"].startswith("Context: 0 of 2048 positions (the server's limit).")
    assert not (served.directory / "cache").exists()  # LLAMA_OMNI_CACHE: the default tiny model was never built


def test_app_streams_the_servers_text_and_speech(client, fresh):
    job = submit(client)
    updates = list(job)
    final = job.outputs()[-1]
    shown = [answer_text(u).split("\n\n*Latency")[0] for u in updates if u[0] and u[0][-1]["role"] == "assistant"]
    assert len({s for s in shown if s != "…"}) >= 3  # the text grows in several updates
    meta = answer_text(final)
    assert meta.startswith("Paris is the capital of France, on the Seine.\n\n*Latency: first text ")
    assert re.search(r"first text [0-9.]+ s · first audio [0-9.]+ s · 11 tokens and 0\.6 s of speech in [0-9.]+ s · "
                     rf"via 127\.0\.0\.1:{fresh.port} · context 361/2048\*$", meta), meta
    pieces = [i for i, u in enumerate(updates) if isinstance(u[1], dict) and u[1].get("is_stream")]
    assert len(pieces) >= 2 and answer_text(updates[pieces[0]]) != meta  # speech in pieces before the text ended
    whole, rate = whole_answer(final)
    expected = fresh.expected_audio()
    assert rate == 16000 and whole.shape == expected.shape
    assert np.abs(whole - expected).max() <= 2 / 32768  # the app's own 16-bit re-encoding
    assert final[2].startswith("Context: 361 of 2048 positions")
    body = fresh.requests[-1]
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.2, 0.7, 256)
    heard, heard_rate = sent_audio(body["messages"][0]["content"][0])
    question, question_rate = soundfile.read(QUESTION, dtype="float32")
    assert heard_rate == question_rate and np.abs(heard - question).max() <= 1 / 32767


def test_app_follow_up_sends_the_first_answer_as_text_and_plays_the_servers_rate(client, fresh):
    submit(client).result()
    fresh.rate = 24000  # LLaMA-Omni2's rate: the app takes it from the chunks
    job = submit(client, QUESTION.parent / "ocean_fact.wav")
    job.result()
    final = job.outputs()[-1]
    assert [m["role"] for m in final[0]] == ["user", "assistant"] * 2
    messages = fresh.requests[-1]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == "Paris is the capital of France, on the Seine."
    whole, rate = whole_answer(final)
    assert rate == 24000 and len(whole) == len(fresh.expected_audio())


@pytest.mark.parametrize("scenario, message", [
    ("http_error", "**Cannot answer:** the server at {url} refused the question (HTTP 400): This model's maximum "
                   "context length is 2048 tokens. However, you requested 2100 tokens in the messages. Please reduce "
                   "the length of the messages. This conversation is full: press “New conversation”."),
    ("stream_error", "Paris is\n\n**The answer broke off:** the server failed while answering: This model's maximum "
                     "context length is 2048 tokens. However, you requested 2100 tokens in the messages. Please "
                     "reduce the length of the messages."),
    ("cut", "Paris is\n\n**The answer broke off:** the connection to the server at {url} broke during the answer "
            "(peer closed connection without sending complete message body (incomplete chunked read)): it may have "
            "stopped or restarted"),
    ("down", "**Cannot answer:** cannot reach the LLaMA-Omni server at {url} ([Errno 111] Connection refused): is it "
             "running, and is the URL right?"),
    ("silence", "**Cannot answer:** the question is silent (peak below 1e-4): there is no speech to answer"),
])
def test_app_server_errors_come_back_as_messages(client, fresh, served, tmp_path, scenario, message):
    path = QUESTION
    if scenario == "silence":
        path = tmp_path / "question.wav"
        soundfile.write(path, np.zeros(RATE, np.float32), RATE)
    elif scenario == "down":
        fresh.stop()
    else:
        fresh.reset(scenario)
    try:
        job = submit(client, path)
        job.result()
    finally:
        if scenario == "down":
            fresh.start()  # the same port again
    chat = job.outputs()[-1][0]
    assert [m["role"] for m in chat] == ["assistant"]  # a notice under the conversation, not a turn of it
    assert chat[-1]["content"][0]["text"] == message.format(url=fresh.url)
    assert fresh.requests == [] if scenario in ("silence", "down") else len(fresh.requests) == 1
    assert "Traceback" not in served.log.read_text()
    fresh.reset("answer")
    job = submit(client)  # the conversation goes on as if the failed question had not been asked
    job.result()
    assert [m["role"] for m in job.outputs()[-1][0]] == ["user", "assistant"]
    assert len(fresh.requests[-1]["messages"]) == 1


def test_app_stop_cancels_the_servers_request(client, fresh):
    fresh.reset("endless")
    job = submit(client, max_new_tokens=1000)
    deadline = time.monotonic() + 60
    while not any(" w3" in answer_text(o) for o in job.outputs() if o[0]) and time.monotonic() < deadline:
        time.sleep(0.02)
    client.predict(api_name="/stop")
    job.result(timeout=60)
    meta = answer_text(job.outputs()[-1])
    assert "w0 w1 w2 w3" in meta and meta.endswith(" · stopped*")
    assert fresh.disconnected.wait(10) and fresh.ends == ["disconnected"]  # the connection was closed
