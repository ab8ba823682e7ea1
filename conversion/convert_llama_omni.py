"""Convert the released LLaMA-Omni files into one self-contained Hugging Face repo (spec sections 1 and 5).

    python conversion/convert_llama_omni.py --checkpoint Llama-3.1-8B-Omni \\
        --whisper-checkpoint models/speech_encoder/large-v3.pt \\
        --vocoder-checkpoint vocoder/g_00500000 --vocoder-config vocoder/config.json \\
        --output-dir llama-omni-hf [--dtype float16] [--verify]

Reads tensor by tensor and streams each converted tensor straight into its output shard, so memory stays
near one tensor (the 8B release: ~1 GiB embedding) whatever the model size. Everything is checked before
OUT is created (every key mapped, every shape equal to what LlamaOmniForConditionalGeneration expects), and
OUT is written into a temporary directory next to it and renamed at the end: an error leaves no OUT.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `conversion` and `llama_omni_hf` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from conversion.config_map import build_config, check_released_config
from conversion.key_map import Entry, check_against_model, map_keys, source_file
from conversion.model_card import MODEL_ID_PLACEHOLDER, render_model_card
from conversion.repo_files import build_generation_config, build_processor, write_repo_files
from conversion.original_formats import (SAFETENSORS_TO_TORCH, ConversionError, ShardSet, read_json,
                                         read_vocoder_checkpoint, read_vocoder_config, read_whisper_checkpoint,
                                         whisper_dims_from_shapes)
from conversion.writing import (MemoryMonitor, PlannedTensor, StreamingShardWriter, atomic_directory, parse_size,
                                plan_shards)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ENCODER_PREFIX = "model.speech_encoder."


@dataclass
class Sources:
    """Every input tensor, by prefixed key (`checkpoint:`, `whisper:`, `vocoder:`), read on demand."""

    shards: ShardSet
    whisper_dims: dict | None
    whisper: dict | None
    vocoder: dict | None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {f"checkpoint:{k}": s for k, s in self.shards.shapes.items()}
        for prefix, sd in (("whisper", self.whisper), ("vocoder", self.vocoder)):
            shapes.update({f"{prefix}:{k}": tuple(v.shape) for k, v in (sd or {}).items()})
        return shapes

    def get(self, key: str) -> torch.Tensor:
        origin, name = key.split(":", 1)
        if origin == "checkpoint":
            return self.shards.get(name)
        return (self.whisper if origin == "whisper" else self.vocoder)[name]

    def dtype(self, key: str) -> torch.dtype:
        origin, name = key.split(":", 1)
        if origin == "checkpoint":
            return SAFETENSORS_TO_TORCH[self.shards.dtypes[name]]
        return self.get(key).dtype

    def order(self, key: str) -> tuple:
        """Reading order: shard by shard, then the Whisper file, then the vocoder."""
        origin, name = key.split(":", 1)
        if origin == "checkpoint":
            return (0, self.shards.files.index(self.shards.file_of[name]), name)
        return (1 if origin == "whisper" else 2, 0, name)


def choose_sources(plan, whisper_source: str) -> tuple[dict[str, Entry], list[tuple[Entry, Entry]], str]:
    """One entry per target. Encoder keys may come from the shards and from large-v3.pt: by default the .pt
    wins, because the original replaces the encoder with large-v3.pt at load (builder.py), after checking
    both agree. Returns (entries, pairs to compare, description of what was used)."""
    entries, pairs, problems = {}, [], []
    for target, candidates in plan.entries.items():
        by_file = {source_file(c.sources[0]): c for c in candidates}
        if len(candidates) != len(by_file) or (len(by_file) > 1 and set(by_file) != {"checkpoint", "whisper"}):
            problems.append(f"{target} comes from several inputs: {[c.sources for c in candidates]}")
            continue
        if len(by_file) == 2:
            pairs.append((by_file["checkpoint"], by_file["whisper"]))
            entries[target] = by_file["checkpoint" if whisper_source == "checkpoint" else "whisper"]
        else:
            entries[target] = candidates[0]
    if problems:
        raise ConversionError("conflicting inputs:\n    " + "\n    ".join(problems[:20]))
    files = {source_file(e.sources[0]) for t, e in entries.items() if t.startswith("speech_encoder.")}
    used = {"checkpoint": "from the released shards (`model.speech_encoder.*`)",
            "whisper": "from the openai-whisper checkpoint (`encoder.*`)"}
    return entries, pairs, " and ".join(used[f] for f in sorted(files)) or "none"


def check_whisper_agreement(pairs, sources: Sources, strict: bool) -> str:
    """Both copies of the encoder must be equal up to fp16 rounding; returns a one-line report."""
    differing, worst = [], 0.0
    for from_shards, from_pt in pairs:
        a = sources.get(from_shards.sources[0]).float()
        b = sources.get(from_pt.sources[0]).float()
        diff = (a - b).abs().max().item() if a.numel() else 0.0
        worst = max(worst, diff)
        if diff > 1e-3 * max(1.0, b.abs().max().item()):
            differing.append(f"{from_shards.target} (max |diff| {diff:.3g})")
    if not pairs:
        return ""
    if differing and strict:
        raise ConversionError(
            f"the Whisper encoder in the shards differs from --whisper-checkpoint in {len(differing)} of "
            f"{len(pairs)} tensors, e.g.\n    " + "\n    ".join(differing[:10]) + "\nThe original runs the "
            "--whisper-checkpoint weights (it reloads them at start-up); pass --whisper-source whisper to use "
            "them anyway, or --whisper-source checkpoint for the shards' copy"
        )
    verdict = f"DIFFER in {len(differing)} tensors" if differing else "agree"
    return f"shards and Whisper checkpoint {verdict} ({len(pairs)} tensors compared, max |diff| {worst:.3g})"


def expected_state(config) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Key -> shape of the target model, built on the meta device (no memory)."""
    from llama_omni_hf.modeling_llama_omni import LlamaOmniForConditionalGeneration

    with torch.device("meta"):
        model = LlamaOmniForConditionalGeneration(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    keep_fp32 |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])  # e.g. the vocoder, as original
    return shapes, sorted(keep_fp32)


def output_dtype(target: str, source_dtype: torch.dtype, dtype: torch.dtype, keep_fp32: list[str]) -> torch.dtype:
    if not source_dtype.is_floating_point:
        return source_dtype
    if any(target == m or target.startswith(m + ".") for m in keep_fp32):
        return torch.float32
    return dtype


def convert_tensor(entry: Entry, sources: Sources) -> torch.Tensor:
    if entry.transform == "fold_weight_norm":
        from llama_omni_hf.vocoder_llama_omni import fold_weight_norm

        g_key, v_key = entry.sources
        folded = fold_weight_norm({g_key: sources.get(g_key), v_key: sources.get(v_key)})
        return next(iter(folded.values()))
    return sources.get(entry.sources[0])


def write_weights(directory: Path, entries, sources: Sources, dtype, keep_fp32, max_shard_bytes, monitor) -> int:
    ordered = sorted(entries.values(), key=lambda e: sources.order(e.sources[-1]))
    planned, dtypes = [], {}
    for e in ordered:
        dtypes[e.target] = output_dtype(e.target, sources.dtype(e.sources[-1]), dtype, keep_fp32)
        planned.append(PlannedTensor(e.target, e.shape, dtypes[e.target]))
    writer = StreamingShardWriter(directory, plan_shards(planned, max_shard_bytes))
    try:
        for e in ordered:
            source = convert_tensor(e, sources)
            converted = source.to(dtypes[e.target])
            monitor.sample()  # both copies alive: the peak of this step
            writer.write(e.target, converted)
            del source, converted
        writer.close()
    finally:
        writer.abort()
    return sum(p.nbytes for p in planned)



# --------------------------------------------------------------------------- orchestration


def read_inputs(args) -> tuple[dict, dict | None, Sources]:
    checkpoint = Path(args.checkpoint)
    released = read_json(checkpoint / "config.json", "released config")
    check_released_config(released, checkpoint / "config.json")
    dims = whisper = vocoder = vocoder_kwargs = None
    if args.whisper_checkpoint:
        dims, whisper = read_whisper_checkpoint(args.whisper_checkpoint)
    if args.vocoder_checkpoint or args.vocoder_config:
        if not (args.vocoder_checkpoint and args.vocoder_config):
            raise ConversionError("--vocoder-checkpoint (g_00500000) and --vocoder-config (config.json) go together")
        vocoder_kwargs = read_vocoder_config(args.vocoder_config)
        vocoder = read_vocoder_checkpoint(args.vocoder_checkpoint)
    elif not args.no_vocoder:
        raise ConversionError("pass --vocoder-checkpoint g_00500000 and --vocoder-config config.json (fairseq's unit "
                              "HiFi-GAN), or --no-vocoder for a model that stops at speech units")
    shards = ShardSet(checkpoint)
    in_shards = any(k.startswith(ENCODER_PREFIX) for k in shards.shapes)
    if args.whisper_source == "whisper" and whisper is None:
        raise ConversionError("--whisper-source whisper needs --whisper-checkpoint large-v3.pt")
    if args.whisper_source == "checkpoint" and not in_shards:
        raise ConversionError(f"--whisper-source checkpoint: the shards hold no Whisper encoder ({ENCODER_PREFIX}*)")
    if dims is None:
        if not in_shards:
            raise ConversionError(f"the shards in {checkpoint} hold no Whisper encoder ({ENCODER_PREFIX}*); "
                                  "pass --whisper-checkpoint large-v3.pt")
        dims = whisper_dims_from_shapes(shards.shapes, ENCODER_PREFIX)
    return released, vocoder_kwargs, Sources(shards, dims, whisper, vocoder)


def prepare(args) -> dict:
    """Read and check everything; nothing is written. Returns what `convert` needs."""
    released, vocoder_kwargs, sources = read_inputs(args)
    plan = map_keys(sources.shapes())
    entries, pairs, whisper_used = choose_sources(plan, args.whisper_source)
    dims = sources.whisper_dims
    adaptor = entries.get("speech_adaptor.linear1.weight")  # its width is not in the released config
    processor = build_processor(Path(args.checkpoint), int(dims["n_mels"]), int(dims["n_audio_ctx"]),
                                int(released["speech_encoder_ds_rate"]))
    config, notes = build_config(released, Path(args.checkpoint) / "config.json", dims,
                                 adaptor.shape[0] if adaptor else 2048, vocoder_kwargs,
                                 processor.speech_token_id, args.dtype)
    if config.speech_token_id < config.text_config.vocab_size:
        notes.append(f"the tokenizer's <speech> id {config.speech_token_id} lies inside the LLM vocabulary "
                     f"({config.text_config.vocab_size}); the released Llama-3 tokenizer gives {128256}, just after it")
    expected, keep_fp32 = expected_state(config)
    problems = check_against_model(entries, expected, plan)
    if problems:
        raise ConversionError("the inputs do not match LlamaOmniForConditionalGeneration:\n" + "\n".join(problems))
    agreement = check_whisper_agreement(pairs, sources, strict=args.whisper_source == "auto")
    summary = {
        "output_dir": str(Path(args.output_dir).absolute()), "dtype": args.dtype,
        "parameters": sum(_numel(e.shape) for e in entries.values()), "tensors": len(entries),
        "whisper_source": whisper_used + (f"; {agreement}" if agreement else ""),
        "dropped": _dropped_summary(plan.dropped), "notes": notes,
        "largest_tensor_bytes": max(PlannedTensor(e.target, e.shape, DTYPES[args.dtype]).nbytes
                                    for e in entries.values()),
        "sources": {k: str(Path(v).absolute()) for k, v in (
            ("released checkpoint", args.checkpoint), ("Whisper checkpoint", args.whisper_checkpoint),
            ("vocoder checkpoint", args.vocoder_checkpoint), ("vocoder config", args.vocoder_config)) if v},
    }
    return dict(sources=sources, entries=entries, config=config, processor=processor, keep_fp32=keep_fp32,
                generation=build_generation_config(Path(args.checkpoint), config, processor.tokenizer),
                summary=summary)


def convert(args) -> dict:
    """prepare, then write OUT atomically; returns the summary with time and memory figures."""
    monitor = MemoryMonitor()
    start, baseline = time.time(), monitor.rss()
    p = prepare(args)
    summary = p["summary"]
    with atomic_directory(Path(args.output_dir), args.overwrite) as tmp:
        summary["bytes"] = write_weights(tmp, p["entries"], p["sources"], DTYPES[args.dtype], p["keep_fp32"],
                                         parse_size(args.max_shard_size), monitor)
        card = render_model_card(args.repo_id or MODEL_ID_PLACEHOLDER, p["config"], summary)
        write_repo_files(tmp, p["config"], p["processor"], p["generation"], card)
    summary.update(seconds=time.time() - start, baseline_rss_bytes=baseline, **monitor.report())
    return summary


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _dropped_summary(dropped: dict[str, str]) -> list[str]:
    reasons: dict[str, int] = {}
    for reason in dropped.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    return [f"{count} keys: {reason.removeprefix('drop: ')}" for reason, count in sorted(reasons.items())]


# The 8B release: its largest tensor (embed_tokens / lm_head, 128256 x 4096 fp16) and its Whisper-large-v3
# encoder (read from the memory-mapped large-v3.pt).
REAL_LARGEST_TENSOR_BYTES = 128256 * 4096 * 2
REAL_WHISPER_ENCODER_BYTES = 635_000_000


def print_summary(s: dict):
    gib = 2**30
    print(f"wrote {s['output_dir']}: {s['tensors']} tensors, {s['parameters'] / 1e6:.1f} M parameters, "
          f"{s['bytes'] / gib:.2f} GiB of {s['dtype']} weights in {s['seconds']:.1f} s")
    print(f"Whisper encoder: {s['whisper_source']}")
    for line in s["dropped"]:
        print(f"dropped {line}")
    for note in s["notes"]:
        print(f"note: {note}")
    print(f"peak memory: {s['peak_rss_bytes'] / gib:.2f} GiB resident ({s['peak_anon_bytes'] / gib:.2f} GiB "
          f"anonymous); {s['baseline_rss_bytes'] / gib:.2f} GiB before reading inputs; largest tensor "
          f"{s['largest_tensor_bytes'] / gib:.3f} GiB")
    estimate = s["baseline_rss_bytes"] + 2 * REAL_LARGEST_TENSOR_BYTES + REAL_WHISPER_ENCODER_BYTES
    print(f"estimate for the 8B release: ~{estimate / gib:.1f} GiB resident (that baseline + its largest tensor "
          f"read and cast, 2 x {REAL_LARGEST_TENSOR_BYTES / gib:.2f} GiB + the memory-mapped Whisper encoder, "
          f"{REAL_WHISPER_ENCODER_BYTES / gib:.2f} GiB), independent of the shard size")


def run_verify(output_dir: Path, dtype: str, max_new_tokens: int) -> int:
    """Load OUT with AutoModel/AutoProcessor in a fresh interpreter (llama_omni_hf blocked) and answer once."""
    script = Path(__file__).resolve().parent / "verify_converted.py"
    command = [sys.executable, "-I", str(script), str(output_dir), "--dtype", dtype,
               "--max-new-tokens", str(max_new_tokens)]
    print(f"verifying in a clean subprocess: {' '.join(command)}", flush=True)
    return subprocess.run(command, cwd=str(Path(output_dir).parent)).returncode


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="released model directory (config.json, shards, tokenizer)")
    p.add_argument("--whisper-checkpoint", help="openai-whisper large-v3.pt (optional if the shards hold the encoder)")
    p.add_argument("--vocoder-checkpoint", help="fairseq unit HiFi-GAN checkpoint g_00500000")
    p.add_argument("--vocoder-config", help="the vocoder's config.json")
    p.add_argument("--no-vocoder", action="store_true", help="convert without a vocoder (text + units only)")
    p.add_argument("--output-dir", required=True, help="the repo to write (must not exist, see --overwrite)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="weights dtype (release: float16)")
    p.add_argument("--whisper-source", choices=["auto", "checkpoint", "whisper"], default="auto",
                   help="where the encoder comes from when both inputs hold it; auto = the Whisper checkpoint, "
                        "as the original loads it, after checking that both agree")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--repo-id", help="hub id shown in the model card (push_to_hub.py fills it in otherwise)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir (atomically)")
    p.add_argument("--verify", action="store_true", help="then load OUT in a clean subprocess and answer once")
    p.add_argument("--verify-dtype", default="auto", help="dtype to load for --verify (auto = stored)")
    p.add_argument("--verify-max-new-tokens", type=int, default=8)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = convert(args)
    except ConversionError as err:
        print(f"error: {err}\n{args.output_dir} was not written.", file=sys.stderr)
        return 2
    print_summary(summary)
    if args.verify:
        return run_verify(Path(args.output_dir), args.verify_dtype, args.verify_max_new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
