"""LLaMA-Omni in the browser: ask by voice, read and hear the answer while it is generated.

    python app.py [--model DIR_OR_HUB_ID|tiny-omni2] [--device auto] [--dtype auto] [--share]
                  [--server-name 0.0.0.0] [--server-port 7860]
    python app.py --backend http://127.0.0.1:8000   # answers from a LLaMA-Omni server on vLLM-Omni (issue 12)

One process (the original needs a controller, a worker and a web server). It serves either family, told
apart by the loaded config's `model_type`: LLaMA-Omni ("llama_omni", 16 kHz speech, chunk size Ω) and
LLaMA-Omni2 ("llama_omni2", 24 kHz speech, a voice). Without `--model` (or `LLAMA_OMNI_MODEL`) it runs the
embedded tiny LLaMA-Omni checkpoint with RANDOM weights, and `--model tiny-omni2` the tiny LLaMA-Omni2 one:
the pipeline is real (streaming text, streaming speech, latencies, multi-turn), the answers are noise. The
same file is the entry of a Hugging Face Space (ZeroGPU through the `spaces` package when it is installed).
With `--backend URL` (or `LLAMA_OMNI_BACKEND`) nothing is loaded in-process: the same page streams the text and
speech of a vLLM-Omni server's `/v1/chat/completions` (llama_omni_hf/omni_client.py), many users at once.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
import threading
import time
import wave
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import gradio as gr
import numpy as np

from llama_omni_hf.audio_io import AudioFileError, load_audio
from llama_omni_hf.cli import load_model
from llama_omni_hf.omni_client import OmniClient, OmniServerError, ServerHTTPError

try:  # ZeroGPU Spaces: a GPU is attached while an answer streams; elsewhere a no-op
    import spaces

    gpu = spaces.GPU(duration=120)
except ImportError:
    def gpu(function):
        return function

SAMPLE_RATE = 16000  # of the speech the model hears (and LLaMA-Omni says; the chunks carry their own rate)
MAX_SECONDS = 30  # Whisper's window: the processor keeps only the first 30 s of a question
TRAINED_CONTEXT = 2048  # original `tokenizer_model_max_length`: the released model never saw longer inputs
TINY_OMNI2 = "tiny-omni2"  # --model name of the embedded tiny random-weight LLaMA-Omni2 checkpoint
FAMILIES = {"llama_omni": "LLaMA-Omni", "llama_omni2": "LLaMA-Omni2"}  # config.model_type -> name
TYPICAL_ANSWER = 100  # tokens, about four spoken sentences: what "turns that fit" assumes
MIN_ANSWER = 16  # fewer free positions than this and the conversation is full
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
EXAMPLES = sorted(str(p) for p in (Path(__file__).resolve().parent / "examples").glob("*.wav"))
TINY_BANNER = (
    "**Embedded tiny checkpoint with RANDOM weights.** It demonstrates the pipeline only: text and speech "
    "stream and the latencies are measured, but the answers are noise. Run `python app.py --model "
    "<converted checkpoint directory or hub id>` (or set `LLAMA_OMNI_MODEL`) for real answers."
)
BACKEND_CONCURRENCY = 16  # answers streamed at once with --backend: the server batches them (the queue holds 32)


def family(model) -> str:
    """"llama_omni" or "llama_omni2", from the loaded model's config (never from its name)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"the app serves LLaMA-Omni and LLaMA-Omni2 checkpoints (model_type "
                         f"{' or '.join(map(repr, FAMILIES))}), not model_type {model_type!r}")
    return model_type


@dataclass
class Settings:
    chunk_size: int = 10  # LLaMA-Omni: Omega, units per vocoder call; no seams at any value (vocoded with context)
    temperature: float = 0.2  # a little sampling: 0 (greedy, the original's script) makes small models loop
    top_p: float = 0.7
    max_new_tokens: int = 256
    speaker: str | None = None  # LLaMA-Omni2: one of the checkpoint's voices (None: its default)
    seed: int | None = None  # LLaMA-Omni2: seeds the TTS sampling and HiFT (None: torch's global generator)

    def generation_kwargs(self) -> dict:
        sampling = dict(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        return dict(sampling if self.temperature > 0 else dict(do_sample=False), max_new_tokens=self.max_new_tokens)


@dataclass
class Turn:
    """One finished exchange: the question's audio (at most 30 s) and the model's text answer."""

    audio: np.ndarray
    rate: int
    path: str | None  # the uploaded or recorded file, shown in the conversation
    text: str
    meta: str  # the latency line shown under the answer


@dataclass
class Update:
    """The answer so far; `audio` holds only the samples new since the previous update."""

    text: str
    audio: np.ndarray
    first_text: float | None  # seconds from the question's arrival
    first_audio: float | None
    elapsed: float
    tokens: int
    samples: int
    context: int  # positions used by the conversation including this answer
    done: bool = False
    rate: int | None = None  # of `audio`, from the chunks (16000 LLaMA-Omni, 24000 LLaMA-Omni2; None: no speech)
    setting: str = ""  # the family's own setting, shown in the latency line ("Ω 10", "voice en")

    def meta(self, max_context: int, note: str = "", stopped: bool = False) -> str:
        seconds = lambda value: "-" if value is None else f"{value:.2f} s"  # noqa: E731
        spoken = self.samples / self.rate if self.rate else 0.0
        parts = [f"first text {seconds(self.first_text)}", f"first audio {seconds(self.first_audio)}",
                 f"{self.tokens} tokens and {spoken:.1f} s of speech in {self.elapsed:.1f} s",
                 *([self.setting] if self.setting else []),
                 f"context {self.context}" + (f"/{max_context}" if max_context else "")]
        return ("*Latency: " + " · ".join(parts) + (" · stopped*" if stopped else "*")
                + (f"\n\n**Note:** {note}" if note else ""))


class Assistant:
    """Model + processor + the conversation rules (30 s per question, the trained context).

    `max_context` (default: the trained window) bounds prompt + answer. LLaMA-Omni: the tokenizer's
    `model_max_length` (2048 for the release). LLaMA-Omni2: `config.max_prompt_length` (4096), which is also a
    ceiling: the model cuts longer prompts from the FRONT (as the original), which would silently drop the
    conversation's start and, in the end, the generation prompt; the app asks for a new conversation instead.
    """

    def __init__(self, model, processor, max_context: int | None = None):
        self.model, self.processor = model, processor
        self.family = family(model)
        self.omni2 = self.family == "llama_omni2"
        self.name = FAMILIES[self.family]
        if self.omni2:
            self.trained_context = int(model.config.max_prompt_length)
        else:
            trained = processor.tokenizer.model_max_length
            self.trained_context = trained if trained <= 131072 else TRAINED_CONTEXT  # else: the tokenizer's "no limit"
        if max_context is not None and self.omni2 and max_context > self.trained_context:
            raise ValueError(f"a context of {max_context} positions does not fit LLaMA-Omni2's prompt window: the "
                             f"model keeps only the last {self.trained_context} (config.max_prompt_length) and would "
                             "silently drop the conversation's start")
        self.max_context = self.trained_context if max_context is None else max_context
        token2wav = getattr(model, "token2wav", None) if self.omni2 else None
        self.speakers = list(token2wav.config.speakers) if token2wav is not None else []
        self.default_speaker = token2wav.config.default_speaker if token2wav is not None else None
        self.speech_positions = int(getattr(model.config, "speech_tokens_per_audio", 300))
        probe = np.random.default_rng(0).uniform(-0.1, 0.1, SAMPLE_RATE // 10).astype(np.float32)
        length = lambda history: self.inputs(history, probe)["input_ids"].shape[1]  # noqa: E731
        self.first_turn = length([])  # positions of a first question's prompt, then what a follow-up adds
        self.next_turn = length([Turn(probe, SAMPLE_RATE, None, "", "")]) - self.first_turn

    def turns_left(self, used: int = 0, answer: int = TYPICAL_ANSWER) -> int:
        """How many more questions with `answer`-token answers fit after `used` positions."""
        first = self.first_turn + answer if used == 0 else self.next_turn + answer
        free = self.max_context - used
        return 0 if free < first else 1 + (free - first) // (self.next_turn + answer)

    @staticmethod
    def read_question(path) -> tuple[np.ndarray, int, str]:
        """Audio file -> (samples cut to 30 s, rate, a note saying what was cut); AudioFileError if unreadable."""
        try:
            samples, rate = load_audio(path)
        except AudioFileError as error:  # the server's temp path means nothing to the user: keep the name
            raise AudioFileError(str(error).replace(str(path), Path(path).name)) from None
        seconds = samples.shape[-1] / rate
        note = ""
        if seconds > MAX_SECONDS:
            note = (f"The question lasts {seconds:.1f} s; only its first {MAX_SECONDS} s were heard "
                    f"(the last {seconds - MAX_SECONDS:.1f} s were ignored).")
            samples = samples[..., : MAX_SECONDS * rate]
        return samples, rate, note

    def inputs(self, history: list[Turn], samples: np.ndarray, rate: int = SAMPLE_RATE):
        """Every earlier question (audio) and answer (text), then the new question -> model inputs."""
        ask = lambda audio, rate: {"role": "user", "content": [  # noqa: E731
            {"type": "audio", "audio": audio, "sampling_rate": rate}]}
        conversation = [m for t in history for m in (ask(t.audio, t.rate), {"role": "assistant", "content": t.text})]
        try:
            return self.processor.apply_chat_template(conversation + [ask(samples, rate)], add_generation_prompt=True,
                                                      tokenize=True, return_dict=True, return_tensors="pt")
        except ValueError as error:  # earlier turns were checked when asked: the new question is at fault
            raise ValueError(re.sub(r"audio\[\d+\]", "the question", str(error))) from None

    def answer(self, history: list[Turn], samples: np.ndarray, rate: int, settings: Settings,
               started: float | None = None):
        """Stream one answer as `Update`s. Closing this generator stops generation at the next step."""
        started = time.perf_counter() if started is None else started
        inputs = self.inputs(history, samples, rate).to(self.model.device)
        prompt = int(inputs["input_ids"].shape[1])
        budget = self.max_context - prompt
        if budget < MIN_ANSWER:
            raise ValueError(f"This conversation is full: with this question it takes {prompt} of the "
                             f"{self.max_context} positions the model was trained on, leaving no room for an "
                             "answer. Press “New conversation”.")
        options = replace(settings, max_new_tokens=min(settings.max_new_tokens, budget)).generation_kwargs()
        if self.omni2:  # no Ω: the read/write schedule decides when speech comes
            if settings.speaker:
                options["speaker"] = settings.speaker
            if settings.seed is not None:
                options["seed"] = settings.seed
            voice = settings.speaker or self.default_speaker
            setting = f"voice {voice}" if voice else ""
        else:
            options.update(chunk_size=settings.chunk_size)
            setting = f"Ω {settings.chunk_size}"
        stream = self.model.generate_stream(**inputs, tokenizer=self.processor.tokenizer, **options)
        update = Update("", np.zeros(0, np.float32), None, None, 0.0, 0, 0, prompt, setting=setting)
        with closing(stream):
            for chunk in stream:
                now, audio = time.perf_counter() - started, chunk.audio.numpy()
                update.text, update.audio, update.rate = update.text + chunk.text, audio, chunk.sampling_rate
                update.tokens, update.samples = update.tokens + len(chunk.token_ids), update.samples + len(audio)
                if update.first_text is None and update.text.strip():
                    update.first_text = now
                if update.first_audio is None and len(audio):
                    update.first_audio = now
                update.elapsed, update.context, update.done = now, prompt + update.tokens, chunk.is_final
                if chunk.text or len(audio) or chunk.is_final:  # units alone change nothing on screen
                    yield replace(update)  # a snapshot: callers may keep it


class RemoteAssistant:
    """The Assistant's part of the app answered by a LLaMA-Omni server on vLLM-Omni (`--backend URL`, issue 12).

    Nothing is loaded here: each question goes, with the conversation so far (earlier questions as audio, earlier
    answers as text), to the server's `/v1/chat/completions`, and its streamed text and speech come back as
    `Update`s. The server's deploy config sets the chunk size Ω and the voice; temperature, top-p and max new
    tokens go with each question. `max_context` is the server's `max_model_len` (None: it did not say), and the
    server, not the app, refuses a conversation that no longer fits.
    """

    omni2, speakers, default_speaker = False, [], None  # the page shows no Ω and no voice: the server's settings
    speech_positions = 300  # what one spoken question takes in LLaMA-Omni's prompt (speech_tokens_per_audio)
    read_question = staticmethod(Assistant.read_question)

    def __init__(self, client: OmniClient):
        self.client, self.name, self.model, self.max_context, self.unreachable = client, "LLaMA-Omni", None, None, ""
        self.refresh()

    @property
    def trained_context(self):
        return self.max_context

    def refresh(self):
        """Ask the server which model it serves and its context (`/v1/models`); remember why if it did not say."""
        try:
            card = next(iter(self.client.models()), {})
        except OmniServerError as error:
            self.unreachable = str(error)
            return
        self.model, self.max_context, self.unreachable = card.get("id"), card.get("max_model_len"), ""

    def banner(self) -> str:
        if self.unreachable:
            return (f"**Answers come from the LLaMA-Omni server at {self.client.url}, which did not answer when the "
                    f"app started** ({self.unreachable}). Questions are sent to it once it is up; nothing is loaded "
                    "in this process.")
        context = f", {self.max_context} positions of context" if self.max_context else ""
        return (f"**Answers come from the LLaMA-Omni server at {self.client.url}** (model `{self.model}`{context}). "
                "Nothing is loaded in this process; the server's deploy config sets the chunk size Ω and the voice.")

    def context_info(self, used: int = 0) -> str:
        limit = f"of {self.max_context} positions (the server's limit)" if self.max_context else "positions used"
        return (f"Context: {used} {limit}. Each spoken question takes {self.speech_positions} positions plus its "
                "prompt and answer; when the conversation no longer fits, the server says so: then press “New "
                "conversation”.")

    def answer(self, history: list[Turn], samples: np.ndarray, rate: int, settings: Settings,
               started: float | None = None):
        """Stream one answer from the server as `Update`s. Closing this generator closes the connection, which
        makes the server abort the request."""
        started = time.perf_counter() if started is None else started
        if np.abs(samples).max() < 1e-4:  # as the processor (in-process): no request for a silent question
            raise ValueError("the question is silent (peak below 1e-4): there is no speech to answer")
        if self.unreachable:
            self.refresh()  # the server may have come up since: its context limit for the latency line
        stream = self.client.stream(history, samples, rate, temperature=settings.temperature, top_p=settings.top_p,
                                    max_tokens=settings.max_new_tokens)
        update = Update("", np.zeros(0, np.float32), None, None, 0.0, 0, 0, 0,
                        setting=f"via {urlsplit(self.client.url).netloc}")
        with closing(self._full_conversation_hint(stream)) as chunks:  # closing it closes the client's stream
            for chunk in chunks:
                now = time.perf_counter() - started
                update.text, update.audio = update.text + chunk.text, chunk.audio
                update.rate = chunk.sampling_rate or update.rate  # the rate the server's audio chunks state
                # the server's count (usage); without it, one token per text delta (vLLM's stream_interval 1)
                update.tokens = chunk.completion_tokens if chunk.completion_tokens is not None else (
                    update.tokens + bool(chunk.text))
                update.samples += len(chunk.audio)
                if update.first_text is None and update.text.strip():
                    update.first_text = now
                if update.first_audio is None and len(chunk.audio):
                    update.first_audio = now
                update.elapsed, update.done = now, chunk.is_final
                update.context = (chunk.prompt_tokens or 0) + update.tokens
                if chunk.text or len(chunk.audio) or chunk.is_final:
                    yield replace(update)

    @staticmethod
    def _full_conversation_hint(stream):
        """vLLM refuses a prompt over max_model_len ("maximum context length"): say what to do, as in-process."""
        try:
            yield from stream
        except ServerHTTPError as error:
            if "context length" not in error.message:
                raise
            raise OmniServerError(f"{error} This conversation is full: press “New conversation”.") from None


def pcm16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2")


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """16-bit mono WAV at `rate`: Gradio streams it without re-encoding or per-chunk peak normalization."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1), writer.setsampwidth(2), writer.setframerate(rate)
        writer.writeframes(pcm16(samples).tobytes())
    return buffer.getvalue()


def chat_messages(history: list[Turn], path: str | None = None, text: str | None = None, meta: str = "") -> list[dict]:
    messages = []
    pending = [] if text is None else [Turn(np.zeros(0), SAMPLE_RATE, path, text, meta)]
    for turn in history + pending:
        if turn.path:
            messages.append({"role": "user", "content": {"path": turn.path}})
        text = CONTROL_CHARACTERS.sub("", turn.text)  # a random-weight model emits them; they render as boxes
        messages.append({"role": "assistant", "content": text + (f"\n\n{turn.meta}" if turn.meta else "")})
    return messages


def context_info(assistant: Assistant | RemoteAssistant, used: int = 0) -> str:
    if isinstance(assistant, RemoteAssistant):
        return assistant.context_info(used)
    trained = " (what the released model was trained on)" if assistant.max_context == assistant.trained_context else ""
    return (f"Context: {used} of {assistant.max_context} positions{trained}. Each spoken question takes "
            f"{assistant.speech_positions} positions plus "
            f"its prompt and answer: with ~{TYPICAL_ANSWER}-token answers, about **{assistant.turns_left(used)} more turn(s)** fit"
            + (" in a new conversation." if used == 0 else "."))


class Handlers:
    """The app's event handlers; `generate` streams `Update`s (the ZeroGPU-decorated part)."""

    def __init__(self, assistant: Assistant, generate):
        self.assistant, self.generate = assistant, generate
        self.stops: dict[str, threading.Event] = {}  # session -> its Stop button was pressed

    def respond(self, path, history, chunk_size, temperature, top_p, max_new_tokens, voice=None,
                request: gr.Request = None):
        """Yields (conversation, new speech, history, context line) while the answer streams."""
        started = time.perf_counter()
        stop = self.stops.setdefault(request.session_hash, threading.Event())
        stop.clear()
        settings = Settings(int(chunk_size), float(temperature), float(top_p), int(max_new_tokens),
                            speaker=voice or None)
        update = None
        try:
            if not path:
                raise ValueError("No question yet: record one with the microphone or upload an audio file.")
            samples, rate, note = self.assistant.read_question(path)
            if note:
                gr.Warning(note)
            spoken = []  # every streamed piece, for the whole answer at the end
            with closing(self.generate(history, samples, rate, settings, started)) as updates:
                yield chat_messages(history, path, "…"), gr.skip(), history, gr.skip(), None
                for update in updates:
                    meta = update.meta(self.assistant.max_context, note, stop.is_set())
                    spoken.append(update.audio)
                    # the player keeps going; each piece carries the model's own rate (16 or 24 kHz)
                    audio = wav_bytes(update.audio, update.rate) if len(update.audio) else gr.skip()
                    yield chat_messages(history, path, update.text or "…", meta), audio, history, gr.skip(), gr.skip()
                    if stop.is_set():
                        break  # leaving the `with` closes the stream: generation ends at its next step
        except (ValueError, OmniServerError) as error:  # bad audio; a full conversation; --backend: the server's
            gr.Warning(str(error))  # a toast, and a notice under the conversation that is not part of it
            said = CONTROL_CHARACTERS.sub("", update.text) if update is not None else ""  # a server that broke off
            notice = {"role": "assistant", "content": f"{said}\n\n**The answer broke off:** {error}" if said
                      else f"**Cannot answer:** {error}"}
            yield chat_messages(history) + [notice], gr.skip(), history, gr.skip(), None
            return
        meta = update.meta(self.assistant.max_context, note, stopped=not update.done)
        history = history + [Turn(samples, rate, path, update.text, meta)]
        whole = np.concatenate(spoken) if spoken else np.zeros(0, np.float32)
        full_answer = (update.rate, pcm16(whole)) if len(whole) else None
        yield chat_messages(history), gr.skip(), history, context_info(self.assistant, update.context), full_answer

    def respond_to_change(self, path, history, chunk_size, temperature, top_p, max_new_tokens, voice=None,
                          request: gr.Request = None):
        """Recording stopped, file uploaded or example picked: answer. Input cleared: nothing to do."""
        if not path:
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        yield from self.respond(path, history, chunk_size, temperature, top_p, max_new_tokens, voice, request)

    def stop(self, request: gr.Request):
        self.stops.setdefault(request.session_hash, threading.Event()).set()

    def new_conversation(self):
        return [], [], None, context_info(self.assistant), None


def build_demo(assistant: Assistant | RemoteAssistant, banner: str = "", concurrency_limit: int = 1) -> gr.Blocks:
    remote = isinstance(assistant, RemoteAssistant)

    def generate(history, samples, rate, settings, started):
        yield from assistant.answer(history, samples, rate, settings, started)

    # plain-data arguments and results: ZeroGPU runs the in-process answer in a worker process with a GPU
    handlers = Handlers(assistant, generate if remote else gpu(generate))
    with gr.Blocks(title=assistant.name) as demo:
        gr.Markdown(f"# {assistant.name}\nAsk a question out loud: the answer's text appears and its speech plays "
                    "while the model is still generating. Earlier turns stay in the conversation.")
        if banner:
            gr.Markdown(banner, elem_id="banner")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chat", height=420)
                info = gr.Markdown(context_info(assistant), label="Context", elem_id="context-info")
            with gr.Column(scale=2):
                question = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Your question",
                                    elem_id="question")
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    new = gr.Button("New conversation", elem_id="new")
                speech = gr.Audio(label="Spoken answer", streaming=True, autoplay=True, interactive=False,
                                  elem_id="answer-audio")
                # the whole answer once it is complete: to replay or download it, and for API clients
                full_answer = gr.Audio(label="Whole spoken answer", type="numpy", format="wav", interactive=False,
                                       elem_id="full-answer")
                with gr.Accordion("Generation settings", open=False):
                    chunk_size = gr.Slider(1, 500, Settings.chunk_size, step=1, label="Chunk size Ω (units)",
                                           info="Units per vocoder call: smaller = earlier first audio, more calls",
                                           visible=not assistant.omni2 and not remote,  # LLaMA-Omni in-process
                                           elem_id="chunk-size")
                    # LLaMA-Omni2's voices (the token-to-wave's speaker x-vectors); ignored by LLaMA-Omni
                    voice = gr.Dropdown(assistant.speakers, value=assistant.default_speaker, label="Voice",
                                        info="The speaker of the spoken answer", elem_id="voice",
                                        visible=len(assistant.speakers) > 1)
                    temperature = gr.Slider(0, 1, Settings.temperature, step=0.05, label="Temperature",
                                            info="0 = greedy")
                    top_p = gr.Slider(0.05, 1, Settings.top_p, step=0.05, label="Top-p")
                    max_new_tokens = gr.Slider(16, 1024, Settings.max_new_tokens, step=8, label="Max new tokens")
                gr.Examples([[p] for p in EXAMPLES], inputs=[question],
                            label="Spoken examples (espeak-ng; `bash scripts/make_examples.sh` remakes them)")
        inputs = [question, history, chunk_size, temperature, top_p, max_new_tokens, voice]
        model_event = dict(concurrency_limit=concurrency_limit, concurrency_id="model")  # one model: one queue
        answer = dict(outputs=[chatbot, speech, history, info, full_answer], show_progress="minimal", **model_event)
        ask.click(handlers.respond, inputs, api_name="answer", **answer)
        question.change(handlers.respond_to_change, inputs, api_visibility="private", **answer)
        stop.click(handlers.stop, api_name="stop", queue=False)
        # stop a running answer, then reset once it has ended (so it cannot write into the new conversation)
        new.click(handlers.stop, api_visibility="private", queue=False).then(
            handlers.new_conversation, None, [chatbot, history, speech, info, full_answer], api_name="new_conversation",
            **model_event)
    demo.queue(max_size=32)
    return demo


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("LLAMA_OMNI_MODEL"),
                        help="local directory or hub id of a LLaMA-Omni or LLaMA-Omni2 checkpoint; "
                             f"{TINY_OMNI2!r} = the embedded tiny random-weight LLaMA-Omni2 (default: the embedded "
                             "tiny random-weight LLaMA-Omni)")
    parser.add_argument("--device", default="auto", help="auto = cuda when available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--max-context", type=int, default=None,
                        help="positions a conversation may use (default: the context the model was trained on: "
                             "the tokenizer's model_max_length for LLaMA-Omni, 2048 for the release; "
                             "config.max_prompt_length for LLaMA-Omni2, 4096, also its ceiling)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--server-name", default=None, help="e.g. 0.0.0.0 to listen on every interface")
    parser.add_argument("--server-port", type=int, default=None)
    parser.add_argument("--backend", default=os.environ.get("LLAMA_OMNI_BACKEND") or None, metavar="URL",
                        help="answer from a LLaMA-Omni server on vLLM-Omni (its OpenAI-compatible "
                             "/v1/chat/completions, e.g. http://127.0.0.1:8000) instead of loading a model here; "
                             "env LLAMA_OMNI_BACKEND")
    parser.add_argument("--backend-timeout", type=float, default=120.0, metavar="SECONDS",
                        help="--backend: the longest wait for the server's next piece of an answer (default 120)")
    return parser.parse_args(argv)


def serve_backend(args):
    """`--backend URL`: the page, answered by the server; no model, no torch work in this process."""
    if args.model:
        print(f"[llama-omni] --backend {args.backend}: the server answers; --model/LLAMA_OMNI_MODEL ({args.model}) "
              "is not loaded", file=sys.stderr)
    try:
        assistant = RemoteAssistant(OmniClient(args.backend, read_timeout=args.backend_timeout))
    except ValueError as error:  # not a URL
        sys.exit(f"app.py: error: --backend: {error}")
    if assistant.unreachable:
        print(f"[llama-omni] {assistant.unreachable}; starting anyway", file=sys.stderr)
    demo = build_demo(assistant, banner=assistant.banner(), concurrency_limit=BACKEND_CONCURRENCY)
    demo.launch(server_name=args.server_name, server_port=args.server_port, share=args.share, show_error=True)


def main(argv=None):
    args = parse_args(argv)
    if args.backend:
        return serve_backend(args)
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    model_id, tiny = args.model, args.model in (None, TINY_OMNI2)
    if model_id == TINY_OMNI2 and not Path(model_id).is_dir():
        from llama_omni_hf.tiny import default_tiny_omni2_checkpoint

        model_id = str(default_tiny_omni2_checkpoint())
        print(f"[llama-omni] using the embedded TINY RANDOM-WEIGHT LLaMA-Omni2 checkpoint at {model_id}: it "
              "demonstrates the pipeline only, its answers are noise.", file=sys.stderr)
    model, processor = load_model(model_id, device, args.dtype)
    try:
        assistant = Assistant(model, processor, args.max_context)
    except ValueError as error:  # not a LLaMA-Omni model; a context the model cannot take
        sys.exit(f"app.py: error: {error}")
    demo = build_demo(assistant, banner=TINY_BANNER if tiny else "")
    demo.launch(server_name=args.server_name, server_port=args.server_port, share=args.share, show_error=True)


if __name__ == "__main__":
    main()
