"""The Gradio app (app.py): the answer generator, then `python app.py` end to end through gradio_client."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import app  # noqa: E402

QUESTION = ROOT / "examples" / "capital_of_france.wav"
FOLLOW_UP = ROOT / "examples" / "ocean_fact.wav"
# The tiny model's greedy answer repeats one token, whose units collapse to a handful: sampling gives the
# varied answer (and so the steady stream of units) a real model produces.
SAMPLING = app.Settings(chunk_size=10, temperature=0.7, top_p=0.9, max_new_tokens=48)


def snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    reference, estimate = reference.astype(np.float64), estimate.astype(np.float64)
    return float(10 * np.log10((reference ** 2).sum() / max(((reference - estimate) ** 2).sum(), 1e-300)))


@pytest.fixture(scope="module")
def assistant(model, processor):
    return app.Assistant(model, processor)


@pytest.fixture(scope="module")
def question():
    samples, rate, note = app.Assistant.read_question(QUESTION)
    assert note == "" and rate == 16000
    return samples, rate


def generator_threads():
    return [t for t in threading.enumerate() if t.name == "llama-omni-generate" and t.is_alive()]


# --- the answer generator -------------------------------------------------------------------------------

def test_text_streams_in_several_updates_and_audio_starts_before_the_text_is_complete(assistant, question):
    torch.manual_seed(0)
    updates = list(assistant.answer([], *question, SAMPLING))
    final = updates[-1]
    assert final.done and not any(u.done for u in updates[:-1])
    texts = [u.text for u in updates]
    assert len(set(t for t in texts if t)) >= 3, texts  # the text grows in several steps
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    first_audio = next(i for i, u in enumerate(updates) if len(u.audio))
    assert len(updates[first_audio].text) < len(final.text) and updates[first_audio].tokens < final.tokens
    assert sum(len(u.audio) for u in updates) == final.samples > 0
    assert 0 < final.first_text <= final.elapsed and 0 < final.first_audio < final.elapsed
    assert final.context == assistant.first_turn + final.tokens


def test_streamed_speech_equals_the_offline_answer(assistant, question, model, processor):
    torch.manual_seed(1)
    updates = list(assistant.answer([], *question, SAMPLING))
    streamed = np.concatenate([u.audio for u in updates])
    inputs = assistant.inputs([], *question)
    torch.manual_seed(1)
    offline = model.generate(**inputs, return_dict_in_generate=True, **SAMPLING.generation_kwargs())
    answer = offline.sequences[0, inputs["input_ids"].shape[1]:]
    assert updates[-1].text == processor.decode(answer, skip_special_tokens=True)
    assert updates[-1].tokens == len(answer)
    reference = offline.audio[0].numpy()
    assert streamed.shape == reference.shape and len(reference) > 0
    assert snr_db(reference, streamed) > 15.0  # chunks vocoded with context: no seams (test_streaming.py)


def test_closing_the_answer_stops_generation_promptly(assistant, question):
    settings = app.Settings(10, 0.7, 0.9, max_new_tokens=1000)
    torch.manual_seed(2)
    answer = assistant.answer([], *question, settings)
    update = next(u for u in answer if u.text)
    assert generator_threads()
    answer.close()  # what the Stop button does
    assert not generator_threads()  # close() waited for the generation thread to end
    assert update.tokens < 100


def test_follow_up_questions_keep_earlier_turns_in_the_prompt(assistant, question, processor):
    history = [app.Turn(*question, None, "Paris is the capital of France.", "")]
    follow_up, rate = soundfile.read(FOLLOW_UP, dtype="float32")
    inputs = assistant.inputs(history, follow_up, rate)
    assert inputs["input_features"].shape[0] == 2
    ids = inputs["input_ids"][0]
    assert int((ids == processor.speech_token_id).sum()) == 2 * 300
    text = processor.decode(ids[ids != processor.speech_token_id])
    assert "Paris is the capital of France." in text and text.count("<|start_header_id|>user") == 2
    assert ids.shape[0] > assistant.first_turn + 300
    assert assistant.next_turn > 300  # a follow-up costs its 300 speech positions plus its prompt


def test_turns_that_fit_in_the_trained_context(assistant):
    turns = assistant.turns_left()
    used, fitted = 0, 0
    while True:  # simulate questions with typical answers
        used += (assistant.first_turn if used == 0 else assistant.next_turn) + app.TYPICAL_ANSWER
        if used > app.TRAINED_CONTEXT:
            break
        fitted += 1
    assert turns == fitted >= 2
    assert f"about **{turns} more turn(s)** fit" in app.context_info(assistant)
    assert assistant.turns_left(app.TRAINED_CONTEXT - 10) == 0


def test_a_full_conversation_is_refused_and_a_nearly_full_one_gives_a_short_answer(model, processor, question):
    small = app.Assistant(model, processor, max_context=0)
    small.max_context = small.first_turn + 24  # room for one short answer only
    torch.manual_seed(3)
    final = list(small.answer([], *question, SAMPLING))[-1]
    assert final.tokens <= 24 and final.context <= small.max_context
    history = [app.Turn(*question, None, final.text, "")]
    with pytest.raises(ValueError, match="This conversation is full: .* Press “New conversation”"):
        next(small.answer(history, *question, SAMPLING))


def test_bad_audio_gives_readable_errors(assistant, tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    with pytest.raises(ValueError, match="cannot read corrupt.wav as audio"):
        assistant.read_question(corrupt)
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="audio file is empty"):
        assistant.read_question(tmp_path / "empty.wav")
    with pytest.raises(ValueError, match=r"^the question is silent"):
        next(assistant.answer([], np.zeros(16000, np.float32), 16000, SAMPLING))


def test_questions_over_30_seconds_are_cut_with_a_note(tmp_path, question):
    samples, rate = question
    long = np.tile(samples, 35 * rate // len(samples) + 1)[: 35 * rate]
    soundfile.write(tmp_path / "long.wav", long, rate)
    cut, rate, note = app.Assistant.read_question(tmp_path / "long.wav")
    assert cut.shape == (30 * rate,)
    assert note == "The question lasts 35.0 s; only its first 30 s were heard (the last 5.0 s were ignored)."


@pytest.mark.parametrize("model_rate", [16000, 24000])
def test_wav_chunks_are_16_bit_without_normalization_at_the_model_rate(model_rate):
    chunk = app.wav_bytes(np.array([0.0, 0.5, -1.0, 2.0], np.float32), model_rate)
    samples, rate = soundfile.read(io.BytesIO(chunk), dtype="int16")
    assert rate == model_rate and samples.tolist() == [0, 16383, -32767, 32767]


def test_llama_omni_settings_and_window(assistant, question):
    assert assistant.family == "llama_omni" and assistant.name == "LLaMA-Omni" and assistant.speakers == []
    assert assistant.max_context == assistant.trained_context == app.TRAINED_CONTEXT
    torch.manual_seed(4)
    final = list(assistant.answer([], *question, replace(SAMPLING, max_new_tokens=8)))[-1]
    assert final.rate == 16000 and "· Ω 10 ·" in final.meta(assistant.max_context)


# --- LLaMA-Omni2 (the tiny random checkpoint, loaded as the app loads it) ---------------------------------

GREEDY2 = app.Settings(temperature=0, max_new_tokens=24, seed=0)  # seed: the TTS and HiFT draw the same


@pytest.fixture(scope="module")
def omni2(tmp_path_factory):
    from llama_omni_hf.cli import load_model
    from llama_omni_hf.tiny import build_tiny_omni2_checkpoint

    path = build_tiny_omni2_checkpoint(tmp_path_factory.mktemp("omni2") / "llama-omni2-tiny")
    return app.Assistant(*load_model(str(path)))


def speech_of(updates) -> np.ndarray:
    return np.concatenate([u.audio for u in updates])


def test_omni2_streams_24khz_speech_and_the_text_of_generate(omni2, question):
    assert omni2.family == "llama_omni2" and omni2.name == "LLaMA-Omni2"
    updates = list(omni2.answer([], *question, GREEDY2))
    final = updates[-1]
    assert final.done and {u.rate for u in updates} == {24000}  # every chunk's own rate, not 16 kHz
    assert sum(len(u.audio) for u in updates) == final.samples > 0
    assert 0 < final.first_audio < final.elapsed
    meta = final.meta(omni2.max_context)
    assert f"{final.samples / 24000:.1f} s of speech" in meta and "· voice en ·" in meta and "Ω" not in meta
    inputs = omni2.inputs([], *question)
    prompt = inputs["input_ids"].shape[1]
    greedy = omni2.model.generate(**inputs, return_dict_in_generate=True, return_audio=False,
                                  **GREEDY2.generation_kwargs())
    answer = greedy.sequences[0, prompt:]
    assert final.text == omni2.processor.decode(answer, skip_special_tokens=True) and final.tokens == len(answer)
    assert final.context == prompt + final.tokens == omni2.first_turn + final.tokens
    # the tiny model's greedy text is one repeated token: sampled text (same seeds) is a stronger check
    sampling = replace(GREEDY2, temperature=0.7, top_p=0.9)
    torch.manual_seed(5)
    streamed = list(omni2.answer([], *question, sampling))[-1]
    torch.manual_seed(5)
    offline = omni2.model.generate(**inputs, return_dict_in_generate=True, return_audio=False, seed=0,
                                   **sampling.generation_kwargs())
    assert streamed.text == omni2.processor.decode(offline.sequences[0, prompt:], skip_special_tokens=True)
    assert len(set(streamed.text)) > 5


def test_omni2_voice_changes_the_speech_not_the_text(omni2, question):
    assert omni2.speakers == ["en", "zh"] and omni2.default_speaker == "en"
    en, zh, en_again = (list(omni2.answer([], *question, replace(GREEDY2, speaker=voice)))
                        for voice in ("en", "zh", "en"))
    assert en[-1].text == zh[-1].text and en[-1].tokens == zh[-1].tokens
    assert np.array_equal(speech_of(en), speech_of(en_again))  # seeded: the same voice says the same
    assert speech_of(en).shape == speech_of(zh).shape  # the same units...
    assert np.abs(speech_of(en) - speech_of(zh)).max() > 1e-5  # ...in another voice
    assert "· voice zh ·" in zh[-1].meta(omni2.max_context)
    with pytest.raises(ValueError, match="unknown speaker 'fr'"):
        next(omni2.answer([], *question, replace(GREEDY2, speaker="fr")))


def test_omni2_follow_up_prompt_holds_earlier_questions_and_the_first_answer_as_text(omni2, question):
    torch.manual_seed(6)
    first = list(omni2.answer([], *question, replace(GREEDY2, temperature=0.7, top_p=0.9)))[-1]
    history = [app.Turn(*question, None, first.text, "")]
    follow_up, rate = soundfile.read(FOLLOW_UP, dtype="float32")
    inputs = omni2.inputs(history, follow_up, rate)
    ids, speech_id = inputs["input_ids"][0], omni2.processor.speech_token_id
    assert inputs["input_features"].shape[0] == 2 and int((ids == speech_id).sum()) == 2 * 300
    text = omni2.processor.decode(ids[ids != speech_id])
    assert f"<|im_start|>assistant\n{first.text}<|im_end|>" in text and len(first.text.strip()) > 5
    assert text.count("<|im_start|>user") == 2 and text.endswith("<|im_start|>assistant\n")
    second = list(omni2.answer(history, follow_up, rate, GREEDY2))[-1]
    assert second.done and second.context == len(ids) + second.tokens


def test_omni2_conversation_stays_in_its_prompt_window(omni2, question):
    """The model cuts prompts over `max_prompt_length` from the front (the original's Q9), which would drop the
    conversation's start and at last the generation prompt: the app refuses before that, as for LLaMA-Omni."""
    limit = omni2.model.config.max_prompt_length
    assert omni2.max_context == omni2.trained_context == limit == 4096
    assert "of 4096 positions (what the released model was trained on)" in app.context_info(omni2)
    assert 2 <= omni2.turns_left() < (limit - omni2.first_turn) // 300 + 1
    assert omni2.turns_left(limit - 10) == 0
    with pytest.raises(ValueError, match="keeps only the last 4096"):
        app.Assistant(omni2.model, omni2.processor, max_context=limit + 1)
    turn = app.Turn(*question, None, "Paris.", "")
    history = [turn] * 11  # with the tiny tokenizer: ~350 + ~310 per earlier turn, then fill up with text
    used = omni2.inputs(history, *question)["input_ids"].shape[1]
    filler = len(omni2.processor.tokenizer(" Paris.")["input_ids"])
    history = history[:-1] + [replace(turn, text="Paris." + " Paris." * ((limit - used - 24) // filler))]
    prompt = omni2.inputs(history, *question)["input_ids"].shape[1]
    assert app.MIN_ANSWER <= limit - prompt <= 24 + filler
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final = list(omni2.answer(history, *question, replace(GREEDY2, max_new_tokens=1000)))[-1]
    assert final.tokens <= limit - prompt and final.context <= limit  # the answer is cut to the window
    assert not [w for w in caught if "max_prompt_length" in str(w.message)]  # and the prompt never was
    too_long = [turn] * 13
    assert omni2.inputs(too_long, *question)["input_ids"].shape[1] > limit  # the model would cut its front
    with pytest.raises(ValueError, match="This conversation is full: .* of the 4096 positions"):
        next(omni2.answer(too_long, *question, GREEDY2))


# --- python app.py, end to end ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_app(directory: Path, *args: str, timeout: float = 120.0, env: dict | None = None):
    """Start `python app.py` on 127.0.0.1 with a free port; return (process, url, log path)."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1",
           "LLAMA_OMNI_CACHE": str(directory / "cache"), "GRADIO_TEMP_DIR": str(directory / "gradio"), **(env or {})}
    log = directory / "app.log"
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--server-name", "127.0.0.1",
                                "--server-port", str(port), *args],
                               cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return process, url, log
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"app.py did not start in {timeout} s:\n{log.read_text()}")


def stop_app(process):
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_checkpoint):
    """The app on the session's tiny checkpoint; a small context so a few turns fill it."""
    process, url, log = launch_app(tmp_path_factory.mktemp("app"), "--model", str(tiny_checkpoint),
                                   "--max-context", "1000")
    yield url
    stop_app(process)
    print(log.read_text()[-3000:])


@pytest.fixture
def client(served, tmp_path):
    from gradio_client import Client

    return Client(served, verbose=False, download_files=False)


def ask(client, path, settings=SAMPLING):
    from gradio_client import handle_file

    return client.submit(handle_file(str(path)) if path else None, settings.chunk_size, settings.temperature,
                         settings.top_p, settings.max_new_tokens, api_name="/answer")


def last_answer(outputs) -> str:
    chat = outputs[0]
    return chat[-1]["content"][0]["text"] if chat and chat[-1]["role"] == "assistant" else ""


def seconds(meta: str, name: str) -> float:
    return float(re.search(rf"{name} ([0-9.]+) s", meta).group(1))


def tokens(meta: str) -> int:
    return int(re.search(r"(\d+) tokens", meta).group(1))


def ask_for_a_full_answer(client, path, settings=SAMPLING, tries=5):
    """The served app samples without a seed: random tiny weights end about 1 answer in 40 after a few
    tokens, too short to stream in pieces. Ask again then, as a user would."""
    for _ in range(tries):
        job = ask(client, path, settings)
        updates = list(job)
        if tokens(last_answer(job.outputs()[-1])) >= settings.max_new_tokens // 2:
            return job, updates
    pytest.fail(f"{tries} answers in a row ended before {settings.max_new_tokens // 2} tokens")


def test_client_receives_streamed_text_and_audio(client, served):
    job, updates = ask_for_a_full_answer(client, QUESTION)
    final = job.outputs()[-1]
    answers = [last_answer(u) for u in updates]
    assert len({a.split("\n\n*Latency")[0] for a in answers if a and a != "…"}) >= 3  # text in several updates
    chat = final[0]
    # a retried question (ask_for_a_full_answer) is a second turn of the same conversation: check the last one
    roles = [m["role"] for m in chat]
    assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
    assert chat[-2]["content"][0]["type"] == "file" and chat[-2]["content"][0]["file"]["path"].endswith(".wav")
    meta = last_answer(final)
    first_text, first_audio = seconds(meta, "first text"), seconds(meta, "first audio")
    speech = float(re.search(r"and ([0-9.]+) s of speech", meta).group(1))
    assert 0 < first_text < 30 and 0 < first_audio < 30 and speech > 0
    pieces = [i for i, u in enumerate(updates) if isinstance(u[1], dict) and u[1].get("is_stream")]
    assert len(pieces) >= 2 and answers[pieces[0]] != answers[-1]  # speech in pieces, before the text ended
    audio = updates[pieces[-1]][1]
    assert audio["url"].endswith("playlist.m3u8")
    playlist = httpx.get(audio["url"]).text
    durations = [float(d) for d in re.findall(r"#EXTINF:([0-9.]+),", playlist)]
    assert "#EXT-X-ENDLIST" in playlist and len(durations) >= 2  # the player got the speech in several pieces
    # Gradio encodes each piece as AAC, whose 64 ms frames round every piece up; `speech` is shown to 0.1 s.
    assert speech - 0.06 < sum(durations) < speech + 0.06 + 0.064 * len(durations)
    assert re.match(r"Context: \d+ of 1000 positions", final[2])
    # the whole answer arrives at the end as one wav file: what a client that only reads the result needs
    whole, rate = soundfile.read(io.BytesIO(httpx.get(final[3]["url"]).content))
    assert rate == 16000 and abs(len(whole) / rate - speech) < 0.05 and np.abs(whole).max() > 0.01


def test_client_follow_ups_until_the_context_is_full_then_new_conversation(client):
    turns = 0
    while True:
        job = ask(client, QUESTION if turns % 2 == 0 else FOLLOW_UP)
        job.result()
        if "This conversation is full" in last_answer(job.outputs()[-1]):
            assert "Press “New conversation”" in last_answer(job.outputs()[-1])
            break
        turns += 1
        assert [m["role"] for m in job.outputs()[-1][0]] == ["user", "assistant"] * turns
        assert turns < 6
    assert turns >= 2  # 1000 positions hold two questions and their answers
    client.predict(api_name="/new_conversation")
    job = ask(client, QUESTION)
    job.result()
    assert len(job.outputs()[-1][0]) == 2


def test_client_stop_button_ends_the_answer_promptly(client):
    # Random tiny weights sometimes sample an end-of-turn token within the first few tokens; such an answer
    # ends before /stop arrives and proves nothing, so ask again (each try has about a 1 in 6 chance of that).
    for _ in range(6):
        job = ask(client, QUESTION, app.Settings(10, 0.7, 0.9, max_new_tokens=1000))
        while not any(last_answer(o).split("\n\n")[0] not in ("", "…") for o in job.outputs()) and not job.done():
            time.sleep(0.02)
        if job.done():
            continue
        client.predict(api_name="/stop")
        job.result(timeout=120)
        meta = last_answer(job.outputs()[-1])
        if "stopped*" in meta:
            break
        assert tokens(meta) < 1000  # not stopped: it ended on its own
    else:
        pytest.fail("six answers in a row ended on their own before /stop")
    assert tokens(meta) < 500


@pytest.mark.parametrize("content, message", [
    (None, "No question yet: record one with the microphone or upload an audio file."),
    (b"RIFF\x00\x00\x00\x00WAVEnot really audio",
     "cannot read question.wav as audio: question.wav: Invalid data found when processing input"),
    (b"", "audio file is empty: question.wav"),
    ("silence", "the question is silent (peak below 1e-4): there is no speech to answer"),
])
def test_client_bad_inputs_come_back_as_messages(client, tmp_path, content, message):
    path = None
    if content is not None:
        path = tmp_path / "question.wav"
        if content == "silence":
            soundfile.write(path, np.zeros(16000, np.float32), 16000)
        else:
            path.write_bytes(content)
    job = ask(client, path)
    job.result()
    chat = job.outputs()[-1][0]
    assert chat[-1]["role"] == "assistant" and chat[-1]["content"][0]["text"] == f"**Cannot answer:** {message}"


def test_client_long_question_is_answered_with_a_note(client, tmp_path, question):
    samples, rate = question
    soundfile.write(tmp_path / "long.wav", np.tile(samples, 33 * rate // len(samples) + 1)[: 33 * rate], rate)
    job = ask(client, tmp_path / "long.wav", app.Settings(10, 0.7, 0.9, 16))
    job.result()
    assert "**Note:** The question lasts 33.0 s; only its first 30 s were heard (the last 3.0 s were ignored)." \
        in last_answer(job.outputs()[-1])


def page_components(url: str) -> dict:
    """elem_id -> props of the served page's components (what the browser renders)."""
    config = httpx.get(url + "config").json()
    return config, {c["props"].get("elem_id"): c["props"] for c in config["components"] if c["props"].get("elem_id")}


def test_client_llama_omni_page_has_omega_and_no_voice(served):
    config, components = page_components(served)
    assert config["title"] == "LLaMA-Omni" and "banner" not in components  # a --model checkpoint
    assert components["chunk-size"]["visible"] is True and components["voice"]["visible"] is False


@pytest.fixture(scope="module")
def served_omni2(tmp_path_factory):
    """The Space's way: LLAMA_OMNI_MODEL names the model (here the embedded tiny LLaMA-Omni2, built on first run)."""
    process, url, log = launch_app(tmp_path_factory.mktemp("app-omni2"), env={"LLAMA_OMNI_MODEL": "tiny-omni2"})
    yield url
    stop_app(process)
    print(log.read_text()[-3000:])


def test_client_omni2_streams_24khz_speech_in_the_chosen_voice(served_omni2):
    from gradio_client import Client, handle_file

    config, components = page_components(served_omni2)
    assert config["title"] == "LLaMA-Omni2"
    assert components["banner"]["value"].startswith("**Embedded tiny checkpoint with RANDOM weights.**")
    assert components["chunk-size"]["visible"] is False  # no Ω in LLaMA-Omni2
    voice = components["voice"]
    assert voice["visible"] is True and [c[1] for c in voice["choices"]] == ["en", "zh"] and voice["value"] == "en"
    client = Client(served_omni2, verbose=False, download_files=False)
    job = client.submit(handle_file(str(QUESTION)), 10, 0.7, 0.9, 32, "zh", api_name="/answer")
    updates = list(job)
    final = job.outputs()[-1]
    meta = last_answer(final)
    assert "· voice zh ·" in meta and "Ω" not in meta and re.match(r"Context: \d+ of 4096 positions", final[2])
    speech = float(re.search(r"and ([0-9.]+) s of speech", meta).group(1))
    assert speech > 0 and any(isinstance(u[1], dict) and u[1].get("is_stream") for u in updates)
    whole, rate = soundfile.read(io.BytesIO(httpx.get(final[3]["url"]).content))
    assert rate == 24000 and abs(len(whole) / rate - speech) < 0.05 and np.abs(whole).max() > 0.01
    job = client.submit(handle_file(str(FOLLOW_UP)), 10, 0.7, 0.9, 16, "en", api_name="/answer")  # a follow-up
    job.result()
    assert [m["role"] for m in job.outputs()[-1][0]] == ["user", "assistant"] * 2
    assert "· voice en ·" in last_answer(job.outputs()[-1])
