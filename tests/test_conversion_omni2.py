"""conversion/convert_llama_omni2.py on tiny fake LLaMA-Omni2 releases in the ORIGINAL formats (tests/omni2_fixtures.py,
tests/token2wav_fixtures.py).

Every converted tensor is compared with what the test computes itself from the ORIGINAL tensors (openai-whisper ->
transformers names written out here, the TTS head rule of quirk Q1 both ways, HiFT's fold against torch's own
weight-norm modules, the dtype rules), the config and generation config with the release's fields, and the
converted model's outputs with independent references: openai-whisper's AudioEncoder, the adaptor from its
formula, transformers' own Qwen2ForCausalLM built on the original LLM and TTS tensors.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conversion import convert_llama_omni2 as c2  # noqa: E402
from conversion.convert_llama_omni2 import convert_llama_omni2, parse_stream_params, prepare  # noqa: E402
from conversion.key_map_llama_omni2 import map_keys  # noqa: E402
from conversion.original_formats import ConversionError  # noqa: E402
from llama_omni_hf.configuration_llama_omni2 import LlamaOmni2Token2WavConfig  # noqa: E402
from llama_omni_hf.tiny import tiny_token2wav_config_dict  # noqa: E402
from omni2_fixtures import RELEASE_SYSTEM_PROMPT, UNITS, write_fake_release, write_tokenizers  # noqa: E402

T2W = LlamaOmni2Token2WavConfig(**tiny_token2wav_config_dict())


@pytest.fixture(scope="module")
def t2w_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("t2w") / "token2wav.json"
    path.write_text(json.dumps(tiny_token2wav_config_dict()))
    return path


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """The 0.5B-3B shape: LLM head tied, the TTS head in the file, one safetensors file, large-v3.pt, the decoder."""
    return write_fake_release(tmp_path_factory.mktemp("release"), decoder_config=T2W)


@pytest.fixture(scope="module")
def fake_untied(tmp_path_factory):
    """The 7B+ shape: an LLM head of its own, NO TTS head in the file (Q1), two shards, no generation_config.json,
    no large-v3.pt, no decoder."""
    return write_fake_release(tmp_path_factory.mktemp("release-untied"), seed=1, tied=False, tts_head=False,
                              sharded=True, generation_config=False, whisper_pt=False)


def cli_args(fake, out, t2w_json, *extra):
    args = ["--checkpoint", str(fake.checkpoint), "--output-dir", str(out)]
    if fake.decoder is not None:
        args += ["--decoder-dir", str(fake.decoder), "--speaker", f"en={fake.speaker}",
                 "--token2wav-config", str(t2w_json)]
    if fake.whisper is not None:
        args += ["--whisper-checkpoint", str(fake.whisper)]
    return args + list(extra)


@pytest.fixture(scope="module")
def converted(fake, t2w_json, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "omni2-hf"
    assert c2.main(cli_args(fake, out, t2w_json, "--dtype", "float32")) == 0
    return out


@pytest.fixture(scope="module")
def converted_untied(fake_untied, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted-untied") / "omni2-hf"
    summary = convert_llama_omni2(fake_untied.checkpoint, out, dtype="float32", unit_parse="regex")
    return out, summary


def weights(directory: Path) -> dict:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def dtypes(directory: Path) -> dict:
    found = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            found.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    return found


# ----------------------------------------------------------------------------- the expectation, independently

# transformers' WhisperEncoder names for openai-whisper's AudioEncoder, written out here (not key_map's table)
WHISPER_BLOCK = {"attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj", "attn.value": "self_attn.v_proj",
                 "attn.out": "self_attn.out_proj", "attn_ln": "self_attn_layer_norm", "mlp.0": "fc1",
                 "mlp.2": "fc2", "mlp_ln": "final_layer_norm"}
WHISPER_TOP = {"conv1": "conv1", "conv2": "conv2", "ln_post": "layer_norm"}


def hf_whisper_name(openai: str) -> str:
    if openai == "positional_embedding":
        return "embed_positions.weight"
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", openai)
    if block:
        return f"layers.{block[1]}.{WHISPER_BLOCK[block[2]]}.{block[3]}"
    module, param = openai.rsplit(".", 1)
    return f"{WHISPER_TOP[module]}.{param}"


def expected_from_original(fake) -> dict:
    """Output key -> the ORIGINAL tensor it must equal (float32), LLM repo part, from the file's names."""
    state = {k: v.float() for k, v in fake.state.items()}
    out = {}
    for key, value in state.items():
        if key.startswith("model.speech_encoder."):
            out["speech_encoder." + hf_whisper_name(key.removeprefix("model.speech_encoder."))] = value
        elif key.startswith("model.speech_projector."):
            out["speech_adaptor." + key.removeprefix("model.speech_projector.")] = value
        elif key.startswith("speech_generator.model.model."):
            out["tts.model." + key.removeprefix("speech_generator.model.model.")] = value
        elif key == "speech_generator.model.lm_head.weight":
            out["tts.lm_head.weight"] = value
        elif key.startswith("speech_generator.input_proj."):
            out["tts.input_proj." + key.removeprefix("speech_generator.input_proj.")] = value
        elif key.startswith("speech_generator.gate.0."):
            out["tts.gate." + key.removeprefix("speech_generator.gate.0.")] = value
        else:  # model.embed_tokens / layers / norm, lm_head
            out[key] = value
    if "tts.lm_head.weight" not in out:  # Q1: a missing TTS head becomes the TTS embedding
        out["tts.lm_head.weight"] = state["speech_generator.model.model.embed_tokens.weight"]
    return out


def legacy_weight(module) -> torch.Tensor:
    """What a legacy weight-norm module computes in its forward pre-hook."""
    for hook in module._forward_pre_hooks.values():
        hook(module, None)
    return module.weight.detach()


def expected_token2wav(fake) -> dict:
    files = fake.decoder_files
    out = {}
    for key, value in files.flow_state.items():
        out["token2wav.flow." + key.replace("decoder.estimator.", "estimator.")] = value
    for prefix, module in files.weight_norm_modules.items():
        out[f"token2wav.hift.{prefix}.weight"] = legacy_weight(module)
    for key, value in files.hift_state.items():
        if not key.endswith(("weight_g", "weight_v")):
            out["token2wav.hift." + key] = value
    out["token2wav.flow.noise"] = torch.randn(1, 80, T2W.noise_frames, generator=torch.Generator().manual_seed(0))
    out["token2wav.speakers.en"] = torch.from_numpy(np.load(fake.speaker)).float()
    return out


def derived_layout(config) -> set[str]:
    """The target layout from the config alone: transformers' WhisperEncoder and Qwen2Model + the spec's heads."""
    from transformers import Qwen2Model
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    keys = set()
    with torch.device("meta"):
        for prefix, module in (("speech_encoder.", WhisperEncoder(config.speech_encoder_config)),
                               ("model.", Qwen2Model(config.text_config)),
                               ("tts.model.", Qwen2Model(config.tts_config))):
            keys |= {prefix + k for k in module.state_dict()}
    keys |= {f"speech_adaptor.linear{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    keys |= {f"tts.{m}.{p}" for m in ("input_proj.0", "input_proj.2", "gate") for p in ("weight", "bias")}
    keys.add("tts.lm_head.weight")
    if not config.text_config.tie_word_embeddings:
        keys.add("lm_head.weight")
    return keys


# ----------------------------------------------------------------------------- tensors


def test_every_tensor_equals_the_original(fake, converted):
    from llama_omni_hf.configuration_llama_omni2 import LlamaOmni2Config

    out = weights(converted)
    expected = {**expected_from_original(fake), **expected_token2wav(fake)}
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key].dtype == torch.float32 and torch.equal(out[key], value.float()), key
    # the layout is what the config describes (no LLM head: tied), plus the decoder's tensors
    config = LlamaOmni2Config.from_pretrained(converted)
    assert {k for k in out if not k.startswith("token2wav.")} == derived_layout(config)
    assert "lm_head.weight" not in out and not [k for k in out if "rotary_emb" in k]


def test_whisper_names_by_hand(fake, converted):
    out, state = weights(converted), fake.state
    pairs = {"speech_encoder.layers.1.self_attn.k_proj.weight": "model.speech_encoder.blocks.1.attn.key.weight",
             "speech_encoder.layers.0.self_attn.out_proj.bias": "model.speech_encoder.blocks.0.attn.out.bias",
             "speech_encoder.layers.0.fc2.weight": "model.speech_encoder.blocks.0.mlp.2.weight",
             "speech_encoder.layers.1.final_layer_norm.bias": "model.speech_encoder.blocks.1.mlp_ln.bias",
             "speech_encoder.embed_positions.weight": "model.speech_encoder.positional_embedding",
             "speech_encoder.layer_norm.weight": "model.speech_encoder.ln_post.weight",
             "speech_encoder.conv2.weight": "model.speech_encoder.conv2.weight"}
    for ours, theirs in pairs.items():
        assert torch.equal(out[ours], state[theirs].float()), ours
    assert "speech_encoder.layers.0.self_attn.k_proj.bias" not in out  # openai-whisper's key has no bias


def test_tts_head_is_the_files_own_when_present(fake, converted):
    out = weights(converted)
    head = fake.state["speech_generator.model.lm_head.weight"].float()
    assert torch.equal(out["tts.lm_head.weight"], head)
    assert not torch.equal(head, fake.state["speech_generator.model.model.embed_tokens.weight"].float())


def test_untied_release_without_tts_head(fake_untied, converted_untied, capsys):
    """7B+: lm_head.weight is converted; a missing TTS head becomes a copy of the TTS embedding, loudly (Q1)."""
    out_dir, summary = converted_untied
    out = weights(out_dir)
    expected = expected_from_original(fake_untied)
    assert set(out) == set(expected) and all(torch.equal(out[k], v) for k, v in expected.items())
    assert torch.equal(out["lm_head.weight"], fake_untied.state["lm_head.weight"].float())
    assert torch.equal(out["tts.lm_head.weight"],
                       fake_untied.state["speech_generator.model.model.embed_tokens.weight"].float())
    assert any("RANDOM, untied TTS head" in w for w in summary["warnings"])
    assert "RANDOM, untied TTS head" in (out_dir / "README.md").read_text()
    # the command line says it on stderr
    args = ["--checkpoint", str(fake_untied.checkpoint), "--output-dir", str(out_dir.parent / "cli")]
    assert c2.main(args) == 0
    assert "WARNING: the checkpoint has no `speech_generator.model.lm_head.weight`" in capsys.readouterr().err


def test_dtype_rules_default_bfloat16(fake, t2w_json, tmp_path):
    out = tmp_path / "bf16"
    assert c2.main(cli_args(fake, out, t2w_json)) == 0
    found = dtypes(out)
    assert {d for k, d in found.items() if k.startswith("token2wav.")} == {"F32"}  # as the original runs it
    assert {d for k, d in found.items() if not k.startswith("token2wav.")} == {"BF16"}
    ours, original = load_file(out / "model.safetensors"), fake.state
    assert torch.equal(ours["tts.gate.weight"], original["speech_generator.gate.0.weight"])  # bf16 -> bf16: exact
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_input_and_output(fake_untied, converted_untied, tmp_path):
    out = tmp_path / "sharded"
    convert_llama_omni2(fake_untied.checkpoint, out, dtype="float32", max_shard_size="200KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in out.glob("model-*.safetensors"))
    single = weights(converted_untied[0])
    assert set(index["weight_map"]) == set(single)
    assert all(torch.equal(v, single[k]) for k, v in weights(out).items())


def test_rotary_frequencies_are_dropped(fake_untied, tmp_path):
    root = copy_release(fake_untied, tmp_path)
    edit_state(root, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    summary = prepare(root.checkpoint)["summary"]
    assert "1 keys: RoPE frequencies are recomputed from the config" in summary["dropped"]


def test_key_table_by_hand():
    plan, comparisons = map_keys({
        "checkpoint:speech_generator.gate.0.weight": (4, 8), "checkpoint:speech_generator.gate.1.weight": (1,),
        "checkpoint:speech_generator.input_proj.1.weight": (1,), "checkpoint:model.speech_projector.linear2.bias": (3,),
        "whisper:decoder.blocks.0.attn.key.weight": (2, 2), "whisper:encoder.ln_post.bias": (2,),
        "checkpoint:speech_generator.model.model.embed_tokens.weight": (9, 4),
    })
    assert {t: e[0].sources for t, e in plan.entries.items()} == {
        "tts.gate.weight": ["checkpoint:speech_generator.gate.0.weight"],
        "speech_adaptor.linear2.bias": ["checkpoint:model.speech_projector.linear2.bias"],
        "tts.model.embed_tokens.weight": ["checkpoint:speech_generator.model.model.embed_tokens.weight"],
        "tts.lm_head.weight": ["checkpoint:speech_generator.model.model.embed_tokens.weight"],  # Q1 fallback
    }
    assert plan.entries["tts.lm_head.weight"][0].transform == "tie_tts_head"
    assert sorted(plan.unmatched) == ["checkpoint:speech_generator.gate.1.weight",
                                      "checkpoint:speech_generator.input_proj.1.weight"]  # Sigmoid / ReLU: no weights
    assert list(comparisons) == ["speech_encoder.layer_norm.bias"]
    assert plan.dropped == {"whisper:decoder.blocks.0.attn.key.weight":
                            "drop: the Whisper decoder is not part of LLaMA-Omni2"}


# ----------------------------------------------------------------------------- config, generation config, tokenizers


def test_config_fields(fake, converted, converted_untied):
    config = json.loads((converted / "config.json").read_text())
    released = json.loads((fake.checkpoint / "config.json").read_text())
    assert config["model_type"] == "llama_omni2"
    assert config["auto_map"]["AutoModel"] == "modeling_llama_omni2.LlamaOmni2ForConditionalGeneration"
    assert config["architectures"] == ["LlamaOmni2ForConditionalGeneration"]
    assert (config["tts_read"], config["tts_write"]) == (3, 10)  # from the STRING "(3,10)"
    assert config["max_prompt_length"] == released["tokenizer_model_max_length"] == 4096
    assert config["speech_token_id"] == fake.ids["speech"]
    assert config["tts_sep_token_id"] == fake.ids["sep"] and config["tts_eos_token_id"] == fake.ids["tts_eos"]
    assert config["unit_token_offset"] == fake.ids["unit_offset"] == fake.ids["sep"] + 1
    assert config["unit_vocab_size"] == UNITS and config["unit_parse"] == "offset"
    assert config["speech_adaptor_downsample_rate"] == 5 and config["speech_adaptor_hidden_size"] == 2048
    text, tts, enc = config["text_config"], config["tts_config"], config["speech_encoder_config"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "intermediate_size", "rms_norm_eps", "tie_word_embeddings", "max_window_layers"):
        assert text[key] == released[key], key
        assert tts[key] == released["speech_generator"][key] or key == "tie_word_embeddings", key
    assert text["rope_parameters"]["rope_theta"] == released["rope_theta"]
    assert tts["tie_word_embeddings"] is False  # Q1: the head is a weight of its own
    assert (text["eos_token_id"], tts["eos_token_id"]) == (fake.ids["im_end"], fake.ids["endoftext"])
    assert (enc["num_mel_bins"], enc["max_source_positions"], enc["d_model"]) == (128, 1500, 128)
    assert config["token2wav_config"]["speakers"] == ["en"] and config["token2wav_config"]["input_size"] == 64
    untied = json.loads((converted_untied[0] / "config.json").read_text())
    assert untied["token2wav_config"] is None and untied["unit_parse"] == "regex"
    assert untied["text_config"]["tie_word_embeddings"] is False and untied["tie_word_embeddings"] is False


@pytest.mark.parametrize("value, expected", [("(3,10)", (3, 10)), (" (2, 8) ", (2, 8)), ("[4,12]", (4, 12)),
                                             ([3, 10], (3, 10))])
def test_stream_params_accepted(value, expected):
    assert parse_stream_params(value) == expected


@pytest.mark.parametrize("value", ["__import__('os').system('echo pwned')", "(3,10,1)", "(0,10)", "(3,-1)",
                                   "(True,10)", "(3.0,10)", "3", "('3','10')", "", 3, None, "(" * 200 + ")" * 200])
def test_stream_params_rejected(value):
    with pytest.raises(ConversionError, match="stream_params"):
        parse_stream_params(value)


def test_generation_config_merge(converted, converted_untied, fake):
    ours = json.loads((converted / "generation_config.json").read_text())
    # the release's (Qwen2.5-Instruct's) kept: eos ids and repetition penalty (applied to the answer only, Q13) ...
    assert ours["eos_token_id"] == [fake.ids["im_end"], fake.ids["endoftext"]]
    assert ours["repetition_penalty"] == 1.05 and ours["bos_token_id"] == fake.ids["endoftext"]
    # ... then the run script's arguments: greedy, no sampling knobs, 256 new tokens, the tokenizer's pad
    assert ours["do_sample"] is False and ours["max_new_tokens"] == 256
    assert "temperature" not in ours and "top_p" not in ours and "top_k" not in ours
    assert ours["pad_token_id"] == fake.ids["endoftext"]
    missing = json.loads((converted_untied[0] / "generation_config.json").read_text())
    # without the file the original's 4.43 generate uses GenerationConfig.from_model_config: config.json's eos only
    assert missing["eos_token_id"] == fake.ids["im_end"] and missing["bos_token_id"] == fake.ids["endoftext"]
    assert missing["do_sample"] is False and missing["max_new_tokens"] == 256 and "repetition_penalty" not in missing


def test_tokenizer_processor_and_tts_tokenizer(fake, converted):
    from transformers import AutoTokenizer, Qwen2Config

    from llama_omni_hf.processing_llama_omni2 import LlamaOmni2Processor

    processor = LlamaOmni2Processor.from_pretrained(converted, trust_remote_code=True)
    original = AutoTokenizer.from_pretrained(fake.checkpoint, config=Qwen2Config())
    assert processor.chat_template == original.chat_template and RELEASE_SYSTEM_PROMPT in processor.chat_template
    assert processor.speech_token_id == fake.ids["speech"] and processor.speech_tokens_per_audio == 300
    assert processor.tokenizer.model_max_length == 4096
    assert processor.feature_extractor.feature_size == 128
    # the prompt the original builds: its template on a "<speech>" user turn, <speech> widened to 300 slots
    prompt = original.apply_chat_template([{"role": "user", "content": "<speech>"}], add_generation_prompt=True,
                                          tokenize=False)
    ids = original(prompt, add_special_tokens=False).input_ids
    at = ids.index(fake.ids["speech"])
    wave = 0.3 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000).astype(np.float32)
    ours = processor(audio=wave, sampling_rate=16000)["input_ids"][0]
    assert ours == ids[:at] + [fake.ids["speech"]] * 300 + ids[at + 1:]
    for path in (fake.checkpoint / "tts_tokenizer").iterdir():
        assert (converted / "tts_tokenizer" / path.name).read_bytes() == path.read_bytes()


def test_output_repo_files_and_card(converted):
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "generation_config.json", "processor_config.json", "tokenizer.json", "README.md",
            "configuration_llama_omni2.py", "modeling_llama_omni2.py", "processing_llama_omni2.py",
            "token2wav_llama_omni2.py", "model.safetensors", "tts_tokenizer"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".onnx"))]
    card = (converted / "README.md").read_text()
    for needle in ("AutoModel.from_pretrained", "trust_remote_code=True", "may NOT be used for commercial purposes",
                   "arXiv:2505.02625", "generate_stream", "Flow noise", "large-v3.pt agrees within bf16 rounding",
                   "license: other"):
        assert needle in card, needle
    assert not list(converted.parent.glob(".*partial*"))
    from conversion.push_to_hub import check_converted

    assert check_converted(converted) == "llama_omni2"  # push_to_hub.py takes it as it is


# ----------------------------------------------------------------------------- the converted model = the original


@pytest.fixture(scope="module")
def loaded(converted):
    from llama_omni_hf.modeling_llama_omni2 import LlamaOmni2ForConditionalGeneration
    from llama_omni_hf.processing_llama_omni2 import LlamaOmni2Processor

    model = LlamaOmni2ForConditionalGeneration.from_pretrained(converted).eval()
    return model, LlamaOmni2Processor.from_pretrained(converted, trust_remote_code=True)


def qwen2_from_original(fields: dict, state: dict, prefix: str, head: str | None, tied: bool):
    """transformers' own Qwen2ForCausalLM from the released config fields and the ORIGINAL tensors."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    names = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "hidden_act"]
    model = Qwen2ForCausalLM(Qwen2Config(**{k: fields[k] for k in names}, tie_word_embeddings=tied)).eval()
    weights_ = {"model." + k.removeprefix(prefix): v.float() for k, v in state.items()
                if re.match(re.escape(prefix) + r"(embed_tokens|layers|norm)\.", k)}
    if head is not None:
        weights_["lm_head.weight"] = state[head].float()
    missing, unexpected = model.load_state_dict(weights_, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set())
    return model


def test_llm_logits_with_speech_equal_an_independent_computation(fake, loaded):
    import whisper

    model, processor = loaded
    released, state = json.loads((fake.checkpoint / "config.json").read_text()), fake.state
    t = np.arange(24000) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * (500 + 300 * t) * t)).astype(np.float32)
    inputs = processor(audio=wave, sampling_rate=16000, return_tensors="pt")

    s = fake.sizes
    encoder = whisper.model.AudioEncoder(s.n_mels, s.n_audio_ctx, s.n_audio_state, s.n_audio_head,
                                         s.n_audio_layer).eval()
    encoder.load_state_dict({k.removeprefix("model.speech_encoder."): v.float() for k, v in state.items()
                             if k.startswith("model.speech_encoder.")})
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(wave)), n_mels=s.n_mels)
    assert torch.allclose(inputs["input_features"][0], mel, atol=1e-4)
    llm = qwen2_from_original(released, state, "model.", None, tied=True)
    with torch.no_grad():
        frames = encoder(mel[None])  # [1, 1500, C]
        stacked = frames.reshape(1, frames.shape[1] // s.ds_rate, -1)  # 5 consecutive frames concatenated
        p = {k: state[f"model.speech_projector.{k}"].float() for k in ("linear1.weight", "linear1.bias",
                                                                        "linear2.weight", "linear2.bias")}
        speech = F.relu(stacked @ p["linear1.weight"].T + p["linear1.bias"]) @ p["linear2.weight"].T + p["linear2.bias"]
        ids = inputs["input_ids"][0].tolist()
        at = ids.index(fake.ids["speech"])
        embed = llm.model.embed_tokens
        embeds = torch.cat([embed(torch.tensor([ids[:at]])), speech, embed(torch.tensor([ids[at + 300:]]))], dim=1)
        reference = llm(inputs_embeds=embeds).logits
        ours = model(**inputs).logits
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()


def test_tts_logits_equal_qwen2_on_the_original_tensors(fake, loaded):
    model, _ = loaded
    released = json.loads((fake.checkpoint / "config.json").read_text())
    reference = qwen2_from_original(released["speech_generator"], fake.state, "speech_generator.model.model.",
                                    "speech_generator.model.lm_head.weight", tied=False)
    ids = torch.tensor([[fake.ids["sep"], fake.ids["unit_offset"] + 17, 42, fake.ids["unit_offset"] + 6560]])
    with torch.no_grad():
        ours = model.tts.lm_head(model.tts.model(input_ids=ids).last_hidden_state)
        theirs = reference(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_cli_with_verify_in_a_clean_subprocess(fake, t2w_json, tmp_path):
    """`python -m conversion.convert_llama_omni2 ... --verify`: exit 0, AutoModel/AutoProcessor answer from the repo's
    own remote code in a fresh interpreter (llama_omni_hf blocked), with audio."""
    out = tmp_path / "cli-out"
    run = subprocess.run([sys.executable, "-m", "conversion.convert_llama_omni2",
                          *cli_args(fake, out, t2w_json, "--verify", "--verify-max-new-tokens", "4")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "peak memory:" in run.stdout and "large-v3.pt agrees within bf16 rounding" in run.stdout
    result = json.loads(run.stdout.split("VERIFY ", 1)[1].splitlines()[0])
    assert result["model_class"] == "LlamaOmni2ForConditionalGeneration" and result["dtype"] == "bfloat16"
    assert len(result["answer_ids"]) == 4 and result["sampling_rate"] == 24000
    assert result["audio_samples"] == 960 * result["unit_count"]
    bad = subprocess.run([sys.executable, "-m", "conversion.convert_llama_omni2", *cli_args(fake, out, t2w_json)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode == 2 and "already exists" in bad.stderr


# ----------------------------------------------------------------------------- wrong inputs: clear error, no OUT


def copy_release(fake, tmp_path):
    root = tmp_path / "release"
    shutil.copytree(fake.root, root)
    return replace(fake, root=root, checkpoint=root / "checkpoint",
                   whisper=root / "large-v3.pt" if fake.whisper else None,
                   decoder=root / "cosy2_decoder" if fake.decoder else None,
                   speaker=root / "en.npy" if fake.speaker else None)


def edit_state(fake, edit):
    """Rewrite every safetensors file (and the index) after `edit(tensors)` on the last one."""
    index_path = fake.checkpoint / "model.safetensors.index.json"
    files = sorted(p.name for p in fake.checkpoint.glob("*.safetensors"))
    weight_map = {}
    for name in files:
        tensors = load_file(fake.checkpoint / name)
        if name == files[-1]:
            edit(tensors)
        save_file(tensors, fake.checkpoint / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    if index_path.exists():
        index_path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def set_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def truncate(path: Path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def wrong_unit_count(fake):
    shutil.rmtree(fake.checkpoint / "tts_tokenizer")
    scratch = fake.root / "scratch"
    scratch.mkdir()
    write_tokenizers(scratch, unit_count=UNITS - 1)  # <0> .. <6559>
    shutil.move(str(scratch / "tts_tokenizer"), fake.checkpoint / "tts_tokenizer")


def whisper_disagrees(fake):
    pt = torch.load(fake.whisper, weights_only=True)
    pt["model_state_dict"]["encoder.ln_post.bias"] = pt["model_state_dict"]["encoder.ln_post.bias"] + 0.5
    torch.save(pt, fake.whisper)


def bf16(*shape):
    return torch.zeros(*shape, dtype=torch.bfloat16)


BREAKAGES = {
    "missing key": (lambda f: edit_state(f, lambda t: t.pop("speech_generator.gate.0.bias")), [],
                    ["1 key missing", "tts.gate.bias"]),
    "unexpected key": (lambda f: edit_state(f, lambda t: t.update({"model.layers.2.mlp.up_proj.weight":
                                                                   bf16(128, 64)})), [],
                       ["1 key unexpected", "model.layers.2.mlp.up_proj.weight",
                        "from checkpoint:model.layers.2.mlp.up_proj.weight"]),
    "unknown key": (lambda f: edit_state(f, lambda t: t.update({"model.mm_projector.weight": bf16(2)})), [],
                    ["1 key in the inputs that no conversion rule knows", "checkpoint:model.mm_projector.weight"]),
    "mis-shaped key": (lambda f: edit_state(f, lambda t: t.update({"speech_generator.input_proj.2.bias": bf16(7)})),
                       [], ["1 key mis-shaped", "tts.input_proj.2.bias: input [7]", "model expects [32]"]),
    "tied head differs": (lambda f: edit_state(f, lambda t: t.update({"lm_head.weight": bf16(896, 64) + 1})), [],
                          ["tie_word_embeddings", "lm_head.weight differs from model.embed_tokens.weight"]),
    "no encoder": (lambda f: edit_state(f, lambda t: [t.pop(k) for k in list(t) if "speech_encoder" in k]), [],
                   ["holds no Whisper encoder", "Q14"]),
    "corrupt safetensors": (lambda f: truncate(f.checkpoint / "model.safetensors"), [],
                            ["cannot read shard", "model.safetensors", "truncated or corrupt"]),
    "v1 checkpoint": (lambda f: set_json(f.checkpoint / "config.json", model_type="omni_speech2s_llama"), [],
                      ["LLaMA-Omni (v1) release", "conversion/convert_llama_omni.py"]),
    "other model type": (lambda f: set_json(f.checkpoint / "config.json", model_type="qwen2"), [],
                         ["model_type 'qwen2'", "expected 'omni2_speech2s_qwen2'"]),
    "decoder dir as checkpoint": (lambda f: None, ["--checkpoint", "{decoder}"],
                                  ["is the speech decoder", "pass it as --decoder-dir"]),
    "llm dir as decoder dir": (lambda f: None, ["--decoder-dir", "{checkpoint}"],
                               ["is an LLM release", "ICTNLP/cosy2_decoder"]),
    "stream_params with code": (lambda f: set_json(f.checkpoint / "config.json",
                                                   stream_params="__import__('os').system('touch PWNED')"), [],
                                ["stream_params", "never evaluated as code"]),
    "stream_params not a pair": (lambda f: set_json(f.checkpoint / "config.json", stream_params="(3,10,2)"), [],
                                 ["stream_params", "'(3,10,2)'", "not a pair"]),
    "broken config json": (lambda f: (f.checkpoint / "config.json").write_text('{"model_type": '), [],
                           ["is not valid JSON"]),
    "missing config field": (lambda f: set_json(f.checkpoint / "config.json", speech_generator=None), [],
                             ["`speech_generator` must be the TTS model's config"]),
    "other unit count": (lambda f: set_json(f.checkpoint / "config.json", unit_vocab_size=1000), [],
                         ["unit_vocab_size 1000", "6561 speech tokens"]),
    "no tts_tokenizer": (lambda f: shutil.rmtree(f.checkpoint / "tts_tokenizer"), [],
                         ["has no tts_tokenizer/ directory"]),
    "tts_tokenizer of 6560 units": (wrong_unit_count, [],
                                    ["not the 6561-unit layout", "<6560> is None, expected"]),
    "whisper disagrees": (whisper_disagrees, [],
                          ["--whisper-checkpoint does not match", "1 tensors", "speech_encoder.layer_norm.bias",
                           "beyond bf16 rounding", "leave --whisper-checkpoint out"]),
    "whisper not a whisper file": (lambda f: torch.save({"state_dict": {}}, f.whisper), [],
                                   ["is not an openai-whisper checkpoint"]),
    "decoder without a voice": (lambda f: None, ["--speaker", None], ["no speaker voice given"]),
    "voice without a decoder": (lambda f: None, ["--decoder-dir", None, "--token2wav-config", None],
                                ["need --decoder-dir"]),
}


def apply_args(args: list[str], change: list, fake) -> list[str]:
    """change: [option, value, ...]; value None drops the option, "{decoder}"/"{checkpoint}" are paths."""
    args = list(args)
    for option, value in zip(change[::2], change[1::2]):
        i = args.index(option)
        if value is None:
            del args[i:i + 2]
        else:
            args[i + 1] = value.format(decoder=fake.decoder, checkpoint=fake.checkpoint)
    return args


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_input_gives_a_clear_error_and_no_output(breakage, fake, t2w_json, tmp_path, capsys):
    broken = copy_release(fake, tmp_path)
    damage, change, needles = BREAKAGES[breakage]
    damage(broken)
    out = tmp_path / "out"
    assert c2.main(apply_args(cli_args(broken, out, t2w_json), change, broken)) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert "Traceback" not in err and f"{out} was not written" in err
    assert not out.exists() and not list(tmp_path.glob(".out*")) and not list(Path.cwd().glob("PWNED"))


def test_failure_while_writing_leaves_no_output(fake, t2w_json, tmp_path, monkeypatch):
    real, calls = c2.convert_tensor, []

    def failing(entry, sources):
        calls.append(entry.target)
        if len(calls) == 50:
            raise OSError("No space left on device")
        return real(entry, sources)

    monkeypatch.setattr(c2, "convert_tensor", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        c2.main(cli_args(fake, out, t2w_json))
    assert len(calls) == 50 and not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_is_replaced_only_with_overwrite(fake_untied, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    args = ["--checkpoint", str(fake_untied.checkpoint), "--output-dir", str(out)]
    assert c2.main(args) == 2
    assert "already exists" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep"
    assert c2.main([*args, "--overwrite"]) == 0
    assert not (out / "mine.txt").exists() and (out / "config.json").exists()
