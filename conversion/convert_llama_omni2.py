"""Convert a LLaMA-Omni2 release (+ its CosyVoice2 decoder) into one self-contained Hugging Face repo (spec §6).

    python -m conversion.convert_llama_omni2 --checkpoint LLaMA-Omni2-0.5B \\
        [--decoder-dir cosy2_decoder [--flow-noise seed0|FILE] [--speaker NAME=FILE ...]
                                     [--campplus campplus.onnx --prompt-wav en=prompt_en.wav ...]] \\
        [--whisper-checkpoint models/speech_encoder/large-v3.pt] --output-dir OUT \\
        [--dtype bfloat16] [--max-shard-size 5GB] [--repo-id ID] [--overwrite] [--verify]

The released shards are read tensor by tensor and every converted tensor is streamed straight into its output
shard. Everything is checked before OUT is created: every key mapped by key_map_llama_omni2.py (and the decoder's
key_map_omni2.py), every shape equal to what LlamaOmni2ForConditionalGeneration expects, the config's fields, the
TTS tokenizer's ids. OUT is written into a temporary directory next to it and renamed at the end: an error leaves
no OUT. Without --decoder-dir the repo stops at speech units (token2wav_config None).
"""

from __future__ import annotations

import argparse
import ast
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `conversion` and `llama_omni_hf` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from conversion.config_map import whisper_encoder_config
from conversion.key_map import Entry, check_against_model
from conversion.key_map_llama_omni2 import TIED_TTS_HEAD, TTS_HEAD, map_keys
from conversion.model_card import MODEL_ID_PLACEHOLDER, render_omni2_model_card
from conversion.original_formats import (SAFETENSORS_TO_TORCH, ConversionError, ShardSet, read_json,
                                         read_whisper_checkpoint, whisper_dims_from_shapes)
from conversion.writing import (MemoryMonitor, PlannedTensor, StreamingShardWriter, atomic_directory, parse_size,
                                plan_shards)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
RELEASED_MODEL_TYPE = "omni2_speech2s_qwen2"
ENCODER_PREFIX = "model.speech_encoder."
TTS_TOKENIZER_DIR = "tts_tokenizer"
UNIT_COUNT = 6561  # CosyVoice2's speech tokens (the flow's input_embedding rows)
# What the original's run script passes to generate (spec §2.3): greedy (temperature 0 by default), no sampling
# knobs, 256 new tokens; everything else of the release's generation_config.json stays in force.
RUN_SCRIPT_GENERATION = dict(do_sample=False, temperature=None, top_p=None, top_k=None, max_new_tokens=256)

# Qwen2 fields of the released config.json (root = the LLM, `speech_generator` = the TTS) copied into Qwen2Config.
QWEN2_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "use_sliding_window", "sliding_window", "max_window_layers",
    "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "layer_types",
]
REQUIRED_QWEN2 = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
SPEECH_FIELDS = ["speech_encoder_type", "speech_projector_type", "speech_encoder_ds_rate",
                 "speech_encoder_hidden_size", "stream_params", "unit_vocab_size", "speech_generator"]
DROPPED_FIELDS = {
    "architectures": "the original class; ours is LlamaOmni2ForConditionalGeneration",
    "model_type": f"checked to be {RELEASED_MODEL_TYPE}; ours is llama_omni2",
    "_name_or_path": "a local path of the authors",
    "torch_dtype": "replaced by --dtype",
    "dtype": "replaced by --dtype",
    "transformers_version": "ours is written by the installed transformers",
    "use_cache": "a runtime choice",
    "speech_encoder": "a path relative to the original's working directory (large-v3.pt only builds the module; "
                      "the checkpoint's encoder tensors are converted)",
    "tokenizer_model_max_length": "kept as max_prompt_length (the spliced prompt is cut to its last N positions, "
                                  "Q9) and as the tokenizer's model_max_length",
    "tokenizer_padding_side": "training-time padding; the processor pads on the left for generation",
    "tts_tokenizer": "a path set at load time by the original; the directory is copied and its ids are config fields",
    "use_mrope": "checked to be false (Qwen2-VL's multimodal RoPE is not used)",
}
TTS_DROPPED = {k: DROPPED_FIELDS[k] for k in ("architectures", "_name_or_path", "torch_dtype", "dtype",
                                              "transformers_version", "use_cache", "use_mrope")}
TTS_DROPPED["model_type"] = "checked to be qwen2"


# --------------------------------------------------------------------------- the released directory and config


def check_checkpoint_dir(checkpoint: Path) -> dict:
    """The released LLM directory's config.json, after recognising the usual wrong directories."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ConversionError(f"--checkpoint {checkpoint} is not a directory (download ICTNLP/LLaMA-Omni2-*)")
    if not (checkpoint / "config.json").is_file():
        if (checkpoint / "flow.pt").is_file() or (checkpoint / "hift.pt").is_file():
            raise ConversionError(f"--checkpoint {checkpoint} is the speech decoder (ICTNLP/cosy2_decoder: flow.pt, "
                                  "hift.pt); pass it as --decoder-dir and the LLM repo (ICTNLP/LLaMA-Omni2-*) as "
                                  "--checkpoint")
        raise ConversionError(f"--checkpoint {checkpoint} has no config.json; pass the released LLaMA-Omni2 model "
                              "directory (ICTNLP/LLaMA-Omni2-*)")
    released = read_json(checkpoint / "config.json", "released config")
    model_type = released.get("model_type")
    if model_type == "omni_speech2s_llama":
        raise ConversionError(f"{checkpoint} is a LLaMA-Omni (v1) release (model_type 'omni_speech2s_llama'); "
                              "convert it with conversion/convert_llama_omni.py")
    if model_type == "llama_omni2":
        raise ConversionError(f"{checkpoint} is already a converted repo (model_type 'llama_omni2'); pass the "
                              "original release")
    if model_type != RELEASED_MODEL_TYPE:
        raise ConversionError(f"{checkpoint / 'config.json'} has model_type {model_type!r}, expected "
                              f"{RELEASED_MODEL_TYPE!r} (a LLaMA-Omni2 release, e.g. ICTNLP/LLaMA-Omni2-0.5B)")
    missing = [k for k in REQUIRED_QWEN2 + SPEECH_FIELDS if k not in released]
    if missing:
        raise ConversionError(f"{checkpoint / 'config.json'} lacks {', '.join(missing)}; is it LLaMA-Omni2's "
                              "released config.json?")
    for field, expected in (("speech_encoder_type", "whisper"), ("speech_projector_type", "linear")):
        if str(released[field]).lower() != expected:
            raise ConversionError(f"{checkpoint / 'config.json'}: {field} {released[field]!r} is not supported "
                                  f"(only {expected!r})")
    if not isinstance(released["speech_generator"], dict):
        raise ConversionError(f"{checkpoint / 'config.json'}: `speech_generator` must be the TTS model's config "
                              f"(a JSON object), found {type(released['speech_generator']).__name__}")
    parse_stream_params(released["stream_params"])
    return released


def parse_stream_params(value) -> tuple[int, int]:
    """The release's STRING `"(3,10)"` (the original `eval()`s it) -> (read, write), by ast.literal_eval only."""
    def bad(why: str) -> ConversionError:
        return ConversionError(f"config.json field `stream_params` is {value!r}: {why}; expected a string like "
                               "\"(3,10)\" (text tokens read, speech tokens written per step)")

    if isinstance(value, str):
        if len(value) > 64:
            raise bad("too long")
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise bad("not a literal pair of integers (it is never evaluated as code)") from None
    elif isinstance(value, list):
        parsed = value
    else:
        raise bad(f"a {type(value).__name__}")
    if not isinstance(parsed, (tuple, list)) or len(parsed) != 2:
        raise bad("not a pair")
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in parsed):
        raise bad("not two positive integers")
    return int(parsed[0]), int(parsed[1])


def qwen2_config(fields: dict, where: str, **overrides):
    from transformers import Qwen2Config

    missing = [k for k in REQUIRED_QWEN2 if k not in fields]
    if missing:
        raise ConversionError(f"{where} lacks {', '.join(missing)}")
    try:
        return Qwen2Config(**{**{k: fields[k] for k in QWEN2_FIELDS if k in fields}, **overrides})
    except (TypeError, ValueError) as err:
        raise ConversionError(f"{where} is not a valid Qwen2 config: {err}") from None


def tts_fields(released: dict, path) -> tuple[dict, list[str]]:
    tts = dict(released["speech_generator"])
    if tts.get("model_type", "qwen2") != "qwen2":
        raise ConversionError(f"{path}: speech_generator.model_type {tts['model_type']!r} is not supported (only "
                              "'qwen2')")
    if tts.get("use_mrope"):
        raise ConversionError(f"{path}: speech_generator.use_mrope is true; only Qwen2's plain RoPE is supported")
    notes = [f"speech_generator field {k!r} not carried over (training-time or unknown)"
             for k in sorted(set(tts) - set(QWEN2_FIELDS) - set(TTS_DROPPED))]
    return tts, notes


# --------------------------------------------------------------------------- tokenizers


def load_tokenizer(directory: Path, what: str):
    from transformers import AutoTokenizer, Qwen2Config

    try:
        # config= : the released config.json has a model_type transformers does not know; the tokenizer is Qwen's
        return AutoTokenizer.from_pretrained(str(directory), config=Qwen2Config())
    except Exception as err:
        reason = str(err).split("\n")[0][:300]
        raise ConversionError(f"cannot load the {what} in {directory}: {reason}") from None


@dataclass
class TTSIds:
    sep: int
    eos: int
    pad: int | None
    unit_offset: int
    units_special: bool


def read_tts_tokenizer(checkpoint: Path, unit_count: int) -> TTSIds:
    """`<sep>`, EOS and the unit layout `<0>` .. `<unit_count-1>` (consecutive ids) of the release's tts_tokenizer/."""
    directory = Path(checkpoint) / TTS_TOKENIZER_DIR
    if not directory.is_dir():
        raise ConversionError(f"{checkpoint} has no {TTS_TOKENIZER_DIR}/ directory: the TTS model's tokenizer "
                              "(<sep>, EOS and the 6561 unit tokens) is part of the release; is the download "
                              "complete?")
    tokenizer = load_tokenizer(directory, "TTS tokenizer")
    vocab = tokenizer.get_vocab()
    problems = []
    if "<sep>" not in vocab:
        problems.append("it has no `<sep>` token")
    if tokenizer.eos_token_id is None:
        problems.append("it has no EOS token")
    if "<0>" not in vocab:
        problems.append("it has no unit token `<0>`")
    if problems:
        raise ConversionError(f"{directory} is not LLaMA-Omni2's TTS tokenizer: " + "; ".join(problems))
    offset = vocab["<0>"]
    wrong = [f"<{k}> is {vocab.get(f'<{k}>')}, expected {offset + k}" for k in range(unit_count)
             if vocab.get(f"<{k}>") != offset + k]
    if f"<{unit_count}>" in vocab:
        wrong.append(f"it has a unit token <{unit_count}> (id {vocab[f'<{unit_count}>']}) beyond {unit_count} units")
    if wrong:
        raise ConversionError(f"{directory}: the unit tokens are not the {unit_count}-unit layout (`<0>` .. "
                              f"`<{unit_count - 1}>` at consecutive ids from {offset}) that CosyVoice2's "
                              f"{UNIT_COUNT} speech tokens need:\n    " + "\n    ".join(wrong[:10])
                              + (f"\n    ... and {len(wrong) - 10} more" if len(wrong) > 10 else ""))
    sep, eos = vocab["<sep>"], int(tokenizer.eos_token_id)
    inside = sorted(name for name, i in (("<sep>", sep), ("EOS", eos)) if offset <= i < offset + unit_count)
    if inside:
        raise ConversionError(f"{directory}: {' and '.join(inside)} lie among the unit ids {offset}.."
                              f"{offset + unit_count - 1}")
    # the original decodes with skip_special_tokens=True and reads digits (Q3): special unit tokens would vanish
    units_special = tokenizer.decode([offset, offset + unit_count - 1], skip_special_tokens=True).strip() == ""
    return TTSIds(sep, eos, tokenizer.pad_token_id, offset, units_special)


def build_processor(checkpoint: Path, tokenizer, n_mels: int, n_audio_ctx: int, model_max_length: int):
    from transformers import WhisperFeatureExtractor

    try:
        from llama_omni_hf.processing_llama_omni2 import LlamaOmni2Processor
    except ImportError as err:
        raise ConversionError(f"llama_omni_hf.processing_llama_omni2 is not available ({err})") from None
    if tokenizer.chat_template is None:
        raise ConversionError(f"the tokenizer in {checkpoint} has no chat template (tokenizer_config.json "
                              "`chat_template` or chat_template.jinja); the original builds its prompts with it")
    tokenizer.model_max_length = model_max_length
    tokenizer.clean_up_tokenization_spaces = False  # transformers 5 ignores it for BPE and warns at every load
    seconds = n_audio_ctx * 2 * 160 / 16000  # encoder positions -> mel frames (stride 2) -> samples (hop 160)
    if seconds != int(seconds):
        raise ConversionError(f"the Whisper encoder's {n_audio_ctx} positions are not a whole number of seconds")
    extractor = WhisperFeatureExtractor(feature_size=n_mels, chunk_length=int(seconds))
    return LlamaOmni2Processor(feature_extractor=extractor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def build_generation_config(checkpoint: Path, tokenizer, text_config):
    """Spec §2.3: the release's generation_config.json (eos ids, repetition_penalty, ... all kept, Q13), then what
    the original run script passes (greedy, no sampling knobs, 256 new tokens, the tokenizer's pad id)."""
    from transformers import GenerationConfig

    path = checkpoint / "generation_config.json"
    if path.is_file():
        read_json(path, "generation config")  # a clear error for broken JSON
        try:
            generation = GenerationConfig.from_pretrained(str(checkpoint))
        except Exception as err:
            raise ConversionError(f"cannot read {path}: {str(err).splitlines()[0][:300]}") from None
        how = "the release's generation_config.json"
    else:
        # the original (transformers 4.43) then builds it with `from_model_config`: config.json's bos/eos only,
        # so it stops at <|im_end|> alone
        generation = GenerationConfig(bos_token_id=text_config.bos_token_id, eos_token_id=text_config.eos_token_id)
        how = "no generation_config.json in the release: config.json's EOS id, as the original's from_model_config"
    for key, value in RUN_SCRIPT_GENERATION.items():
        setattr(generation, key, value)
    generation.pad_token_id = tokenizer.pad_token_id
    return generation, how


# --------------------------------------------------------------------------- the config


def build_config(released: dict, path, whisper_dims: dict, adaptor_hidden: int, speech_token_id: int, tts: TTSIds,
                 token2wav_config, unit_parse: str, dtype: str):
    """Returns (LlamaOmni2Config, notes). Raises ConversionError on anything inconsistent."""
    from llama_omni_hf.configuration_llama_omni2 import LlamaOmni2Config

    encoder = whisper_encoder_config(whisper_dims)
    if released["speech_encoder_hidden_size"] != encoder.d_model:
        raise ConversionError(f"{path}: speech_encoder_hidden_size {released['speech_encoder_hidden_size']} but the "
                              f"checkpoint's Whisper encoder is {encoder.d_model} wide")
    text = qwen2_config(released, f"{path}")
    tts_dict, notes = tts_fields(released, path)
    # the TTS head is a weight of its own (Q1: the original loads it untied whatever the config says)
    tts_config = qwen2_config(tts_dict, f"{path} `speech_generator`", tie_word_embeddings=False)
    read, write = parse_stream_params(released["stream_params"])
    try:
        config = LlamaOmni2Config(
            speech_encoder_config=encoder, text_config=text, tts_config=tts_config, token2wav_config=token2wav_config,
            speech_adaptor_downsample_rate=int(released["speech_encoder_ds_rate"]),
            speech_adaptor_hidden_size=int(adaptor_hidden), speech_token_id=speech_token_id,
            max_prompt_length=int(released.get("tokenizer_model_max_length", 4096)), tts_read=read, tts_write=write,
            tts_sep_token_id=tts.sep, tts_eos_token_id=tts.eos, unit_token_offset=tts.unit_offset,
            unit_vocab_size=int(released["unit_vocab_size"]), unit_parse=unit_parse,
        )
    except (ValueError, TypeError) as err:
        raise ConversionError(f"the inputs give an invalid LlamaOmni2Config: {err}") from None
    config.dtype = dtype
    used = set(QWEN2_FIELDS) | set(SPEECH_FIELDS) | set(DROPPED_FIELDS)
    notes += [f"config field {k!r} not carried over (training-time or unknown)" for k in sorted(set(released) - used)]
    if "tokenizer_model_max_length" not in released:
        notes.append("config.json has no tokenizer_model_max_length: max_prompt_length 4096 (the release's) assumed")
    if released["speech_generator"].get("tie_word_embeddings", True):
        notes.append("the TTS config says tie_word_embeddings; the original loads its head untied (Q1), so "
                     "`tts.lm_head.weight` is stored as a weight of its own")
    return config, notes


# --------------------------------------------------------------------------- tensors


@dataclass
class Sources:
    """Every input tensor, by prefixed key (`checkpoint:`, `whisper:`, `token2wav:`), read on demand."""

    shards: ShardSet
    whisper: dict | None
    token2wav: dict | None  # LlamaOmni2Token2Wav keys -> float32 tensors (convert_cosy2_decoder's result)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {f"checkpoint:{k}": s for k, s in self.shards.shapes.items()}
        shapes.update({f"whisper:{k}": tuple(v.shape) for k, v in (self.whisper or {}).items()})
        return shapes

    def get(self, key: str) -> torch.Tensor:
        origin, name = key.split(":", 1)
        if origin == "checkpoint":
            return self.shards.get(name)
        return (self.whisper if origin == "whisper" else self.token2wav)[name]

    def dtype(self, key: str) -> torch.dtype:
        origin, name = key.split(":", 1)
        if origin == "checkpoint":
            return SAFETENSORS_TO_TORCH[self.shards.dtypes[name]]
        return self.get(key).dtype

    def order(self, key: str) -> tuple:
        """Reading order: shard by shard, then the decoder."""
        origin, name = key.split(":", 1)
        if origin == "checkpoint":
            return (0, self.shards.files.index(self.shards.file_of[name]), name)
        return (1, 0, name)


def expected_state(config) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Key -> shape of LlamaOmni2ForConditionalGeneration as saved (a tied `lm_head.weight` left out, as
    save_pretrained does), built on the meta device (no memory); and the module prefixes kept in float32."""
    from llama_omni_hf.modeling_llama_omni2 import LlamaOmni2ForConditionalGeneration

    with torch.device("meta"):
        model = LlamaOmni2ForConditionalGeneration(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.text_config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    keep_fp32 = {"token2wav"} | set(getattr(model, "_keep_in_fp32_modules", None) or [])
    keep_fp32 |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return shapes, sorted(keep_fp32)


def choose_entries(plan, sources: Sources, config, notes: list, warnings: list) -> dict[str, Entry]:
    """One entry per target; the tied LLM head and the TTS head (Q1) decided here."""
    entries, problems = {}, list(plan.problems)
    for target, candidates in plan.entries.items():
        if len(candidates) > 1:
            problems.append(f"{target} comes from several keys: {[c.sources for c in candidates]}")
        entries[target] = candidates[0]
    plan.problems = problems
    head = entries.get("lm_head.weight")
    if head is not None and config.text_config.tie_word_embeddings:
        embed = sources.get("checkpoint:model.embed_tokens.weight")
        if not torch.equal(sources.get(head.sources[0]), embed):
            raise ConversionError("config.json says tie_word_embeddings but the checkpoint's lm_head.weight differs "
                                  "from model.embed_tokens.weight; the release is inconsistent")
        del entries["lm_head.weight"]
        plan.dropped[head.sources[0]] = "drop: equal to model.embed_tokens.weight (tie_word_embeddings)"
    tts_head = entries.get("tts.lm_head.weight")
    if tts_head is not None and tts_head.transform == TIED_TTS_HEAD:
        warnings.append(
            f"the checkpoint has no `{TTS_HEAD.split(':', 1)[1]}`: the TTS head is written as a COPY of the TTS "
            "embedding (tied, as the TTS config says). The original code would run such a release with a RANDOM, "
            "untied TTS head (spec Q1: transformers 4.43 skips the nested tie), so no converted repo can match its "
            "speech output; check that the download is complete")
    elif tts_head is not None:
        notes.append("TTS head: the checkpoint's own `speech_generator.model.lm_head.weight`, untied from the TTS "
                     "embedding, as the original loads it (Q1)")
    return entries


def compare_whisper(comparisons: dict[str, Entry], entries: dict[str, Entry], sources: Sources) -> str:
    """large-v3.pt's encoder must equal the checkpoint's copy within bf16 rounding (Q14); a one-line report."""
    if not comparisons:
        return "from the checkpoint (`model.speech_encoder.*`), as the original runs it"
    problems, worst = [], 0.0
    encoder_targets = {t for t in entries if t.startswith("speech_encoder.")}
    for target in sorted(set(comparisons) | encoder_targets):
        pt, ours = comparisons.get(target), entries.get(target)
        if pt is None or ours is None:
            side = "large-v3.pt" if pt is None else "the checkpoint"
            problems.append(f"{target}: not in {side}")
            continue
        if pt.shape != ours.shape:
            problems.append(f"{target}: checkpoint {list(ours.shape)}, large-v3.pt {list(pt.shape)}")
            continue
        a, b = sources.get(ours.sources[0]).float(), sources.get(pt.sources[0]).float()
        # bf16 keeps 8 significant bits (relative rounding up to 2**-8); 2**-7 leaves room for fp16 -> bf16 double
        # rounding, 2**-24 for fp16's subnormals
        excess = ((a - b).abs() - (2**-7 * b.abs() + 2**-24)).max().item() if a.numel() else -1.0
        worst = max(worst, ((a - b).abs() / b.abs().clamp(min=2**-14)).max().item() if a.numel() else 0.0)
        if excess > 0:
            problems.append(f"{target}: differs beyond bf16 rounding (max |diff| {(a - b).abs().max().item():.3g})")
    if problems:
        raise ConversionError(
            f"--whisper-checkpoint does not match the checkpoint's Whisper encoder in {len(problems)} tensors:\n    "
            + "\n    ".join(problems[:15]) + "\nThe original runs the checkpoint's copy (large-v3.pt only builds the "
            "module, spec Q14): check that it is openai-whisper's large-v3.pt, or leave --whisper-checkpoint out")
    return (f"from the checkpoint (`model.speech_encoder.*`), as the original runs it; large-v3.pt agrees within "
            f"bf16 rounding ({len(comparisons)} tensors, max relative difference {worst:.2g})")


def output_dtype(target: str, source_dtype: torch.dtype, dtype: torch.dtype, keep_fp32: list[str]) -> torch.dtype:
    if not source_dtype.is_floating_point:
        return source_dtype
    if any(target == m or target.startswith(m + ".") for m in keep_fp32):
        return torch.float32
    return dtype


def convert_tensor(entry: Entry, sources: Sources) -> torch.Tensor:
    return sources.get(entry.sources[0])  # copy and tie_tts_head alike: the tensor itself, cast by the writer


def write_weights(directory: Path, entries, sources: Sources, dtype, keep_fp32, max_shard_bytes, monitor) -> int:
    ordered = sorted(entries.values(), key=lambda e: (sources.order(e.sources[0]), e.target))
    planned, dtypes = [], {}
    for e in ordered:
        dtypes[e.target] = output_dtype(e.target, sources.dtype(e.sources[0]), dtype, keep_fp32)
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


def read_decoder(decoder_dir, token2wav_config, flow_noise, speaker_files, campplus, prompt_wavs):
    """convert_cosy2_decoder's `prepare` (keys, shapes, yaml, noise, voices): LlamaOmni2Token2Wav's float32 state
    dict, its config and its summary."""
    from conversion import convert_cosy2_decoder

    decoder_dir = Path(decoder_dir)
    if (decoder_dir / "config.json").is_file() and not (decoder_dir / "flow.pt").is_file():
        model_type = read_json(decoder_dir / "config.json", "config").get("model_type")
        if model_type in (RELEASED_MODEL_TYPE, "omni_speech2s_llama"):
            raise ConversionError(f"--decoder-dir {decoder_dir} is an LLM release (model_type {model_type!r}); pass "
                                  "ICTNLP/cosy2_decoder (flow.pt, hift.pt) as --decoder-dir")
    return convert_cosy2_decoder.prepare(decoder_dir, token2wav_config, flow_noise, speaker_files, campplus,
                                         prompt_wavs)


def prepare(checkpoint, decoder_dir=None, whisper_checkpoint=None, dtype: str = "bfloat16", flow_noise="seed0",
            speaker_files=None, campplus=None, prompt_wavs=None, token2wav_config=None, unit_parse: str = "offset"):
    """Read and check everything; nothing is written. Returns what `convert_llama_omni2` writes."""
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(sorted(DTYPES))}")
    checkpoint = Path(checkpoint)
    released = check_checkpoint_dir(checkpoint)
    path = checkpoint / "config.json"
    notes, warnings = [], []
    if decoder_dir is None and (speaker_files or prompt_wavs or campplus or token2wav_config is not None):
        raise ConversionError("--speaker, --prompt-wav, --campplus and --token2wav-config need --decoder-dir")
    shards = ShardSet(checkpoint)
    whisper = None
    if whisper_checkpoint is not None:
        whisper = read_whisper_checkpoint(whisper_checkpoint)[1]  # its dims: checked tensor by tensor instead
    if not any(k.startswith(ENCODER_PREFIX) for k in shards.shapes):
        raise ConversionError(f"the checkpoint in {checkpoint} holds no Whisper encoder ({ENCODER_PREFIX}*); every "
                              "LLaMA-Omni2 release carries it and the original runs that copy (spec Q14)")
    try:
        dims = whisper_dims_from_shapes(shards.shapes, ENCODER_PREFIX)
    except KeyError as err:
        raise ConversionError(f"the checkpoint's Whisper encoder lacks {err.args[0]}") from None

    if released["unit_vocab_size"] != UNIT_COUNT:
        raise ConversionError(f"{path}: unit_vocab_size {released['unit_vocab_size']!r}; LLaMA-Omni2 speaks "
                              f"CosyVoice2's {UNIT_COUNT} speech tokens")
    tokenizer = load_tokenizer(checkpoint, "tokenizer")
    if "<speech>" not in tokenizer.get_vocab():
        raise ConversionError(f"the tokenizer in {checkpoint} has no `<speech>` token; the release's tokenizer adds "
                              "it (id 151665)")
    speech_id = tokenizer.convert_tokens_to_ids("<speech>")
    tts_ids = read_tts_tokenizer(checkpoint, UNIT_COUNT)
    if unit_parse == "regex" and tts_ids.units_special:
        raise ConversionError("--unit-parse regex reads units from the TTS tokenizer's decoded text, but its unit "
                              "tokens are special (skip_special_tokens drops them)")
    decoder = None  # read last: CAM++ on the prompt wavs is the slow part
    if decoder_dir is not None:
        decoder = read_decoder(decoder_dir, token2wav_config, flow_noise, speaker_files, campplus, prompt_wavs)
    sources = Sources(shards, whisper, decoder[0] if decoder else None)
    plan, comparisons = map_keys(sources.shapes())
    adaptor = plan.entries.get("speech_adaptor.linear1.weight")
    config, config_notes = build_config(
        released, path, dims, adaptor[0].shape[0] if adaptor else 2048, speech_id, tts_ids,
        decoder[1] if decoder else None, unit_parse, dtype)
    notes += config_notes
    if decoder is not None:
        for key, tensor in decoder[0].items():
            plan.entries.setdefault(f"token2wav.{key}", []).append(
                Entry(f"token2wav.{key}", "copy", [f"token2wav:{key}"], tuple(tensor.shape)))
    entries = choose_entries(plan, sources, config, notes, warnings)
    expected, keep_fp32 = expected_state(config)
    problems = check_against_model(entries, expected, plan)
    if problems:
        raise ConversionError("the inputs do not match LlamaOmni2ForConditionalGeneration:\n" + "\n".join(problems))
    whisper_report = compare_whisper(comparisons, entries, sources)
    processor = build_processor(checkpoint, tokenizer, dims["n_mels"], dims["n_audio_ctx"], config.max_prompt_length)
    generation, generation_how = build_generation_config(checkpoint, processor.tokenizer, config.text_config)
    if tts_ids.pad is None:
        notes.append("the TTS tokenizer has no pad token (the original passes it to the TTS generate, unused there)")
    elif tts_ids.pad != tts_ids.eos:
        notes.append(f"the TTS tokenizer's pad id {tts_ids.pad} differs from its EOS {tts_ids.eos}")
    summary = {
        "dtype": dtype, "tensors": len(entries), "parameters": sum(_numel(e.shape) for e in entries.values()),
        "whisper_source": whisper_report, "dropped": _dropped_summary(plan.dropped), "notes": notes,
        "warnings": warnings, "generation": generation_how, "unit_parse": unit_parse,
        "tts_ids": dict(sep=tts_ids.sep, eos=tts_ids.eos, unit_offset=tts_ids.unit_offset),
        "largest_tensor_bytes": max(PlannedTensor(e.target, e.shape, DTYPES[dtype]).nbytes for e in entries.values()),
        "sources": {k: Path(v).absolute().name for k, v in (
            ("released checkpoint", checkpoint), ("Whisper checkpoint (compared only)", whisper_checkpoint),
            ("speech decoder", decoder_dir)) if v},
        "token2wav": decoder[2] if decoder else None,
    }
    return dict(sources=sources, entries=entries, config=config, processor=processor, generation=generation,
                keep_fp32=keep_fp32, summary=summary, checkpoint=checkpoint)


def write_repo_files(directory: Path, p: dict, card: str) -> None:
    try:
        from llama_omni_hf.tiny import write_omni2_remote_code
    except ImportError as err:
        raise ConversionError(f"llama_omni_hf.tiny has no write_omni2_remote_code yet ({err})") from None
    config = p["config"]
    config.architectures = ["LlamaOmni2ForConditionalGeneration"]
    config.save_pretrained(directory)
    p["generation"].save_pretrained(directory)
    p["processor"].save_pretrained(directory)
    shutil.copytree(p["checkpoint"] / TTS_TOKENIZER_DIR, directory / TTS_TOKENIZER_DIR,
                    ignore=shutil.ignore_patterns(".*"))
    write_omni2_remote_code(directory)
    (directory / "README.md").write_text(card)


def convert_llama_omni2(checkpoint, output_dir, decoder_dir=None, whisper_checkpoint=None, dtype: str = "bfloat16",
                        max_shard_size: str = "5GB", flow_noise="seed0", speaker_files=None, campplus=None,
                        prompt_wavs=None, token2wav_config=None, unit_parse: str = "offset", repo_id=None,
                        overwrite: bool = False) -> dict:
    """prepare, then write OUT atomically; returns the summary with time and memory figures."""
    monitor = MemoryMonitor()
    start, baseline = time.time(), monitor.rss()
    max_shard_bytes = parse_size(max_shard_size)
    p = prepare(checkpoint, decoder_dir, whisper_checkpoint, dtype, flow_noise, speaker_files, campplus, prompt_wavs,
                token2wav_config, unit_parse)
    summary = p["summary"]
    summary["output_dir"] = str(Path(output_dir).absolute())
    with atomic_directory(Path(output_dir), overwrite) as tmp:
        summary["bytes"] = write_weights(tmp, p["entries"], p["sources"], DTYPES[dtype], p["keep_fp32"],
                                         max_shard_bytes, monitor)
        card = render_omni2_model_card(repo_id or MODEL_ID_PLACEHOLDER, p["config"], summary)
        write_repo_files(tmp, p, card)
    summary.update(seconds=time.time() - start, baseline_rss_bytes=baseline, config=p["config"], **monitor.report())
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


# --------------------------------------------------------------------------- command line


def print_summary(s: dict):
    gib = 2**30
    print(f"wrote {s['output_dir']}: {s['tensors']} tensors, {s['parameters'] / 1e6:.1f} M parameters, "
          f"{s['bytes'] / gib:.2f} GiB of {s['dtype']} weights (token-to-wave float32) in {s['seconds']:.1f} s")
    print(f"Whisper encoder: {s['whisper_source']}")
    print(f"generation config: {s['generation']}, with the run script's greedy settings")
    ids = s["tts_ids"]
    print(f"TTS ids: <sep> {ids['sep']}, EOS {ids['eos']}, units at {ids['unit_offset']}.. ({s['unit_parse']} "
          "parsing)")
    if s["token2wav"] is None:
        print("no --decoder-dir: the repo stops at speech units (token2wav_config None)")
    else:
        t = s["token2wav"]
        print(f"token-to-wave: flow {t['flow_parameters'] / 1e6:.2f} M, HiFT {t['hift_parameters'] / 1e6:.2f} M "
              f"parameters; flow noise {t['noise']}")
        for name, how in t["speakers"].items():
            print(f"speaker {name}: {how}")
        for line in t["yaml"]:
            print(("WARNING: " if line.startswith("!!!") else "yaml: ") + line)
    for line in s["dropped"]:
        print(f"dropped {line}")
    for note in s["notes"]:
        print(f"note: {note}")
    for warning in s["warnings"]:
        print(f"WARNING: {warning}", file=sys.stderr)
    print(f"peak memory: {s['peak_rss_bytes'] / gib:.2f} GiB resident ({s['peak_anon_bytes'] / gib:.2f} GiB "
          f"anonymous); {s['baseline_rss_bytes'] / gib:.2f} GiB before reading inputs; largest tensor "
          f"{s['largest_tensor_bytes'] / gib:.3f} GiB")


def run_verify(output_dir: Path, max_new_tokens: int) -> int:
    """Load OUT with AutoModel/AutoProcessor in a fresh interpreter (llama_omni_hf blocked) and answer once."""
    script = Path(__file__).resolve().parent / "verify_llama_omni2.py"
    command = [sys.executable, "-I", str(script), str(output_dir), "--max-new-tokens", str(max_new_tokens)]
    print(f"verifying in a clean subprocess: {' '.join(command)}", flush=True)
    return subprocess.run(command, cwd=str(Path(output_dir).parent)).returncode


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="released LLM directory, ICTNLP/LLaMA-Omni2-* (config.json, "
                   "safetensors, tokenizer, tts_tokenizer/)")
    p.add_argument("--decoder-dir", help="ICTNLP/cosy2_decoder (flow.pt, hift.pt, optional cosyvoice.yaml and "
                   "campplus.onnx); without it the repo stops at speech units")
    p.add_argument("--flow-noise", default="seed0", help="seed0 (default) or a .pt/.npy tensor [1, 80, F>=15000]")
    p.add_argument("--speaker", action="append", metavar="NAME=FILE", help="a precomputed CAM++ x-vector (.npy/.pt/"
                   ".safetensors, [192] or [1, 192]); repeatable")
    p.add_argument("--campplus", help="CAM++ onnx model (default: campplus.onnx in --decoder-dir)")
    p.add_argument("--prompt-wav", action="append", metavar="NAME=WAV", help="a prompt wav whose CAM++ x-vector "
                   "becomes voice NAME (en: prompt_en.wav, zh: prompt_zh.wav); repeatable")
    p.add_argument("--token2wav-config", help="JSON of LlamaOmni2Token2WavConfig fields (default: the released "
                   "sizes)")
    p.add_argument("--whisper-checkpoint", help="openai-whisper large-v3.pt, optional: only compared with the "
                   "checkpoint's encoder (which is converted) within bf16 rounding")
    p.add_argument("--unit-parse", choices=["offset", "regex"], default="offset", help="how the model turns TTS ids "
                   "into units: offset (id - offset, default) or regex (the original's decode + digits, quirk Q3)")
    p.add_argument("--output-dir", required=True, help="the repo to write (must not exist, see --overwrite)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="weights dtype (release: bfloat16); "
                   "the token-to-wave decoder stays float32")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--repo-id", help="hub id shown in the model card (push_to_hub.py fills it in otherwise)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir (atomically)")
    p.add_argument("--verify", action="store_true", help="then load OUT in a clean subprocess and answer once")
    p.add_argument("--verify-max-new-tokens", type=int, default=8)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from conversion.convert_cosy2_decoder import _named, read_config

    args = parse_args(argv)
    try:
        summary = convert_llama_omni2(
            args.checkpoint, args.output_dir, decoder_dir=args.decoder_dir,
            whisper_checkpoint=args.whisper_checkpoint, dtype=args.dtype, max_shard_size=args.max_shard_size,
            flow_noise=args.flow_noise, speaker_files=_named(args.speaker, "--speaker"), campplus=args.campplus,
            prompt_wavs=_named(args.prompt_wav, "--prompt-wav"),
            token2wav_config=read_config(args.token2wav_config) if args.token2wav_config else None,
            unit_parse=args.unit_parse, repo_id=args.repo_id, overwrite=args.overwrite)
    except ConversionError as err:
        print(f"error: {err}\n{args.output_dir} was not written.", file=sys.stderr)
        return 2
    print_summary(summary)
    if args.verify:
        return run_verify(Path(args.output_dir), args.verify_max_new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
