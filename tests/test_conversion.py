"""conversion/convert_llama_omni.py on tiny fake inputs in the ORIGINAL formats (tests/conversion_fixtures.py).

The converted repo, loaded with AutoModel/AutoProcessor, must compute what the original computes, and the
original is computed here independently from the original-format files: openai-whisper's AudioEncoder for
the encoder, transformers' LlamaForCausalLM on the original keys for the LLM, the adaptor and the unit
decoder written from the spec, torch's own weight-norm modules for the vocoder.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
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

from conversion import convert_llama_omni  # noqa: E402
from conversion.key_map import whisper_name  # noqa: E402
from conversion.original_formats import ConversionError, parse_ctc_decoder_config  # noqa: E402
from conversion.writing import PlannedTensor, StreamingShardWriter, plan_shards  # noqa: E402
from conversion_fixtures import write_fake_original  # noqa: E402
from llama_omni_hf.transformers_compat import MIN_TRANSFORMERS_VERSION  # noqa: E402

SYSTEM = ("You are a helpful language and speech assistant. You are able to understand the speech content that "
          "the user provides, and assist the user with a variety of tasks using natural language.")
PROMPT = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + SYSTEM + "<|eot_id|>"
          "<|start_header_id|>user<|end_header_id|>\n\n<speech>\nPlease directly answer the questions in the "
          "user's speech.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
NEW_TOKENS = 6


def cli_args(fake, out, *extra):
    return ["--checkpoint", str(fake.checkpoint), "--whisper-checkpoint", str(fake.whisper),
            "--vocoder-checkpoint", str(fake.vocoder), "--vocoder-config", str(fake.vocoder_config),
            "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return write_fake_original(tmp_path_factory.mktemp("original"))


@pytest.fixture(scope="module")
def converted(fake, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "llama-omni-hf"
    assert convert_llama_omni.main(cli_args(fake, out, "--dtype", "float32")) == 0
    return out


@pytest.fixture(scope="module")
def loaded(converted):
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(converted, trust_remote_code=True)
    model = AutoModel.from_pretrained(converted, trust_remote_code=True).eval()
    return model, processor


@pytest.fixture(scope="module")
def audio():
    t = np.arange(24000) / 16000  # 1.5 s: two tones and a glide
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * (500 + 300 * t) * t)).astype(np.float32)


# ----------------------------------------------------------------------------- the original, independently


def original_shards(fake) -> dict:
    tensors = {}
    for path in sorted(fake.checkpoint.glob("*.safetensors")):
        tensors.update(load_file(path))
    return {k: v.float() for k, v in tensors.items()}


@pytest.fixture(scope="module")
def reference(fake, audio):
    """The original pipeline on the original files: ids, speech embeddings, LLM."""
    import whisper
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    released = json.loads((fake.checkpoint / "config.json").read_text())
    llama_fields = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
                    "tie_word_embeddings", "bos_token_id", "eos_token_id"]
    llama = LlamaForCausalLM(LlamaConfig(**{k: released[k] for k in llama_fields})).eval()
    shards = original_shards(fake)
    llama.load_state_dict({k: v for k, v in shards.items() if k.startswith(("model.embed", "model.layers", "model.norm",
                                                                            "lm_head"))}, strict=True)
    pt = torch.load(fake.whisper, weights_only=True)
    dims = pt["dims"]
    encoder = whisper.model.AudioEncoder(dims["n_mels"], dims["n_audio_ctx"], dims["n_audio_state"],
                                         dims["n_audio_head"], dims["n_audio_layer"]).eval()
    encoder.load_state_dict({k[len("encoder."):]: v.float() for k, v in pt["model_state_dict"].items()
                             if k.startswith("encoder.")})
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio)), n_mels=dims["n_mels"])

    # tokens as the original's tokenizer_speech_token: each text piece tokenized with BOS, the BOS of every
    # piece after the first dropped (spec §2: two BOS at the start, none after the speech slot)
    tokenizer = AutoTokenizer.from_pretrained(fake.checkpoint, config=LlamaConfig())
    before, after = (tokenizer(piece).input_ids for piece in PROMPT.split("<speech>"))
    assert before[:2] == [tokenizer.bos_token_id] * 2 and after[0] == tokenizer.bos_token_id
    with torch.no_grad():
        frames = encoder(mel[None])  # [1, 1500, C]
        k = released["speech_encoder_ds_rate"]
        stacked = frames.reshape(1, frames.shape[1] // k, frames.shape[2] * k)  # spec §2: 5 frames concatenated
        w = {n: shards[f"model.speech_projector.{n}"] for n in ("linear1.weight", "linear1.bias", "linear2.weight",
                                                                 "linear2.bias")}
        speech = F.relu(stacked @ w["linear1.weight"].T + w["linear1.bias"]) @ w["linear2.weight"].T + w["linear2.bias"]
        embed = llama.model.embed_tokens
        prompt_embeds = torch.cat([embed(torch.tensor([before])), speech, embed(torch.tensor([after[1:]]))], dim=1)
    return dict(llama=llama, encoder=encoder, mel=mel, frames=frames, ids=(before, after[1:]), released=released,
                prompt_embeds=prompt_embeds, shards=shards, n_speech=speech.shape[1])


def reference_greedy(reference, steps: int):
    """Plain step-by-step greedy decoding, full recompute, and the final-norm state behind every token."""
    llama, embeds, tokens = reference["llama"], reference["prompt_embeds"], []
    with torch.no_grad():
        first_logits = llama(inputs_embeds=embeds).logits[0, -1]
        for _ in range(steps):
            token = int(llama(inputs_embeds=embeds).logits[0, -1].argmax())
            tokens.append(token)
            embeds = torch.cat([embeds, llama.model.embed_tokens(torch.tensor([[token]]))], dim=1)
        # state that predicted each token: positions (last prompt token, y1, ..., y_{N-1}), after the final norm
        states = llama.model(inputs_embeds=embeds[:, :-1]).last_hidden_state[0, -steps:]
    return first_logits, tokens, states


def llama3_inv_freq(head_dim, theta, scaling):
    """RoPE frequencies with Llama-3.1's scaling, from its published formula."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = ((old / wavelen - low) / (high - low)).clamp(0, 1)
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    mid = (wavelen <= old / low) & (wavelen >= old / high)
    return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled).float()


def spec_unit_decoder(states, shards, released):
    """Spec §3: repeat x lambda, input_proj, causal Llama layers (RoPE of the LLM), no final norm, output_proj,
    argmax, merge repeats then drop blanks."""
    layers, dim, heads, _ = parse_ctc_decoder_config(released["ctc_decoder_config"])
    eps, blank = released["rms_norm_eps"], released["unit_vocab_size"]
    g = lambda name: shards[f"speech_generator.{name}"]  # noqa: E731
    x = states.repeat_interleave(released["ctc_upsample_factor"], dim=0)  # [N*lambda, H]
    x = x @ g("input_proj.weight").T + g("input_proj.bias")
    t, hd = x.shape[0], dim // heads
    angles = torch.arange(t)[:, None].float() * llama3_inv_freq(hd, released["rope_theta"], released["rope_scaling"])
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # [T, hd]

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(v):  # [heads, T, hd], rotate-half layout of transformers' Llama weights
        return v * cos + torch.cat([-v[..., hd // 2:], v[..., :hd // 2]], -1) * sin

    for i in range(layers):
        p = lambda name: g(f"layers.{i}.{name}")  # noqa: E731
        h = rms(x, p("input_layernorm.weight"))
        q, k, v = (h @ p(f"self_attn.{n}_proj.weight").T for n in "qkv")
        q, k, v = (m.reshape(t, heads, hd).transpose(0, 1) for m in (q, k, v))
        att = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)  # causal: flash is_causal
        x = x + att.transpose(0, 1).reshape(t, dim) @ p("self_attn.o_proj.weight").T
        h = rms(x, p("post_attention_layernorm.weight"))
        x = x + (F.silu(h @ p("mlp.gate_proj.weight").T) * (h @ p("mlp.up_proj.weight").T)) @ p("mlp.down_proj.weight").T
    frames = F.log_softmax((x @ g("output_proj.weight").T + g("output_proj.bias")).float(), -1).argmax(-1).tolist()
    merged = [f for i, f in enumerate(frames) if i == 0 or f != frames[i - 1]]
    return [f for f in merged if f != blank]


# ----------------------------------------------------------------------------- converted == original


def test_features_and_speech_encoder_match_openai_whisper(loaded, reference, audio):
    model, processor = loaded
    inputs = processor(audio=audio, sampling_rate=16000, return_tensors="pt")
    assert torch.allclose(inputs["input_features"][0], reference["mel"], atol=1e-4)
    with torch.no_grad():
        ours = model.speech_encoder(reference["mel"][None]).last_hidden_state
    assert ours.shape == reference["frames"].shape
    assert torch.allclose(ours, reference["frames"], atol=1e-4), (ours - reference["frames"]).abs().max()


def test_prompt_ids_are_the_originals(loaded, reference, audio):
    model, processor = loaded
    ids = processor(audio=audio, sampling_rate=16000, return_tensors="pt")["input_ids"][0].tolist()
    speech_id = model.config.speech_token_id
    first = ids.index(speech_id)
    before, after = reference["ids"]
    assert ids[:first] == before and ids[first + reference["n_speech"]:] == after
    assert ids.count(speech_id) == reference["n_speech"] == 300


def test_first_step_logits_greedy_text_units_and_waveform(loaded, reference, audio, fake):
    model, processor = loaded
    inputs = processor(audio=audio, sampling_rate=16000, return_tensors="pt")
    first_logits, tokens, states = reference_greedy(reference, NEW_TOKENS)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    assert torch.allclose(logits, first_logits, atol=1e-4), (logits - first_logits).abs().max()

    out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, return_dict_in_generate=True)
    answer = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    assert answer == tokens and len(set(tokens)) > 1

    units = spec_unit_decoder(states, reference["shards"], reference["released"])
    assert out.units[0].tolist() == units and len(units) >= NEW_TOKENS

    expected_audio = fake.reference_vocoder(torch.tensor(units))
    assert out.audio[0].shape == expected_audio.shape
    assert torch.allclose(out.audio[0], expected_audio, atol=1e-5), (out.audio[0] - expected_audio).abs().max()


def test_vocoder_weights_are_torch_weight_norm_folded(loaded, fake):
    import copy

    ref = copy.deepcopy(fake.reference_vocoder)
    for module in ref.modules():
        if hasattr(module, "weight_g"):
            torch.nn.utils.remove_weight_norm(module)  # torch's own fold
    ours = loaded[0].vocoder.state_dict()
    theirs = ref.state_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert torch.allclose(ours[key], value, atol=1e-6), key


def test_encoder_from_shards_only_equals_from_whisper_checkpoint(fake, converted, tmp_path):
    out = tmp_path / "from-shards"
    args = cli_args(fake, out, "--dtype", "float32")
    i = args.index("--whisper-checkpoint")
    del args[i:i + 2]
    assert convert_llama_omni.main(args) == 0
    a, b = load_file(out / "model.safetensors"), load_file(converted / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the output repo


def test_output_repo_is_complete_and_safetensors_only(converted):
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "generation_config.json", "processor_config.json", "tokenizer.json", "README.md",
            "configuration_llama_omni.py", "modeling_llama_omni.py", "processing_llama_omni.py",
            "vocoder_llama_omni.py", "transformers_compat.py", "model.safetensors"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama_omni" and config["auto_map"]["AutoModel"].startswith("modeling_llama_omni.")
    assert config["unit_decoder_num_layers"] == 2 and isinstance(config["unit_decoder_intermediate_size"], int)
    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation["do_sample"] is True and generation["temperature"] == 0.6  # the release's defaults, kept
    card = (converted / "README.md").read_text()
    for needle in ("AutoModel.from_pretrained", "AutoProcessor.from_pretrained", "generate_stream",
                   "may NOT be used for commercial purposes", "@article{fang-etal-2024-llama-omni",
                   "trust_remote_code=True", "license: other", f'"transformers>={MIN_TRANSFORMERS_VERSION}"'):
        assert needle in card, needle
    assert not list(converted.parent.glob(".*partial*"))


def test_sharded_output_has_a_consistent_index(fake, converted, tmp_path):
    out = tmp_path / "sharded"
    assert convert_llama_omni.main(cli_args(fake, out, "--dtype", "float32", "--max-shard-size", "1MB")) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in out.glob("model-*.safetensors"))
    single = load_file(converted / "model.safetensors")
    total = 0
    for name in files:
        with safe_open(out / name, "pt") as f:
            for key in f.keys():
                assert index["weight_map"][key] == name and torch.equal(f.get_tensor(key), single[key])
                total += single[key].numel() * 4
    assert total == index["metadata"]["total_size"] and set(index["weight_map"]) == set(single)


def test_streaming_writer_round_trips_every_dtype(tmp_path):
    tensors = {
        "a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(7).half(), "c": torch.randn(2, 2, 2),
        "d": torch.arange(5), "e": torch.tensor(3.5), "f": torch.zeros(0, 4),
    }
    planned = [PlannedTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = StreamingShardWriter(tmp_path, plan_shards(planned, 40))
    for k, v in tensors.items():
        writer.write(k, v)
    weight_map = writer.close()
    for key, name in weight_map.items():
        with safe_open(tmp_path / name, "pt") as f:
            assert torch.equal(f.get_tensor(key), tensors[key]) and f.metadata() == {"format": "pt"}


def test_whisper_names_and_ctc_string():
    assert whisper_name("blocks.3.attn.key.weight") == "layers.3.self_attn.k_proj.weight"
    assert whisper_name("blocks.0.mlp.2.bias") == "layers.0.fc2.bias"
    assert whisper_name("blocks.0.mlp_ln.weight") == "layers.0.final_layer_norm.weight"
    assert whisper_name("positional_embedding") == "embed_positions.weight"
    assert whisper_name("ln_post.bias") == "layer_norm.bias"
    assert whisper_name("blocks.0.cross_attn.query.weight") is None
    assert parse_ctc_decoder_config("(2,4096,32,11008)") == (2, 4096, 32, 11008)
    with pytest.raises(ConversionError, match="ctc_decoder_config"):
        parse_ctc_decoder_config("__import__('os')")


def test_cli_with_verify_in_a_clean_subprocess(fake, tmp_path):
    out = tmp_path / "cli-out"
    run = subprocess.run([sys.executable, str(ROOT / "conversion" / "convert_llama_omni.py"),
                          *cli_args(fake, out, "--verify", "--verify-max-new-tokens", "4")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "peak memory:" in run.stdout and "estimate for the 8B release" in run.stdout
    result = json.loads(run.stdout.split("VERIFY ", 1)[1].splitlines()[0])
    assert result["dtype"] == "float16" and len(result["answer_ids"]) == 4 and result["audio_samples"] > 0
    # the vocoder stays float32 (the original runs it so; fp16 flips rounded durations), the rest is float16
    from safetensors import safe_open

    dtypes = {}
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            dtypes.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    assert {d for k, d in dtypes.items() if k.startswith("vocoder.")} == {"F32"}
    assert dtypes["lm_head.weight"] == "F16" and dtypes["unit_decoder.output_proj.weight"] == "F16"


# ----------------------------------------------------------------------------- wrong inputs: clear error, no OUT


def copy_original(fake, tmp_path):
    from dataclasses import replace

    root = tmp_path / "original"
    shutil.copytree(fake.root, root)
    return replace(fake, root=root, checkpoint=root / "checkpoint", whisper=root / "large-v3.pt",
                   vocoder=root / "vocoder" / "g_00500000", vocoder_config=root / "vocoder" / "config.json")


def edit_shards(fake, edit):
    """Rewrite the shard holding each affected key (and the index) after `edit(state_dict)`."""
    index_path = fake.checkpoint / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for name in sorted(set(index["weight_map"].values())):
        tensors = load_file(fake.checkpoint / name)
        if name == "model-00002-of-00002.safetensors":
            edit(tensors)
        save_file(tensors, fake.checkpoint / name, metadata={"format": "pt"})
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != name}
        index["weight_map"].update({k: name for k in tensors})
    index_path.write_text(json.dumps(index))


def truncate(path: Path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def set_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_vocoder(fake, edit):
    pickle = torch.load(fake.vocoder, weights_only=True)
    edit(pickle)
    torch.save(pickle, fake.vocoder)


class NotATensor:  # an arbitrary object: weights_only loading must refuse it
    pass


BREAKAGES = {
    "truncated shard": (lambda f: truncate(f.checkpoint / "model-00002-of-00002.safetensors"),
                        ["cannot read shard", "model-00002-of-00002.safetensors", "truncated or corrupt"]),
    "missing shard": (lambda f: (f.checkpoint / "model-00001-of-00002.safetensors").unlink(),
                      ["missing from", "model-00001-of-00002.safetensors"]),
    "missing key": (lambda f: edit_shards(f, lambda t: t.pop("speech_generator.output_proj.bias")),
                    ["1 key missing", "unit_decoder.output_proj.bias"]),
    "unexpected key": (lambda f: edit_shards(f, lambda t: t.update({"speech_generator.layers.2.mlp.up_proj.weight":
                                                                    torch.zeros(96, 64).half()})),
                       ["1 key unexpected", "unit_decoder.layers.2.mlp.up_proj.weight",
                        "from checkpoint:speech_generator.layers.2.mlp.up_proj.weight"]),
    "unknown key": (lambda f: edit_shards(f, lambda t: t.update({"model.mm_projector.weight": torch.zeros(2).half()})),
                    ["1 key in the inputs that no conversion rule knows", "checkpoint:model.mm_projector.weight"]),
    "mis-shaped key": (lambda f: edit_shards(f, lambda t: t.update({"speech_generator.output_proj.bias":
                                                                    torch.zeros(7).half()})),
                       ["1 key mis-shaped", "unit_decoder.output_proj.bias: input [7]", "model expects [101]"]),
    "whisper disagrees": (lambda f: torch.save({**(w := torch.load(f.whisper, weights_only=True)), "model_state_dict": {
        k: (v + 0.5 if k == "encoder.ln_post.bias" else v) for k, v in w["model_state_dict"].items()}}, f.whisper),
                          ["differs from --whisper-checkpoint in 1 of", "speech_encoder.layer_norm.bias",
                           "--whisper-source"]),
    "truncated whisper": (lambda f: truncate(f.whisper), ["cannot read Whisper checkpoint", "large-v3.pt"]),
    "not a whisper file": (lambda f: torch.save({"state_dict": {}}, f.whisper),
                           ["is not an openai-whisper checkpoint", "'dims' and 'model_state_dict'"]),
    "vocoder without generator": (lambda f: edit_vocoder(f, lambda p: p.update(generator=None)),
                                  ["not a fairseq CodeHiFiGAN checkpoint", "'generator'"]),
    "vocoder unsafe pickle": (lambda f: edit_vocoder(f, lambda p: p.update(extra=NotATensor())),
                              ["cannot read vocoder checkpoint", "NotATensor", "weights_only=True"]),
    "half a weight-norm pair": (lambda f: edit_vocoder(f, lambda p: p["generator"].pop("conv_post.weight_v")),
                                ["vocoder.conv_post.weight: weight norm needs both", "conv_post.weight_g"]),
    "wrong model type": (lambda f: set_json(f.checkpoint / "config.json", model_type="llama"),
                         ["model_type 'llama'", "expected 'omni_speech2s_llama'"]),
    "bad ctc string": (lambda f: set_json(f.checkpoint / "config.json", ctc_decoder_config="(2,64,4)"),
                       ["ctc_decoder_config", "'(2,64,4)'"]),
    "vocoder with f0": (lambda f: set_json(f.vocoder_config, f0=True), ["f0 conditioning"]),
    "broken config json": (lambda f: (f.checkpoint / "config.json").write_text('{"model_type": '),
                           ["is not valid JSON"]),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_input_gives_a_clear_error_and_no_output(breakage, fake, tmp_path, capsys):
    broken = copy_original(fake, tmp_path)
    damage, needles = BREAKAGES[breakage]
    damage(broken)
    out = tmp_path / "out"
    assert convert_llama_omni.main(cli_args(broken, out)) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_existing_output_is_left_alone_without_overwrite(fake, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert convert_llama_omni.main(cli_args(fake, out)) == 2
    assert "already exists" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep"
    assert convert_llama_omni.main(cli_args(fake, out, "--overwrite")) == 0
    assert not (out / "mine.txt").exists() and (out / "config.json").exists()


def test_failure_while_writing_leaves_no_output(fake, tmp_path, monkeypatch):
    real, calls = convert_llama_omni.convert_tensor, []

    def failing(entry, sources):
        calls.append(entry.target)
        if len(calls) == 50:
            raise OSError("No space left on device")
        return real(entry, sources)

    monkeypatch.setattr(convert_llama_omni, "convert_tensor", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        convert_llama_omni.main(cli_args(fake, out))
    assert len(calls) == 50 and not out.exists() and list(tmp_path.iterdir()) == []


def test_no_encoder_anywhere_asks_for_the_whisper_checkpoint(fake, tmp_path, capsys):
    broken = copy_original(fake, tmp_path)
    index = json.loads((broken.checkpoint / "model.safetensors.index.json").read_text())
    for name in sorted(set(index["weight_map"].values())):
        tensors = {k: v for k, v in load_file(broken.checkpoint / name).items() if "speech_encoder" not in k}
        save_file(tensors, broken.checkpoint / name, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if "speech_encoder" not in k}
    (broken.checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    args = cli_args(broken, tmp_path / "out")
    i = args.index("--whisper-checkpoint")
    del args[i:i + 2]
    assert convert_llama_omni.main(args) == 2
    assert "pass --whisper-checkpoint large-v3.pt" in capsys.readouterr().err
    # with the .pt it converts: the encoder then comes from openai-whisper's file alone
    assert convert_llama_omni.main(cli_args(broken, tmp_path / "out")) == 0


def test_whisper_source_choice(fake, tmp_path, capsys):
    broken = copy_original(fake, tmp_path)
    BREAKAGES["whisper disagrees"][0](broken)  # ln_post.bias differs between the shards and large-v3.pt
    out = tmp_path / "out"
    assert convert_llama_omni.main(cli_args(broken, out, "--whisper-source", "checkpoint", "--dtype", "float32")) == 0
    assert "DIFFER in 1 tensors" in capsys.readouterr().out
    shards = original_shards(broken)
    assert torch.equal(load_file(out / "model.safetensors")["speech_encoder.layer_norm.bias"],
                       shards["model.speech_encoder.ln_post.bias"])
    args = cli_args(broken, tmp_path / "out2", "--whisper-source", "whisper")
    i = args.index("--whisper-checkpoint")
    del args[i:i + 2]
    assert convert_llama_omni.main(args) == 2
    assert "--whisper-source whisper needs --whisper-checkpoint" in capsys.readouterr().err


def test_without_vocoder(fake, tmp_path, capsys):
    args = ["--checkpoint", str(fake.checkpoint), "--whisper-checkpoint", str(fake.whisper)]
    assert convert_llama_omni.main([*args, "--output-dir", str(tmp_path / "a")]) == 2
    assert "or --no-vocoder" in capsys.readouterr().err
    assert convert_llama_omni.main([*args, "--output-dir", str(tmp_path / "b"), "--no-vocoder"]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["vocoder_config"] is None
    assert not [k for k in load_file(tmp_path / "b" / "model.safetensors") if k.startswith("vocoder.")]


def test_trained_context_is_kept_as_the_tokenizer_limit(loaded, fake, tmp_path):
    """The release's `tokenizer_model_max_length` (its training cut-off) becomes model_max_length; the app counts
    conversation turns against it."""
    import json
    import shutil

    from conversion.repo_files import build_processor

    released = json.loads((fake.checkpoint / "config.json").read_text())
    assert loaded[1].tokenizer.model_max_length == released["tokenizer_model_max_length"]
    other = tmp_path / "release"
    shutil.copytree(fake.checkpoint, other, ignore=shutil.ignore_patterns("*.safetensors"))
    (other / "config.json").write_text(json.dumps(dict(released, tokenizer_model_max_length=1536)))
    assert build_processor(other, n_mels=128, n_audio_ctx=1500, ds_rate=5).tokenizer.model_max_length == 1536
