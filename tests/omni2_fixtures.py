"""Fake LLaMA-Omni2 releases in the ORIGINAL formats, for tests/test_conversion_omni2.py.

Written from the spec (`llama-omni2.md` §1.1-1.4: the released files, config fields and key names of
`Omni2Speech2SQwen2ForCausalLM` as transformers 4.43 saved it), not from llama_omni_hf's names:

    root/checkpoint/   config.json (model_type omni2_speech2s_qwen2, the §1.2 fields at a tiny size, the TTS config
                       as the dict `speech_generator`, `stream_params` as the STRING "(3,10)"),
                       model.safetensors (bf16) or model-0000i-of-00002.safetensors + model.safetensors.index.json,
                       Qwen2.5-shaped tokenizer files with `<speech>` and a chat template, generation_config.json
                       (Qwen2.5-Instruct's sampling defaults), tts_tokenizer/ (`<sep>`, then `<0>`.. `<6560>`)
    root/large-v3.pt   openai-whisper checkpoint {"dims", "model_state_dict": encoder.* + decoder.*} (fp16); the
                       checkpoint's `model.speech_encoder.*` is its bf16 rounding, as in the release (Q14)
    root/cosy2_decoder/ flow.pt, hift.pt, cosyvoice.yaml (tests/token2wav_fixtures.py) + a speaker x-vector .npy

Variants: LLM head tied (no `lm_head.weight`, the 0.5B-3B releases) or not (7B+); the TTS head
`speech_generator.model.lm_head.weight` present or absent (quirk Q1); sharded or single file; with or without
generation_config.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

UNITS = 6561


@dataclass(frozen=True)
class Omni2Sizes:
    # the LLM (Qwen2.5 layout; vocab padded past the tokenizer, as Qwen's 151936 > 151666)
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab_pad_to: int = 64
    # Whisper (openai-whisper dims): the real 128 mels and 1500 positions (300 LLM positions per turn with k=5);
    # heads 64 wide as in every openai-whisper size
    n_mels: int = 128
    n_audio_ctx: int = 1500
    n_audio_state: int = 128
    n_audio_head: int = 2
    n_audio_layer: int = 2
    n_text_layer: int = 1
    n_vocab_whisper: int = 100
    # adaptor (2048 hard-coded in the original's EncoderProjectorConcat, so at every size) and the TTS Qwen2
    ds_rate: int = 5
    adaptor_hidden: int = 2048
    tts_hidden: int = 32
    tts_layers: int = 2
    tts_heads: int = 2
    tts_kv_heads: int = 1
    tts_intermediate: int = 64
    tokenizer_model_max_length: int = 4096
    stream_params: str = "(3,10)"


TINY = Omni2Sizes()


@dataclass
class FakeRelease:
    root: Path
    checkpoint: Path
    whisper: Path | None
    decoder: Path | None
    speaker: Path | None  # an x-vector file for --speaker en=FILE
    sizes: Omni2Sizes
    state: dict  # the checkpoint's tensors as written (original names, bf16)
    ids: dict  # speech, sep, unit_offset, tts_eos, im_end, endoftext
    options: dict = field(default_factory=dict)
    decoder_files: object = None  # token2wav_fixtures.FakeDecoder (its tensors and weight-norm modules)


def _randn(gen, *shape, scale=None):
    scale = scale if scale is not None else 1.0 / (shape[-1] ** 0.5)
    return torch.randn(*shape, generator=gen) * scale


def _around(gen, size, center):
    return center + 0.1 * torch.randn(size, generator=gen)


def _qwen2_layer(prefix, hidden, heads, kv_heads, inter, gen) -> dict:
    """transformers' Qwen2DecoderLayer keys (q/k/v with bias, o_proj without), spec §1.4."""
    hd = hidden // heads
    return {
        f"{prefix}.self_attn.q_proj.weight": _randn(gen, heads * hd, hidden),
        f"{prefix}.self_attn.q_proj.bias": _around(gen, heads * hd, 0.0),
        f"{prefix}.self_attn.k_proj.weight": _randn(gen, kv_heads * hd, hidden),
        f"{prefix}.self_attn.k_proj.bias": _around(gen, kv_heads * hd, 0.0),
        f"{prefix}.self_attn.v_proj.weight": _randn(gen, kv_heads * hd, hidden),
        f"{prefix}.self_attn.v_proj.bias": _around(gen, kv_heads * hd, 0.0),
        f"{prefix}.self_attn.o_proj.weight": _randn(gen, hidden, heads * hd),
        f"{prefix}.mlp.gate_proj.weight": _randn(gen, inter, hidden),
        f"{prefix}.mlp.up_proj.weight": _randn(gen, inter, hidden),
        f"{prefix}.mlp.down_proj.weight": _randn(gen, hidden, inter),
        f"{prefix}.input_layernorm.weight": _around(gen, hidden, 1.0),
        f"{prefix}.post_attention_layernorm.weight": _around(gen, hidden, 1.0),
    }


def whisper_checkpoint(s: Omni2Sizes, gen) -> dict:
    """An openai-whisper checkpoint dict (fp16), built with openai-whisper's own module for its key names."""
    import whisper.model

    dims = whisper.model.ModelDimensions(
        n_mels=s.n_mels, n_audio_ctx=s.n_audio_ctx, n_audio_state=s.n_audio_state, n_audio_head=s.n_audio_head,
        n_audio_layer=s.n_audio_layer, n_vocab=s.n_vocab_whisper, n_text_ctx=16, n_text_state=s.n_audio_state,
        n_text_head=s.n_audio_head, n_text_layer=s.n_text_layer,
    )
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = whisper.model.Whisper(dims)
    with torch.no_grad():  # LayerNorms start at 1/0: move them so a wrong mapping shows
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return {"dims": asdict(dims), "model_state_dict": {k: v.half() for k, v in model.state_dict().items()}}


def release_state_dict(s: Omni2Sizes, vocab: int, tts_vocab: int, encoder: dict, gen, tied: bool,
                       tts_head: bool) -> dict:
    """Every tensor of `Omni2Speech2SQwen2ForCausalLM.state_dict()` as save_pretrained wrote it (§1.1)."""
    sd = {f"model.speech_encoder.{k.removeprefix('encoder.')}": v for k, v in encoder.items()
          if k.startswith("encoder.")}
    sd["model.embed_tokens.weight"] = _randn(gen, vocab, s.hidden, scale=1.0)
    for i in range(s.layers):
        sd.update(_qwen2_layer(f"model.layers.{i}", s.hidden, s.heads, s.kv_heads, s.intermediate, gen))
    sd["model.norm.weight"] = _around(gen, s.hidden, 1.0)
    d_in = s.n_audio_state * s.ds_rate
    sd["model.speech_projector.linear1.weight"] = _randn(gen, s.adaptor_hidden, d_in)
    sd["model.speech_projector.linear1.bias"] = _around(gen, s.adaptor_hidden, 0.0)
    sd["model.speech_projector.linear2.weight"] = _randn(gen, s.hidden, s.adaptor_hidden)
    sd["model.speech_projector.linear2.bias"] = _around(gen, s.hidden, 0.0)
    if not tied:
        sd["lm_head.weight"] = _randn(gen, vocab, s.hidden)
    sd["speech_generator.model.model.embed_tokens.weight"] = _randn(gen, tts_vocab, s.tts_hidden, scale=1.0)
    for i in range(s.tts_layers):
        sd.update(_qwen2_layer(f"speech_generator.model.model.layers.{i}", s.tts_hidden, s.tts_heads,
                               s.tts_kv_heads, s.tts_intermediate, gen))
    sd["speech_generator.model.model.norm.weight"] = _around(gen, s.tts_hidden, 1.0)
    if tts_head:  # loaded untied by the original, so it may differ from the embedding (Q1)
        sd["speech_generator.model.lm_head.weight"] = _randn(gen, tts_vocab, s.tts_hidden)
    sd["speech_generator.input_proj.0.weight"] = _randn(gen, 2 * s.hidden, s.hidden)
    sd["speech_generator.input_proj.0.bias"] = _around(gen, 2 * s.hidden, 0.0)
    sd["speech_generator.input_proj.2.weight"] = _randn(gen, s.tts_hidden, 2 * s.hidden)
    sd["speech_generator.input_proj.2.bias"] = _around(gen, s.tts_hidden, 0.0)
    sd["speech_generator.gate.0.weight"] = _randn(gen, s.tts_hidden, 2 * s.tts_hidden)
    sd["speech_generator.gate.0.bias"] = _around(gen, s.tts_hidden, 0.0)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}


def released_config(s: Omni2Sizes, vocab: int, tts_vocab: int, ids: dict, tied: bool) -> dict:
    """config.json as the release has it (§1.2), at the tiny sizes."""
    return {
        "_name_or_path": "LLaMA-Omni2-0.5B", "architectures": ["Omni2Speech2SQwen2ForCausalLM"],
        "model_type": "omni2_speech2s_qwen2", "attention_dropout": 0.0, "bos_token_id": ids["endoftext"],
        "eos_token_id": ids["im_end"], "hidden_act": "silu", "hidden_size": s.hidden, "initializer_range": 0.02,
        "intermediate_size": s.intermediate, "max_position_embeddings": 32768, "max_window_layers": 21,
        "num_attention_heads": s.heads, "num_hidden_layers": s.layers, "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16", "transformers_version": "4.43.4", "use_cache": True,
        "use_sliding_window": False, "vocab_size": vocab,
        "speech_encoder": "models/speech_encoder/large-v3.pt", "speech_encoder_type": "whisper",
        "speech_encoder_ds_rate": s.ds_rate, "speech_encoder_hidden_size": s.n_audio_state,
        "speech_projector_type": "linear", "stream_params": s.stream_params, "unit_vocab_size": UNITS,
        "tokenizer_model_max_length": s.tokenizer_model_max_length, "tokenizer_padding_side": "right",
        "speech_generator": {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": tts_vocab,
            "hidden_size": s.tts_hidden, "intermediate_size": s.tts_intermediate,
            "num_hidden_layers": s.tts_layers, "num_attention_heads": s.tts_heads,
            "num_key_value_heads": s.tts_kv_heads, "max_position_embeddings": 32768, "max_window_layers": 24,
            "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": True,
            "bos_token_id": ids["endoftext"], "eos_token_id": ids["endoftext"], "use_sliding_window": False,
            "use_mrope": False, "hidden_act": "silu", "attention_dropout": 0.0,
        },
    }


def write_safetensors(directory: Path, state: dict, sharded: bool):
    """model.safetensors, or two shards + index named as transformers 4.43 saved them."""
    if not sharded:
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        return
    keys = list(state)
    groups = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state[k] for k in group}, directory / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# The release's chat template is its tokenizer_config.json's (spec §1.1); the fake's differs from the stock
# Qwen2.5 one in its default system text, so a test can tell that the converted repo keeps the checkpoint's.
RELEASE_SYSTEM_PROMPT = "You are a helpful speech assistant from a fake LLaMA-Omni2 release."


def as_released_tokenizer_files(directory: Path, chat_template: str | None = None):
    """tokenizer_config.json as transformers 4.43 wrote it: Qwen2Tokenizer, no BOS, the chat template inside (no
    chat_template.jinja); and the slow tokenizer's vocab.json / merges.txt beside tokenizer.json (the original
    loads `use_fast=False`)."""
    model = json.loads((directory / "tokenizer.json").read_text())["model"]
    (directory / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    path = directory / "tokenizer_config.json"
    data = json.loads(path.read_text())
    data.pop("backend", None)
    data.update(tokenizer_class="Qwen2Tokenizer", bos_token=None, errors="replace", split_special_tokens=False)
    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()
    if chat_template is not None:
        data["chat_template"] = chat_template
    path.write_text(json.dumps(data, indent=2))


def write_tokenizers(checkpoint: Path, unit_count: int = UNITS) -> tuple[int, int, dict]:
    """The LLM tokenizer (Qwen2.5 + `<speech>`, chat template) and tts_tokenizer/; (vocab, tts vocab, ids)."""
    from llama_omni_hf.tiny_tokenizer import (QWEN2_CHAT_TEMPLATE, QWEN2_DEFAULT_SYSTEM_PROMPT,
                                              build_tiny_qwen2_tokenizer, build_tiny_qwen2_tts_tokenizer)

    tokenizer = build_tiny_qwen2_tokenizer()
    tokenizer.save_pretrained(checkpoint)
    as_released_tokenizer_files(checkpoint, QWEN2_CHAT_TEMPLATE.replace(QWEN2_DEFAULT_SYSTEM_PROMPT,
                                                                         RELEASE_SYSTEM_PROMPT))
    tts = build_tiny_qwen2_tts_tokenizer(unit_vocab_size=unit_count)
    tts.save_pretrained(checkpoint / "tts_tokenizer")
    as_released_tokenizer_files(checkpoint / "tts_tokenizer")
    get = tokenizer.convert_tokens_to_ids
    ids = dict(speech=get("<speech>"), im_end=get("<|im_end|>"), endoftext=get("<|endoftext|>"),
               sep=tts.convert_tokens_to_ids("<sep>"), unit_offset=tts.convert_tokens_to_ids("<0>"),
               tts_eos=tts.eos_token_id)
    return len(tokenizer), len(tts), ids


def write_fake_release(root, sizes: Omni2Sizes = TINY, seed: int = 0, tied: bool = True, tts_head: bool = True,
                       sharded: bool = False, generation_config: bool = True, whisper_pt: bool = True,
                       decoder_config=None) -> FakeRelease:
    """Write a fake release under `root`; `decoder_config` (a LlamaOmni2Token2WavConfig) adds root/cosy2_decoder/."""
    root = Path(root)
    checkpoint = root / "checkpoint"
    checkpoint.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    n_tokens, tts_vocab, ids = write_tokenizers(checkpoint)
    vocab = -(-n_tokens // sizes.vocab_pad_to) * sizes.vocab_pad_to + sizes.vocab_pad_to  # padded, as Qwen's
    pt = whisper_checkpoint(sizes, gen)
    whisper = None
    if whisper_pt:
        whisper = root / "large-v3.pt"
        torch.save(pt, whisper)
    state = release_state_dict(sizes, vocab, tts_vocab, pt["model_state_dict"], gen, tied, tts_head)
    write_safetensors(checkpoint, state, sharded)
    (checkpoint / "config.json").write_text(json.dumps(released_config(sizes, vocab, tts_vocab, ids, tied), indent=2))
    if generation_config:  # Qwen2.5-Instruct's, as a release fine-tuned from it would inherit (§2.3)
        (checkpoint / "generation_config.json").write_text(json.dumps({
            "bos_token_id": ids["endoftext"], "pad_token_id": ids["endoftext"], "do_sample": True,
            "eos_token_id": [ids["im_end"], ids["endoftext"]], "repetition_penalty": 1.05, "temperature": 0.7,
            "top_p": 0.8, "top_k": 20, "transformers_version": "4.43.4"}, indent=2))
    decoder = speaker = files = None
    if decoder_config is not None:
        from token2wav_fixtures import cosyvoice_yaml, write_fake_decoder

        files = write_fake_decoder(root / "cosy2_decoder", decoder_config, yaml=cosyvoice_yaml(decoder_config))
        decoder = files.root
        speaker = root / "en.npy"
        np.save(speaker, torch.randn(192, generator=gen).numpy())
    return FakeRelease(root, checkpoint, whisper, decoder, speaker, sizes, state, ids,
                       dict(tied=tied, tts_head=tts_head, sharded=sharded, generation_config=generation_config),
                       files)


def with_sizes(**changes) -> Omni2Sizes:
    return replace(TINY, **changes)
