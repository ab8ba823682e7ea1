"""The conversion as a table: every original key -> its key in LlamaOmniForConditionalGeneration.

Source keys are prefixed by the file they come from:
    checkpoint:  the released shards (ICTNLP/Llama-3.1-8B-Omni)
    whisper:     openai-whisper's large-v3.pt `model_state_dict`
    vocoder:     fairseq's g_00500000 `generator`
A rule is (regex on the prefixed key, target template or None, transform). The first matching rule wins;
a None target drops the key and the transform names the reason. A key matched by no rule is an error.

Transforms:
    copy              the tensor, cast to the output dtype
    whisper_names     copy, after openai-whisper -> transformers WhisperEncoder renames (WHISPER_NAMES)
    fold_weight_norm  w = v * g / ||v|| from the X.weight_g / X.weight_v pair (llama_omni_hf's fold_weight_norm)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

KEY_TABLE: list[tuple[str, str | None, str]] = [
    # released checkpoint
    (r"checkpoint:.*\.rotary_emb\.inv_freq", None, "drop: RoPE frequencies are recomputed from the config"),
    (r"checkpoint:model\.speech_encoder\.(.+)", r"speech_encoder.\1", "whisper_names"),
    (r"checkpoint:model\.speech_projector\.(linear[12]\.(?:weight|bias))", r"speech_adaptor.\1", "copy"),
    (r"checkpoint:model\.(embed_tokens\.weight|norm\.weight|layers\.\d+\..+)", r"model.\1", "copy"),
    (r"checkpoint:lm_head\.weight", "lm_head.weight", "copy"),
    (r"checkpoint:speech_generator\.(.+)", r"unit_decoder.\1", "copy"),
    # openai-whisper large-v3.pt
    (r"whisper:encoder\.(.+)", r"speech_encoder.\1", "whisper_names"),
    (r"whisper:decoder\..+", None, "drop: the Whisper decoder is not part of LLaMA-Omni"),
    # fairseq CodeHiFiGAN generator
    (r"vocoder:(.+)\.weight_[gv]", r"vocoder.\1.weight", "fold_weight_norm"),
    (r"vocoder:(.+)", r"vocoder.\1", "copy"),
]

# openai-whisper encoder names -> transformers WhisperEncoder names (spec section 1), applied in order.
WHISPER_NAMES: list[tuple[str, str]] = [
    (r"^blocks\.(\d+)\.attn\.query\.", r"layers.\1.self_attn.q_proj."),
    (r"^blocks\.(\d+)\.attn\.key\.", r"layers.\1.self_attn.k_proj."),
    (r"^blocks\.(\d+)\.attn\.value\.", r"layers.\1.self_attn.v_proj."),
    (r"^blocks\.(\d+)\.attn\.out\.", r"layers.\1.self_attn.out_proj."),
    (r"^blocks\.(\d+)\.attn_ln\.", r"layers.\1.self_attn_layer_norm."),
    (r"^blocks\.(\d+)\.mlp\.0\.", r"layers.\1.fc1."),
    (r"^blocks\.(\d+)\.mlp\.2\.", r"layers.\1.fc2."),
    (r"^blocks\.(\d+)\.mlp_ln\.", r"layers.\1.final_layer_norm."),
    (r"^positional_embedding$", "embed_positions.weight"),
    (r"^ln_post\.", "layer_norm."),
    (r"^(conv[12]\.(?:weight|bias))$", r"\1"),
]
_WHISPER_DONE = re.compile(r"^(layers\.\d+\.(self_attn\.(q|k|v|out)_proj|self_attn_layer_norm|fc1|fc2|final_layer_norm)"
                           r"\.(weight|bias)|embed_positions\.weight|layer_norm\.(weight|bias)|conv[12]\.(weight|bias))$")


def whisper_name(name: str) -> str | None:
    """openai-whisper encoder key (without `encoder.`) -> WhisperEncoder key, None if it is not one."""
    for pattern, replacement in WHISPER_NAMES:
        new, count = re.subn(pattern, replacement, name)
        if count:
            return new if _WHISPER_DONE.match(new) else None
    return None


@dataclass
class Entry:
    """One output tensor: where it comes from and how."""

    target: str
    transform: str
    sources: list[str]  # prefixed source keys; fold_weight_norm: [g, v]
    shape: tuple[int, ...]


@dataclass
class KeyPlan:
    entries: dict[str, list[Entry]] = field(default_factory=dict)  # target -> candidates (one per source file)
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> reason
    unmatched: list[str] = field(default_factory=list)  # source keys no rule knows
    problems: list[str] = field(default_factory=list)  # e.g. half a weight-norm pair


def apply_rule(table: list[tuple[str, str | None, str]], key: str, plan: KeyPlan) -> tuple[str, str] | None:
    """(target, transform) of the first rule of `table` matching `key`; a key no rule matches is recorded as
    unmatched, a dropped one with its reason, and both give None."""
    for pattern, template, transform in table:
        match = re.fullmatch(pattern, key)
        if match is None:
            continue
        if template is None:
            plan.dropped[key] = transform
            return None
        return match.expand(template), transform
    plan.unmatched.append(key)
    return None


def map_keys(source_shapes: dict[str, tuple[int, ...]]) -> KeyPlan:
    """Apply KEY_TABLE to every prefixed source key (shapes only: nothing is read here)."""
    plan = KeyPlan()
    folds: dict[str, dict[str, str]] = {}
    for key, shape in source_shapes.items():
        rule = apply_rule(KEY_TABLE, key, plan)
        if rule is None:
            continue
        target, transform = rule
        if transform == "whisper_names":
            prefix, name = target.split(".", 1)
            renamed = whisper_name(name)
            if renamed is None:
                plan.unmatched.append(key)
                continue
            target = f"{prefix}.{renamed}"
        if transform == "fold_weight_norm":
            folds.setdefault(target, {})[key[-1]] = key  # "g" or "v"
            continue
        plan.entries.setdefault(target, []).append(Entry(target, transform, [key], tuple(shape)))
    for target, pair in folds.items():
        if set(pair) != {"g", "v"}:
            have = ", ".join(sorted(pair.values()))
            plan.problems.append(f"{target}: weight norm needs both weight_g and weight_v, found only {have}")
            continue
        plan.entries.setdefault(target, []).append(
            Entry(target, "fold_weight_norm", [pair["g"], pair["v"]], tuple(source_shapes[pair["v"]]))
        )
    return plan


def source_file(key: str) -> str:
    return key.split(":", 1)[0]


def check_against_model(entries: dict[str, Entry], expected: dict[str, tuple[int, ...]], plan: KeyPlan) -> list[str]:
    """Every expected key produced once with its shape, nothing else. Returns the problems (empty = fine)."""
    problems = list(plan.problems)
    missing = sorted(set(expected) - set(entries))
    unexpected = sorted(set(entries) - set(expected))
    misshaped = sorted(k for k in set(entries) & set(expected) if tuple(entries[k].shape) != tuple(expected[k]))
    if missing:
        problems.append(_listing(f"{_keys(missing)} missing (the model needs them, no input has them)", missing))
    if unexpected:
        problems.append(_listing(
            f"{_keys(unexpected)} unexpected (inputs have them, the model does not)",
            [f"{k} (from {', '.join(entries[k].sources)})" for k in unexpected]))
    if misshaped:
        problems.append(_listing(
            f"{_keys(misshaped)} mis-shaped",
            [f"{k}: input {list(entries[k].shape)} ({entries[k].sources[-1]}), model expects {list(expected[k])}"
             for k in misshaped]))
    if plan.unmatched:
        problems.append(_listing(f"{_keys(plan.unmatched)} in the inputs that no conversion rule knows", sorted(plan.unmatched)))
    return problems


def _keys(items) -> str:
    return f"{len(items)} key" + ("" if len(items) == 1 else "s")


def _listing(title: str, items: list[str], limit: int = 25) -> str:
    shown = "\n".join(f"    {item}" for item in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title}:\n{shown}{more}"
