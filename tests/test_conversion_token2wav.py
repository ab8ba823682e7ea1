"""conversion/convert_cosy2_decoder.py on tiny fake cosy2_decoder files in the ORIGINAL formats.

The fakes (tests/token2wav_fixtures.py) are written from the spec's description of the original classes, not from
llama_omni_hf's module; HiFT's weight norm is compared with torch's own weight-norm modules, the speaker front end
with independent numpy formulas of torchaudio's resampler and Kaldi's fbank (and kaldi-native-fbank when installed).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conversion import convert_cosy2_decoder as c2d  # noqa: E402
from conversion.convert_cosy2_decoder import (convert_cosy2_decoder, convert_decoder_state_dicts,  # noqa: E402
                                              make_noise, plan_conversion)
from conversion.cosyvoice_yaml import check_cosyvoice_yaml, parse_cosyvoice_yaml  # noqa: E402
from conversion.key_map_omni2 import fold_weight_norm  # noqa: E402
from conversion.original_formats import ConversionError  # noqa: E402
from conversion.speaker_embedding import kaldi_fbank, read_speaker_file, resample  # noqa: E402
from conversion.token2wav_repo import remote_code_files  # noqa: E402
from llama_omni_hf.configuration_llama_omni2 import LlamaOmni2Token2WavConfig  # noqa: E402
from llama_omni_hf.tiny import tiny_token2wav_config_dict  # noqa: E402
from token2wav_fixtures import (cosyvoice_yaml, fake_flow_state, fake_hift_state, original_flow_shapes,  # noqa: E402
                                original_hift_layout, parameter_count, weight_norm_module, write_fake_decoder)

CONFIG = LlamaOmni2Token2WavConfig(**tiny_token2wav_config_dict())


def xvector(seed: int) -> torch.Tensor:
    return torch.randn(192, generator=torch.Generator().manual_seed(seed))


def legacy_weight(module) -> torch.Tensor:
    """What a legacy weight-norm module computes in its forward pre-hook."""
    for hook in module._forward_pre_hooks.values():
        hook(module, None)
    return module.weight.detach()


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return write_fake_decoder(tmp_path_factory.mktemp("decoder"), CONFIG, yaml=cosyvoice_yaml(CONFIG))


@pytest.fixture(scope="module")
def speaker_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("speakers")
    np.save(root / "en.npy", xvector(1).numpy())
    torch.save(xvector(2)[None], root / "zh.pt")
    return {"en": root / "en.npy", "zh": root / "zh.pt"}


@pytest.fixture(scope="module")
def converted(fake, speaker_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "token2wav"
    summary = convert_cosy2_decoder(fake.root, out, CONFIG, speaker_files=speaker_files)
    return out, summary


# ----------------------------------------------------------------------------- the table and the fold


@pytest.mark.parametrize("parametrized", [False, True], ids=["weight_g-v", "parametrizations+generator"])
def test_every_tensor_lands_where_it_should(parametrized):
    flow = fake_flow_state(CONFIG)
    hift, modules = fake_hift_state(CONFIG, parametrized=parametrized)
    noise = torch.randn(1, 80, CONFIG.noise_frames)
    out = convert_decoder_state_dicts(flow, hift, CONFIG, noise, {"en": xvector(1), "zh": xvector(2)})
    for key, tensor in flow.items():
        target = "flow.estimator." + key[len("decoder.estimator."):] if key.startswith("decoder.") else "flow." + key
        assert torch.equal(out.pop(target), tensor), key
    plain, _ = original_hift_layout(CONFIG)
    prefix = "generator." if parametrized else ""
    for key in plain:
        assert torch.equal(out.pop(f"hift.{key}"), hift[prefix + key]), key
    for layer, module in modules.items():  # bit-exact: the weight torch's weight norm computes in the original
        assert torch.equal(out.pop(f"hift.{layer}.weight"), legacy_weight(module)), layer
    assert torch.equal(out.pop("flow.noise"), noise)
    assert torch.equal(out.pop("speakers.en"), xvector(1)) and torch.equal(out.pop("speakers.zh"), xvector(2))
    assert out == {}


@pytest.mark.parametrize("kind,shape", [("conv", (64, 80, 7)), ("conv_transpose", (32, 16, 11)), ("conv", (18, 8, 7))])
def test_fold_is_bit_identical_to_torch_weight_norm(kind, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    v = torch.randn(shape, generator=gen) * 0.3
    g = torch.rand(shape[0], 1, 1, generator=gen) * 3
    legacy = weight_norm_module(kind, shape)
    parametrized = weight_norm_module(kind, shape, parametrized=True)
    with torch.no_grad():
        legacy.weight_g.copy_(g), legacy.weight_v.copy_(v)
        parametrized.parametrizations.weight.original0.copy_(g)
        parametrized.parametrizations.weight.original1.copy_(v)
    folded = fold_weight_norm(g, v)
    assert torch.equal(folded, legacy_weight(legacy)) and torch.equal(folded, parametrized.weight.detach())
    textbook = g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1)  # dim 0 even for ConvTranspose1d ([in, out, k])
    assert torch.allclose(folded, textbook, rtol=1e-5, atol=1e-6) and not torch.allclose(folded, v)
    assert not torch.equal(folded, textbook)  # same maths, other rounding: why the fold goes through torch (Q12)
    assert torch.equal(fold_weight_norm(g.half(), v.half()), fold_weight_norm(g.half().float(), v.half().float()))


def test_released_sizes_and_parameter_counts():
    """Spec §1.5: flow.pt 1121 tensors / 112.55 M, hift.pt 328 tensors / 20.82 M (g and v counted); the module,
    built on the meta device, has exactly the keys and shapes the released files map to."""
    from llama_omni_hf.token2wav_llama_omni2 import LlamaOmni2Token2Wav

    released = LlamaOmni2Token2WavConfig()
    flow = original_flow_shapes(released)
    plain, wn = original_hift_layout(released)
    assert len(flow) == 1121 and parameter_count(flow.values()) == 112_549_360
    assert len(plain) + 2 * len(wn) == 328
    g_values = sum(shape[0] for _, shape in wn.values())
    assert parameter_count(plain.values()) + parameter_count(s for _, s in wn.values()) + g_values == 20_821_295
    with torch.device("meta"):
        model = LlamaOmni2Token2Wav(released)
    count = lambda prefix: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))  # noqa: E731
    assert round(count("flow.") / 1e6, 2) == 112.55 and count("flow.") == 112_549_360  # noise is a buffer
    assert count("hift.") == 20_821_295 - g_values == 20_806_557  # folded: one weight per g/v pair
    shapes = {f"flow:{k}": s for k, s in flow.items()}
    shapes.update({f"hift:{k}": s for k, s in plain.items()})
    for layer, (_, shape) in wn.items():
        shapes[f"hift:{layer}.weight_g"] = (shape[0], 1, 1)
        shapes[f"hift:{layer}.weight_v"] = shape
    extras = {"flow.noise": (1, 80, 15000), "speakers.en": (192,), "speakers.zh": (192,)}
    entries = plan_conversion(shapes, extras, released)
    assert len(entries) == len(model.state_dict()) == 1121 + 328 - len(wn) + 3


# ----------------------------------------------------------------------------- wrong inputs


def _convert(flow, hift, config=CONFIG):
    return convert_decoder_state_dicts(flow, hift, config, torch.zeros(1, 80, config.noise_frames),
                                       {"en": xvector(1), "zh": xvector(2)})


def test_missing_extra_and_misshaped_keys_are_listed():
    flow, (hift, _) = fake_flow_state(CONFIG), fake_hift_state(CONFIG)
    flow.pop("decoder.estimator.final_proj.bias")
    flow["encoder.encoders.9.norm_ff.weight"] = torch.zeros(64)
    flow["encoder.after_norm.weight"] = torch.zeros(65)
    hift.pop("conv_post.weight_g")
    hift["ups.0.weight_g"] = torch.ones(32)
    with pytest.raises(ConversionError) as info:
        _convert(flow, hift)
    text = str(info.value)
    for needle in ("3 keys missing", "flow.estimator.final_proj.bias",
                   "unexpected", "flow.encoder.encoders.9.norm_ff.weight (from flow:encoder.encoders.9.norm_ff.weight)",
                   "1 key mis-shaped", "flow.encoder.after_norm.weight: input [65]", "model expects [64]",
                   "hift.conv_post.weight: weight norm needs both halves", "found only hift:conv_post.weight_v",
                   "hift:ups.0.weight_g has shape [32]", "it must be [32, 1, 1]"):
        assert needle in text, f"{needle!r} not in:\n{text}"


def test_a_layer_given_twice_is_an_error():
    flow, (hift, _) = fake_flow_state(CONFIG), fake_hift_state(CONFIG)
    hift["generator.conv_pre.bias"] = hift["conv_pre.bias"]
    hift["conv_pre.parametrizations.weight.original0"] = hift["conv_pre.weight_g"]
    with pytest.raises(ConversionError, match="hift.conv_pre.bias comes from several keys") as info:
        _convert(flow, hift)
    assert "weight norm g given twice" in str(info.value)


def test_a_different_config_is_a_shape_error():
    flow, (hift, _) = fake_flow_state(CONFIG), fake_hift_state(CONFIG)
    other = LlamaOmni2Token2WavConfig(**{**tiny_token2wav_config_dict(), "encoder_linear_units": 96})
    with pytest.raises(ConversionError, match=r"feed_forward.w_1.weight: input \[64, 64\].*model expects \[96, 64\]"):
        _convert(flow, hift, other)


class NotATensor:  # weights_only loading must refuse it
    pass


WRONG_FILES = {
    "v1 vocoder as hift": ("hift.pt", lambda f: torch.save({"generator": {"conv_pre.weight_g": torch.ones(1)}}, f.hift),
                           ["is not CosyVoice2's hift.pt", "fairseq unit HiFi-GAN checkpoint"]),
    "LLM as flow": ("flow.pt", lambda f: torch.save({"model.embed_tokens.weight": torch.ones(2, 2)}, f.flow),
                    ["is not CosyVoice2's flow.pt", "language-model checkpoint"]),
    "hift as flow": ("flow.pt", lambda f: f.flow.write_bytes(f.hift.read_bytes()), ["looks like CosyVoice2's hift.pt"]),
    "wrapped": ("flow.pt", lambda f: torch.save({"state_dict": f.flow_state}, f.flow), ["wrapped checkpoint"]),
    "truncated": ("flow.pt", lambda f: f.flow.write_bytes(f.flow.read_bytes()[:5000]),
                  ["cannot read CosyVoice2's flow.pt"]),
    "missing": ("hift.pt", lambda f: f.hift.unlink(), ["CosyVoice2's hift.pt not found"]),
    "pickled object": ("hift.pt", lambda f: torch.save({**f.hift_state, "x": NotATensor()}, f.hift),
                       ["NotATensor", "weights_only=True"]),
    "non-tensor entry": ("flow.pt", lambda f: torch.save({**f.flow_state, "step": 3}, f.flow),
                         ["holds entries that are not tensors: ['step']"]),
}


@pytest.mark.parametrize("case", sorted(WRONG_FILES))
def test_wrong_files_give_a_clear_error_and_no_output(case, tmp_path, speaker_files, capsys):
    fake = write_fake_decoder(tmp_path / "decoder", CONFIG)
    WRONG_FILES[case][1](fake)
    out = tmp_path / "out"
    assert c2d.main(cli_args(fake.root, out, speaker_files)) == 2
    err = capsys.readouterr().err
    assert all(needle in err for needle in WRONG_FILES[case][2]), err
    assert "Traceback" not in err and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "decoder"]  # no partial output either


# ----------------------------------------------------------------------------- noise and speakers


def test_seed0_noise_is_the_global_seed_0_draw_and_files_are_checked(tmp_path):
    noise, how = make_noise("seed0", CONFIG)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # upstream's set_all_random_seed(0), then torch.randn in CausalConditionalCFM.__init__
        assert torch.equal(noise, torch.randn([1, 80, 15000]))
    assert "seed0" in how
    longer = torch.randn(1, 80, 15100)
    torch.save(longer, tmp_path / "noise.pt")
    np.save(tmp_path / "exact.npy", longer[:, :, :15000].numpy())
    assert torch.equal(make_noise(str(tmp_path / "noise.pt"), CONFIG)[0], longer[:, :, :15000])
    assert torch.equal(make_noise(str(tmp_path / "exact.npy"), CONFIG)[0], longer[:, :, :15000])
    bad = {"short.pt": torch.randn(1, 80, 100), "mels.pt": torch.randn(1, 64, 15000), "nan.pt": longer * float("nan")}
    for name, tensor in bad.items():
        torch.save(tensor, tmp_path / name)
    for name, needle in [("short.pt", "F >= 15000"), ("mels.pt", "shape [1, 64, 15000]"), ("nan.pt", "NaN"),
                         ("absent.pt", "no such file")]:
        with pytest.raises(ConversionError) as info:
            make_noise(str(tmp_path / name), CONFIG)
        assert needle in str(info.value)


def test_speaker_files(tmp_path):
    vector = xvector(3)
    save_file({"zh": vector.clone(), "en": xvector(4)}, tmp_path / "both.safetensors")
    torch.save({"embedding": vector[None]}, tmp_path / "one.pt")
    assert torch.equal(read_speaker_file(tmp_path / "both.safetensors", "zh"), vector)
    assert torch.equal(read_speaker_file(tmp_path / "one.pt", "en"), vector)
    for name, value, needle in [("nan.npy", np.full(192, np.nan, np.float32), "NaN"),
                                ("zeros.npy", np.zeros((1, 192), np.float32), "all zeros"),
                                ("shape.npy", np.ones(80, np.float32), r"shape \[192\] or \[1, 192\], got \[80\]"),
                                ("ints.npy", np.ones(192, np.int64), "expected floats")]:
        np.save(tmp_path / name, value)
        with pytest.raises(ConversionError, match=needle):
            read_speaker_file(tmp_path / name, "en")


def test_no_voice_explains_both_options(fake, tmp_path, capsys):
    assert c2d.main(["--decoder-dir", str(fake.root), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--prompt-wav en=prompt_en.wav" in err and "--speaker en=en.npy" in err and "convert-speakers" in err


def test_one_voice_makes_a_one_voice_repo(fake, speaker_files, tmp_path):
    summary = convert_cosy2_decoder(fake.root, tmp_path / "out", CONFIG, speaker_files={"zh": speaker_files["zh"]})
    assert summary["config"].speakers == ["zh"] and summary["config"].default_speaker == "zh"
    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert {k for k in stored if k.startswith("speakers.")} == {"speakers.zh"}


# ----------------------------------------------------------------------------- cosyvoice.yaml


def test_yaml_matches_and_is_only_read(tmp_path):
    marker = tmp_path / "executed"
    text = cosyvoice_yaml(CONFIG) + f'__evil: !apply:os.system ["touch {marker}"]\n'
    data = parse_cosyvoice_yaml(text)
    report = check_cosyvoice_yaml(data, CONFIG)
    assert report.errors == [] and report.checked >= 35 and report.overrides == {} and not marker.exists()
    assert report.use_dynamic_chunk is False and "matches the config" in report.summary()
    assert any("torch.manual_seed(1986)" in note for note in report.notes)  # spec Q5: decides the original noise
    assert any("static_chunk_size`: 50" in note for note in report.notes)  # `!ref <token_frame_rate> * 2`, resolved


@pytest.mark.parametrize("edit,needle", [
    (("linear_units: 64", "linear_units: 128"), "`flow.encoder.linear_units` is 128 but the config's "
                                                "`encoder_linear_units` is 64"),
    (("upsample_rates: [8, 5, 3]", "upsample_rates: [8, 8]"), "`hift.upsample_rates` is [8, 8]"),
    (("use_cnn_module: False", "use_cnn_module: True"), "`flow.encoder.use_cnn_module` is True; this port implements"),
    (("causal: True", "causal: False"), "`flow.decoder.estimator.causal` is False"),
    (("flow: !new:", "flow: ["), "is not valid YAML"),
])
def test_yaml_mismatch_is_an_error_naming_the_field(edit, needle, tmp_path, speaker_files, capsys):
    fake = write_fake_decoder(tmp_path / "decoder", CONFIG, yaml=cosyvoice_yaml(CONFIG).replace(*edit, 1))
    assert c2d.main(cli_args(fake.root, tmp_path / "out", speaker_files)) == 2
    assert needle in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_yaml_behaviour_values_are_taken_and_dynamic_chunk_is_reported_loudly(tmp_path, speaker_files, capsys):
    text = cosyvoice_yaml(CONFIG, dynamic_chunk=True).replace("nsf_alpha: 0.1", "nsf_alpha: 0.2")
    fake = write_fake_decoder(tmp_path / "decoder", CONFIG, yaml=text)
    out = tmp_path / "out"
    assert c2d.main(cli_args(fake.root, out, speaker_files)) == 0
    printed = capsys.readouterr().out
    assert "WARNING: !!! cosyvoice.yaml sets flow.encoder.use_dynamic_chunk: True" in printed
    assert "`hift.nsf_alpha` is 0.2, not the default 0.1" in printed
    assert json.loads((out / "config.json").read_text())["nsf_alpha"] == 0.2
    card = (out / "README.md").read_text()
    assert "use_dynamic_chunk TRUE" in card and "RANDOM chunk mask" in card


def test_no_yaml_is_a_note(tmp_path, speaker_files):
    fake = write_fake_decoder(tmp_path / "decoder", CONFIG)
    summary = convert_cosy2_decoder(fake.root, tmp_path / "out", CONFIG, speaker_files=speaker_files)
    assert "no cosyvoice.yaml" in summary["yaml"][0]


# ----------------------------------------------------------------------------- the output repo


def test_output_loads_with_automodel_and_equals_the_converted_tensors(converted, fake):
    from transformers import AutoModel

    out, summary = converted
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md",
                                               *remote_code_files()}
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    assert type(model).__name__ == "LlamaOmni2Token2Wav" and model.config.speakers == ["en", "zh"]
    stored = load_file(out / "model.safetensors")
    state = model.state_dict()
    assert set(state) == set(stored) and all(torch.equal(state[k], stored[k]) for k in stored)
    assert all(t.dtype == torch.float32 for t in stored.values())
    assert torch.equal(stored["flow.encoder.after_norm.weight"], fake.flow_state["encoder.after_norm.weight"])
    assert torch.equal(stored["speakers.en"], xvector(1)) and torch.equal(stored["flow.noise"],
                                                                           make_noise("seed0", CONFIG)[0])
    wave = model.token2wav([5, 6560, 17, 300, 2, 9, 1000], speaker="zh", nsf_noise=False)
    assert wave.shape == (7 * 960,) and torch.isfinite(wave).all()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_llama_omni2.LlamaOmni2Token2WavConfig",
                                  "AutoModel": "token2wav_llama_omni2.LlamaOmni2Token2Wav"}
    assert config["architectures"] == ["LlamaOmni2Token2Wav"]
    card = (out / "README.md").read_text()
    for needle in ("AutoModel.from_pretrained", "trust_remote_code=True", 'speaker="en"', "seed0", "en.npy",
                   "cosyvoice.yaml matches the config", "may NOT be used commercially"):
        assert needle in card, needle
    assert summary["flow_parameters"] == 823_440


def test_remote_code_files_follow_relative_imports():
    assert set(remote_code_files()) >= {"configuration_llama_omni2.py", "configuration_llama_omni.py",
                                        "token2wav_llama_omni2.py", "transformers_compat.py"}


def test_failure_while_writing_leaves_no_output(fake, speaker_files, tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(c2d, "write_repo_files", failing)
    with pytest.raises(OSError, match="No space left"):
        convert_cosy2_decoder(fake.root, tmp_path / "out", CONFIG, speaker_files=speaker_files)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(fake, speaker_files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert c2d.main(cli_args(fake.root, out, speaker_files)) == 2
    assert "already exists" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep"
    assert c2d.main(cli_args(fake.root, out, speaker_files, "--overwrite")) == 0
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").exists()


def cli_args(decoder_dir, out, speaker_files, *extra):
    config = Path(out).parent / "config.json"
    config.write_text(json.dumps(tiny_token2wav_config_dict()))
    return ["--decoder-dir", str(decoder_dir), "--output", str(out), "--config", str(config),
            *[a for name, path in speaker_files.items() for a in ("--speaker", f"{name}={path}")], *extra]


def test_cli_with_verify_in_a_clean_subprocess(fake, speaker_files, tmp_path):
    out = tmp_path / "cli-out"
    run = subprocess.run([sys.executable, "-m", "conversion.convert_cosy2_decoder",
                          *cli_args(fake.root, out, speaker_files, "--verify", "--verify-units", "9")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.split("VERIFY ", 1)[1].splitlines()[0])
    assert result["samples"] == 9 * 960 and result["finite"] and result["speakers"] == ["en", "zh"]


# ----------------------------------------------------------------------------- the speaker front end (spec §4)


def numpy_resample(x, orig, new, zeros=6, rolloff=0.99):
    """Band-limited interpolation, written directly: y[j] = sum_i x[i] h(i / orig - j / new), h a Hann-windowed
    sinc with cut-off rolloff * min(orig, new) / 2 and `zeros` zero crossings each side (torchaudio's defaults)."""
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    base = min(orig, new) * rolloff
    i = np.arange(len(x))
    out = np.zeros(math.ceil(new * len(x) / orig))
    for j in range(len(out)):
        t = np.clip((i / orig - j / new) * base, -zeros, zeros)
        out[j] = (x * np.sinc(t) * np.cos(np.pi * t / zeros / 2) ** 2).sum() * base / orig
    return out


def numpy_kaldi_fbank(x, rate=16000, bins=80):
    """Kaldi's recipe in float64: 25 ms / 10 ms frames, DC removed, pre-emphasis 0.97, povey window, power
    spectrum of a 512-point FFT, triangular mel banks 20 Hz..Nyquist (Kaldi mel 1127 ln(1 + f/700)), log floored
    at the float epsilon."""
    size, shift, nfft = int(0.025 * rate), int(0.010 * rate), 512
    frames = np.stack([x[k * shift:k * shift + size] for k in range(1 + (len(x) - size) // shift)]).astype(np.float64)
    frames -= frames.mean(axis=1, keepdims=True)
    frames = frames - 0.97 * np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames *= (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(size) / (size - 1))) ** 0.85
    power = np.abs(np.fft.rfft(frames, nfft)) ** 2
    mel = lambda f: 1127 * np.log(1 + f / 700)  # noqa: E731
    low, high = mel(20), mel(rate / 2)
    delta = (high - low) / (bins + 1)
    fft_mel = mel(np.arange(nfft // 2 + 1) * rate / nfft)
    banks = np.zeros((bins, nfft // 2 + 1))
    for b in range(bins):
        left, center, right = low + b * delta, low + (b + 1) * delta, low + (b + 2) * delta
        banks[b] = np.maximum(0, np.minimum((fft_mel - left) / (center - left), (right - fft_mel) / (right - center)))
    banks[:, -1] = 0  # Kaldi's banks cover the FFT bins below Nyquist only
    return np.log(np.maximum(power @ banks.T, np.finfo(np.float32).eps))


def make_signal(seconds, rate):
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(0).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 2500 * t * (1 + t)) + 0.02 * noise).astype(
        np.float32)


def test_resample_is_torchaudios_band_limited_interpolation():
    x = make_signal(0.2, 22050)
    ours = resample(torch.from_numpy(x), 22050, 16000).numpy()
    assert ours.dtype == np.float32 and len(ours) == math.ceil(len(x) * 16000 / 22050)
    assert np.abs(ours - numpy_resample(x, 22050, 16000)).max() < 2e-5
    t = np.arange(22050) / 22050
    tone = lambda f: resample(torch.from_numpy(np.sin(2 * np.pi * f * t).astype(np.float32)), 22050, 16000)  # noqa
    assert np.abs(tone(10000).numpy()[200:-200]).max() < 0.01  # above the new Nyquist: filtered out
    assert np.abs(tone(1000).numpy()[200:-200]).max() > 0.99


def test_fbank_is_kaldis_recipe():
    x = make_signal(1.0, 16000)
    ours = kaldi_fbank(torch.from_numpy(x)).numpy()
    reference = numpy_kaldi_fbank(x)
    assert ours.shape == reference.shape == (98, 80)
    assert np.abs(ours - reference).max() < 2e-3, np.abs(ours - reference).max()


def test_fbank_matches_kaldi_native_fbank():
    knf = pytest.importorskip("kaldi_native_fbank")
    x = make_signal(1.0, 16000)
    options = knf.FbankOptions()
    options.frame_opts.dither = 0
    options.frame_opts.samp_freq = 16000
    options.mel_opts.num_bins = 80
    online = knf.OnlineFbank(options)
    online.accept_waveform(16000, x.tolist())
    online.input_finished()
    reference = np.stack([online.get_frame(i) for i in range(online.num_frames_ready)])
    assert np.abs(kaldi_fbank(torch.from_numpy(x)).numpy() - reference).max() < 2e-3


def tiny_campplus(path: Path, weights: np.ndarray):
    """An onnx model with CAM++'s interface, feats [1, T, 80] -> [1, 192]: mean over time of feats^2, then W."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["feats", "feats"], ["squared"]),
         helper.make_node("ReduceMean", ["squared"], ["mean"], axes=[1], keepdims=0),
         helper.make_node("MatMul", ["mean", "W"], ["embedding"])],
        "campplus", [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, None, 80])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 192])],
        [numpy_helper.from_array(weights, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_campplus_prompt_wavs_through_the_cli(fake, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import soundfile

    from conversion.speaker_embedding import campplus_features

    weights = np.random.default_rng(1).standard_normal((80, 192)).astype(np.float32) * 0.01
    tiny_campplus(tmp_path / "campplus.onnx", weights)
    stereo = np.stack([make_signal(1.0, 22050), make_signal(1.0, 22050)[::-1]], axis=1)
    soundfile.write(tmp_path / "prompt_en.wav", stereo, 22050, subtype="FLOAT")
    out = tmp_path / "out"
    assert c2d.main(cli_args(fake.root, out, {}, "--campplus", str(tmp_path / "campplus.onnx"),
                             "--prompt-wav", f"en={tmp_path / 'prompt_en.wav'}")) == 0
    assert "CAM++ (`campplus.onnx`) on `prompt_en.wav`" in capsys.readouterr().out
    feat = campplus_features(tmp_path / "prompt_en.wav")  # mono mean, 16 kHz, fbank, mean-normalised
    mono = resample(torch.from_numpy(stereo.mean(axis=1).astype(np.float32)), 22050, 16000)
    fbank = kaldi_fbank(mono)
    assert torch.allclose(feat, fbank - fbank.mean(dim=0), atol=1e-6) and abs(float(feat.mean())) < 1e-5
    expected = (feat.double().pow(2).mean(dim=0) @ torch.from_numpy(weights).double()).float()
    assert torch.allclose(load_file(out / "model.safetensors")["speakers.en"], expected, rtol=1e-4, atol=1e-5)


def test_missing_onnxruntime_names_the_extra(monkeypatch, tmp_path):
    import builtins

    from conversion.speaker_embedding import campplus_session

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "onnxruntime" else real_import(name, *a, **k))
    with pytest.raises(ConversionError, match=r"pip install 'llama-omni-hf\[convert-speakers\]'"):
        campplus_session(tmp_path / "campplus.onnx")
