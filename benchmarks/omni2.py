#!/usr/bin/env python
"""LLaMA-Omni2 latency and TTS cost at the 0.5B release shapes (random weights, bf16, CPU by default).

    .venv/bin/python benchmarks/omni2.py --markdown docs/benchmarks.md    # ~7-8 min on 2 shared cores
    .venv/bin/python benchmarks/omni2.py --quick                          # ~3 min: 6-token answers, 3 writes
    .venv/bin/python benchmarks/omni2.py --render-only --markdown docs/benchmarks.md   # re-render the JSON

Prints a table and writes `benchmarks/omni2_results.json` (every sample, medians, machine, load average) and, with
`--markdown docs/benchmarks.md`, replaces (or appends) the section "## LLaMA-Omni2 (0.5B shapes, CPU)" of that file,
leaving the rest of it untouched (as benchmarks/token2wav.py does with its own section).

The model is `LlamaOmni2ForConditionalGeneration(LlamaOmni2Config(token2wav_config=LlamaOmni2Token2WavConfig()))`
built with `_from_config(dtype=torch.bfloat16)`: the RELEASED 0.5B shapes (Whisper-large-v3 encoder 637M parameters,
Qwen2.5-0.5B LLM 494M, TTS LM 646M with its 158227-token vocabulary and own head, CosyVoice2 token-to-wave 133M),
random weights (`torch.manual_seed(seed)` before construction), nothing downloaded. The encoder, adaptor, LLM and TTS
run in bf16 (this CPU has AMX-bf16: the encoder and prefills are ~4x faster than fp32, a TTS step equally fast);
the token-to-wave decoder stays fp32, as the model keeps it (`_keep_in_fp32_modules_strict`, the original's flow
and HiFT run in fp32). The prompt is a spoken question through `LlamaOmni2Processor` with the tiny Qwen2.5 tokenizer
(ids remapped: `<speech>` -> 151665; the other ids are valid in the 151936-token vocabulary); 300 speech positions.

Random weights answer noise, which is fine for timing with three adjustments:
- The answer length is fixed (`min_new_tokens = max_new_tokens`, greedy LLM), so EOS never ends a run early.
- The TTS is greedy (`tts_do_sample=False`) and a forward hook on `tts.lm_head` adds a margin to the 6561 unit ids,
  so every written token is a unit (a random TTS writes mostly text ids, which carry no audio) and the TTS's EOS is
  never chosen: every write emits exactly W=10 units. The hook costs one addition over 158227 logits per TTS step.
- The final flush after `<sep>` is capped at W=10 tokens (`config.tts_final_max_new_tokens`, 1024 in the release):
  a real TTS stops at its EOS, a steered random one never does. Each further 10 tokens of flush cost about one
  more write (the per-write figures below).

Measured (medians; wall-clock `time.perf_counter`, process CPU time next to it where it matters):
1. Whole answers of `--answer-tokens` (24) tokens, `--repeats` (3) rounds after one short warm-up of each path; each
   round runs, in turn: text only (`generate(return_units=False)`), text + units (`generate(return_audio=False)`,
   the TTS written every R=3 tokens, W=10), and text + speech streamed (`generate_stream` with the token-to-wave
   decoder in its incremental mode). Every run starts from the processor's outputs (the encoder is inside it).
   Ratios are taken within a round. First text token / first audio: from calling `generate_stream` to the first
   chunk with token ids / with audio samples (the first token-to-wave call included).
2. TTS cost per write, with the KV cache (ours) and with `tts_reprefill=True` (the original's re-prefill of the
   whole TTS context at every write), driven directly for `--writes` (30) writes with synthetic inputs: per write,
   3 random final-norm-sized LLM states (N(0, 1), the scale of an RMS-normed state) and 3 random text ids go
   through `_tts_read`; the third read triggers `_tts_write`, which is timed (a wrapper on the instance). The two
   streams are advanced write by write in turn (same load for both), with identical inputs; both greedy, so both do
   the same work on the same tokens (whether they wrote the same ids is recorded, not asserted: the cached and
   re-prefilled passes round differently in bf16).

Peers, not re-run here: LLaMA-Omni (v1) at its release size is 8B (too large for this CPU); its mid-size CPU figures
come from `benchmarks/results.json` (run_benchmarks.py) and the token-to-wave decoder's own first call from
`benchmarks/token2wav_results.json`, when those files exist. The release sizes of both families on a GPU:
`benchmarks/release_cuda.py`.

Nothing here asserts on timings; the tests never run this script.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path

# as in run_benchmarks.py: sleeping OpenMP waits keep the figures usable when other jobs share the cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))  # run from a plain checkout too

from run_benchmarks import (  # noqa: E402
    TimingStreamer,
    load_average,
    machine_info,
    median,
    print_table,
    spoken_question,
    summarize,
)
from transformers import GenerationConfig, WhisperFeatureExtractor  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from llama_omni_hf.configuration_llama_omni2 import LlamaOmni2Config, LlamaOmni2Token2WavConfig  # noqa: E402
from llama_omni_hf.modeling_llama_omni2 import LlamaOmni2ForConditionalGeneration  # noqa: E402
from llama_omni_hf.processing_llama_omni2 import LlamaOmni2Processor  # noqa: E402
from llama_omni_hf.tiny_tokenizer import build_tiny_qwen2_tokenizer  # noqa: E402

SECTION = "## LLaMA-Omni2 (0.5B shapes, CPU)"
READ_WRITE = (3, 10)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------- helpers


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device="cpu"):
    """(result, {"wall_s", "cpu_s"}) of fn(), the accelerator synchronized at both ends."""
    sync(device)
    cpu, start = time.process_time(), time.perf_counter()
    out = fn()
    sync(device)
    return out, {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}


def log(message):
    print(message, flush=True)


class UnitSteer:
    """Forward hook on `tts.lm_head`: fp32 logits with `margin` added to the unit ids, so a greedy (or sampled) random
    TTS writes units only and never its EOS."""

    def __init__(self, offset: int, n_units: int, margin: float = 1e4):
        self.offset, self.n_units, self.margin = offset, n_units, margin

    def __call__(self, module, inputs, output):
        logits = output.float()
        logits[..., self.offset : self.offset + self.n_units] += self.margin
        return logits


class WriteTimer:
    """Times every `_tts_write` of one model (an instance attribute over the class method): wall, CPU, the TTS
    context (re-prefill) or cache length before the write, and the ids written."""

    def __init__(self, model, device):
        self.model, self.device, self.records = model, device, []
        self.method = type(model)._tts_write.__get__(model)
        model._tts_write = self

    def __call__(self, state, index, final):
        row = state.rows[index]
        cached = 0 if state.reprefill or row.cache is None else row.cache.get_seq_length()
        written = len(row.tts_token_ids)
        _, t = timed(lambda: self.method(state, index, final), self.device)
        ids = row.tts_token_ids[written:]
        record = {**t, "reprefill": state.reprefill, "final": final, "ids": ids, "cached_positions": int(cached)}
        if state.reprefill:  # the context now ends with the written ids; the prefill read everything before them
            record["prefill_positions"] = int(row.context.shape[0]) - len(ids)
        self.records.append(record)

    def take(self):
        records, self.records = self.records, []
        return records

    def remove(self):
        del self.model._tts_write


def write_section(path, text, section=SECTION):
    """Replace `section` of a Markdown file (up to the next heading of level 1 or 2), or append it."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == section), None)
    if start is None:
        new = old + ("" if not old or old.endswith("\n\n") else "\n" if old.endswith("\n") else "\n\n") + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("## ", "# "))), len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + text + ("\n" + tail if tail else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
    print(f"wrote {path} (section {section!r})")


def peers() -> dict:
    """The figures of the other benchmarks' last runs (not re-run here), when their JSON files exist."""
    out = {}
    path = HERE / "results.json"
    if path.exists():
        r = json.loads(path.read_text())
        stream = r["answers"]["median"].get("stream_omega_10", {})
        out["v1_mid_cpu"] = {
            "source": "benchmarks/results.json", "date": r["date"], "answer_tokens": r["settings"]["answer_tokens"],
            "llm_params_millions": r["model"]["params_millions"]["llm"],
            "first_token_s": stream.get("first_token_s"), "first_audio_omega_10_s": stream.get("first_audio_s"),
            "text_units_over_text_only": r["answers"]["ratio_to_text_only"].get("text_units"),
            "stream_omega_10_over_text_only": r["answers"]["ratio_to_text_only"].get("stream_omega_10"),
        }
    path = HERE / "token2wav_results.json"
    if path.exists():
        r = json.loads(path.read_text())
        out["token2wav_cpu"] = {"source": "benchmarks/token2wav_results.json", "date": r["date"],
                                "first_audio_tokens": r["settings"]["first_audio_tokens"],
                                "first_call_s": r["first_audio"]["median"]["wall_s"]}
    return out


# ----------------------------------------------------------------------------------------------- model


def build(seed: int = 0, device="cpu", dtype=torch.bfloat16, config_kwargs=None, token2wav_config=None,
          final_flush: int = READ_WRITE[1]):
    """The release-shaped model (or `config_kwargs` overrides), its processor, and the unit-steering hook."""
    tokenizer = build_tiny_qwen2_tokenizer()
    kwargs = dict(config_kwargs or {})
    kwargs.setdefault("token2wav_config", LlamaOmni2Token2WavConfig() if token2wav_config is None else token2wav_config)
    config = LlamaOmni2Config(**kwargs)
    config.tts_final_max_new_tokens = final_flush
    processor = LlamaOmni2Processor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer,
                                    speech_tokens_per_audio=config.speech_tokens_per_audio)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaOmni2ForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    text = config.text_config
    eos = text.eos_token_id if isinstance(text.eos_token_id, list) else [text.eos_token_id, text.bos_token_id]
    model.generation_config = GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=eos,
                                               pad_token_id=text.bos_token_id, do_sample=False)
    model.tts.lm_head.register_forward_hook(UnitSteer(config.unit_token_offset, config.unit_vocab_size))
    return model, processor


def parameters_millions(model) -> dict:
    params = {name: sum(p.numel() for p in getattr(model, name).parameters()) / 1e6
              for name in ("speech_encoder", "speech_adaptor", "tts", "token2wav") if getattr(model, name) is not None}
    params["llm"] = sum(p.numel() for p in model.model.parameters()) / 1e6  # lm_head is tied to the embeddings
    return params


def model_inputs(model, processor, audio, device):
    inputs = processor(audio=audio, sampling_rate=16000, return_tensors="pt")
    ids = inputs["input_ids"]
    inputs["input_ids"] = ids.masked_fill(ids == processor.speech_token_id, model.config.speech_token_id)
    return {k: v.to(device) for k, v in inputs.items()}


# ---------------------------------------------------------------------------------------------- benchmarks


def bench_answers(model, inputs, n_tokens, repeats, device, timer: WriteTimer):
    """Whole answers three ways, interleaved round by round (text only, text + units, text + speech streamed)."""
    gen = dict(do_sample=False, max_new_tokens=n_tokens, min_new_tokens=n_tokens)
    tts = dict(read_write=READ_WRITE, tts_do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    rate = model.sampling_rate
    answers = {}

    def text_only(n=n_tokens):
        def once():
            start = time.perf_counter()
            streamer = TimingStreamer(start)
            out, t = timed(lambda: model.generate(**inputs, return_units=False, return_dict_in_generate=True,
                                                  streamer=streamer, **{**gen, "max_new_tokens": n,
                                                                        "min_new_tokens": n}), device)
            answers["text_only"] = out.sequences[0, prompt_length:].tolist()
            return {"total_s": t["wall_s"], "cpu_s": t["cpu_s"], "first_token_s": streamer.first_token,
                    "step_ms": 1000 * median(streamer.step_times) if n > 2 else None}
        return once

    def text_units(n=n_tokens):
        def once():
            start = time.perf_counter()
            streamer = TimingStreamer(start)
            timer.take()
            out, t = timed(lambda: model.generate(**inputs, return_audio=False, return_dict_in_generate=True,
                                                  streamer=streamer, **{**gen, "max_new_tokens": n,
                                                                        "min_new_tokens": n}, **tts), device)
            writes = timer.take()
            answers["text_units"] = out.sequences[0, prompt_length:].tolist()
            return {"total_s": t["wall_s"], "cpu_s": t["cpu_s"], "first_token_s": streamer.first_token,
                    "units": len(out.units[0]), "writes": len(writes),
                    "write_s": median([w["wall_s"] for w in writes]),
                    "writes_total_s": sum(w["wall_s"] for w in writes)}
        return once

    def streamed(n=n_tokens):
        def once():
            timer.take()
            sync(device)
            cpu, start = time.process_time(), time.perf_counter()
            first_token = first_audio = first_token_cpu = first_audio_cpu = None
            tokens = units = samples = 0
            tokens_at_audio = units_at_audio = None
            stream = model.generate_stream(**inputs, **{**gen, "max_new_tokens": n, "min_new_tokens": n}, **tts)
            try:
                for chunk in stream:
                    now = time.perf_counter() - start
                    tokens += len(chunk.token_ids)
                    units += len(chunk.units)
                    if first_token is None and len(chunk.token_ids):
                        first_token, first_token_cpu = now, time.process_time() - cpu
                    if first_audio is None and len(chunk.audio):
                        first_audio, tokens_at_audio, units_at_audio = now, tokens, units
                        first_audio_cpu = time.process_time() - cpu
                    samples += len(chunk.audio)
            finally:
                stream.close()
            sync(device)
            writes = timer.take()
            return {"total_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
                    "first_token_s": first_token, "first_audio_s": first_audio,
                    "first_token_cpu_s": first_token_cpu, "first_audio_cpu_s": first_audio_cpu,
                    "tokens_at_first_audio": tokens_at_audio, "units_at_first_audio": units_at_audio,
                    "units": units, "audio_s": samples / rate, "writes": len(writes),
                    "first_write_s": writes[0]["wall_s"] if writes else None,
                    "write_s": median([w["wall_s"] for w in writes])}
        return once

    ways = {"text_only": text_only, "text_units": text_units, "stream": streamed}
    warm = min(n_tokens, READ_WRITE[0])  # one write: every code path (encoder, LLM, TTS, token-to-wave) once
    log(f"warm-up: each way once with {warm}-token answers")
    warmup = {name: make(warm)() for name, make in ways.items()}
    samples = {name: [] for name in ways}
    log(f"answers of {n_tokens} tokens, {repeats} rounds")
    for round_ in range(repeats):
        for name, make in ways.items():
            samples[name].append(make()())
            s = samples[name][-1]
            log(f"  round {round_ + 1}/{repeats} {name}: " + ", ".join(
                f"{k}={v:.3f}" for k, v in s.items() if isinstance(v, float)))
    ratios = {name: [s["total_s"] / t["total_s"] for s, t in zip(runs, samples["text_only"])]
              for name, runs in samples.items() if name != "text_only"}
    cpu_ratios = {name: [s["cpu_s"] / t["cpu_s"] for s, t in zip(runs, samples["text_only"])]
                  for name, runs in samples.items() if name != "text_only"}
    return {
        "warmup": warmup,
        "samples": samples,
        "median": {name: summarize(runs) for name, runs in samples.items()},
        "ratio_to_text_only": {name: median(r) for name, r in ratios.items()},
        "cpu_ratio_to_text_only": {name: median(r) for name, r in cpu_ratios.items()},
        "ratio_samples": ratios,
        "cpu_ratio_samples": cpu_ratios,
        "same_answer": answers["text_only"] == answers["text_units"],
    }


def bench_encoder(model, inputs, repeats, device):
    samples = []
    with torch.no_grad():
        for _ in range(repeats):
            _, t = timed(lambda: model.get_speech_features(inputs["input_features"]), device)
            samples.append(t)
            log(f"  speech encoder + adaptor: {t['wall_s']:.2f} s")
    return samples


def bench_tts_writes(model, n_writes, device, timer: WriteTimer, seed=0, extra=4, targets=None):
    """`n_writes` writes of R=3 synthetic (state, token) pairs each, cached and re-prefilled streams in turn. The
    `targets` writes (default the first and the last) are also run `extra` times on deep copies of both streams
    taken just before them (the same operations on the same shapes), cache and re-prefill copies alternating, for
    medians and paired ratios."""
    targets = set(targets or (1, n_writes))
    cfg = model.config
    read = READ_WRITE[0]
    hidden, dtype = cfg.text_config.hidden_size, model.model.embed_tokens.weight.dtype
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(n_writes * read, hidden, generator=generator).to(device, dtype)
    tokens = torch.randint(cfg.tts_eos_token_id, (n_writes * read,), generator=generator).tolist()  # text ids
    eos = model.generation_config.eos_token_id
    streams = {mode: model.init_tts_stream(1, eos, read_write=READ_WRITE, tts_do_sample=False,
                                           tts_reprefill=mode == "reprefill") for mode in ("cache", "reprefill")}
    records = {mode: [] for mode in streams}
    repeated = {mode: {} for mode in streams}
    timer.take()
    log(f"TTS writes: {n_writes} with the KV cache and with re-prefill, in turn")
    with torch.no_grad():
        for k in range(n_writes):
            order = ("cache", "reprefill") if k % 2 == 0 else ("reprefill", "cache")  # neither always goes second
            last = (k + 1) * read - 1  # this read writes
            for mode in order:
                for j in range(k * read, last):
                    model._tts_read(streams[mode], 0, states[j], tokens[j], False)
            if k + 1 in targets:
                for mode in streams:
                    repeated[mode][str(k + 1)] = []
                for i in range(extra):
                    for mode in (order if i % 2 else order[::-1]):
                        model._tts_read(copy.deepcopy(streams[mode]), 0, states[last], tokens[last], False)
                        (r,) = timer.take()
                        repeated[mode][str(k + 1)].append({"wall_s": r["wall_s"], "cpu_s": r["cpu_s"]})
            for mode in order:
                model._tts_read(streams[mode], 0, states[last], tokens[last], False)
                (record,) = timer.take()
                record["write"] = k + 1
                records[mode].append(record)
                if k + 1 in targets:
                    repeated[mode][str(k + 1)].append({"wall_s": record["wall_s"], "cpu_s": record["cpu_s"]})
            c, r = records["cache"][-1], records["reprefill"][-1]
            if k == 0 or (k + 1) % 5 == 0 or k + 1 == n_writes:
                log(f"  write {k + 1}: cache {1000 * c['wall_s']:.0f} ms ({c['cached_positions']} cached), "
                    f"re-prefill {1000 * r['wall_s']:.0f} ms (prefill of {r['prefill_positions']} positions)")
    same = [c["ids"] == r["ids"] for c, r in zip(records["cache"], records["reprefill"])]
    return {"writes": records, "same_ids": same, "units_per_write": [len(c["ids"]) for c in records["cache"]],
            "repeated_s": repeated, "extra_copies": extra,
            "fit": {mode: fit_line([(w["write"], w["wall_s"]) for w in ws]) for mode, ws in records.items()}}


def fit_line(points):
    """Least squares wall_s = a + b * write (one sample per write is noisy under load; the fit is less so)."""
    if len(points) < 3:
        return None
    (b, a) = np.polyfit([p[0] for p in points], [p[1] for p in points], 1)
    return {"a_s": float(a), "b_s_per_write": float(b)}


def write_summary(tts, at):
    """Per reported write: medians of the stream's own write and its copies, the fitted line, the shapes."""
    out = {}
    fit = tts["fit"]
    for write in at:
        c, r = tts["writes"]["cache"][write - 1], tts["writes"]["reprefill"][write - 1]
        d = {}
        for mode, rec in (("cache", c), ("reprefill", r)):
            samples = tts["repeated_s"][mode][str(write)]
            d[f"{mode}_s"] = median([x["wall_s"] for x in samples])
            d[f"{mode}_cpu_s"] = median([x["cpu_s"] for x in samples])
            d[f"{mode}_samples"] = len(samples)
            d[f"{mode}_stream_s"] = rec["wall_s"]  # the stream's own write alone
            d[f"fit_{mode}_s"] = fit[mode] and fit[mode]["a_s"] + fit[mode]["b_s_per_write"] * write
        pairs = list(zip(tts["repeated_s"]["cache"][str(write)], tts["repeated_s"]["reprefill"][str(write)]))
        # ratios of the two copies timed next to each other, then the median: slow load changes cancel
        d["reprefill_over_cache"] = median([r["wall_s"] / c["wall_s"] for c, r in pairs])
        d["reprefill_over_cache_cpu"] = median([r["cpu_s"] / c["cpu_s"] for c, r in pairs])
        d["cached_positions"], d["prefill_positions"] = c["cached_positions"], r["prefill_positions"]
        out[str(write)] = d
    return out


# ------------------------------------------------------------------------------------------- reporting


def _ms(seconds):
    return f"{1000 * seconds:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _s(seconds):
    return f"{seconds:.2f} s"


def table_rows(report) -> list[tuple[str, str, str]]:
    s = report["settings"]
    a = report["answers"]["median"]
    ratio, cpu_ratio = report["answers"]["ratio_to_text_only"], report["answers"]["cpu_ratio_to_text_only"]
    stream, units, text = a["stream"], a["text_units"], a["text_only"]
    encoder = report["speech_encoder"]["median_s"]
    n = s["answer_tokens"]
    r, w = s["read_write"]
    rows = [
        ("speech encoder + adaptor (Whisper-large-v3)", _ms(encoder),
         f"{_s(report['speech_encoder']['median_cpu_s'])} CPU; part of every first-token time below"),
        ("time to first text token", _ms(stream["first_token_s"]),
         f"generate_stream; {_s(stream['first_token_cpu_s'])} CPU; text only {_ms(text['first_token_s'])}; "
         f"encoder + the {s['prompt_tokens']}-position prefill"),
    ]
    if stream.get("first_audio_s") is None:
        rows.append((f"time to first audio, R={r}, W={w}", "none", f"only {stream['units']:.0f} units"))
    else:
        rounds = " / ".join(_ms(x["first_audio_s"]) for x in report["answers"]["samples"]["stream"])
        rows.append((f"time to first audio, R={r}, W={w}", _ms(stream["first_audio_s"]),
                     f"{_s(stream['first_audio_cpu_s'])} CPU; rounds {rounds}; {stream['tokens_at_first_audio']:.0f} "
                     "text tokens, "
                     f"{stream['units_at_first_audio']:.0f} units out; first TTS write {_ms(stream['first_write_s'])}, "
                     f"then the first token-to-wave call ({s['token2wav_dtype']})"))
    rows += [
        (f"text-only answer, {n} tokens", _s(text["total_s"]),
         f"generate(return_units=False); {text['step_ms']:.0f} ms per token after the first"),
        ("text+units / text-only (generate, no audio)",
         f"{ratio['text_units']:.2f}x wall, {cpu_ratio['text_units']:.2f}x CPU",
         f"{units['writes']:.0f} TTS writes of {w} units, {_ms(units['write_s'])} each (median), "
         f"{_s(units['writes_total_s'])} in all"),
        ("text+speech / text-only (generate_stream)",
         f"{ratio['stream']:.2f}x wall, {cpu_ratio['stream']:.2f}x CPU",
         f"{stream['audio_s']:.1f} s of 24 kHz audio; token-to-wave ({s['token2wav_dtype']}) in the consumer thread "
         "beside generation"),
    ]
    writes = report["tts_writes"]["summary"]
    first, last = writes[str(1)], writes[str(s["writes"])]
    for write, d in ((1, first), (s["writes"], last)):
        fitted = ""
        if d.get("fit_cache_s") is not None:
            fitted = (f"; line fitted to all {s['writes']} writes: {_ms(d['fit_cache_s'])} vs "
                      f"{_ms(d['fit_reprefill_s'])} ({d['fit_reprefill_s'] / d['fit_cache_s']:.2f}x)")
        rows.append((f"TTS write {write}: KV cache vs re-prefill", f"{_ms(d['cache_s'])} vs {_ms(d['reprefill_s'])}",
                     f"re-prefill / cache {d['reprefill_over_cache']:.2f}x wall, {d['reprefill_over_cache_cpu']:.2f}x "
                     f"CPU (medians of {d['cache_samples']} pairs); the re-prefill's first pass reads "
                     f"{d['prefill_positions']} positions, the cache holds {d['cached_positions']}{fitted}"))
    rows.append((f"TTS write {s['writes']} / write 1", f"{last['cache_s'] / first['cache_s']:.2f}x cache, "
                 f"{last['reprefill_s'] / first['reprefill_s']:.2f}x re-prefill",
                 f"wall; CPU {last['cache_cpu_s'] / first['cache_cpu_s']:.2f}x and "
                 f"{last['reprefill_cpu_s'] / first['reprefill_cpu_s']:.2f}x; sum over the {s['writes']} writes of "
                 f"the two streams: cache {_s(report['tts_writes']['total_s']['cache'])}, re-prefill "
                 f"{_s(report['tts_writes']['total_s']['reprefill'])}"))
    v1 = report["peers"].get("v1_mid_cpu")
    if v1:
        rows.append(("peer: LLaMA-Omni v1, mid size (CPU)",
                     f"{_ms(v1['first_token_s'])} / {_ms(v1['first_audio_omega_10_s'])}",
                     f"first text / first audio at Omega=10; text+units {v1['text_units_over_text_only']:.2f}x, "
                     f"streamed speech {v1['stream_omega_10_over_text_only']:.2f}x text-only; "
                     f"{v1['llm_params_millions']:.0f}M-parameter LLM, small encoder ({v1['date'][:10]})"))
    t2w = report["peers"].get("token2wav_cpu")
    if t2w:
        rows.append(("peer: token-to-wave alone, first call", _ms(t2w["first_call_s"]),
                     f"{t2w['first_audio_tokens']} tokens, benchmarks/token2wav.py ({t2w['date'][:10]})"))
    return rows


def markdown(report, rows) -> str:
    s, m, p = report["settings"], report["machine"], report["model"]["params_millions"]
    command = "benchmarks/omni2.py" + (" --quick" if s["quick"] else "")
    load = report["load_average"]
    tts = report["tts_writes"]
    same = sum(tts["same_ids"])
    diverged = next((i + 1 for i, x in enumerate(tts["same_ids"]) if not x), None)
    if diverged is None:
        same_text = f"Both wrote the same ids in all {len(tts['same_ids'])} writes."
    else:
        same_text = (f"Both wrote the same ids in {same} of {len(tts['same_ids'])} writes, the first {diverged - 1} "
                     f"alike: bf16 rounds a cached and a re-prefilled pass differently, one flipped argmax among "
                     "nearly equal random logits changes the context of every later write (the costs do not depend "
                     "on the ids; on a tiny fp32 model the two write the same ids: tests/test_model_omni2.py).")
    fit = tts.get("fit") or {}
    growth = ""
    if fit.get("cache") and fit.get("reprefill"):
        growth = (f"- Growth: the fitted lines rise by {1000 * fit['reprefill']['b_s_per_write']:.0f} ms per write "
                  f"with re-prefill (13 more positions to re-read each time) and by "
                  f"{1000 * fit['cache']['b_s_per_write']:.0f} ms with the KV cache. A write is 10 TTS steps, "
                  f"~{100 * fit['cache']['a_s']:.0f} ms each here; a step reads all of the TTS's "
                  f"{2 * p['tts'] / 1000:.1f} GB of {s['dtype']} weights for one position (likely bound by memory "
                  "bandwidth, not measured here), while a pass over a few hundred positions reuses each weight for "
                  "all of them (AMX matrix units), so it costs only a few steps' worth: the re-prefill's overhead "
                  "grows with the answer but stays moderate at 30 writes on this CPU.")
    out = [
        SECTION,
        "",
        f"`.venv/bin/python {command}` on {report['date'][:10]}: {m['cpu']}, {m['logical_cpus']} logical CPUs, "
        f"`torch.set_num_threads({s['threads']})`, OMP_WAIT_POLICY={m['omp_wait_policy']}, torch {m['torch']}, "
        f"transformers {m['transformers']}; {report['wall_time_s'] / 60:.1f} min in all. Load average "
        f"{load['start']} at the start and {load['end']} at the end: other jobs shared the cores, so absolute times "
        "are noisy (ratios are taken within a round).",
        "",
        f"Model: `LlamaOmni2Config()` = the 0.5B release shapes, random weights, on {s['device']}. Whisper-large-v3 "
        f"encoder {p['speech_encoder']:.0f}M parameters, adaptor {p['speech_adaptor']:.0f}M, Qwen2.5-0.5B LLM "
        f"{p['llm']:.0f}M (head tied), TTS LM {p['tts']:.0f}M (Qwen2.5-0.5B body, 158227-token vocabulary, own head), "
        f"all in {s['dtype']} (this CPU has AMX-bf16: the encoder and prefills ran ~4x faster than fp32 in a probe, "
        f"a TTS step equally fast); token-to-wave (CosyVoice2 flow + HiFT, release size) {p['token2wav']:.0f}M in "
        f"{s['token2wav_dtype']}, as the model keeps it. Prompt: a spoken question ({s['question']}), "
        f"{s['prompt_tokens']} positions (300 of them speech). R={s['read_write'][0]}, W={s['read_write'][1]}; greedy "
        f"LLM and greedy TTS; answers forced to {s['answer_tokens']} tokens; the TTS is steered to units (a hook "
        "adds a margin to the 6561 unit ids: a random TTS writes mostly text ids and no audio), so each write emits "
        f"exactly W units and the TTS never ends; the final flush after `<sep>` is capped at {s['final_flush']} tokens "
        "(1024 in the release, where the TTS's EOS ends it). See the script's docstring.",
        "",
        "| measure | value | notes |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "",
        "How each figure is measured (medians; one short warm-up of every path first):",
        "",
        "- Every time starts once the processor's outputs exist (log-mel of the 30 s window, prompt ids); the speech "
        "encoder runs inside every answer.",
        f"- Whole answers, {s['repeats']} rounds; each round runs, in turn: text only (`generate(return_units=False)`, "
        "the LLM alone), text+units (`generate(return_audio=False)`: the TTS reads every 3 tokens and writes 10 "
        "units), text+speech (`generate_stream`: the same, and the token-to-wave decoder in its incremental mode "
        "turns each write's units into audio in the consumer thread while generation goes on in its own). Ratios "
        "are total times over the text-only time of the same round: wall-clock, and CPU time of the process (all "
        f"threads). The text-only and text+units answers are the same tokens (checked: "
        f"{report['answers']['same_answer']}).",
        "- First text token / first audio: from calling `generate_stream` to the first chunk carrying token ids / "
        "audio samples; CPU = process CPU time (all threads) over the same span, less disturbed by other jobs "
        "than wall time. The first audio needs R text tokens, one TTS write and the first token-to-wave call; "
        "that call runs in the consumer thread while the generation thread goes on (LLM steps, the next write), "
        "so on 2 cores the two share them, and how much of the second core other jobs left decides most of the "
        "spread between rounds; "
        "TTS writes are timed in place by a wrapper on the model's `_tts_write`.",
        f"- TTS per write: {s['writes']} writes driven directly (`init_tts_stream`, then `_tts_read` 3 times per "
        "write with random LLM-state-sized vectors and random text ids; the third read writes), once with the KV "
        "cache (ours: each write reads the new positions only) and once with `tts_reprefill=True` (the original: "
        "each write re-runs the TTS over its whole context, then decodes with a cache inside the write), the two "
        "advanced write by write in turn on identical inputs (which goes first alternates); every write emits 10 "
        f"units. Write 1 and write {s['writes']} are also run {tts['extra_copies']} more times on deep copies of "
        "both streams taken just before them (the same operations on tensors of the same shapes), a cache copy and "
        "a re-prefill copy one after the other; the table gives the medians of those and the streams' own writes "
        f"({tts['extra_copies'] + 1} each) and the median of the {tts['extra_copies'] + 1} paired ratios. A straight "
        "line a + b k fitted to each stream's own writes is given as a check (single samples under load are noisy). "
        + same_text,
        *([growth] if growth else []),
        "- Peers are not re-run: LLaMA-Omni v1's release size (8B) does not fit this CPU's budget; its row is the "
        "mid-size v1 run above (a 156M LLM and a 4-layer encoder, so its first-token time is not comparable to "
        "Whisper-large-v3 plus a 0.5B LLM here). The token-to-wave row is its own benchmark's first call with 10 "
        "tokens (fp32, alone on the cores). Release sizes of both on a GPU: `benchmarks/release_cuda.py` (below).",
        "",
    ]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- main


def run(args, device=None, dtype_name=None, config_kwargs=None, token2wav_config=None) -> dict:
    """Measure everything; the report (also used by benchmarks/release_cuda.py)."""
    device = device or args.device
    dtype_name = dtype_name or args.dtype
    load_start = load_average()
    started = time.perf_counter()
    log(f"LLaMA-Omni2: building the model ({dtype_name}, {device})")
    model, processor = build(args.seed, device, DTYPES[dtype_name], config_kwargs, token2wav_config)
    params = parameters_millions(model)
    log("parameters (M): " + ", ".join(f"{k} {v:.1f}" for k, v in params.items()))
    audio, audio_source = spoken_question()
    inputs = model_inputs(model, processor, audio, device)
    timer = WriteTimer(model, device)
    machine = machine_info(torch.get_num_threads())
    if torch.device(device).type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(torch.device(device))
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {"quick": args.quick, "threads": torch.get_num_threads(), "device": device, "dtype": dtype_name,
                     "token2wav_dtype": "fp32", "repeats": args.repeats, "answer_tokens": args.answer_tokens,
                     "writes": args.writes, "read_write": list(READ_WRITE), "final_flush": READ_WRITE[1],
                     "seed": args.seed, "question": audio_source, "prompt_tokens": int(inputs["input_ids"].shape[1]),
                     "build_s": time.perf_counter() - started},
        "model": {"params_millions": params},
        "load_average": {"start": load_start},
        "peers": peers(),
    }
    report["answers"] = bench_answers(model, inputs, args.answer_tokens, args.repeats, device, timer)
    report["load_average"]["after_answers"] = load_average()
    encoder = bench_encoder(model, inputs, args.repeats, device)
    report["speech_encoder"] = {"samples": encoder, "median_s": median([t["wall_s"] for t in encoder]),
                                "median_cpu_s": median([t["cpu_s"] for t in encoder])}
    tts = bench_tts_writes(model, args.writes, device, timer, args.seed)
    tts["summary"] = write_summary(tts, sorted({1, args.writes}))
    tts["total_s"] = {mode: sum(w["wall_s"] for w in ws) for mode, ws in tts["writes"].items()}
    report["tts_writes"] = tts
    report["load_average"]["end"] = load_average()
    report["wall_time_s"] = time.perf_counter() - started
    timer.remove()
    del model
    return report


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="6-token answers, 1 round, 3 writes (~3 min)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="encoder, LLM and TTS (the token-to-wave decoder stays fp32)")
    parser.add_argument("--answer-tokens", type=int, help="forced answer length (default 24, quick 6)")
    parser.add_argument("--repeats", type=int, help="rounds of answers / encoder samples (default 3, quick 1)")
    parser.add_argument("--writes", type=int, help="TTS writes per stream (default 30, quick 3)")
    parser.add_argument("--seed", type=int, default=0)


def resolve_defaults(args):
    args.answer_tokens = args.answer_tokens or (6 if args.quick else 24)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.writes = args.writes or (3 if args.quick else 30)
    return args


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--output", default=str(HERE / "omni2_results.json"))
    parser.add_argument("--markdown", help="replace or append the section in this Markdown file (docs/benchmarks.md)")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: print the table of an existing --output JSON (refreshing its "
                             "`table`) and write --markdown")
    args = parser.parse_args(argv)
    if args.render_only:
        report = json.loads(Path(args.output).read_text())
        rows = table_rows(report)
        print_table(rows)
        report["table"] = [list(r) for r in rows]
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
        if args.markdown:
            write_section(args.markdown, markdown(report, rows))
        return
    resolve_defaults(args)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    log(f"torch threads: {torch.get_num_threads()} (of {os.cpu_count()} logical CPUs), "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; load average {load_average()}")
    report = run(args)
    rows = table_rows(report)
    report["table"] = [list(r) for r in rows]
    print()
    print(f"LLaMA-Omni2 benchmark: {args.device}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"{args.answer_tokens}-token answers, {args.writes} writes; load average {report['load_average']['start']} "
          f"-> {report['load_average']['end']}; wall time {report['wall_time_s']:.0f} s")
    print_table(rows)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {output}")
    if args.markdown:
        write_section(args.markdown, markdown(report, rows))


if __name__ == "__main__":
    main()
