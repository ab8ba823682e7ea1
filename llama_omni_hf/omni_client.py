"""A streaming client for LLaMA-Omni served on vLLM-Omni (issue 12): what `app.py --backend URL` talks to.

    client = OmniClient("http://127.0.0.1:8000")
    with closing(client.stream([], samples, 16000, temperature=0.2, top_p=0.7, max_tokens=256)) as chunks:
        for chunk in chunks:  # OmniChunk: new text, new float32 audio at chunk.sampling_rate, is_final
            ...

The wire format, as vllm-omni 0.30.0 (the wheel) and the vLLM 0.30 it runs on implement it:

- Request: `POST {base}/v1/chat/completions`, `stream: true`, `modalities: ["text", "audio"]`. A question is a
  user message whose content is one audio part, `{"type": "input_audio", "input_audio": {"data": <base64 WAV>,
  "format": "wav"}}`; vLLM turns it into `data:audio/wav;base64,...` and decodes that like an `audio_url` part
  (vllm/entrypoints/chat_utils.py: `MM_PARSER_MAP`, `parse_input_audio`). Earlier answers are assistant messages
  with text content. `temperature`, `top_p` and `max_tokens` (not `max_completion_tokens`: only the former is in
  `_OPENAI_SAMPLING_FIELDS`) override the thinker stage's deploy defaults (vllm_omni/entrypoints/openai/
  serving_chat.py: `_apply_request_overrides`); the other stages keep theirs. `audio: {"format": ...}` chooses how
  speech chunks are encoded (`_resolve_audio_format`: wav, the default, pcm, pcm16, flac, mp3, opus).
- Response: Server-Sent Events, one `data: <json>` per event and `data: [DONE]` last (serving_chat.py:
  `chat_completion_stream_generator`). Each event is an `OmniChatCompletionStreamResponse` (protocol/
  chat_completion.py) dumped with `exclude_unset`: the usual `chat.completion.chunk` plus a top-level `modality`.
  `modality: "text"`: `choices[0].delta.content` is new text (the first event: role and ""). `modality: "audio"`:
  `choices[0].delta.content` is one base64-encoded audio file holding only the NEW samples (streaming sets every
  stage to DELTA output, vllm_omni/entrypoints/utils.py: `coerce_param_message_types`; the output processor drains
  the audio after each output, outputs/output_processor.py: `_new_completion_output`), and `choices[0].
  audio_metadata` = `{format, sample_rate_hz, frame_count, channels}` (serving_chat.py: `_create_audio_choice`,
  encoded by audio_utils_mixin.py: `create_audio` with soundfile: WAV is 16-bit PCM, "pcm" raw 16-bit
  little-endian). A closing event may carry only `finish_reason` (and no `modality`: the field's default "text"
  is not dumped), and with `stream_options.include_usage` one with `choices: []` and `usage`.
- Errors: before the stream, an HTTP status with `{"error": {"message", "type", "param", "code"}}` (vLLM's
  `ErrorResponse`; HTTPExceptions are rewritten to it, vllm/entrypoints/serve/exception_handling/handlers/http.py).
  Inside the stream, one `data: {"error": {...}}` event, then `data: [DONE]` (`create_streaming_error_response`).
- Cancellation: closing the connection cancels the request (vLLM's `with_cancellation`, then starlette's
  StreamingResponse watching for `http.disconnect`), which aborts it in the engine. Closing the generator that
  `OmniClient.stream` returns closes the connection.
"""

from __future__ import annotations

import base64
import io
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import numpy as np

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
AUDIO_FORMATS = ("wav", "pcm")  # speech chunk encodings the client decodes (the server's wav default, raw pcm16)


class OmniServerError(Exception):
    """Anything that went wrong talking to the server; the message is meant for the user."""


class ServerUnreachable(OmniServerError):
    """No connection: the server is not running, not there yet, or the URL is wrong."""


class ServerHTTPError(OmniServerError):
    """The server answered with an HTTP error; `message` is the server's own."""

    def __init__(self, status: int, message: str, url: str):
        self.status, self.message = status, message
        super().__init__(f"the server at {url} refused the question (HTTP {status}): {message}")


class ServerStreamError(OmniServerError):
    """The answer's event stream broke: cut short, malformed, or an error event from the server."""


class ServerTimeout(OmniServerError):
    """The server took too long to accept the connection or to send the next piece of the answer."""


@dataclass(eq=False)  # arrays: compare the fields
class OmniChunk:
    """One streamed update, as the in-process stream's chunk: only what is new since the previous one.

    text: new answer text. audio: new float32 mono samples at `sampling_rate` (empty: none in this chunk).
    is_final: True on the last chunk (the server's `[DONE]`), which carries no text or audio of its own.
    completion_tokens / prompt_tokens: the server's usage counts so far (None until it reports them).
    """

    text: str = ""
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    sampling_rate: int | None = None
    is_final: bool = False
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def base_url(url: str) -> str:
    """'http://host:8000', 'http://host:8000/' or 'http://host:8000/v1' -> 'http://host:8000'."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a server URL: {url!r} (expected e.g. http://127.0.0.1:8000)")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def wav_base64(samples: np.ndarray, rate: int) -> str:
    """Mono 16-bit WAV, base64: the question as an `input_audio` part (channels averaged, nothing resampled:
    the server's processor resamples to 16 kHz as the in-process one does)."""
    import soundfile

    samples = np.asarray(samples, np.float32)
    if samples.ndim == 2:  # [channels, samples], as audio_io.load_audio returns
        samples = samples.mean(axis=0)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(samples, -1, 1), int(rate), format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def question_message(samples: np.ndarray, rate: int) -> dict:
    return {"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": wav_base64(samples, rate), "format": "wav"}}]}


def conversation_messages(history, samples: np.ndarray, rate: int) -> list[dict]:
    """Earlier turns (objects with `.audio`, `.rate`, `.text`, as app.Turn) and the new question -> messages:
    every earlier question as audio, every earlier answer as text, as the in-process app builds its prompt."""
    messages = []
    for turn in history:
        messages += [question_message(turn.audio, turn.rate), {"role": "assistant", "content": turn.text}]
    return messages + [question_message(samples, rate)]


def decode_audio(content: str, metadata: dict | None, default_format: str) -> tuple[np.ndarray, int | None]:
    """One audio event's base64 `content` + `audio_metadata` -> (float32 mono samples, rate)."""
    metadata = metadata or {}
    audio_format = metadata.get("format", default_format)
    rate = metadata.get("sample_rate_hz")
    try:
        data = base64.b64decode(content, validate=True)
    except ValueError as error:
        raise ServerStreamError(f"an audio chunk from the server is not valid base64 ({error})") from None
    if audio_format in ("pcm", "pcm16"):
        if not rate:
            raise ServerStreamError("a raw pcm audio chunk from the server has no audio_metadata.sample_rate_hz")
        if len(data) % 2:
            raise ServerStreamError(f"a raw pcm16 audio chunk from the server has an odd length ({len(data)} bytes)")
        channels = int(metadata.get("channels", 1))
        samples = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
        samples = samples.reshape(-1, channels).mean(axis=1) if channels > 1 else samples
    else:
        import soundfile

        try:
            samples, file_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except Exception as error:  # soundfile raises LibsndfileError/RuntimeError for anything unreadable
            raise ServerStreamError(f"an audio chunk from the server is not readable as {audio_format} "
                                    f"({error})") from None
        samples = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
        if rate and int(rate) != file_rate:
            raise ServerStreamError(f"an audio chunk says {rate} Hz in audio_metadata but {file_rate} Hz in its "
                                    "header")
        rate = file_rate
    frames = metadata.get("frame_count")
    if frames is not None and frames != len(samples):
        raise ServerStreamError(f"an audio chunk holds {len(samples)} samples, its audio_metadata says {frames}")
    return np.ascontiguousarray(samples, np.float32), int(rate)


def error_message(body: bytes) -> str:
    """The server's message from an error body: vLLM's {"error": {"message"}}, FastAPI's {"detail"}, or text."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500] or "(empty response)"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if data.get(key):
                return str(data[key]) if not isinstance(data[key], list) else json.dumps(data[key])
    return text[:500]


def sse_events(lines):
    """Server-Sent Event lines -> the `data` of each event (multi-line data joined by "\\n", as the spec says).
    Comments (":...") and the event/id/retry fields are skipped; any other line is not SSE."""
    data = None
    for line in lines:
        if line == "":
            if data is not None:
                yield "\n".join(data)
            data = None
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data = [value] if data is None else data + [value]
            elif name not in ("event", "id", "retry"):
                raise ServerStreamError(f"the server's answer is not a valid event stream (line {line[:200]!r})")
    if data is not None:  # a last event without its blank line: the stream was cut inside it
        yield "\n".join(data)


class OmniClient:
    """Talks to one vLLM-Omni server. `read_timeout`: the longest wait for the next piece of an answer."""

    def __init__(self, url: str, *, model: str | None = None, connect_timeout: float = 5.0,
                 read_timeout: float = 120.0, audio_format: str = "wav"):
        if audio_format not in AUDIO_FORMATS:
            raise ValueError(f"audio_format must be one of {AUDIO_FORMATS}, not {audio_format!r}")
        self.url, self.model, self.audio_format = base_url(url), model, audio_format
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout

    def models(self) -> list[dict]:
        """The server's `/v1/models` entries (vLLM's ModelCard: `id`, `max_model_len`, ...)."""
        with self._errors():
            response = httpx.get(self.url + MODELS_PATH, timeout=self.timeout)
            if response.status_code >= 400:
                raise ServerHTTPError(response.status_code, error_message(response.content), self.url)
            try:
                return list(response.json()["data"])
            except (ValueError, KeyError, TypeError):
                raise ServerStreamError(f"{self.url}{MODELS_PATH} is not an OpenAI model list: "
                                        f"{response.text[:200]!r}") from None

    def request(self, messages: list[dict], *, temperature: float, top_p: float, max_tokens: int) -> dict:
        body = {"messages": messages, "modalities": ["text", "audio"], "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                "temperature": float(temperature), "top_p": float(top_p), "max_tokens": int(max_tokens),
                "audio": {"format": self.audio_format}}
        return body if self.model is None else {"model": self.model, **body}

    def stream(self, history, samples: np.ndarray, rate: int, *, temperature: float, top_p: float,
               max_tokens: int):
        """Stream one answer as `OmniChunk`s (see the class and module docstrings). Raises `OmniServerError`s.
        Closing the generator closes the connection, which makes the server abort the request."""
        body = self.request(conversation_messages(history, samples, rate), temperature=temperature, top_p=top_p,
                            max_tokens=max_tokens)
        with self._errors(), httpx.Client(timeout=self.timeout) as client:
            with client.stream("POST", self.url + CHAT_PATH, json=body,
                               headers={"Accept": "text/event-stream"}) as response:
                if response.status_code >= 400:
                    raise ServerHTTPError(response.status_code, error_message(response.read()), self.url)
                kind = response.headers.get("content-type", "")
                if not kind.startswith("text/event-stream"):
                    raise ServerStreamError(f"the server at {self.url} answered with {kind or 'no content type'}, "
                                            f"not an event stream: {response.read()[:200]!r}")
                yield from self._chunks(sse_events(response.iter_lines()))

    def _chunks(self, events):
        usage: dict = {}
        for data in events:
            if data == "[DONE]":
                yield OmniChunk(is_final=True, prompt_tokens=usage.get("prompt_tokens"),
                                completion_tokens=usage.get("completion_tokens"))
                return
            chunk = self._chunk(data, usage)
            if chunk is not None:
                yield chunk
        raise ServerStreamError(f"the server at {self.url} ended the answer's stream before its end (no [DONE]): "
                                "it may have stopped or restarted")

    def _chunk(self, data: str, usage: dict) -> OmniChunk | None:
        """One event's JSON -> an OmniChunk (None for an event with nothing new); `usage` is updated."""
        try:
            event = json.loads(data)
        except ValueError:
            raise ServerStreamError(f"the server sent an event that is not JSON: {data[:200]!r}") from None
        if not isinstance(event, dict):
            raise ServerStreamError(f"the server sent an event that is not a JSON object: {data[:200]!r}")
        if "error" in event:  # serving_chat.py: create_streaming_error_response, then [DONE]
            raise ServerStreamError(f"the server failed while answering: {error_message(data.encode())}")
        choices = event.get("choices")
        if not isinstance(choices, list):
            raise ServerStreamError(f"the server sent an event without choices: {data[:200]!r}")
        modality = event.get("modality") or "text"  # the closing finish_reason event has none (its default)
        if modality == "text" and isinstance(event.get("usage"), dict):  # audio events report 0 completion tokens
            usage.update({k: v for k, v in event["usage"].items() if isinstance(v, int)})
        choice = next((c for c in choices if isinstance(c, dict) and c.get("index", 0) == 0), None)
        if choice is None:
            return None  # the usage event (choices: [])
        content = (choice.get("delta") or {}).get("content") or ""
        chunk = OmniChunk(finish_reason=choice.get("finish_reason"), prompt_tokens=usage.get("prompt_tokens"),
                          completion_tokens=usage.get("completion_tokens"))
        if modality == "audio":
            if content:
                chunk.audio, chunk.sampling_rate = decode_audio(content, choice.get("audio_metadata"),
                                                                self.audio_format)
        elif modality == "text":
            if not isinstance(content, str):
                raise ServerStreamError(f"the server sent text that is not a string: {data[:200]!r}")
            chunk.text = content
        else:
            return None  # image, ...: not LLaMA-Omni's
        return chunk

    @contextmanager
    def _errors(self):
        """httpx's exceptions -> OmniServerErrors whose message names the server and says what to do."""
        try:
            yield
        except httpx.ConnectTimeout:
            raise ServerTimeout(f"the server at {self.url} did not accept a connection within "
                                f"{self.connect_timeout:g} s") from None
        except (httpx.ConnectError, httpx.UnsupportedProtocol) as error:
            raise ServerUnreachable(f"cannot reach the LLaMA-Omni server at {self.url} ({error}): is it running, "
                                    "and is the URL right?") from None
        except httpx.TimeoutException:
            raise ServerTimeout(f"the server at {self.url} sent nothing for {self.read_timeout:g} s: it may be "
                                "overloaded or stuck") from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as error:
            raise ServerStreamError(f"the connection to the server at {self.url} broke during the answer ({error}): "
                                    "it may have stopped or restarted") from None
        except httpx.HTTPError as error:
            raise OmniServerError(f"talking to the server at {self.url} failed: {error}") from None
