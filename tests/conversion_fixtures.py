"""Fake LLaMA-Omni release files in the ORIGINAL formats, for the conversion tests and memory figures.

`write_fake_original(root, sizes)` writes what a maintainer downloads (spec sections 1 and 5), with random
weights and original key names:

    root/checkpoint/   config.json (model_type omni_speech2s_llama, ctc_decoder_config as a STRING),
                       model-0000i-of-0000n.safetensors (fp16) + model.safetensors.index.json,
                       Llama-3-shaped tokenizer files, generation_config.json (sampling defaults)
    root/large-v3.pt   openai-whisper checkpoint {"dims": ..., "model_state_dict": encoder.* + decoder.*} (fp16)
    root/vocoder/g_00500000   fairseq pickle {"generator": state_dict with weight_g / weight_v}
    root/vocoder/config.json  fairseq CodeHiFiGAN config

`RefCodeHiFiGAN` is the vocoder written from spec section 5 with torch's own weight-norm modules; the tests
use it (and openai-whisper's AudioEncoder, transformers' LlamaForCausalLM) as the independent reference.

Command line (memory figures: mid = LLM ~1.6 GB; real = the released sizes with zero weights, ~20 GB):
    python tests/conversion_fixtures.py --preset mid /tmp/fake-mid
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn


@dataclass(frozen=True)
class FakeSizes:
    # LLM (Llama-3 layout); vocab_size 0 = the tiny tokenizer's length
    vocab_size: int = 0
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    # Whisper (openai-whisper dims); 1500 positions = 30 s, 300 speech positions with k=5, as released
    n_mels: int = 128
    n_audio_ctx: int = 1500
    n_audio_state: int = 128
    n_audio_head: int = 2
    n_audio_layer: int = 2
    n_text_state: int = 128
    n_text_layer: int = 1
    n_vocab_whisper: int = 100
    # adaptor and unit decoder
    ds_rate: int = 5
    adaptor_hidden: int = 96
    ctc_layers: int = 2
    ctc_dim: int = 64
    ctc_heads: int = 4
    ctc_intermediate: int = 96
    ctc_upsample: int = 25
    unit_vocab: int = 100
    # vocoder
    voc_channels: int = 32
    voc_embedding: int = 16
    voc_dur_hidden: int = 16
    num_shards: int = 2
    zeros: bool = False  # all-zero weights, built as expanded views (no memory): for the real-size memory run


TINY = FakeSizes()
# LLM ~1.6 GB in fp16, Whisper medium-sized encoder, the REAL vocoder size: for peak-memory figures only.
MID = FakeSizes(
    vocab_size=32000, hidden=2048, layers=16, heads=16, kv_heads=4, intermediate=5632,
    n_audio_ctx=1500, n_audio_state=1024, n_audio_head=16, n_audio_layer=12, n_text_state=1024,
    n_text_layer=2, n_vocab_whisper=51866, adaptor_hidden=2048, ctc_dim=2048, ctc_heads=16,
    ctc_intermediate=5504, unit_vocab=1000, voc_channels=512, voc_embedding=128, voc_dur_hidden=128,
    num_shards=4,
)

# The released sizes (spec section 1), zero weights: only for measuring the converter's memory on the 8B.
REAL = replace(MID, vocab_size=128256, hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336,
               n_audio_state=1280, n_audio_head=20, n_audio_layer=32, n_text_state=1280, n_text_layer=32,
               adaptor_hidden=2048, ctc_dim=4096, ctc_heads=32, ctc_intermediate=11008, zeros=True)

SYSTEM_FIELDS_OF_THE_RELEASE = dict(
    speech_encoder="models/speech_encoder/large-v3.pt",
    speech_encoder_type="whisper",
    speech_projector_type="linear",
    speech_generator_type="ctc",
    ctc_loss_weight=1.0,
    tokenizer_model_max_length=2048,
    tokenizer_padding_side="right",
)
UPSAMPLE_RATES = [5, 4, 4, 2, 2]
UPSAMPLE_KERNELS = [11, 8, 8, 4, 4]
RESBLOCK_KERNELS = [3, 7, 11]
RESBLOCK_DILATIONS = [[1, 3, 5], [1, 3, 5], [1, 3, 5]]


# ----------------------------------------------------------------------------- reference vocoder (spec §5)


def _wn(module):
    with warnings.catch_warnings():  # legacy weight_norm gives fairseq's weight_g / weight_v keys
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(module)


class _RefResBlock(nn.Module):
    def __init__(self, channels, kernel, dilations):
        super().__init__()
        self.convs1 = nn.ModuleList(
            _wn(nn.Conv1d(channels, channels, kernel, dilation=d, padding=(kernel * d - d) // 2)) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            _wn(nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2)) for _ in dilations
        )

    def forward(self, x):
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, 0.1)), 0.1))
        return x


class _RefDurationPredictor(nn.Module):
    def __init__(self, dim, hidden, kernel):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv1d(dim, hidden, kernel, padding=(kernel - 1) // 2), nn.ReLU())
        self.ln1 = nn.LayerNorm(hidden)
        self.conv2 = nn.Sequential(nn.Conv1d(hidden, hidden, kernel, padding=(kernel - 1) // 2), nn.ReLU())
        self.ln2 = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, 1)

    def forward(self, x):  # [1, T, C] -> [1, T]; dropout is off at inference
        x = self.ln1(self.conv1(x.transpose(1, 2)).transpose(1, 2))
        x = self.ln2(self.conv2(x.transpose(1, 2)).transpose(1, 2))
        return self.proj(x).squeeze(-1)


class RefCodeHiFiGAN(nn.Module):
    """fairseq's CodeHiFiGAN generator as spec section 5 describes it, with torch's legacy weight norm."""

    def __init__(self, sizes: FakeSizes):
        super().__init__()
        ch = sizes.voc_channels
        self.dict = nn.Embedding(sizes.unit_vocab, sizes.voc_embedding)
        self.dur_predictor = _RefDurationPredictor(sizes.voc_embedding, sizes.voc_dur_hidden, 3)
        self.conv_pre = _wn(nn.Conv1d(sizes.voc_embedding, ch, 7, padding=3))
        self.ups = nn.ModuleList(
            _wn(nn.ConvTranspose1d(ch // 2**i, ch // 2 ** (i + 1), k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(UPSAMPLE_RATES, UPSAMPLE_KERNELS))
        )
        self.resblocks = nn.ModuleList(
            _RefResBlock(ch // 2 ** (i + 1), k, d)
            for i in range(len(UPSAMPLE_RATES))
            for k, d in zip(RESBLOCK_KERNELS, RESBLOCK_DILATIONS)
        )
        self.conv_post = _wn(nn.Conv1d(ch // 2 ** len(UPSAMPLE_RATES), 1, 7, padding=3))

    @torch.no_grad()
    def forward(self, units: torch.Tensor) -> torch.Tensor:
        """units [T] -> waveform [T' * 320]."""
        x = self.dict(units[None])  # [1, T, C]
        durations = torch.clamp(torch.round(torch.exp(self.dur_predictor(x)) - 1).long(), min=1)
        x = torch.repeat_interleave(x, durations[0], dim=1).transpose(1, 2)  # [1, C, frames]
        x = self.conv_pre(x)
        n = len(RESBLOCK_KERNELS)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, 0.1))
            x = sum(self.resblocks[i * n + j](x) for j in range(n)) / n
        return torch.tanh(self.conv_post(F.leaky_relu(x))).flatten()  # final slope: torch default 0.01


def _perturb_weight_norm(module: nn.Module, gen: torch.Generator):
    """Scale every g away from ||v||, so folding w = v * g / ||v|| is not the identity."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight_g"):
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))


# ----------------------------------------------------------------------------- writers


ZEROS = False  # set by write_fake_original for FakeSizes.zeros


def _randn(gen, *shape, scale=None):
    if ZEROS:
        return torch.zeros(()).expand(*shape)  # materialized shard by shard, in fp16, by write_shards
    scale = scale if scale is not None else 1.0 / (shape[-1] ** 0.5)
    return torch.randn(*shape, generator=gen) * scale


def _around(gen, size, center):
    return torch.zeros(()).expand(size) if ZEROS else center + 0.1 * torch.randn(size, generator=gen)


def _llama_layer(prefix, hidden, heads, kv_heads, inter, gen):
    head_dim = hidden // heads
    return {
        f"{prefix}.self_attn.q_proj.weight": _randn(gen, heads * head_dim, hidden),
        f"{prefix}.self_attn.k_proj.weight": _randn(gen, kv_heads * head_dim, hidden),
        f"{prefix}.self_attn.v_proj.weight": _randn(gen, kv_heads * head_dim, hidden),
        f"{prefix}.self_attn.o_proj.weight": _randn(gen, hidden, heads * head_dim),
        f"{prefix}.mlp.gate_proj.weight": _randn(gen, inter, hidden),
        f"{prefix}.mlp.up_proj.weight": _randn(gen, inter, hidden),
        f"{prefix}.mlp.down_proj.weight": _randn(gen, hidden, inter),
        f"{prefix}.input_layernorm.weight": _around(gen, hidden, 1.0),
        f"{prefix}.post_attention_layernorm.weight": _around(gen, hidden, 1.0),
    }


def llm_state_dict(s: FakeSizes, vocab_size: int, eos_ids, gen) -> dict:
    """Original top-level keys of everything but the speech encoder: Llama, projector, unit decoder."""
    sd = {"model.embed_tokens.weight": _randn(gen, vocab_size, s.hidden, scale=1.0)}
    for i in range(s.layers):
        sd.update(_llama_layer(f"model.layers.{i}", s.hidden, s.heads, s.kv_heads, s.intermediate, gen))
    sd["model.norm.weight"] = _around(gen, s.hidden, 1.0)
    lm_head = _randn(gen, vocab_size, s.hidden)
    if not ZEROS:
        lm_head[list(eos_ids)] = 0  # EOS never wins a greedy step, so answers have their full length
    sd["lm_head.weight"] = lm_head
    sd["model.speech_projector.linear1.weight"] = _randn(gen, s.adaptor_hidden, s.n_audio_state * s.ds_rate)
    sd["model.speech_projector.linear1.bias"] = _around(gen, s.adaptor_hidden, 0.0)
    sd["model.speech_projector.linear2.weight"] = _randn(gen, s.hidden, s.adaptor_hidden)
    sd["model.speech_projector.linear2.bias"] = _around(gen, s.hidden, 0.0)
    sd["speech_generator.input_proj.weight"] = _randn(gen, s.ctc_dim, s.hidden)
    sd["speech_generator.input_proj.bias"] = _around(gen, s.ctc_dim, 0.0)
    for i in range(s.ctc_layers):
        sd.update(_llama_layer(f"speech_generator.layers.{i}", s.ctc_dim, s.ctc_heads, s.ctc_heads,
                               s.ctc_intermediate, gen))
    sd["speech_generator.output_proj.weight"] = _randn(gen, s.unit_vocab + 1, s.ctc_dim, scale=3 / s.ctc_dim**0.5)
    sd["speech_generator.output_proj.bias"] = _around(gen, s.unit_vocab + 1, 0.0)
    return sd


def whisper_checkpoint(s: FakeSizes, gen) -> dict:
    """An openai-whisper checkpoint dict (fp16), built with openai-whisper's own module for its key names."""
    import whisper.model

    dims = whisper.model.ModelDimensions(
        n_mels=s.n_mels, n_audio_ctx=s.n_audio_ctx, n_audio_state=s.n_audio_state, n_audio_head=s.n_audio_head,
        n_audio_layer=s.n_audio_layer, n_vocab=s.n_vocab_whisper, n_text_ctx=16, n_text_state=s.n_text_state,
        n_text_head=s.n_audio_head, n_text_layer=s.n_text_layer,
    )
    if ZEROS:  # real size: shapes from the module built on the meta device, zero data
        with torch.device("meta"):  # (Whisper() itself builds a sparse buffer, which meta cannot)
            encoder = whisper.model.AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state,
                                                 dims.n_audio_head, dims.n_audio_layer)
            decoder = whisper.model.TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head,
                                                dims.n_text_layer)
            shapes = {f"{name}.{k}": v.shape for name, module in (("encoder", encoder), ("decoder", decoder))
                      for k, v in module.state_dict().items()}
        return {"dims": asdict(dims), "model_state_dict": {k: torch.zeros(s_, dtype=torch.float16)
                                                           for k, s_ in shapes.items()}}
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = whisper.model.Whisper(dims)
    with torch.no_grad():  # LayerNorms start at 1/0: move them so a wrong mapping shows
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(_around(gen, p.shape, 0.0))
    return {"dims": asdict(dims), "model_state_dict": {k: v.half() for k, v in model.state_dict().items()}}


def fairseq_vocoder(s: FakeSizes, gen) -> tuple[dict, dict, RefCodeHiFiGAN]:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    ref = RefCodeHiFiGAN(s).eval()
    _perturb_weight_norm(ref, gen)
    with torch.no_grad():
        ref.dur_predictor.proj.bias.fill_(1.0)  # durations of a few frames, not all 1
    config = {
        "resblock": "1", "num_gpus": 0, "batch_size": 16, "learning_rate": 0.0002, "adam_b1": 0.8,
        "adam_b2": 0.99, "lr_decay": 0.999, "seed": 1234,
        "upsample_rates": UPSAMPLE_RATES, "upsample_kernel_sizes": UPSAMPLE_KERNELS,
        "upsample_initial_channel": s.voc_channels, "resblock_kernel_sizes": RESBLOCK_KERNELS,
        "resblock_dilation_sizes": RESBLOCK_DILATIONS, "num_embeddings": s.unit_vocab,
        "embedding_dim": s.voc_embedding, "model_in_dim": s.voc_embedding, "segment_size": 8960,
        "code_hop_size": 320, "f0": False, "num_mels": 80, "num_freq": 1025, "n_fft": 1024, "hop_size": 256,
        "win_size": 1024, "dur_prediction_weight": 1.0,
        "dur_predictor_params": {"encoder_embed_dim": s.voc_embedding, "var_pred_hidden_dim": s.voc_dur_hidden,
                                 "var_pred_kernel_size": 3, "var_pred_dropout": 0.5},
        "sampling_rate": 16000, "fmin": 0, "fmax": 8000, "fmax_for_loss": None,
    }
    return {"generator": {k: v.clone() for k, v in ref.state_dict().items()}}, config, ref


def _as_released_tokenizer_config(path: Path):
    """The release's tokenizer_config.json was written by transformers 4.43: PreTrainedTokenizerFast, no pad."""
    data = json.loads(path.read_text())
    data.pop("pad_token", None)
    data.pop("backend", None)
    data.update(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=True,
                model_input_names=["input_ids", "attention_mask"])
    path.write_text(json.dumps(data, indent=2))


def released_config(s: FakeSizes, vocab_size: int, bos: int, eos: list[int]) -> dict:
    return {
        "_name_or_path": "Llama-3.1-8B-Omni", "architectures": ["OmniSpeech2SLlamaForCausalLM"],
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": bos, "eos_token_id": eos,
        "hidden_act": "silu", "hidden_size": s.hidden, "initializer_range": 0.02,
        "intermediate_size": s.intermediate, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "omni_speech2s_llama", "num_attention_heads": s.heads, "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "float16",
        "transformers_version": "4.43.4", "use_cache": True, "vocab_size": vocab_size,
        **SYSTEM_FIELDS_OF_THE_RELEASE,
        "speech_encoder_ds_rate": s.ds_rate, "speech_encoder_hidden_size": s.n_audio_state,
        "ctc_decoder_config": f"({s.ctc_layers},{s.ctc_dim},{s.ctc_heads},{s.ctc_intermediate})",
        "ctc_upsample_factor": s.ctc_upsample, "unit_vocab_size": s.unit_vocab,
    }


def write_shards(directory: Path, state_dict: dict, num_shards: int):
    """fp16 safetensors shards of about equal size + index, named as transformers 4.43 saved the release."""
    sizes = {k: v.numel() * 2 for k, v in state_dict.items()}
    target = sum(sizes.values()) / num_shards
    groups, size = [[]], 0
    for key in state_dict:
        if groups[-1] and size + sizes[key] > target and len(groups) < num_shards:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += sizes[key]
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state_dict[k].half().contiguous() for k in keys}, directory / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


@dataclass
class FakeOriginal:
    root: Path
    checkpoint: Path
    whisper: Path
    vocoder: Path
    vocoder_config: Path
    sizes: FakeSizes
    reference_vocoder: RefCodeHiFiGAN


def write_fake_original(root, sizes: FakeSizes = TINY, seed: int = 0, encoder_in_shards: bool = True) -> FakeOriginal:
    from llama_omni_hf.tiny_tokenizer import build_tiny_llama3_tokenizer

    global ZEROS
    ZEROS = sizes.zeros
    root = Path(root)
    checkpoint = root / "checkpoint"
    checkpoint.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tokenizer = build_tiny_llama3_tokenizer()
    tokenizer.save_pretrained(checkpoint)
    _as_released_tokenizer_config(checkpoint / "tokenizer_config.json")
    vocab_size = sizes.vocab_size or len(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    bos, eos = ids("<|begin_of_text|>"), [ids("<|end_of_text|>"), ids("<|eom_id|>"), ids("<|eot_id|>")]
    sizes = replace(sizes, vocab_size=vocab_size)

    whisper_ckpt = whisper_checkpoint(sizes, gen)
    torch.save(whisper_ckpt, root / "large-v3.pt")
    state = llm_state_dict(sizes, vocab_size, eos, gen)
    if encoder_in_shards:  # the release carries the (frozen) encoder in its shards too
        encoder = {k: v for k, v in whisper_ckpt["model_state_dict"].items() if k.startswith("encoder.")}
        state = {**{"model.speech_encoder." + k[len("encoder."):]: v for k, v in encoder.items()}, **state}
    write_shards(checkpoint, state, sizes.num_shards)
    (checkpoint / "config.json").write_text(json.dumps(released_config(sizes, vocab_size, bos, eos), indent=2))
    generation = {"bos_token_id": bos, "do_sample": True, "eos_token_id": eos, "temperature": 0.6, "top_p": 0.9,
                  "transformers_version": "4.43.4"}
    (checkpoint / "generation_config.json").write_text(json.dumps(generation, indent=2))

    vocoder_dir = root / "vocoder"
    vocoder_dir.mkdir(exist_ok=True)
    pickle, config, ref = fairseq_vocoder(sizes, gen)
    torch.save(pickle, vocoder_dir / "g_00500000")
    (vocoder_dir / "config.json").write_text(json.dumps(config, indent=2))
    return FakeOriginal(root, checkpoint, root / "large-v3.pt", vocoder_dir / "g_00500000",
                        vocoder_dir / "config.json", sizes, ref)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--preset", choices=["tiny", "mid", "real"], default="tiny",
                        help="real: the released sizes with zero weights (~20 GB on disk), for memory figures")
    args = parser.parse_args(argv)
    fake = write_fake_original(args.output_dir, {"tiny": TINY, "mid": MID, "real": REAL}[args.preset])
    size = sum(p.stat().st_size for p in fake.root.rglob("*") if p.is_file())
    print(f"wrote {fake.root} ({size / 2**30:.2f} GiB):")
    print(f"  --checkpoint {fake.checkpoint} --whisper-checkpoint {fake.whisper} "
          f"--vocoder-checkpoint {fake.vocoder} --vocoder-config {fake.vocoder_config}")


if __name__ == "__main__":
    main()
