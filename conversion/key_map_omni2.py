"""The cosy2_decoder conversion as a table: every original key -> its key in LlamaOmni2Token2Wav (spec §6).

Source keys are prefixed by the file they come from:
    flow:  CosyVoice2's `flow.pt`, a CausalMaskedDiffWithXvec state dict
    hift:  CosyVoice2's `hift.pt`, a HiFTGenerator state dict, keys optionally prefixed `generator.` (the HiFiGan
           training wrapper's name; the original loader strips it)
A rule is (regex on the prefixed key, target template or None, transform). The first matching rule wins; a None
target drops the key and the transform names the reason. A key matched by no rule is an error.

Transforms:
    copy            the tensor, as float32 (the original runs the flow and HiFT in fp32)
    weight_norm_g   the magnitude half of a torch weight norm (dim 0): legacy `X.weight_g` or the parametrization's
    weight_norm_v   `X.parametrizations.weight.original0`; `_v` / `original1` is the direction. The pair is folded
                    into `X.weight` by `fold_weight_norm`, computed exactly as torch's weight norm computes it
                    (spec Q12: the textbook g * v / ||v|| in another order moves the waveform by ~1.5e-3)

Not in either file, added by the converter: `flow.noise` (the CFM's fixed initial noise, spec Q5) and
`speakers.<name>` (CAM++ x-vectors, spec §4).
"""

from __future__ import annotations

import torch
from torch import nn

from conversion.key_map import Entry, KeyPlan, apply_rule

_HIFT = r"hift:(?:generator\.)?"
DECODER_KEY_TABLE: list[tuple[str, str | None, str]] = [
    # flow.pt: the estimator moves up one level (the CFM wrapper `decoder` holds no weights, only the noise)
    (r"flow:(input_embedding\.weight|(?:spk_embed_affine_layer|encoder_proj)\.(?:weight|bias))", r"flow.\1", "copy"),
    (r"flow:encoder\.(.+)", r"flow.encoder.\1", "copy"),
    (r"flow:decoder\.estimator\.(.+)", r"flow.estimator.\1", "copy"),
    (r"flow:decoder\.rand_noise", None, "drop: the original draws it at start-up; --flow-noise chooses ours"),
    # hift.pt: weight norm folded, in either of torch's two spellings
    (_HIFT + r"(.+)\.weight_g", r"hift.\1.weight", "weight_norm_g"),
    (_HIFT + r"(.+)\.weight_v", r"hift.\1.weight", "weight_norm_v"),
    (_HIFT + r"(.+)\.parametrizations\.weight\.original0", r"hift.\1.weight", "weight_norm_g"),
    (_HIFT + r"(.+)\.parametrizations\.weight\.original1", r"hift.\1.weight", "weight_norm_v"),
    (_HIFT + r"(.+)", r"hift.\1", "copy"),
]


def map_decoder_keys(source_shapes: dict[str, tuple[int, ...]]) -> KeyPlan:
    """Apply DECODER_KEY_TABLE to every prefixed source key (shapes only: nothing is read here)."""
    plan = KeyPlan()
    halves: dict[str, dict[str, str]] = {}
    for key in source_shapes:
        rule = apply_rule(DECODER_KEY_TABLE, key, plan)
        if rule is None:
            continue
        target, transform = rule
        if transform.startswith("weight_norm_"):
            pair = halves.setdefault(target, {})
            half = transform[-1]  # "g" or "v"
            if half in pair:  # e.g. both `X.weight_g` and `generator.X.weight_g`
                plan.problems.append(f"{target}: weight norm {half} given twice, by {pair[half]} and {key}")
            pair[half] = key
            continue
        plan.entries.setdefault(target, []).append(Entry(target, transform, [key], tuple(source_shapes[key])))
    for target, pair in halves.items():
        if set(pair) != {"g", "v"}:
            have = ", ".join(sorted(pair.values()))
            plan.problems.append(f"{target}: weight norm needs both halves (weight_g and weight_v, or original0 and "
                                 f"original1), found only {have}")
            continue
        g_shape, v_shape = tuple(source_shapes[pair["g"]]), tuple(source_shapes[pair["v"]])
        if not v_shape or g_shape != (v_shape[0],) + (1,) * (len(v_shape) - 1):
            plan.problems.append(f"{target}: weight norm magnitude {pair['g']} has shape {list(g_shape)}; with "
                                 f"direction {list(v_shape)} it must be {[v_shape[0]] + [1] * (len(v_shape) - 1)} "
                                 "(dim 0)" if v_shape else f"{target}: {pair['v']} is a scalar")
            continue
        plan.entries.setdefault(target, []).append(Entry(target, "fold_weight_norm", [pair["g"], pair["v"]], v_shape))
    return plan


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The weight a torch weight-norm module (dim 0) computes from magnitude g and direction v, in float32.

    Built with torch's public weight-norm parametrization, so it is the same computation (`torch._weight_norm`)
    that both the legacy `weight_norm` hook of the release and the parametrization run in their forward: the fold
    is bit-identical to what the original HiFT uses (tests/test_conversion_token2wav.py checks it)."""
    v, g = v.detach().to(torch.float32), g.detach().to(torch.float32)
    holder = nn.Module()
    holder.weight = nn.Parameter(v.clone(), requires_grad=False)
    nn.utils.parametrizations.weight_norm(holder, name="weight", dim=0)
    with torch.no_grad():
        holder.parametrizations.weight.original0.copy_(g)
        holder.parametrizations.weight.original1.copy_(v)
    nn.utils.parametrize.remove_parametrizations(holder, "weight", leave_parametrized=True)
    return holder.weight.detach().contiguous()
