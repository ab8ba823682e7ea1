"""A stand-in for `vllm-omni serve` (issue 12): `/v1/models` and a streamed `/v1/chat/completions`, byte for byte
in the format vllm-omni 0.30.0 writes, with a scripted answer and scripted faults. For the client and app tests
(tests/test_app_backend.py) and to try `app.py --backend` by hand:

    .venv/bin/python tests/omni_server_stub.py --port 8000 &
    .venv/bin/python app.py --backend http://127.0.0.1:8000

What it mimics (read in the vllm-omni 0.30.0 wheel and the vLLM 0.30 it runs on; see llama_omni_hf/omni_client.py):
- the event sequence of serving_chat.py `chat_completion_stream_generator`: a first text event with the role and
  "", text deltas (`modality: "text"`), audio events (`modality: "audio"`, base64 audio file of the new samples in
  `delta.content`, `audio_metadata`, usage with 0 completion tokens), `finish_reason: "stop"` only on the event
  that finishes the last modality (here the last audio), the `choices: []` usage event when
  `stream_options.include_usage`, then `data: [DONE]`; each event a JSON object dumped with `exclude_unset`;
- audio encoded as audio_utils_mixin.py `create_audio` does with soundfile (WAV = 16-bit PCM; "pcm" = raw
  16-bit little-endian);
- errors as vLLM's `ErrorResponse` (`{"error": {"message", "type", "param", "code"}}`), as an HTTP status before
  the stream and as one event followed by [DONE] inside it (`create_streaming_error_response`);
- uvicorn's chunked transfer encoding, so a cut stream looks like a server that died (no terminating chunk).

`upstream_events` runs vllm-omni's own stream generator on the same scripted answer (where vllm-omni is installed):
tests/test_app_backend.py checks that it writes the stub's events (all but `id` and `created`).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

SCENARIOS = ("answer", "http_error", "stream_error", "cut", "no_done", "malformed", "not_sse", "stall", "endless")
TEXT = ["Paris", " is", " the", " capital", " of", " France", ",", " on", " the", " Seine", "."]


def speech(samples: int, rate: int, seed: int) -> np.ndarray:
    """Deterministic int16 "speech": a tone with noise, different for every chunk."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / rate
    wave = 0.3 * np.sin(2 * np.pi * (180 + 20 * seed) * t) + 0.05 * rng.standard_normal(samples)
    return np.round(np.clip(wave, -1, 1) * 32767).astype("<i2")


def encode(samples: np.ndarray, rate: int, audio_format: str) -> str:
    """As audio_utils_mixin.py `create_audio`: soundfile WAV (its default subtype, PCM_16) or RAW PCM_16."""
    import soundfile

    if audio_format in ("pcm", "pcm16"):
        return base64.b64encode(samples.astype("<i2").tobytes()).decode()
    buffer = io.BytesIO()
    soundfile.write(buffer, samples.astype(np.float32) / 32768.0, rate, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode()


class OmniServerStub:
    """Serves on 127.0.0.1. Set `scenario` (and the answer's `text`, `rate`, `audio_every`, `chunk_samples`) before
    a request; `requests` holds every chat request's JSON body; `ends` how each stream ended ("done",
    "disconnected" when the client closed the connection, "cut", ...), and `disconnected` is set on a disconnect."""

    def __init__(self, port: int = 0, model: str = "llama-omni-stub", max_model_len: int = 2048):
        self.model, self.max_model_len = model, max_model_len
        self.scenario = "answer"
        self.text, self.rate, self.audio_every, self.chunk_samples = list(TEXT), 16000, 2, 1600
        self.delay = 0.01  # s between events: an answer streams in several pieces
        self.error = ("This model's maximum context length is 2048 tokens. However, you requested 2100 tokens in "
                      "the messages. Please reduce the length of the messages.")
        self.requests: list[dict] = []
        self.ends: list[str] = []
        self.disconnected = threading.Event()
        self.port, self.server, self.thread = port, None, None

    # --- the answer -------------------------------------------------------------------------------------------

    def audio_chunks(self) -> list[np.ndarray]:
        """The answer's speech, one int16 array per audio event."""
        count = (len(self.text) - 1) // self.audio_every + 1
        return [speech(self.chunk_samples, self.rate, seed=i) for i in range(count)]

    def expected_audio(self) -> np.ndarray:
        return np.concatenate(self.audio_chunks()).astype(np.float32) / 32768.0

    def events(self, body: dict):
        """The answer's events, as serving_chat.py `chat_completion_stream_generator` writes them."""
        rid, created = f"chatcmpl-stub{len(self.requests)}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model}
        options = body.get("stream_options") or {}
        usage_on = bool(options.get("include_usage"))
        continuous = usage_on and bool(options.get("continuous_usage_stats"))
        audio_format = (body.get("audio") or {}).get("format", "wav")
        prompt = 40 + 310 * sum(m.get("role") == "user" for m in body.get("messages", []))
        usage = lambda completion: {"prompt_tokens": prompt, "completion_tokens": completion,  # noqa: E731
                                    "total_tokens": prompt + completion}

        def text_event(content, tokens, last=False):
            choice = {"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": None,
                      **({"stop_reason": None} if last else {}), "token_ids": None}
            event = {**head, "choices": [choice], "modality": "text", "metrics": None}
            return {**event, "usage": usage(tokens)} if continuous else event

        def audio_event(samples, finish):
            choice = {"index": 0, "delta": {"role": "assistant", "content": encode(samples, self.rate, audio_format)},
                      "audio_metadata": {"format": "pcm" if audio_format == "pcm16" else audio_format,
                                         "sample_rate_hz": self.rate, "frame_count": len(samples), "channels": 1},
                      "logprobs": None, "finish_reason": finish, "stop_reason": None, "token_ids": None}
            return {**head, "choices": [choice], "modality": "audio", "metrics": None, "usage": usage(0)}

        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        first = {**head, "choices": [role], "prompt_token_ids": None, "prompt_text": None, "modality": "text"}
        yield {**first, "usage": usage(0)} if continuous else first
        if self.scenario == "endless":  # talks until the client hangs up
            for i in range(10 ** 6):
                yield text_event(f" w{i}", i + 1)
                if i % 5 == 4:
                    yield audio_event(speech(self.chunk_samples, self.rate, i % 10), None)
        chunks = self.audio_chunks()
        for i, piece in enumerate(self.text):
            # the text's end: finish_reason stays null while audio is to come (only stop_reason is set)
            yield text_event(piece, i + 1, last=i == len(self.text) - 1)
            if i % self.audio_every == self.audio_every - 1 and i < len(self.text) - 1:
                yield audio_event(chunks[i // self.audio_every], None)
        yield audio_event(chunks[-1], "stop")  # the last modality to finish carries finish_reason
        if usage_on:
            yield {**head, "choices": [], "usage": usage(len(self.text))}

    # --- HTTP ---------------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "OmniServerStub":
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # chunked streaming, as uvicorn

            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.rstrip("/") != "/v1/models":
                    return self.json(404, {"error": {"message": "Not Found", "type": "Not Found", "param": None,
                                                     "code": 404}})
                card = {"id": stub.model, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                        "root": stub.model, "parent": None, "max_model_len": stub.max_model_len, "permission": []}
                self.json(200, {"object": "list", "data": [card]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                if self.path != "/v1/chat/completions":
                    return self.json(404, {"detail": "Not Found"})
                stub.requests.append(body)
                if stub.scenario == "http_error":
                    return self.json(400, {"error": {"message": stub.error, "type": "BadRequestError",
                                                     "param": None, "code": 400}})
                self.send_response(200)
                self.send_header("content-type", "text/event-stream; charset=utf-8")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                try:
                    stub.ends.append(self.stream(body))
                except (BrokenPipeError, ConnectionResetError):
                    stub.ends.append("disconnected")
                    stub.disconnected.set()
                self.close_connection = True

            def json(self, status, data):
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def chunk(self, data: bytes):
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def event(self, data):
                self.chunk(f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode())
                time.sleep(stub.delay)

            def stream(self, body) -> str:
                for i, event in enumerate(stub.events(body)):
                    if i == 3 and stub.scenario == "stream_error":
                        self.event({"error": {"message": stub.error, "type": "BadRequestError", "param": None,
                                              "code": 400}})
                        break
                    if i == 3 and stub.scenario == "malformed":
                        self.event('{"choices": [{"index": 0, "delta": {"content": "Par')
                        break
                    if i == 3 and stub.scenario == "not_sse":
                        self.chunk(b"<html>502 Bad Gateway</html>\n\n")
                        break
                    if i == 3 and stub.scenario == "stall":
                        time.sleep(3)
                        break
                    if i == 4 and stub.scenario == "cut":  # the server died: no terminating chunk, no [DONE]
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return "cut"
                    self.event(event)
                else:
                    if stub.scenario != "no_done":
                        self.chunk(b"data: [DONE]\n\n")
                try:  # the terminating chunk: a clean end (the client may already have hung up after [DONE])
                    self.chunk(b"")
                except (BrokenPipeError, ConnectionResetError):
                    pass
                return "done" if stub.scenario == "answer" else stub.scenario

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="omni-server-stub", daemon=True)
        self.thread.start()
        return self

    def stop(self):
        """Stop listening (the port stays this stub's: `start()` serves on it again)."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def reset(self, scenario: str = "answer"):
        assert scenario in SCENARIOS, scenario
        self.scenario = scenario
        self.requests.clear(), self.ends.clear(), self.disconnected.clear()


def upstream_events(stub: OmniServerStub, body: dict) -> list[str]:
    """The same answer written by vllm-omni's OWN `OmniOpenAIServingChat.chat_completion_stream_generator`, fed by a
    scripted engine: the `data:` payloads, for comparison with `stub.events(body)`. Runs only where vllm-omni is
    installed (.venv-serve, `python tests/omni_server_stub.py --upstream`)."""
    import asyncio
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:  # issue 12's serving package installs torchvision/torchaudio stand-ins, which vllm-omni needs on a CPU
        import serving  # noqa: F401
    except ImportError:
        pass
    from vllm.entrypoints.generate.base.protocol import RequestResponseMetadata
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm_omni.entrypoints.openai.serving_chat import OmniOpenAIServingChat

    serving = OmniOpenAIServingChat.__new__(OmniOpenAIServingChat)  # only what the stream generator reads
    serving.__dict__.update(engine_client=SimpleNamespace(request_states={}), parser_cls=None, request_logger=None,
                            enable_force_include_usage=False, enable_log_outputs=False, enable_auto_tools=False,
                            enable_prompt_tokens_details=False, response_role="assistant", model_config=None)
    request = ChatCompletionRequest(**body)
    prompt = list(range(40 + 310 * sum(m.get("role") == "user" for m in body.get("messages", []))))

    def output(kind, text="", token_ids=(), finish=None, audio=None):
        mm = {} if audio is None else {"audio": [torch.from_numpy(audio.astype(np.float32) / 32768.0)],
                                       "sr": torch.tensor(stub.rate)}
        done = SimpleNamespace(index=0, text=text, token_ids=list(token_ids), finish_reason=finish, stop_reason=None,
                               logprobs=None, multimodal_output=mm)
        return SimpleNamespace(final_output_type=kind, outputs=[done], metrics=None, prompt_token_ids=prompt,
                               encoder_prompt_token_ids=None, num_cached_tokens=0, num_cache_creation_tokens=None,
                               stage_id=0 if kind == "text" else 1, prompt=None)

    async def engine():  # the stub's script: text pieces, an audio chunk after every `audio_every`, audio last
        chunks = stub.audio_chunks()
        for i, piece in enumerate(stub.text):
            yield output("text", piece, [i], "stop" if i == len(stub.text) - 1 else None)
            if i % stub.audio_every == stub.audio_every - 1 and i < len(stub.text) - 1:
                yield output("audio", audio=chunks[i // stub.audio_every])
        yield output("audio", finish="stop", audio=chunks[-1])

    async def collect():
        stream = serving.chat_completion_stream_generator(
            request, engine(), "chatcmpl-upstream", stub.model, [], None, RequestResponseMetadata(request_id="x"))
        return [line async for line in stream]

    return [line.removeprefix("data: ").removesuffix("\n\n") for line in asyncio.run(collect())]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--scenario", default="answer", choices=SCENARIOS)
    parser.add_argument("--delay", type=float, default=0.1, help="seconds between events")
    parser.add_argument("--upstream", metavar="REQUESTS_JSON", help="a JSON list of chat requests: print the events "
                        "vllm-omni's own stream generator writes for the scripted answer to each (needs vllm-omni)")
    args = parser.parse_args()
    if args.upstream:
        for body in json.loads(args.upstream):
            for data in upstream_events(OmniServerStub(), body):
                print(f"data: {data}", flush=True)
        raise SystemExit
    stub = OmniServerStub(args.port)
    stub.scenario, stub.delay = args.scenario, args.delay
    stub.start()
    print(f"omni server stub on {stub.url} ({args.scenario})", flush=True)
    stub.thread.join()
