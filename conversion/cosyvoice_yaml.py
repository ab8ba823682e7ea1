"""Check ICTNLP/cosy2_decoder's `cosyvoice.yaml` against LlamaOmni2Token2WavConfig, reading it as DATA only.

The original builds its modules by loading this file with hyperpyyaml, whose tags run code (`!new:` constructs a
class, `!apply:` calls a function, `!ref` evaluates arithmetic). Here it is parsed with PyYAML's SafeLoader, every
tag kept as an inert `Tagged(tag, value)`, and `!ref <name>` resolved only to plain values and + - * / arithmetic.

What the check does (spec §1.5, R3, Q5):
- a field that decides a tensor shape must equal the config: otherwise an error naming the field;
- a field that changes only the computation (sampling rate, NSF constants, CFG rate, frame rate) is taken from the
  yaml, because the original runs with it, and reported;
- the structure our port implements (class names, causal estimator, rel-pos attention without macaron/conv
  modules, Euler solver with cosine schedule) is required;
- `use_dynamic_chunk` is reported LOUDLY when true: the original's encoder then draws random chunk masks at every
  call (decoding_chunk_size 0), where this port always uses the static 50-token / 100-frame chunks;
- the RNG seeding lines (`__set_seed*`) and an `llm:` section are reported: both decide the original's noise.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from conversion.original_formats import ConversionError


@dataclass(frozen=True)
class Tagged:
    tag: str  # e.g. "!new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec"
    value: object


@dataclass(frozen=True)
class Ref:
    expression: str  # e.g. "<token_frame_rate> * <token_mel_ratio>"


class _InertLoader(yaml.SafeLoader):
    """SafeLoader that turns every `!tag` into data instead of refusing it."""


def _construct_tagged(loader, suffix, node):
    tag = "!" + suffix
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return Ref(str(value)) if tag == "!ref" else Tagged(tag, value)


_InertLoader.add_multi_constructor("!", _construct_tagged)

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.USub: operator.neg, ast.UAdd: operator.pos}


def _arithmetic(text: str):
    """Numbers and + - * / // only; anything else raises ValueError (no eval)."""
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.operand))
        raise ValueError(text)
    return walk(ast.parse(text, mode="eval"))


def _resolve(value, top: dict, depth: int = 0):
    """Replace each Ref by its value (a top-level key, or arithmetic on such keys); unresolvable ones stay Refs."""
    if depth > 20:
        return value
    if isinstance(value, dict):
        return {k: _resolve(v, top, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, top, depth) for v in value]
    if isinstance(value, Tagged):
        return Tagged(value.tag, _resolve(value.value, top, depth))
    if not isinstance(value, Ref):
        return value
    names = re.findall(r"<([A-Za-z_][A-Za-z0-9_]*)>", value.expression)
    values = {n: _resolve(top.get(n, Ref(f"<{n}>")), top, depth + 1) for n in names}
    if re.fullmatch(r"\s*<[A-Za-z_][A-Za-z0-9_]*>\s*", value.expression):
        return values[names[0]]
    if any(isinstance(v, (bool, Ref)) or not isinstance(v, (int, float)) for v in values.values()):
        return value
    try:
        return _arithmetic(re.sub(r"<([A-Za-z_][A-Za-z0-9_]*)>", lambda m: repr(values[m.group(1)]), value.expression))
    except (ValueError, SyntaxError, ZeroDivisionError):
        return value


def parse_cosyvoice_yaml(text: str, where: str = "cosyvoice.yaml") -> dict:
    try:
        data = yaml.load(text, Loader=_InertLoader)  # noqa: S506 (an inert SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ConversionError(f"{where} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{where} must hold a mapping (flow:, hift:, ...), found {type(data).__name__}")
    return _resolve(data, data)


def _get(data: dict, path: str):
    """Value at a dotted path, looking through tags (`!new:` mappings, `!new:omegaconf.DictConfig` content)."""
    node = data
    for part in path.split("."):
        if isinstance(node, Tagged):
            node = node.value
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()

# yaml path -> config field, for fields that decide a tensor shape (a mismatch is an error)
SHAPE_FIELDS = [
    ("flow.input_size", "input_size"), ("flow.output_size", "num_mels"), ("flow.spk_embed_dim", "spk_embed_dim"),
    ("flow.vocab_size", "vocab_size"), ("flow.token_mel_ratio", "token_mel_ratio"),
    ("flow.pre_lookahead_len", "pre_lookahead_len"), ("flow.encoder.input_size", "input_size"),
    ("flow.encoder.output_size", "input_size"), ("flow.encoder.attention_heads", "encoder_attention_heads"),
    ("flow.encoder.linear_units", "encoder_linear_units"), ("flow.encoder.num_blocks", "encoder_num_blocks"),
    ("flow.decoder.spk_emb_dim", "num_mels"), ("flow.decoder.estimator.in_channels", "estimator_in_channels"),
    ("flow.decoder.estimator.out_channels", "num_mels"), ("flow.decoder.estimator.channels", "[estimator_channels]"),
    ("flow.decoder.estimator.attention_head_dim", "estimator_attention_head_dim"),
    ("flow.decoder.estimator.n_blocks", "estimator_n_blocks"),
    ("flow.decoder.estimator.num_mid_blocks", "estimator_num_mid_blocks"),
    ("flow.decoder.estimator.num_heads", "estimator_num_heads"),
    ("hift.in_channels", "num_mels"), ("hift.base_channels", "hift_base_channels"),
    ("hift.nb_harmonics", "nb_harmonics"), ("hift.upsample_rates", "upsample_rates"),
    ("hift.upsample_kernel_sizes", "upsample_kernel_sizes"), ("hift.istft_params.n_fft", "istft_n_fft"),
    ("hift.resblock_kernel_sizes", "resblock_kernel_sizes"),
    ("hift.resblock_dilation_sizes", "resblock_dilation_sizes"),
    ("hift.source_resblock_kernel_sizes", "source_resblock_kernel_sizes"),
    ("hift.source_resblock_dilation_sizes", "source_resblock_dilation_sizes"),
    ("hift.f0_predictor.in_channels", "num_mels"), ("hift.f0_predictor.cond_channels", "f0_predictor_channels"),
]
# yaml path -> config field, for fields that change only the computation (taken from the yaml, reported)
BEHAVIOUR_FIELDS = [
    ("flow.input_frame_rate", "token_frame_rate"),
    ("flow.decoder.cfm_params.content.inference_cfg_rate", "inference_cfg_rate"),
    ("hift.sampling_rate", "sampling_rate"), ("hift.nsf_alpha", "nsf_alpha"), ("hift.nsf_sigma", "nsf_sigma"),
    ("hift.nsf_voiced_threshold", "nsf_voiced_threshold"), ("hift.istft_params.hop_len", "istft_hop_length"),
    ("hift.lrelu_slope", "lrelu_slope"), ("hift.audio_limit", "audio_limit"),
]
# yaml path -> what this port implements (a difference is an error)
STRUCTURE = [
    ("flow", "!new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec"),
    ("flow.encoder", "!new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder"),
    ("flow.encoder.input_layer", "linear"), ("flow.encoder.pos_enc_layer_type", "rel_pos_espnet"),
    ("flow.encoder.selfattention_layer_type", "rel_selfattn"), ("flow.encoder.activation_type", "swish"),
    ("flow.encoder.normalize_before", True), ("flow.encoder.use_cnn_module", False),
    ("flow.encoder.macaron_style", False), ("flow.decoder", "!new:cosyvoice.flow.flow_matching.CausalConditionalCFM"),
    ("flow.decoder.cfm_params.content.solver", "euler"), ("flow.decoder.cfm_params.content.t_scheduler", "cosine"),
    ("flow.decoder.estimator.act_fn", "gelu"), ("hift", "!new:cosyvoice.hifigan.generator.HiFTGenerator"),
    ("hift.f0_predictor", "!new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor"),
    ("hift.f0_predictor.num_class", 1),
]
VENDORED_ESTIMATOR = "!new:cosyvoice.flow.decoder.ConditionalDecoder"  # + causal: True (spec §1.5)
LATER_ESTIMATOR = "!new:cosyvoice.flow.decoder.CausalConditionalDecoder"  # upstream CosyVoice after 2024-12-30


@dataclass
class YamlReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    overrides: dict = field(default_factory=dict)  # config field -> the yaml's value
    use_dynamic_chunk: object = None  # None = not in the yaml
    checked: int = 0

    def summary(self) -> str:
        """One line for the model card and the console."""
        verdict = "MISMATCH" if self.errors else "matches the config"
        dynamic = {None: "use_dynamic_chunk not set (False)", True: "use_dynamic_chunk TRUE",
                   False: "use_dynamic_chunk false"}.get(self.use_dynamic_chunk, f"use_dynamic_chunk "
                                                                              f"{self.use_dynamic_chunk!r}")
        taken = f"; taken from it: {self.overrides}" if self.overrides else ""
        return f"cosyvoice.yaml {verdict} ({self.checked} fields checked; {dynamic}{taken})"


def _config_value(config, name: str):
    return [getattr(config, name[1:-1])] if name.startswith("[") else getattr(config, name)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))
    return a == b


def _tag_of(value):
    return value.tag if isinstance(value, Tagged) else value


def check_cosyvoice_yaml(data: dict, config) -> YamlReport:
    """Compare the parsed yaml with `config`; nothing is raised here (the caller decides)."""
    report = YamlReport()
    for path, name in SHAPE_FIELDS + BEHAVIOUR_FIELDS:
        value = _get(data, path)
        if value is _MISSING:
            continue
        if isinstance(value, (Ref, Tagged)):
            report.notes.append(f"cosyvoice.yaml `{path}` is {value!r}, which is not a plain value: not checked")
            continue
        report.checked += 1
        expected = _config_value(config, name)
        if _same(value, expected):
            continue
        if (path, name) in SHAPE_FIELDS:
            report.errors.append(f"cosyvoice.yaml `{path}` is {value!r} but the config's `{name.strip('[]')}` is "
                                 f"{expected!r}: the weights would not fit (pass --config with the released sizes)")
        else:
            report.overrides[name] = value
            report.warnings.append(f"cosyvoice.yaml `{path}` is {value!r}, not the default {expected!r}: the "
                                   f"original runs with the yaml's value, so the config takes it (`{name}`)")
    if "token_frame_rate" in report.overrides:  # the original sets the chunk to 2 s of tokens at start-up
        report.overrides["encoder_chunk_size"] = 2 * int(report.overrides["token_frame_rate"])
    for path, wanted in STRUCTURE:
        value = _tag_of(_get(data, path))
        if value is not _MISSING and not _same(value, wanted):
            report.errors.append(f"cosyvoice.yaml `{path}` is {value!r}; this port implements {wanted!r} only")
    _check_estimator(data, report)
    _report_chunks_and_seeds(data, report)
    return report


def _check_estimator(data: dict, report: YamlReport):
    estimator = _get(data, "flow.decoder.estimator")
    if estimator is _MISSING:
        return
    tag = _tag_of(estimator)
    if tag == LATER_ESTIMATOR:
        report.warnings.append(f"cosyvoice.yaml builds the estimator as {tag!r}, a class of later upstream CosyVoice "
                               "that LLaMA-Omni2's vendored copy (2024-12-30) does not have; its key layout is checked "
                               "against flow.pt below")
    elif tag == VENDORED_ESTIMATOR:
        causal = _get(data, "flow.decoder.estimator.causal")
        if causal is not True:
            report.errors.append(f"cosyvoice.yaml `flow.decoder.estimator.causal` is "
                                 f"{'absent (False)' if causal is _MISSING else repr(causal)}; this port implements "
                                 "the causal estimator only")
    else:
        report.errors.append(f"cosyvoice.yaml `flow.decoder.estimator` is {tag!r}; this port implements "
                             f"{VENDORED_ESTIMATOR!r} with causal: True")


def _report_chunks_and_seeds(data: dict, report: YamlReport):
    dynamic = _get(data, "flow.encoder.use_dynamic_chunk")
    report.use_dynamic_chunk = None if dynamic is _MISSING else dynamic
    if dynamic is True:
        report.warnings.append(
            "!!! cosyvoice.yaml sets flow.encoder.use_dynamic_chunk: True. The original encoder is then called with "
            "decoding_chunk_size 0 and draws a RANDOM chunk mask on every call (spec R3): its output is not "
            "reproducible. This port always uses the static chunks the scripts set (50 tokens / 100 mel frames), "
            "which is what use_dynamic_chunk: False gives; expect differences from the original's audio.")
    for path in ("flow.encoder.use_dynamic_left_chunk", "flow.encoder.static_chunk_size",
                 "flow.decoder.estimator.static_chunk_size", "flow.decoder.estimator.num_decoding_left_chunks"):
        value = _get(data, path)
        if value is not _MISSING:
            report.notes.append(f"cosyvoice.yaml `{path}`: {value!r} (static chunk sizes are overridden at start-up "
                                "by the LLaMA-Omni2 scripts: 2 s of tokens; left chunks: all)")
    calls = [v for v in data.values() if isinstance(v, Tagged) and v.tag.startswith("!apply:")]
    seeds = [f"{v.tag[len('!apply:'):]}({', '.join(map(repr, v.value if isinstance(v.value, list) else [v.value]))})"
             for v in calls]
    if seeds:
        report.notes.append("cosyvoice.yaml seeds the RNG when loaded (" + ", ".join(seeds) + "): the original's "
                            "flow noise is drawn after that, and after every random init before it (spec Q5)")
    if "llm" in data:
        report.notes.append("cosyvoice.yaml has an `llm:` section: the original builds it (random init) before the "
                            "flow, which moves the RNG before the noise is drawn (spec Q5)")


def read_and_check_yaml(path: Path, config) -> YamlReport:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConversionError(f"cannot read {path}: {err}") from None
    return check_cosyvoice_yaml(parse_cosyvoice_yaml(text, str(path)), config)
