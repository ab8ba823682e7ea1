#!/usr/bin/env python
"""LLaMA-Omni (8B) and LLaMA-Omni2 (0.5B) at their RELEASE sizes on a CUDA GPU: random weights, bf16.

    .venv/bin/python benchmarks/release_cuda.py --markdown docs/benchmarks.md   # both families, a few min on one GPU
    .venv/bin/python benchmarks/release_cuda.py --family omni2                  # one family only
    .venv/bin/python benchmarks/release_cuda.py --render-only --markdown docs/benchmarks.md
    .venv/bin/python benchmarks/release_cuda.py --smoke                         # tiny shapes on the CPU (see below)

Needs a CUDA GPU with ~24 GB (LLaMA-Omni's 8B LLM alone is 16 GB in bf16; the families run one after the other, the
first freed before the second is built). On a machine without one it exits at once with a message; the CPU
benchmarks are benchmarks/run_benchmarks.py (LLaMA-Omni, mid size) and benchmarks/omni2.py (LLaMA-Omni2, 0.5B).

Prints a table and writes `benchmarks/release_cuda_results.json` and, with `--markdown docs/benchmarks.md`, replaces
(or appends) the section "## Release sizes on CUDA (LLaMA-Omni 8B, LLaMA-Omni2 0.5B)" of that file, leaving the rest
untouched.

- LLaMA-Omni: `LlamaOmniConfig(vocoder_config={})` = Llama-3.1-8B, the Whisper-large-v3 encoder, the 2-layer unit
  decoder of width 4096 and the unit HiFi-GAN vocoder, built with `_from_config(dtype=torch.bfloat16)` (the vocoder
  stays fp32, as the model keeps it). Measured by run_benchmarks.py's `bench_answers` (the same code as its CPU
  table): first text token and first audio at Omega=10 through `generate_stream`, whole answers of text only
  (transformers' `LlamaForCausalLM` on the same modules), text+units, text+speech (`return_audio`) and streamed, in
  interleaved rounds. The unit decoder is steered to `--units-per-token` (8) units per text token by the same hook as
  there (a random one emits almost none). Paper (L40 GPU): 226 ms first audio at Omega=10, 1.28x text+speech time.
- LLaMA-Omni2: `LlamaOmni2Config(token2wav_config=LlamaOmni2Token2WavConfig())`, bf16 (token-to-wave fp32), measured
  by benchmarks/omni2.py's `run` (the same code as its CPU table): first text token, first audio at R=3/W=10,
  text+units and streamed text+speech vs text only, TTS cost at write 1 and write `--writes` with the KV cache vs
  `tts_reprefill=True`. The same adjustments for random weights as there (greedy TTS steered to units, final flush
  capped at 10 tokens).

Every timing synchronizes the GPU where it is read (the token streamers copy ids to the host; the TTS write timer
and whole answers call `torch.cuda.synchronize`). Peak GPU memory per family is recorded.

`--smoke` runs every code path with the TINY test shapes on the CPU (the figures mean nothing; the results go to a
temporary file unless `--output` is given). It exists because the machine this script was written on has no GPU.

Nothing here asserts on timings; the tests never run this script.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))  # run from a plain checkout too

import omni2  # noqa: E402
import run_benchmarks  # noqa: E402
from transformers import GenerationConfig, WhisperFeatureExtractor  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from llama_omni_hf.configuration_llama_omni import LlamaOmniConfig  # noqa: E402
from llama_omni_hf.modeling_llama_omni import LlamaOmniForConditionalGeneration  # noqa: E402
from llama_omni_hf.processing_llama_omni import LlamaOmniProcessor  # noqa: E402
from llama_omni_hf.tiny import tiny_config_dict, tiny_omni2_config_dict  # noqa: E402
from llama_omni_hf.tiny_tokenizer import (  # noqa: E402
    build_tiny_llama3_tokenizer,
    build_tiny_qwen2_tokenizer,
    build_tiny_qwen2_tts_tokenizer,
)

SECTION = "## Release sizes on CUDA (LLaMA-Omni 8B, LLaMA-Omni2 0.5B)"
FAMILIES = ("v1", "omni2")
NO_GPU = (
    "benchmarks/release_cuda.py measures the RELEASE sizes on a CUDA GPU (LLaMA-Omni's 8B LLM alone is 16 GB in "
    "bf16), but torch {torch} sees none (torch.cuda.is_available() is False). On a CPU run "
    "benchmarks/run_benchmarks.py (LLaMA-Omni, mid size) and benchmarks/omni2.py (LLaMA-Omni2, 0.5B shapes); "
    "`--smoke` checks this script's code paths with tiny shapes on the CPU."
)


def log(message):
    print(message, flush=True)


def free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device):
    return torch.cuda.max_memory_allocated(device) / 1e9 if torch.device(device).type == "cuda" else None


# ----------------------------------------------------------------------------------------------- LLaMA-Omni


def build_v1(device, seed, units_per_token, smoke):
    tokenizer = build_tiny_llama3_tokenizer()
    if smoke:
        config = LlamaOmniConfig(**tiny_config_dict(tokenizer, vocoder=True))
    else:
        config = LlamaOmniConfig(vocoder_config={})  # the release: Llama-3.1-8B, Whisper-large-v3, 4096-wide decoder
    processor = LlamaOmniProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer,
                                   speech_tokens_per_audio=config.speech_tokens_per_audio)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaOmniForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.eval()
    text = config.text_config
    eos = text.eos_token_id if isinstance(text.eos_token_id, list) else [text.eos_token_id]
    model.generation_config = GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=eos,
                                               pad_token_id=eos[0], do_sample=False)
    hook = run_benchmarks.UnitRateHook(config.unit_decoder_upsample_factor, units_per_token, config.unit_vocab_size,
                                       seed)
    model.unit_decoder.output_proj.register_forward_hook(hook)
    return model, processor


def run_v1(args, device):
    free(device)
    started = time.perf_counter()
    log("LLaMA-Omni: building the model (bf16, vocoder fp32, {})".format(device))
    model, processor = build_v1(device, args.seed, args.units_per_token, args.smoke)
    build_s = time.perf_counter() - started
    params = {name: sum(p.numel() for p in getattr(model, name).parameters()) / 1e6
              for name in ("speech_encoder", "speech_adaptor", "unit_decoder", "vocoder")}
    params["llm"] = (sum(p.numel() for p in model.model.parameters()) + model.lm_head.weight.numel()) / 1e6
    log("parameters (M): " + ", ".join(f"{k} {v:.1f}" for k, v in params.items()))
    audio, source = run_benchmarks.spoken_question()
    inputs = run_benchmarks.model_inputs(model, processor, audio)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    answers = run_benchmarks.bench_answers(model, processor, inputs, args.answer_tokens, [10], args.repeats)
    report = {
        "settings": {"answer_tokens": args.answer_tokens, "repeats": args.repeats, "omega": 10,
                     "units_per_token": args.units_per_token, "dtype": "bf16", "vocoder_dtype": "fp32",
                     "question": source, "prompt_tokens": int(inputs["input_ids"].shape[1]), "build_s": build_s},
        "model": {"params_millions": params},
        "paper": run_benchmarks.PAPER,
        "answers": answers,
        "peak_gpu_gb": peak_gb(device),
        "wall_time_s": time.perf_counter() - started,
    }
    del model, processor, inputs
    free(device)
    return report


# ----------------------------------------------------------------------------------------------- LLaMA-Omni2


def run_omni2(args, device):
    free(device)
    config_kwargs = None
    if args.smoke:
        config_kwargs = tiny_omni2_config_dict(build_tiny_qwen2_tokenizer(), build_tiny_qwen2_tts_tokenizer())
    report = omni2.run(args, device=device, dtype_name="bf16", config_kwargs=config_kwargs)
    report["peers"] = {}  # the CPU runs' figures do not belong in a GPU table
    report["peak_gpu_gb"] = peak_gb(device)
    free(device)
    return report


# ----------------------------------------------------------------------------------------------- reporting


def table_rows(report) -> list[tuple[str, str, str]]:
    rows = []
    v1 = report.get("v1")
    if v1:
        s, a = v1["settings"], v1["answers"]
        m, ratio, cpu_ratio = a["median"], a["ratio_to_text_only"], a["cpu_ratio_to_text_only"]
        stream = m["stream_omega_10"]
        ms = omni2._ms
        rows += [
            ("LLaMA-Omni 8B: time to first text token", ms(stream["first_token_s"]),
             f"generate_stream; text-only Llama {ms(m['text_only']['first_token_s'])}; "
             f"{s['prompt_tokens']}-position prompt"),
            ("LLaMA-Omni 8B: time to first audio, Omega=10",
             "none" if stream.get("first_audio_s") is None else ms(stream["first_audio_s"]),
             f"{stream.get('units_at_first_audio') or 0:.0f} units out; paper 226 ms (L40)"),
            (f"LLaMA-Omni 8B: text-only answer, {s['answer_tokens']} tokens", omni2._s(m["text_only"]["total_s"]),
             f"LlamaForCausalLM, same weights; {m['text_only']['step_ms']:.0f} ms per token after the first"),
            ("LLaMA-Omni 8B: text+units / text-only", f"{ratio['text_units']:.2f}x wall, "
             f"{cpu_ratio['text_units']:.2f}x CPU", f"generate(return_audio=False); {s['units_per_token']} units "
             "per text token (steered)"),
            ("LLaMA-Omni 8B: text+speech / text-only", f"{ratio['text_units_audio']:.2f}x wall",
             "generate(return_audio=True), vocoder at the end; paper 1.28x"),
            ("LLaMA-Omni 8B: text+speech streamed / text-only", f"{ratio['stream_omega_10']:.2f}x wall",
             "generate_stream, Omega=10"),
        ]
    o2 = report.get("omni2")
    if o2:
        rows += [(f"LLaMA-Omni2 0.5B: {a}", b, c) for a, b, c in omni2.table_rows(o2)]
    return rows


def markdown(report, rows) -> str:
    m, s = report["machine"], report["settings"]
    smoke = " SMOKE RUN: tiny test shapes on the CPU, the figures mean nothing." if s["smoke"] else ""
    parts = []
    for name, label in (("v1", "LLaMA-Omni"), ("omni2", "LLaMA-Omni2")):
        r = report.get(name)
        if r:
            p = r["model"]["params_millions"]
            peak = f", peak GPU memory {r['peak_gpu_gb']:.1f} GB" if r.get("peak_gpu_gb") is not None else ""
            parts.append(f"{label}: " + ", ".join(f"{k} {v:.0f}M" for k, v in p.items()) + peak)
    out = [
        SECTION,
        "",
        f"`.venv/bin/python benchmarks/release_cuda.py` on {report['date'][:10]}: {m.get('gpu', 'no GPU')}, "
        f"{m['cpu']} ({m['logical_cpus']} logical CPUs), torch {m['torch']}, transformers {m['transformers']}; "
        f"{report['wall_time_s'] / 60:.1f} min in all.{smoke}",
        "",
        "Random weights, bf16 (LLaMA-Omni's vocoder and LLaMA-Omni2's token-to-wave decoder fp32, as the models keep "
        f"them); parameters (millions): {'; '.join(parts)}. Answers forced to {s['answer_tokens']} tokens; medians of "
        f"{s['repeats']} rounds. Each family is measured by the same code as its CPU table (run_benchmarks.py's "
        "`bench_answers`, omni2.py's `run`): see those sections and the script's docstring for what each figure "
        "means and the adjustments for random weights.",
        "",
        "| measure | value | notes |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "",
    ]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("both",) + FAMILIES, default="both")
    parser.add_argument("--device", default="cuda", help="a CUDA device (default cuda)")
    parser.add_argument("--answer-tokens", type=int, default=48, help="forced answer length (default 48)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of whole answers (default 3)")
    parser.add_argument("--writes", type=int, default=30, help="LLaMA-Omni2 TTS writes per stream (default 30)")
    parser.add_argument("--units-per-token", type=int, default=8, help="LLaMA-Omni unit steering (default 8)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU: check the code paths without a GPU (meaningless figures)")
    parser.add_argument("--output", help="results JSON (default benchmarks/release_cuda_results.json; with --smoke "
                                         "a temporary file)")
    parser.add_argument("--markdown", help="replace or append the section in this Markdown file (docs/benchmarks.md)")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: print the table of an existing --output JSON and write --markdown")
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = str(Path(tempfile.gettempdir()) / "release_cuda_smoke.json" if args.smoke
                          else HERE / "release_cuda_results.json")
    if args.render_only:
        report = json.loads(Path(args.output).read_text())
        rows = table_rows(report)
        run_benchmarks.print_table(rows)
        if args.markdown:
            omni2.write_section(args.markdown, markdown(report, rows), SECTION)
        return 0

    if args.smoke:
        args.device = "cpu"
        args.answer_tokens, args.repeats, args.writes = min(args.answer_tokens, 6), 1, min(args.writes, 3)
    else:
        if not torch.cuda.is_available():
            sys.exit(NO_GPU.format(torch=torch.__version__))
        if torch.device(args.device).type != "cuda":
            parser.error(f"--device must be a CUDA device, got {args.device!r} (--smoke runs on the CPU)")
    args.quick = args.smoke  # omni2.run's report field
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    families = FAMILIES if args.family == "both" else (args.family,)
    started = time.perf_counter()
    machine = run_benchmarks.machine_info(torch.get_num_threads())
    if torch.device(args.device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(args.device))
        machine["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        machine["cuda"] = torch.version.cuda
        if props.total_memory < 22 * 2**30 and "v1" in families:
            log(f"warning: {props.total_memory / 2**30:.0f} GiB on {props.name}; LLaMA-Omni 8B needs ~20 GB in bf16")
    log(f"release sizes on {machine.get('gpu', args.device)}: {', '.join(families)}"
        + (" (SMOKE: tiny shapes, meaningless figures)" if args.smoke else ""))
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {"families": list(families), "device": args.device, "smoke": args.smoke,
                     "answer_tokens": args.answer_tokens, "repeats": args.repeats, "writes": args.writes,
                     "units_per_token": args.units_per_token, "seed": args.seed},
    }
    if "v1" in families:
        report["v1"] = run_v1(args, args.device)
    if "omni2" in families:
        report["omni2"] = run_omni2(args, args.device)
    report["wall_time_s"] = time.perf_counter() - started
    rows = table_rows(report)
    report["table"] = [list(r) for r in rows]
    print()
    run_benchmarks.print_table(rows)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {output}")
    if args.markdown:
        omni2.write_section(args.markdown, markdown(report, rows), SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
