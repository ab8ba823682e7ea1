"""Loading guards: missing weights and the original (unconverted) release give clear errors."""

import json

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from llama_omni_hf.tiny import build_tiny_checkpoint


@pytest.fixture()
def checkpoint(tmp_path):
    return build_tiny_checkpoint(tmp_path / "tiny", vocoder=False)


def test_missing_weight_is_an_error(checkpoint):
    weights = load_file(checkpoint / "model.safetensors")
    del weights["unit_decoder.output_proj.weight"]
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weights .*unit_decoder\.output_proj\.weight"):
        AutoModel.from_pretrained(checkpoint, trust_remote_code=True)
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True, allow_missing_weights=True)
    assert model.unit_decoder.output_proj.weight.shape[0] == 1001


def test_loading_info_still_available(checkpoint):
    model, info = AutoModel.from_pretrained(checkpoint, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_original_release_config_is_rejected(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["ctc_decoder_config"] = "(2,4096,32,11008)"
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="ORIGINAL LLaMA-Omni release"):
        AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)


def test_bad_config_values_name_the_field():
    from llama_omni_hf.configuration_llama_omni import LlamaOmniConfig, LlamaOmniVocoderConfig

    with pytest.raises(ValueError, match="unit_decoder_num_layers"):
        LlamaOmniConfig(unit_decoder_num_layers="2")
    with pytest.raises(ValueError, match="unit_decoder_hidden_size"):
        LlamaOmniConfig(unit_decoder_hidden_size=100, unit_decoder_num_attention_heads=32)
    with pytest.raises(ValueError, match="code_hop_size"):
        LlamaOmniVocoderConfig(upsample_rates=[5, 4, 4, 2, 1], upsample_kernel_sizes=[11, 8, 8, 4, 4])
    with pytest.raises(ValueError, match="unit_vocab_size"):
        LlamaOmniConfig(vocoder_config={"num_embeddings": 500})


def test_cached_default_checkpoint_follows_the_package_code(tmp_path, monkeypatch):
    from llama_omni_hf import tiny

    monkeypatch.setattr(tiny, "DEFAULT_CACHE", tmp_path)
    path = tiny.default_tiny_checkpoint()
    stale = path / "modeling_llama_omni.py"
    stale.write_text("# an older release of the remote code\n")
    weights = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny.default_tiny_checkpoint() == path
    assert stale.read_bytes() == (tiny.PACKAGE_DIR / "modeling_llama_omni.py").read_bytes()
    assert (path / "model.safetensors").stat().st_mtime_ns == weights  # not rebuilt


def test_default_config_has_the_released_layout():
    """LlamaOmniConfig() is the release: the spec's checkpoint shapes (section 1, 5), built on the meta device."""
    import torch

    from llama_omni_hf.configuration_llama_omni import LlamaOmniConfig, LlamaOmniVocoderConfig
    from llama_omni_hf.modeling_llama_omni import LlamaOmniForConditionalGeneration

    with torch.device("meta"):
        model = LlamaOmniForConditionalGeneration(LlamaOmniConfig(vocoder_config=LlamaOmniVocoderConfig()))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "speech_encoder.embed_positions.weight": (1500, 1280),
        "speech_encoder.conv1.weight": (1280, 128, 3),
        "speech_encoder.layers.31.fc1.weight": (5120, 1280),
        "speech_adaptor.linear1.weight": (2048, 6400),
        "speech_adaptor.linear2.weight": (4096, 2048),
        "model.embed_tokens.weight": (128256, 4096),
        "model.layers.31.self_attn.k_proj.weight": (1024, 4096),  # 8 KV heads
        "model.layers.31.mlp.gate_proj.weight": (14336, 4096),
        "lm_head.weight": (128256, 4096),
        "unit_decoder.input_proj.weight": (4096, 4096),
        "unit_decoder.layers.1.self_attn.k_proj.weight": (4096, 4096),  # 32 KV heads
        "unit_decoder.layers.1.mlp.up_proj.weight": (11008, 4096),
        "unit_decoder.output_proj.weight": (1001, 4096),
        "vocoder.dict.weight": (1000, 128),
        "vocoder.dur_predictor.proj.weight": (1, 128),
        "vocoder.conv_pre.weight": (512, 128, 7),
        "vocoder.ups.0.weight": (512, 256, 11),
        "vocoder.ups.4.weight": (32, 16, 4),
        "vocoder.resblocks.14.convs1.2.weight": (16, 16, 11),
        "vocoder.conv_post.weight": (1, 16, 7),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    assert "speech_encoder.layers.0.self_attn.k_proj.bias" not in shapes  # Whisper's key has no bias
    assert not any(k.startswith("unit_decoder.norm") for k in shapes)  # no final norm (spec section 3)
    assert len([k for k in shapes if k.startswith("unit_decoder.layers.") and k.endswith("q_proj.weight")]) == 2
    assert model.config.speech_tokens_per_audio == 300 and model.config.speech_token_id == 128256
