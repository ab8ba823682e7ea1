"""The served LLaMA-Omni pipeline as an outside user sees it: the official `openai` Python client, several spoken
questions streamed at once.

    .venv-serve/bin/python -m serving.openai_check WORKDIR [--timeout 900]
    .venv-serve/bin/python -m serving.openai_check WORKDIR --url http://127.0.0.1:8000 [--model NAME]

Without --url it builds the tiny serving checkpoint (serving/tiny_checkpoint.py), starts `python -m serving.pipeline
serve` on a free 127.0.0.1 port (serving.e2e_check.pipeline_server: stopped by process group however it ends) and
also computes each question's greedy answer in process (`generate`, the independent reference). With --url it checks
a server that is already running (e.g. `bash scripts/serve.sh MODEL`); the model name is then the first entry of
`/v1/models` unless --model says otherwise.

The checks, on `questions()` (four different synthetic "spoken" questions, each with its own max_tokens), greedy:
- `client.models.list()` lists the served name, and requests name it as `model`;
- each question alone through the repo's own client (llama_omni_hf.omni_client): the reference served answer;
- all questions at once, each its own `client.chat.completions.create(..., modalities=["text", "audio"],
  stream=True)` in its own thread: every stream yields text deltas and audio chunks (base64 WAV in
  `choices[0].delta.content` of events whose top-level `modality` is "audio", `audio_metadata.sample_rate_hz`
  16000), its text equals the omni_client answer (and, without --url, in-process `generate`'s) and its audio has
  as many samples;
- one question with `stream=False`: the response holds the same text and a WAV with as many samples.
Prints one JSON line (RESULT ...); exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import numpy as np

RATE = 16000
# The tiny checkpoint's random LLM answers every audio with the same greedy tokens, so each question also gets its
# own answer length: streams that got mixed up or swapped between requests then show in the text and the audio.
MAX_TOKENS = (24, 12, 20, 16)


def questions() -> list[np.ndarray]:
    """Four different 16 kHz questions (tones, a chirp, a two-tone pattern), 1.2-2.5 s."""
    rng = np.random.default_rng(1)

    def tone(freq, seconds, noise=0.03):
        t = np.arange(int(RATE * seconds)) / RATE
        return 0.3 * np.sin(2 * np.pi * freq * t) + noise * rng.standard_normal(t.shape)

    t = np.arange(int(RATE * 2.0)) / RATE
    chirp = 0.3 * np.sin(2 * np.pi * (150 + 400 * t) * t)
    pattern = np.concatenate([tone(500, 0.4), tone(900, 0.4), tone(300, 0.4)])
    return [np.asarray(q, np.float32) for q in (tone(220, 2.0), tone(660, 1.2), chirp, pattern)]


def wav_b64(samples: np.ndarray) -> str:
    from llama_omni_hf.omni_client import wav_base64

    return wav_base64(samples, RATE)


def audio_message(samples: np.ndarray) -> dict:
    return {"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": wav_b64(samples), "format": "wav"}}]}


def extra(obj, name):
    """A field the OpenAI types do not declare (vllm-omni's `modality`, `audio_metadata`): the openai package's
    models keep unknown fields, readable as attributes or through `model_extra`."""
    value = getattr(obj, name, None)
    if value is None:
        value = (getattr(obj, "model_extra", None) or {}).get(name)
    return value


def decode_wav(data: str, metadata) -> tuple[np.ndarray, int]:
    """One base64 audio payload (+ its audio_metadata) -> float32 samples, rate: omni_client's decoder."""
    from llama_omni_hf.omni_client import decode_audio

    if metadata is not None and not isinstance(metadata, dict):
        metadata = metadata.model_dump() if hasattr(metadata, "model_dump") else dict(metadata)
    return decode_audio(data, metadata, "wav")


def in_process_text(checkpoint: Path, samples: np.ndarray, max_tokens: int) -> str:
    """The independent reference: greedy `generate` in process, the answer's text (as serving.e2e_check)."""
    import torch

    from llama_omni_hf.modeling_llama_omni import LlamaOmniForConditionalGeneration
    from llama_omni_hf.processing_llama_omni import LlamaOmniProcessor

    processor = LlamaOmniProcessor.from_pretrained(checkpoint)
    model = LlamaOmniForConditionalGeneration.from_pretrained(checkpoint).eval()
    inputs = processor(audio=samples, sampling_rate=RATE, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, return_units=False)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    ids = [i for i in out[0, inputs["input_ids"].shape[1]:].tolist() if i not in eos]
    return processor.tokenizer.decode(ids, skip_special_tokens=True)


def openai_stream(client, model: str, samples: np.ndarray, max_tokens: int) -> dict:
    """One streamed answer with the openai client: text deltas and decoded audio chunks, as they come."""
    text, audio, rates, modalities = [], [], set(), set()
    events = audio_chunks = 0
    sent, first = time.monotonic(), None
    stream = client.chat.completions.create(
        model=model, messages=[audio_message(samples)], modalities=["text", "audio"], stream=True,
        temperature=0.0, top_p=1.0, max_tokens=max_tokens)
    with closing(stream):
        for chunk in stream:
            events += 1
            first = first if first is not None else time.monotonic()
            modality = extra(chunk, "modality") or "text"  # the closing finish_reason event has none
            modalities.add(modality)
            if not chunk.choices:
                continue  # a usage event
            choice = chunk.choices[0]
            content = choice.delta.content if choice.delta is not None else None
            if modality == "audio":
                if content:
                    samples_, rate = decode_wav(content, extra(choice, "audio_metadata"))
                    audio.append(samples_)
                    rates.add(rate)
                    audio_chunks += 1
            elif content:
                text.append(content)
    wav = np.concatenate(audio) if audio else np.zeros(0, np.float32)
    return {"text": "".join(text), "audio": wav, "audio_chunks": audio_chunks, "text_deltas": len(text),
            "rates": sorted(rates), "events": events, "modalities": sorted(modalities),
            "sent": sent, "first": first, "end": time.monotonic()}


def openai_full(client, model: str, samples: np.ndarray, max_tokens: int) -> dict:
    """One non-streamed answer: the text in `message.content`, the audio in `message.audio.data` (one WAV), in one
    choice or two (vllm-omni's serving_chat.py `chat_completion_full_generator`)."""
    response = client.chat.completions.create(
        model=model, messages=[audio_message(samples)], modalities=["text", "audio"], stream=False,
        temperature=0.0, top_p=1.0, max_tokens=max_tokens)
    text, audio, rates = [], [], set()
    for choice in response.choices:
        message = choice.message
        if message.content:
            text.append(message.content)
        if message.audio is not None and message.audio.data:
            samples_, rate = decode_wav(message.audio.data, extra(choice, "audio_metadata"))
            audio.append(samples_)
            rates.add(rate)
    wav = np.concatenate(audio) if audio else np.zeros(0, np.float32)
    return {"text": "".join(text), "audio": wav, "choices": len(response.choices), "rates": sorted(rates)}


def omni_client_answer(base: str, model: str, samples: np.ndarray, max_tokens: int) -> dict:
    from llama_omni_hf.omni_client import OmniClient

    text, audio, rates = [], [], set()
    with closing(OmniClient(base, model=model).stream([], samples, RATE, temperature=0.0, top_p=1.0,
                                                      max_tokens=max_tokens)) as chunks:
        for chunk in chunks:
            text.append(chunk.text)
            if chunk.audio is not None and len(chunk.audio):
                audio.append(np.asarray(chunk.audio))
                rates.add(chunk.sampling_rate)
    return {"text": "".join(text), "audio": np.concatenate(audio) if audio else np.zeros(0, np.float32),
            "rates": sorted(rates)}


def _audio_diff(a: np.ndarray, b: np.ndarray) -> float | None:
    return float(np.abs(a - b).max()) if a.size == b.size and a.size else None


def check_server(base: str, model: str | None, result: dict) -> None:
    """Everything against a running server at `base`; fills `result`."""
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="EMPTY", timeout=600, max_retries=0)
    served = [m.id for m in client.models.list().data]
    result["models"] = served
    model = model or served[0]
    result["model"] = model
    qs = questions()

    # the reference: each question alone, through the repo's own client
    reference = [omni_client_answer(base, model, q, n) for q, n in zip(qs, MAX_TOKENS)]

    # all questions at once, one openai stream each
    answers: list[dict | None] = [None] * len(qs)
    barrier = threading.Barrier(len(qs))

    def worker(i):
        try:
            barrier.wait()
            answers[i] = openai_stream(client, model, qs[i], MAX_TOKENS[i])
        except Exception as error:  # reported per question
            answers[i] = {"error": f"{type(error).__name__}: {error}"}

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(qs))]
    t0 = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result["concurrent_wall_s"] = round(time.monotonic() - t0, 2)
    ok_answers = [a for a in answers if a and "error" not in a]
    if ok_answers and len(ok_answers) == len(qs):
        # every request was sent before any answer ended: the server had all of them at once
        result["sent_together"] = max(a["sent"] for a in ok_answers) < min(a["end"] for a in ok_answers)
        # and (for information: the server takes requests in one by one, so a short answer may end first) every
        # stream had started before any ended
        firsts = [a["first"] for a in ok_answers]
        result["streams_overlapped"] = None not in firsts and max(firsts) < min(a["end"] for a in ok_answers)

    per_question = []
    for i, (ref, got) in enumerate(zip(reference, answers)):
        entry = {"reference_text": ref["text"], "reference_audio_samples": int(ref["audio"].size),
                 "reference_rates": ref["rates"]}
        if "error" in got:
            entry["error"] = got["error"]
        else:
            entry.update({k: got[k] for k in ("text", "audio_chunks", "text_deltas", "rates", "events",
                                              "modalities")})
            entry["audio_samples"] = int(got["audio"].size)
            entry["audio_max_diff"] = _audio_diff(got["audio"], ref["audio"])
        per_question.append(entry)
    result["streams"] = per_question

    full = openai_full(client, model, qs[0], MAX_TOKENS[0])
    result["non_streamed"] = {"text": full["text"], "choices": full["choices"], "rates": full["rates"],
                              "audio_samples": int(full["audio"].size),
                              "audio_max_diff": _audio_diff(full["audio"], reference[0]["audio"])}


def verdict(result: dict) -> list[str]:
    """The failed checks, in words (empty: all passed)."""
    failed = []
    if result.get("error"):
        failed.append(f"error: {result['error']}")
    if result.get("left_running"):
        failed.append(f"processes left running: {result['left_running']}")
    if result.get("model") not in (result.get("models") or []):
        failed.append(f"/v1/models {result.get('models')} does not list {result.get('model')!r}")
    streams = result.get("streams") or []
    if not streams:
        failed.append("no streams")
    elif not result.get("sent_together"):
        failed.append("the questions were not all in flight at once")
    expected = result.get("expected_texts")
    for i, s in enumerate(streams):
        name = f"question {i}"
        if "error" in s:
            failed.append(f"{name}: {s['error']}")
            continue
        if not s["text"] or not s["text_deltas"]:
            failed.append(f"{name}: no text streamed")
        if s["text"] != s["reference_text"]:
            failed.append(f"{name}: openai text {s['text']!r} != omni_client text {s['reference_text']!r}")
        if expected is not None and s["reference_text"] != expected[i]:
            failed.append(f"{name}: served text {s['reference_text']!r} != in-process {expected[i]!r}")
        if not s["audio_chunks"] or not s["audio_samples"]:
            failed.append(f"{name}: no audio streamed")
        if s["rates"] != [RATE] or s["reference_rates"] != [RATE]:
            failed.append(f"{name}: audio rates {s['rates']} / {s['reference_rates']}, not [{RATE}]")
        if s["audio_samples"] != s["reference_audio_samples"]:
            failed.append(f"{name}: {s['audio_samples']} audio samples, omni_client got "
                          f"{s['reference_audio_samples']}")
    full = result.get("non_streamed")
    if not full:
        failed.append("no non-streamed answer")
    else:
        if not streams or full["text"] != streams[0]["reference_text"]:
            failed.append(f"non-streamed text {full['text']!r} != the streamed answer's")
        if not full["audio_samples"] or full["rates"] != [RATE]:
            failed.append(f"non-streamed audio: {full['audio_samples']} samples at {full['rates']}")
        elif streams and full["audio_samples"] != streams[0]["reference_audio_samples"]:
            failed.append(f"non-streamed audio has {full['audio_samples']} samples, the streamed answer "
                          f"{streams[0]['reference_audio_samples']}")
    return failed


def run(workdir: Path, timeout: float, url: str | None, model: str | None) -> dict:
    result: dict = {"ok": False}
    if url:
        from llama_omni_hf.omni_client import base_url

        try:
            check_server(base_url(url), model, result)
        except Exception as error:
            result["error"] = f"{type(error).__name__}: {error}"
    else:
        from serving.e2e_check import pipeline_server
        from serving.tiny_checkpoint import build_tiny_serving_checkpoint

        checkpoint = build_tiny_serving_checkpoint(workdir / "ckpt")
        result["expected_texts"] = [in_process_text(checkpoint, q, n) for q, n in zip(questions(), MAX_TOKENS)]
        try:
            # pipeline_server serves it as "tiny-omni" (--served-model-name); /v1/models must say so
            with pipeline_server(checkpoint, workdir, timeout, result) as (base, _):
                check_server(base, None, result)
        except Exception as error:
            result["error"] = f"{type(error).__name__}: {error}"
    result["failed"] = verdict(result)
    result["distinct_texts"] = len({s.get("text") for s in result.get("streams") or []})
    result["ok"] = not result["failed"]
    log = workdir / "server.log"
    if not result["ok"] and log.exists():
        result["log_tail"] = log.read_text(errors="replace")[-6000:]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--timeout", type=float, default=900, help="server start-up limit (s), without --url")
    parser.add_argument("--url", help="check this running server instead of starting one")
    parser.add_argument("--model", help="the served model name (default: the first of /v1/models)")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = run(args.workdir, args.timeout, args.url, args.model)
    print("\nRESULT " + json.dumps(result))  # on its own line (a library may have left a prompt unterminated)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
