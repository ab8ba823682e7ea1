"""Fake ICTNLP/cosy2_decoder files in the ORIGINAL formats, for tests/test_conversion_token2wav.py.

The key layout is written from spec `llama-omni2.md` section 1.5 and the vendored CosyVoice classes it cites
(`CausalMaskedDiffWithXvec` + `UpsampleConformerEncoder` + `ConditionalDecoder`, `HiFTGenerator`), NOT from
llama_omni_hf's module, so the converter's table is checked against an independent description:

    flow.pt   `input_embedding.*`, `spk_embed_affine_layer.*`, `encoder_proj.*`, `encoder.*`,
              `decoder.estimator.*` (the U-Net's Sequential indices `block.0` / `block.2`, as released)
    hift.pt   legacy `torch.nn.utils.weight_norm` (`X.weight_g` / `X.weight_v`), or the parametrization form
              (`generator.X.parametrizations.weight.original0/1`) that a FlashCosyVoice dump shows

Weight-normed layers are real torch modules (`FakeDecoder.weight_norm_modules`), with g moved away from ||v||
so that folding matters; the tests compare the converter's fold with what those modules compute.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

RELEASED_YAML = """\
# set random seed, so that you may reproduce your result.
__set_seed1: !apply:random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]

# fixed params
sample_rate: 24000
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: {input_size}
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: {input_size}
        attention_heads: {heads}
        linear_units: {linear_units}
        num_blocks: {num_blocks}
        dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: {input_size}
        use_cnn_module: False
        macaron_style: False
        use_dynamic_chunk: {dynamic}
        static_chunk_size: !ref <token_frame_rate> * 2
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 320
            out_channels: 80
            causal: True
            channels: [{channels}]
            dropout: 0.0
            attention_head_dim: {head_dim}
            n_blocks: {n_blocks}
            num_mid_blocks: {mid_blocks}
            num_heads: {est_heads}
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {base_channels}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {f0_channels}

feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    sampling_rate: !ref <sample_rate>
"""


def cosyvoice_yaml(config, dynamic_chunk: bool = False) -> str:
    """A cosyvoice.yaml in hyperpyyaml style (tags `!new:`, `!ref`, `!apply:`, `!name:`) for `config`'s sizes."""
    c = config
    return RELEASED_YAML.format(
        input_size=c.input_size, heads=c.encoder_attention_heads, linear_units=c.encoder_linear_units,
        num_blocks=c.encoder_num_blocks, dynamic=dynamic_chunk, channels=c.estimator_channels,
        head_dim=c.estimator_attention_head_dim, n_blocks=c.estimator_n_blocks,
        mid_blocks=c.estimator_num_mid_blocks, est_heads=c.estimator_num_heads, base_channels=c.hift_base_channels,
        f0_channels=c.f0_predictor_channels)


# ----------------------------------------------------------------------------- flow.pt layout (spec §1.5)


def _linear(p, n_out, n_in, bias=True):
    return {f"{p}.weight": (n_out, n_in), **({f"{p}.bias": (n_out,)} if bias else {})}


def _norm(p, n):
    return {f"{p}.weight": (n,), f"{p}.bias": (n,)}


def _conv(p, n_out, n_in, k):
    return {f"{p}.weight": (n_out, n_in, k), f"{p}.bias": (n_out,)}


def _conformer_layer(p, d, heads, units):
    shapes = {}
    for name in ("linear_q", "linear_k", "linear_v", "linear_out"):
        shapes.update(_linear(f"{p}.self_attn.{name}", d, d))
    shapes.update(_linear(f"{p}.self_attn.linear_pos", d, d, bias=False))
    shapes[f"{p}.self_attn.pos_bias_u"] = (heads, d // heads)
    shapes[f"{p}.self_attn.pos_bias_v"] = (heads, d // heads)
    shapes.update(_linear(f"{p}.feed_forward.w_1", units, d))
    shapes.update(_linear(f"{p}.feed_forward.w_2", d, units))
    shapes.update(_norm(f"{p}.norm_ff", d))
    shapes.update(_norm(f"{p}.norm_mha", d))
    return shapes


def _resnet(p, din, dout, time_dim):
    return {**_linear(f"{p}.mlp.1", dout, time_dim), **_conv(f"{p}.block1.block.0", dout, din, 3),
            **_norm(f"{p}.block1.block.2", dout), **_conv(f"{p}.block2.block.0", dout, dout, 3),
            **_norm(f"{p}.block2.block.2", dout), **_conv(f"{p}.res_conv", dout, din, 1)}


def _transformer_block(p, dim, heads, head_dim, ff_mult):
    inner = heads * head_dim
    return {**_norm(f"{p}.norm1", dim), **_linear(f"{p}.attn1.to_q", inner, dim, bias=False),
            **_linear(f"{p}.attn1.to_k", inner, dim, bias=False), **_linear(f"{p}.attn1.to_v", inner, dim, bias=False),
            **_linear(f"{p}.attn1.to_out.0", dim, inner), **_norm(f"{p}.norm3", dim),
            **_linear(f"{p}.ff.net.0.proj", dim * ff_mult, dim), **_linear(f"{p}.ff.net.2", dim, dim * ff_mult)}


def original_flow_shapes(c) -> dict[str, tuple[int, ...]]:
    """Every key of CausalMaskedDiffWithXvec's state dict (flow.pt) with its shape, for config `c`."""
    d, mels = c.input_size, c.num_mels
    s = {"input_embedding.weight": (c.vocab_size, d), **_linear("spk_embed_affine_layer", mels, c.spk_embed_dim),
         **_linear("encoder_proj", mels, d)}
    for embed in ("embed", "up_embed"):
        s.update({**_linear(f"encoder.{embed}.out.0", d, d), **_norm(f"encoder.{embed}.out.1", d)})
    s.update(_conv("encoder.pre_lookahead_layer.conv1", d, d, c.pre_lookahead_len + 1))
    s.update(_conv("encoder.pre_lookahead_layer.conv2", d, d, 3))
    for i in range(c.encoder_num_blocks):
        s.update(_conformer_layer(f"encoder.encoders.{i}", d, c.encoder_attention_heads, c.encoder_linear_units))
    s.update(_conv("encoder.up_layer.conv", d, d, 2 * c.token_mel_ratio + 1))
    for i in range(c.encoder_num_up_blocks):
        s.update(_conformer_layer(f"encoder.up_encoders.{i}", d, c.encoder_attention_heads, c.encoder_linear_units))
    s.update(_norm("encoder.after_norm", d))

    e, ch, time_dim = "decoder.estimator", c.estimator_channels, 4 * c.estimator_channels
    blocks = lambda p: {k: v for j in range(c.estimator_n_blocks) for k, v in _transformer_block(  # noqa: E731
        f"{p}.{j}", ch, c.estimator_num_heads, c.estimator_attention_head_dim, c.estimator_ff_mult).items()}
    s.update({**_linear(f"{e}.time_mlp.linear_1", time_dim, 4 * mels), **_linear(f"{e}.time_mlp.linear_2", time_dim,
                                                                                   time_dim)})
    s.update({**_resnet(f"{e}.down_blocks.0.0", 4 * mels, ch, time_dim), **blocks(f"{e}.down_blocks.0.1"),
              **_conv(f"{e}.down_blocks.0.2", ch, ch, 3)})
    for i in range(c.estimator_num_mid_blocks):
        s.update({**_resnet(f"{e}.mid_blocks.{i}.0", ch, ch, time_dim), **blocks(f"{e}.mid_blocks.{i}.1")})
    s.update({**_resnet(f"{e}.up_blocks.0.0", 2 * ch, ch, time_dim), **blocks(f"{e}.up_blocks.0.1"),
              **_conv(f"{e}.up_blocks.0.2", ch, ch, 3)})
    s.update({**_conv(f"{e}.final_block.block.0", ch, ch, 3), **_norm(f"{e}.final_block.block.2", ch),
              **_conv(f"{e}.final_proj", mels, ch, 1)})
    return s


# ----------------------------------------------------------------------------- hift.pt layout (spec §1.5)


def original_hift_layout(c) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[str, tuple[int, ...]]]]:
    """HiFTGenerator as (plain tensors: key -> shape, weight-normed layers: prefix -> (module kind, weight shape)).
    The kind is "conv" or "conv_transpose" (whose weight is [in, out, k]: weight norm's dim 0 is the input)."""
    plain, wn = {}, {}
    base, n_src = c.hift_base_channels, c.istft_n_fft + 2
    plain.update(_linear("m_source.l_linear", 1, c.nb_harmonics + 1))
    wn["conv_pre"] = ("conv", (base, c.num_mels, 7))
    plain["conv_pre.bias"] = (base,)
    for i, (rate, kernel) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)):
        wn[f"ups.{i}"] = ("conv_transpose", (base // 2**i, base // 2 ** (i + 1), kernel))
        plain[f"ups.{i}.bias"] = (base // 2 ** (i + 1),)

    def resblock(p, ch, kernel, dilations):
        for j in range(len(dilations)):
            for convs in ("convs1", "convs2"):
                wn[f"{p}.{convs}.{j}"] = ("conv", (ch, ch, kernel))
                plain[f"{p}.{convs}.{j}.bias"] = (ch,)
            plain[f"{p}.activations1.{j}.alpha"] = (ch,)
            plain[f"{p}.activations2.{j}.alpha"] = (ch,)

    rates = [1] + list(reversed(c.upsample_rates))[:-1]
    cumulative = [1]
    for r in rates[1:]:
        cumulative.append(cumulative[-1] * r)
    for i, (u, k, d) in enumerate(zip(reversed(cumulative), c.source_resblock_kernel_sizes,
                                      c.source_resblock_dilation_sizes)):
        ch = base // 2 ** (i + 1)
        plain.update(_conv(f"source_downs.{i}", ch, n_src, 1 if u == 1 else 2 * u))
        resblock(f"source_resblocks.{i}", ch, k, d)
    for i in range(len(c.upsample_rates)):
        for j, (k, d) in enumerate(zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes)):
            resblock(f"resblocks.{i * len(c.resblock_kernel_sizes) + j}", base // 2 ** (i + 1), k, d)
    wn["conv_post"] = ("conv", (n_src, base // 2 ** len(c.upsample_rates), 7))
    plain["conv_post.bias"] = (n_src,)
    f0 = c.f0_predictor_channels
    for i in range(5):
        wn[f"f0_predictor.condnet.{2 * i}"] = ("conv", (f0, c.num_mels if i == 0 else f0, 3))
        plain[f"f0_predictor.condnet.{2 * i}.bias"] = (f0,)
    plain.update(_linear("f0_predictor.classifier", 1, f0))
    return plain, wn


def parameter_count(shapes) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for size in shape:
            n *= size
        total += n
    return total


# ----------------------------------------------------------------------------- the files


def weight_norm_module(kind: str, shape: tuple[int, ...], parametrized: bool = False) -> nn.Module:
    """A conv of `shape` with torch's weight norm (dim 0), legacy hook (weight_g/weight_v) or parametrization."""
    if kind == "conv":
        module = nn.Conv1d(shape[1], shape[0], shape[2])
    else:
        module = nn.ConvTranspose1d(shape[0], shape[1], shape[2])
    if parametrized:
        return nn.utils.parametrizations.weight_norm(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # legacy weight_norm is deprecated, the release used it
        return nn.utils.weight_norm(module)


@dataclass
class FakeDecoder:
    root: Path
    flow: Path
    hift: Path
    flow_state: dict
    hift_state: dict  # as saved (legacy or parametrized names)
    weight_norm_modules: dict = field(default_factory=dict)  # layer prefix -> legacy weight-norm module (g, v set)


def _scale(shape) -> float:
    """1 / sqrt(fan in) for matrices and kernels (activations keep their size through the layers), 0.1 for vectors."""
    fan_in = 1
    for size in shape[1:]:
        fan_in *= size
    return fan_in ** -0.5 if len(shape) > 1 else 0.1


def fake_flow_state(config, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) * _scale(shape) for k, shape in original_flow_shapes(config).items()}


def fake_hift_state(config, seed: int = 1, parametrized: bool = False) -> tuple[dict, dict]:
    """(state dict as the file holds it, prefix -> legacy weight-norm module computing the same weights)."""
    gen = torch.Generator().manual_seed(seed)
    plain, wn = original_hift_layout(config)
    state = {k: torch.randn(shape, generator=gen) * _scale(shape) for k, shape in plain.items()}
    modules = {}
    for prefix, (kind, shape) in wn.items():
        v = torch.randn(shape, generator=gen) * _scale(shape)
        norms = v.flatten(1).norm(dim=1).view(-1, *([1] * (len(shape) - 1)))
        g = norms * (0.5 + torch.rand(norms.shape, generator=gen))  # ||w|| != ||v||: the fold is not the identity
        legacy = weight_norm_module(kind, shape)
        with torch.no_grad():
            legacy.weight_g.copy_(g)
            legacy.weight_v.copy_(v)
        modules[prefix] = legacy
        if parametrized:
            state[f"{prefix}.parametrizations.weight.original0"] = g.clone()
            state[f"{prefix}.parametrizations.weight.original1"] = v.clone()
        else:
            state[f"{prefix}.weight_g"] = g.clone()
            state[f"{prefix}.weight_v"] = v.clone()
    if parametrized:  # the HiFiGan training wrapper's prefix, stripped by the original loader
        state = {f"generator.{k}": t for k, t in state.items()}
    return state, modules


def write_fake_decoder(root, config, parametrized: bool = False, yaml: str | None = None) -> FakeDecoder:
    """ROOT/flow.pt, ROOT/hift.pt (+ ROOT/cosyvoice.yaml when `yaml` is given), as torch.save wrote the release."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    flow = fake_flow_state(config)
    hift, modules = fake_hift_state(config, parametrized=parametrized)
    torch.save(flow, root / "flow.pt")
    torch.save(hift, root / "hift.pt")
    if yaml is not None:
        (root / "cosyvoice.yaml").write_text(yaml)
    return FakeDecoder(root, root / "flow.pt", root / "hift.pt", flow, hift, modules)
