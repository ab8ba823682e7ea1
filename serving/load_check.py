"""Load and fault check of the LLaMA-Omni pipeline on vLLM-Omni (issue 12, item 5), one server start.

The tiny serving checkpoint served by `python -m serving.pipeline serve` on 127.0.0.1, then:

- 1, 4 and 8 concurrent streamed questions (threads, each its own llama_omni_hf.omni_client), SAMPLED
  (temperature 1) with a different `seed` per request (vLLM's ChatCompletionRequest.seed, passed on to the
  thinker by vllm-omni's `_apply_request_overrides`) and a different question, so answers differ and cross-talk
  would show. `return_token_ids` gives each stream's served token ids. Per stream: first text / first audio /
  last text times.
- No cross-talk: each request's OWN served ids are teacher-forced through the in-process HF model (one forward
  over prompt + answer, final-norm rows from the last prompt row on) and BatchedUnit2Wav is run on those rows
  alone, in the increments stage 1 consumed for that request (the server's LLAMA_OMNI_SERVING_TRACE: the
  producer coalesces rows by time); the served audio must equal it to 16-bit WAV rounding.
  Where the smallest CTC top-1/top-2 logit margin of that reference run is below MARGIN (vLLM's states differ
  from HF's by ~1e-4, so a unit may flip there), only the audio length is compared (flagged `tiny_margin`).
- A client that closes its stream after its first text chunk while 3 others run: the others still match, stage 1
  logs the freeing of every one of the four (the closed one `aborted`, or `cancelled` when the abort came before
  any of its rows reached stage 1) with 0 requests left active, and a later
  request succeeds. (vLLM's /metrics request gauges are not used: when the server goes idle they keep the
  values of the last busy step.)
- Bad audio (zero-length WAV, corrupt base64, non-WAV bytes, 31 s, a float WAV holding NaN): the response
  (HTTP status and body, or in-stream error events) and whether the server still answers afterwards.

    .venv-serve/bin/python -m serving.load_check WORKDIR [--timeout 900]

Prints one JSON line `RESULT {...}`; the server is stopped by PID (its process group).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import numpy as np

from serving.e2e_check import (increments_for, pipeline_server, question, replay, served_increments,
                               stage1_rows)

MAX_TOKENS = 24
MARGIN = 1e-3  # CTC top-1/top-2 logit margin below which a served unit may legitimately differ
AUDIO_TOL = 1e-4  # 16-bit WAV rounding (3.05e-5) with room


def _client_cls():
    from llama_omni_hf.omni_client import OmniClient

    class SeededClient(OmniClient):
        """OmniClient sending `seed` and `return_token_ids`, keeping the served token ids."""

        def __init__(self, *args, seed: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.seed, self.token_ids, self.response_ids = seed, [], set()

        def request(self, messages, **kwargs):
            return {**super().request(messages, **kwargs), "seed": self.seed, "return_token_ids": True}

        def _chunk(self, data, usage):
            try:
                event = json.loads(data)
            except ValueError:
                event = None
            if isinstance(event, dict) and event.get("id"):
                self.response_ids.add(str(event["id"]))
            if isinstance(event, dict) and (event.get("modality") or "text") == "text":
                for choice in event.get("choices") or []:
                    if isinstance(choice, dict) and choice.get("index", 0) == 0:
                        ids = choice.get("token_ids") or (choice.get("delta") or {}).get("token_ids") or []
                        self.token_ids += list(ids)
            return super()._chunk(data, usage)

    return SeededClient


def stream_one(base: str, wav: np.ndarray, seed: int, barrier=None, close_after_text: int | None = None) -> dict:
    client = _client_cls()(base, model="tiny-omni", seed=seed)
    out = {"seed": seed, "text": "", "first_text_s": None, "first_audio_s": None, "last_text_s": None,
           "audio_chunks": 0, "closed_early": False}
    audio, rates = [], set()
    if barrier is not None:
        barrier.wait()
    t0 = time.monotonic()
    try:
        with closing(client.stream([], wav, 16000, temperature=1.0, top_p=1.0, max_tokens=MAX_TOKENS)) as chunks:
            texts = 0
            for chunk in chunks:
                now = round(time.monotonic() - t0, 3)
                if chunk.text:
                    out["text"] += chunk.text
                    out["first_text_s"] = out["first_text_s"] if out["first_text_s"] is not None else now
                    out["last_text_s"] = now
                    texts += 1
                if chunk.audio is not None and len(chunk.audio):
                    out["first_audio_s"] = out["first_audio_s"] if out["first_audio_s"] is not None else now
                    audio.append(np.asarray(chunk.audio, np.float32))
                    rates.add(chunk.sampling_rate)
                    out["audio_chunks"] += 1
                if chunk.finish_reason:
                    out["finish_reason"] = chunk.finish_reason
                if close_after_text is not None and texts >= close_after_text:
                    out["closed_early"] = True
                    break
    except Exception as error:
        out["error"] = f"{type(error).__name__}: {error}"
    out["total_s"] = round(time.monotonic() - t0, 3)
    out["token_ids"] = client.token_ids
    out["response_ids"] = sorted(client.response_ids)
    out["rates"] = sorted(rates)
    out["_audio"] = np.concatenate(audio) if audio else np.zeros(0, np.float32)
    return out


def concurrent(base: str, jobs: list[dict]) -> list[dict]:
    barrier = threading.Barrier(len(jobs))
    results: list = [None] * len(jobs)

    def work(i, job):
        results[i] = stream_one(base, barrier=barrier, **job)

    threads = [threading.Thread(target=work, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


class Reference:
    """In-process teacher forcing: served ids -> final-norm rows -> BatchedUnit2Wav audio (and CTC margin)."""

    def __init__(self, checkpoint: Path):
        import torch

        from llama_omni_hf.modeling_llama_omni import LlamaOmniForConditionalGeneration
        from llama_omni_hf.processing_llama_omni import LlamaOmniProcessor

        self.torch = torch
        self.processor = LlamaOmniProcessor.from_pretrained(checkpoint)
        self.model = LlamaOmniForConditionalGeneration.from_pretrained(checkpoint).eval()
        self.margins: list[float] = []
        self.model.unit_decoder.output_proj.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        top2 = output.float().topk(2, dim=-1).values
        self.margins.append(float((top2[..., 0] - top2[..., 1]).min()))

    def audio(self, wav: np.ndarray, ids: list[int], increments: list[tuple[int, bool]]) -> tuple[np.ndarray, float]:
        torch = self.torch
        inputs = self.processor(audio=wav, sampling_rate=16000, return_tensors="pt")
        prompt = inputs["input_ids"]
        prompt_len = prompt.shape[1]
        full = torch.cat([prompt, torch.tensor([ids], dtype=prompt.dtype)], dim=1)
        self.margins = []
        rows = stage1_rows(self.model, full, inputs["input_features"], prompt_len)
        audio, _ = replay(self.model, rows, increments)  # in the increments stage 1 consumed them
        return audio, (min(self.margins) if self.margins else float("inf"))


def compare(reference: Reference, wav: np.ndarray, served: dict, trace: Path) -> dict:
    """Served audio vs BatchedUnit2Wav on the teacher-forced rows of the request's own served ids, fed in the
    increments stage 1 consumed for THIS request (the server's trace)."""
    audio = served.pop("_audio")
    served["audio_samples"] = int(audio.size)
    ids = served["token_ids"]
    if not ids:
        return {"match": False, "why": "no served token ids"}
    increments = increments_for(served_increments(trace), served["response_ids"][0]) \
        if len(served["response_ids"]) == 1 else None
    if increments is None:
        return {"match": False, "why": f"no single traced stage-1 request for {served['response_ids']}"}
    try:
        expected, margin = reference.audio(wav, ids, increments)
    except ValueError as error:
        return {"match": False, "why": str(error)}
    check = {"served_samples": int(audio.size), "expected_samples": int(expected.size), "min_margin": margin,
             "tiny_margin": margin < MARGIN}
    if audio.size == expected.size:
        check["max_diff"] = float(np.abs(audio - expected).max()) if audio.size else 0.0
    exact = check.get("max_diff", 1.0) <= AUDIO_TOL
    check["match"] = exact or (check["tiny_margin"] and audio.size == expected.size)
    check["how"] = "exact" if exact else ("length only (tiny CTC margin)" if check["match"] else "mismatch")
    return check


def raw_post(base: str, content_part: dict, timeout: float = 120, **options) -> dict:
    """One request with a hand-made audio part (and request `options`), streamed; what came back."""
    import httpx

    body = {"model": "tiny-omni", "messages": [{"role": "user", "content": [content_part]}],
            "modalities": ["text", "audio"], "stream": True, "max_tokens": 8, "temperature": 0.0, **options}
    t0 = time.monotonic()
    out: dict = {}
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout, connect=5)) as client:
            with client.stream("POST", base + "/v1/chat/completions", json=body) as response:
                out["status"] = response.status_code
                if response.status_code >= 400:
                    out["body"] = response.read().decode(errors="replace")[:600]
                else:
                    events = []
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                    out["error_events"] = [e[:600] for e in events if e.startswith("{") and '"error"' in e[:20]]
                    out["events"] = len(events)
                    out["done"] = bool(events) and events[-1] == "[DONE]"
    except Exception as error:
        out["exception"] = f"{type(error).__name__}: {error}"
    out["s"] = round(time.monotonic() - t0, 2)
    out["clear_error"] = bool((out.get("status", 0) >= 400 and out.get("body")) or out.get("error_events"))
    return out


def alive(base: str) -> bool:
    import httpx

    try:
        return httpx.get(base + "/v1/models", timeout=10).status_code == 200
    except Exception:
        return False


FREED = re.compile(r"unit2wav: request (\S+) freed \((\w+)\); (\d+) active")


def freed_requests(log_path: Path) -> list[dict]:
    """Stage 1's "request ... freed (why); N active" log lines (serving/llama_omni_unit2wav.py), in order."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return [{"id": m[1], "why": m[2], "active": int(m[3])} for m in FREED.finditer(text)]


def settle(log_path: Path, expect_ids: list[str], timeout: float = 20.0) -> dict:
    """Waits until stage 1 logged the freeing of every id in `expect_ids` (a served response id is a prefix of the
    stage's own request id) and its active count is back to 0; what it saw."""
    deadline = time.monotonic() + timeout
    while True:
        freed = freed_requests(log_path)
        found = {rid: next((f for f in freed if f["id"].startswith(rid) or rid.startswith(f["id"])), None)
                 for rid in expect_ids}
        active = freed[-1]["active"] if freed else None
        if (all(found.values()) and active == 0) or time.monotonic() > deadline:
            return {"found": found, "active_after": active, "freed_lines": len(freed)}
        time.sleep(0.5)


def _b64_wav(samples, subtype="PCM_16") -> str:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, 16000, format="WAV", subtype=subtype)
    return base64.b64encode(buffer.getvalue()).decode()


def _audio_part(data: str) -> dict:
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}


def bad_audio_cases() -> dict:
    nan = question(7)
    nan[100:200] = np.nan
    return {
        "zero_length_wav": _audio_part(_b64_wav(np.zeros(0, np.float32))),
        "corrupt_base64": _audio_part("!!!this is not base64@@@"),
        "non_wav_bytes": _audio_part(base64.b64encode(b"definitely not a RIFF file " * 40).decode()),
        "over_30_s": _audio_part(_b64_wav((0.1 * np.sin(np.arange(16000 * 31) / 10)).astype(np.float32))),
        "nan_float_wav": _audio_part(_b64_wav(nan, subtype="FLOAT")),
    }


def run(workdir: Path, timeout: float) -> dict:
    from serving.tiny_checkpoint import build_tiny_serving_checkpoint

    checkpoint = build_tiny_serving_checkpoint(workdir / "ckpt")
    reference = Reference(checkpoint)
    result: dict = {}
    log_path = workdir / "server.log"
    trace = workdir / "server.log.trace.jsonl"
    try:
        with pipeline_server(checkpoint, workdir, timeout, result) as (base, server):
            wavs = {i: question(i) for i in range(8)}
            # 1, 4, 8 concurrent sampled streams
            result["load"] = {}
            for n in (1, 4, 8):
                served = concurrent(base, [{"wav": wavs[i], "seed": 100 * n + i} for i in range(n)])
                for i, s in enumerate(served):
                    s["check"] = compare(reference, wavs[i], s, trace)
                result["load"][str(n)] = served
            # a client that disconnects after its first text chunk, 3 others beside it
            jobs = [{"wav": wavs[i], "seed": 900 + i} for i in range(4)]
            jobs[0]["close_after_text"] = 1
            served = concurrent(base, jobs)
            for i, s in enumerate(served):
                if i == 0:
                    s.pop("_audio")
                else:
                    s["check"] = compare(reference, wavs[i], s, trace)
            # the closed stream's state must be freed in stage 1 (and the others' too), with nothing left active
            freed = settle(log_path, [rid for s in served for rid in s["response_ids"]])
            later = stream_one(base, wavs[5], seed=999)
            later["check"] = compare(reference, wavs[5], later, trace)
            result["disconnect"] = {"streams": served, "later": later, "server_up": server.poll() is None,
                                    "freed": freed}
            # bad audio, one at a time; after each: does the server still list its model?
            result["bad_audio"] = {}
            for name, content_part in bad_audio_cases().items():
                if server.poll() is not None or not alive(base):
                    result["bad_audio"][name] = {"skipped": "the server was already down"}
                    continue
                response = raw_post(base, content_part)
                response["server_up_after"] = server.poll() is None and alive(base)
                result["bad_audio"][name] = response
            # a valid question with `stop` strings: refused (serving/llama_omni_thinker.py RefuseStopStrings), where
            # vllm-omni 0.30 would leave the answer open forever
            response = raw_post(base, _audio_part(_b64_wav(wavs[7])), timeout=60, stop=["a"])
            response["server_up_after"] = server.poll() is None and alive(base)
            result["stop_strings"] = response
            final = stream_one(base, wavs[6], seed=4242) if server.poll() is None else {"error": "server down"}
            final.pop("_audio", None)
            result["final_request"] = {k: final.get(k) for k in ("text", "error", "audio_chunks", "finish_reason")}
    except Exception as error:
        import traceback

        result["error"] = f"{type(error).__name__}: {error}"
        result["traceback"] = traceback.format_exc()[-3000:]
    result["log_tail"] = log_path.read_text(errors="replace")[-4000:]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = run(args.workdir, args.timeout)
    print("\nRESULT " + json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
