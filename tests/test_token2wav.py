"""LLaMA-Omni2's CosyVoice2 token-to-wave (llama_omni_hf/token2wav_llama_omni2.py) against independent code.

Every reference here is written from the spec (`llama-omni2.md` 1.5, 2.6-2.8), not from the module: the
relative-position attention with the original's rel_shift, the chunk masks, Snake, the harmonic source, the
iSTFT window, the Euler/CFG loop; then offline == original-mode stream == incremental stream, causality, dtypes
and the errors a caller can hit.
"""

import math

import numpy as np
import pytest
import torch

from llama_omni_hf.configuration_llama_omni2 import LlamaOmni2Token2WavConfig
from llama_omni_hf.tiny import tiny_token2wav_config_dict
from llama_omni_hf.token2wav_llama_omni2 import (
    LlamaOmni2RelPositionAttention,
    LlamaOmni2Snake,
    LlamaOmni2Token2Wav,
    _chunk_mask,
    _RelativeGeometry,
    _hann_window,
)


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = LlamaOmni2Token2WavConfig(**{**tiny_token2wav_config_dict(), **overrides})
    return LlamaOmni2Token2Wav(config).eval()


def units(n, seed=0):
    return torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(seed))


def snr_db(reference, x):
    error = (reference.double() - x.double()).pow(2).sum().clamp(min=1e-30)
    return 10 * math.log10(reference.double().pow(2).sum() / error)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def small_chunks():
    """8-token (16-frame) chunks: many complete chunks with few tokens."""
    return make_model(seed=1, encoder_chunk_size=8)


# ----------------------------------------------------------------------------------------------- the pieces


def reference_chunk_mask(size, chunk):
    """CosyVoice's subsequent_chunk_mask(size, chunk) with all left chunks, as a loop (spec 2.6 step 3)."""
    mask = torch.zeros(size, size, dtype=torch.bool)
    for i in range(size):
        mask[i, : min((i // chunk + 1) * chunk, size)] = True
    return mask


@pytest.mark.parametrize("size,chunk", [(7, 3), (100, 50), (101, 50), (16, 100)])
def test_chunk_mask_matches_the_loop(size, chunk):
    assert torch.equal(_chunk_mask(0, size, chunk, "cpu"), reference_chunk_mask(size, chunk))
    # a segment starting at a chunk boundary sees the same rows of the full mask
    start = chunk * (size // chunk // 2)
    assert torch.equal(_chunk_mask(start, size - start, chunk, "cpu"), reference_chunk_mask(size, chunk)[start:])


def reference_rel_attention(module, x, mask):
    """ESPnet RelPositionMultiHeadedAttention written from the spec: pe of 2T-1 positions (T-1 .. -(T-1)),
    matrix_bd rel-shifted by the pad/view trick, scores / sqrt(d_k), -inf mask, softmax, re-mask."""
    batch, T, d = x.shape
    h, dk = module.h, module.d_k
    position = torch.arange(0, T, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * -(math.log(10000.0) / d))
    pos, neg = torch.zeros(T, d), torch.zeros(T, d)
    pos[:, 0::2], pos[:, 1::2] = torch.sin(position * div_term), torch.cos(position * div_term)
    neg[:, 0::2], neg[:, 1::2] = torch.sin(-1 * position * div_term), torch.cos(-1 * position * div_term)
    pe = torch.cat([torch.flip(pos, [0]), neg[1:]])[None]  # [1, 2T-1, d]
    q = module.linear_q(x).view(batch, T, h, dk)
    k = module.linear_k(x).view(batch, T, h, dk).transpose(1, 2)
    v = module.linear_v(x).view(batch, T, h, dk).transpose(1, 2)
    p = module.linear_pos(pe).view(1, -1, h, dk).transpose(1, 2)
    ac = torch.matmul((q + module.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
    bd = torch.matmul((q + module.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))  # [B, H, T, 2T-1]
    padded = torch.cat([torch.zeros(*bd.shape[:3], 1), bd], dim=-1).view(batch, h, 2 * T, T)
    bd = padded[:, :, 1:].reshape(batch, h, T, 2 * T - 1)[:, :, :, :T]
    scores = (ac + bd) / math.sqrt(dk)
    masked = ~mask
    attn = torch.softmax(scores.masked_fill(masked, -float("inf")), dim=-1).masked_fill(masked, 0.0)
    return module.linear_out(torch.matmul(attn, v).transpose(1, 2).reshape(batch, T, h * dk))


@pytest.mark.parametrize("T,chunk", [(9, 4), (23, 50), (40, 8)])
def test_relative_position_attention_matches_rel_shift(T, chunk):
    torch.manual_seed(0)
    module = LlamaOmni2RelPositionAttention(LlamaOmni2Token2WavConfig(**tiny_token2wav_config_dict()))
    torch.nn.init.normal_(module.pos_bias_u)
    torch.nn.init.normal_(module.pos_bias_v)
    x = torch.randn(2, T, module.h * module.d_k)
    geometry = _RelativeGeometry.build(0, T, chunk, x.shape[-1], "cpu")
    ours = module(x, geometry)
    reference = reference_rel_attention(module, x, reference_chunk_mask(T, chunk))
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-5)
    # negative control: without the relative term the result is different
    with torch.no_grad():
        module.linear_pos.weight.zero_()
    assert (module(x, geometry) - reference).abs().max() > 1e-3


def test_snake_formula():
    snake = LlamaOmni2Snake(3)
    with torch.no_grad():
        snake.alpha.copy_(torch.tensor([0.5, 1.0, 2.0]))
    x = torch.randn(2, 3, 11, dtype=torch.float32)
    a = np.array([0.5, 1.0, 2.0])[None, :, None]
    expected = x.double().numpy() + 1 / (a + 1e-9) * np.sin(a * x.double().numpy()) ** 2
    np.testing.assert_allclose(snake(x).detach().numpy(), expected, atol=1e-6)


def test_istft_window_is_periodic_hann_and_round_trips():
    window = _hann_window(16)
    n = np.arange(16)
    np.testing.assert_allclose(window.numpy(), 0.5 - 0.5 * np.cos(2 * np.pi * n / 16), atol=1e-7)
    signal = torch.randn(1, 4800)
    spec = torch.stft(signal, 16, 4, 16, window=window, return_complex=True)
    torch.testing.assert_close(torch.istft(spec, 16, 4, 16, window=window), signal, atol=1e-5, rtol=1e-5)


def test_harmonic_source_matches_the_formula(model):
    """nsf_noise=False: s = tanh(l_linear(0.1 sin(2 pi cumsum(k f0 / 24000) mod 1) * uv)), f0 held 480 samples."""
    hift = model.hift
    f0 = torch.tensor([[0.0, 120.0, 250.0, 5.0, 180.0]])  # voiced above 10 Hz, so 0 and 5 are unvoiced
    ours = hift.source(f0, nsf_noise=False)[0, 0].detach().double().numpy()
    up = np.repeat(f0[0].double().numpy(), 480)
    k = np.arange(1, 10)[:, None]
    theta = 2 * np.pi * (np.cumsum(up[None] * k / 24000, axis=-1) % 1)
    sine = 0.1 * np.sin(theta) * (up > 10)[None]
    weight = hift.m_source.l_linear.weight.detach().double().numpy()[0]
    expected = np.tanh(weight @ sine + hift.m_source.l_linear.bias.item())
    assert ours.shape == (2400,)
    np.testing.assert_allclose(ours, expected, atol=2e-4)


def test_source_draws_follow_the_global_rng_order(model):
    """A generator seeded like torch.manual_seed gives the same audio: the draws come in the original's order
    (phases U(-pi, pi) [B,9,1], noise [B,9,S], an unused [B,S,1]) from the same stream."""
    u = units(20)
    torch.manual_seed(7)
    global_rng = model.token2wav(u)
    after_global = torch.rand(1)
    seeded = model.token2wav(u, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(seeded, global_rng, atol=0, rtol=0)
    generator = torch.Generator().manual_seed(7)
    model.token2wav(u, generator=generator)
    assert torch.equal(torch.rand(1, generator=generator), after_global)  # no more and no fewer draws
    other = model.token2wav(u, generator=torch.Generator().manual_seed(8))
    assert (other - seeded).abs().max() > 1e-5
    torch.testing.assert_close(model.token2wav(u, nsf_noise=False), model.token2wav(u, nsf_noise=False), atol=0, rtol=0)


def test_euler_cfg_loop_matches_float64_formula(model):
    """With an estimator v = a x + b mu + c spk (a stand-in), the flow's ODE is 10 Euler steps on t = 1 -
    cos(pi/2 s) and guidance 1.7 v(mu, spk) - 0.7 v(0, 0), from the persistent noise."""
    flow = model.flow

    class Linear(torch.nn.Module):
        def forward(self, x, mu, t, spks, cond, memory=None):
            assert torch.all(cond == 0) and torch.all(mu[1] == 0) and torch.all(spks[1] == 0)
            assert torch.equal(x[0], x[1]) and t.shape == (2,)
            return -0.5 * x + 0.8 * mu + 0.3 * spks[:, :, None] + t[:, None, None]

    saved = flow.estimator
    flow.estimator = Linear()
    try:
        mu = torch.randn(1, 80, 30)
        spks = torch.randn(1, 80)
        ours = flow._solve_euler(flow.noise[:, :, :30].clone(), mu, spks, None)
    finally:
        flow.estimator = saved
    t = 1 - np.cos(np.linspace(0, 1, 11) * np.pi / 2)
    x = flow.noise[:, :, :30].double().numpy()
    mu64, spk64 = mu.double().numpy(), spks.double().numpy()[:, :, None]
    for k in range(10):
        cond = -0.5 * x + 0.8 * mu64 + 0.3 * spk64 + t[k]
        uncond = -0.5 * x + t[k]
        x = x + (t[k + 1] - t[k]) * (1.7 * cond - 0.7 * uncond)
    np.testing.assert_allclose(ours.numpy(), x, atol=1e-5)


def test_released_sizes():
    """112.55 M flow parameters and 20.82 M HiFT parameters once weight norm's g is counted (spec 1.1)."""
    with torch.device("meta"):
        released = LlamaOmni2Token2Wav(LlamaOmni2Token2WavConfig())
    flow = sum(p.numel() for p in released.flow.parameters())
    hift = sum(p.numel() for p in released.hift.parameters())
    # weight norm adds one g per output (input, for transposed convs) channel of each of the 82 normed convs
    convs = (torch.nn.Conv1d, torch.nn.ConvTranspose1d)
    normed = [m for name, m in released.hift.named_modules()
              if isinstance(m, convs) and not name.startswith("source_downs")]
    g = sum(m.weight.shape[0] for m in normed)
    assert len(normed) == 82
    assert round(flow / 1e6, 5) == 112.54936
    assert round((hift + g) / 1e6, 6) == 20.821295
    assert released.flow.noise.shape == (1, 80, 15000)


# ----------------------------------------------------------------------------------------------- offline and streams


def stream_chunks(model, u, step, mode, **kwargs):
    state = model.init_stream(mode=mode, nsf_noise=False, **kwargs)
    chunks = [model.stream(state, u[i : i + step]) for i in range(0, len(u), step)]
    chunks.append(model.stream(state, [], final=True))
    return chunks


def test_offline_shapes_and_one_final_chunk_equals_offline(model):
    u = units(37)
    wave = model.token2wav(u, nsf_noise=False)
    assert wave.dtype == torch.float32 and wave.shape == (37 * 960,)
    assert wave.abs().max() <= 0.99 and wave.abs().max() > 1e-4
    assert model.mel(u).shape == (1, 80, 74) and model.mel(u, finalize=False).shape == (1, 80, 68)
    for mode in ("original", "incremental"):
        state = model.init_stream(mode=mode, nsf_noise=False)
        torch.testing.assert_close(model.stream(state, u, final=True), wave, atol=1e-6, rtol=0)


@pytest.mark.parametrize("step", [1, 7, 10, 25, 53])
def test_incremental_equals_original_chunk_for_chunk(small_chunks, step):
    u = units(90, seed=step)
    original = stream_chunks(small_chunks, u, step, "original")
    incremental = stream_chunks(small_chunks, u, step, "incremental")
    assert [c.shape for c in original] == [c.shape for c in incremental]
    for a, b in zip(original, incremental):
        if a.numel():
            assert snr_db(a, b) > 40
    assert sum(c.numel() for c in original) == 90 * 960


def test_incremental_mel_equals_the_prefix_rerun_at_released_chunks(model):
    """The flow alone, released 50-token chunks: each call's new frames equal the original's re-run (1e-4)."""
    u = units(180, seed=3)
    spks = model.flow.speaker(model.speaker_embedding("en"))
    memory = __import__("llama_omni_hf.token2wav_llama_omni2", fromlist=["_FlowMemory"])._FlowMemory()
    worst = 0.0
    with torch.no_grad():
        for n in list(range(13, 180, 13)) + [180]:
            final = n == 180
            start = memory.tokens
            ours = model.flow(u[:n], spks, final, memory)
            reference = model.flow(u[:n], spks, final)[:, :, 2 * start:]
            assert ours.shape == reference.shape
            worst = max(worst, (ours - reference).abs().max().item())
    assert memory.tokens == 150  # three complete chunks were cached (the final call commits nothing)
    assert worst < 1e-4


def test_streamed_audio_is_the_whole_answer_and_close_to_offline(small_chunks):
    u = units(90, seed=5)
    offline = small_chunks.token2wav(u, nsf_noise=False)
    streamed = torch.cat(stream_chunks(small_chunks, u, 10, "incremental"))
    assert streamed.shape == offline.shape
    # by design not equal (frames emitted before their chunk completes), but the same speech
    assert snr_db(offline, streamed) > 5


def test_incremental_cost_does_not_grow(small_chunks):
    """Frames the estimator computes per call stay bounded by one chunk plus the new frames (no timing)."""
    seen = []
    hook = small_chunks.flow.estimator.final_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    try:
        for mode in ("incremental", "original"):
            seen.clear()
            stream_chunks(small_chunks, units(200, seed=9), 5, mode)
            per_call = seen[:: small_chunks.config.n_timesteps]
            if mode == "incremental":
                assert max(per_call) <= small_chunks.config.estimator_chunk_size + 10 + 6
            else:
                assert max(per_call) >= 390  # the original re-runs the prefix: grows with the answer
    finally:
        hook.remove()


def test_causality(small_chunks):
    """A token never changes mel frames of chunks that end before its look-ahead reaches them."""
    u = units(60, seed=11)
    base = small_chunks.mel(u)
    k = 41  # look-ahead 3: positions >= 38 change, so token chunks [0, 32) (frames [0, 64)) stay
    changed = u.clone()
    changed[k] = (changed[k] + 1) % 6561
    other = small_chunks.mel(changed)
    torch.testing.assert_close(other[:, :, :64], base[:, :, :64], atol=1e-6, rtol=0)
    assert (other[:, :, 64:] - base[:, :, 64:]).abs().max() > 1e-3


def test_first_writes_shorter_than_the_cache_wait_instead_of_crashing(model):
    """Original Q15: a first write of < 7 tokens crashes the demo's session; here it waits for more."""
    state = model.init_stream(mode="incremental", nsf_noise=False)
    assert model.stream(state, units(3)).numel() == 0
    assert model.stream(state, units(3, seed=1)).numel() == 0
    chunk = model.stream(state, units(4, seed=2))
    assert chunk.numel() == (2 * 10 - 6 - 8) * 480  # the first chunk of 10 tokens: 120 ms, the tail withheld
    assert model.stream(state, [], final=True).numel() == 10 * 960 - chunk.numel()
    with pytest.raises(ValueError, match="finished"):
        model.stream(state, units(2))


# ----------------------------------------------------------------------------------------------- dtypes and errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flow_and_hift_stay_fp32(dtype, tmp_path):
    config = LlamaOmni2Token2WavConfig(**tiny_token2wav_config_dict())
    model = LlamaOmni2Token2Wav._from_config(config, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.flow.noise.dtype == torch.float32
    model.save_pretrained(tmp_path)
    loaded = LlamaOmni2Token2Wav.from_pretrained(tmp_path, dtype=dtype)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    torch.testing.assert_close(loaded.flow.noise, model.flow.noise)
    assert loaded.token2wav(units(5), nsf_noise=False).dtype == torch.float32


def test_missing_weights_are_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_model()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["hift.conv_post.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 weights.*hift.conv_post.weight"):
        LlamaOmni2Token2Wav.from_pretrained(tmp_path)
    assert LlamaOmni2Token2Wav.from_pretrained(tmp_path, allow_missing_weights=True) is not None


@pytest.mark.parametrize("bad,message", [
    ([], "empty"),
    ([1, 6561], r"in \[0, 6561\)"),
    ([-1, 3], r"in \[0, 6561\)"),
    (torch.tensor([1.0, 2.0]), "integer speech tokens"),
    (torch.zeros(2, 3, dtype=torch.long), "integer speech tokens"),
    ("abc", "integer speech tokens"),
])
def test_bad_units(model, bad, message):
    with pytest.raises(ValueError, match=message):
        model.token2wav(bad)


@pytest.mark.parametrize("speaker,message", [
    (torch.full((192,), float("nan")), "finite"),
    (torch.zeros(192), "not all zeros"),
    (torch.randn(191), r"x-vector \[192\]"),
    (torch.randn(2, 192), r"x-vector \[192\]"),
    (torch.ones(192, dtype=torch.long), r"x-vector \[192\]"),
    ("fr", "unknown speaker 'fr'"),
])
def test_bad_speakers(model, speaker, message):
    with pytest.raises(ValueError, match=message):
        model.token2wav(units(3), speaker=speaker)


def test_speakers_only_direction_matters(model):
    u = units(12)
    vector = torch.randn(192)
    a = model.token2wav(u, speaker=vector, nsf_noise=False)
    torch.testing.assert_close(model.token2wav(u, speaker=3.5 * vector[None], nsf_noise=False), a, atol=1e-6, rtol=0)
    zh, en = model.token2wav(u, speaker="zh", nsf_noise=False), model.token2wav(u, speaker="en", nsf_noise=False)
    assert (zh - en).abs().max() > 1e-4


def test_bad_stream_mode_and_too_long_answers():
    model = make_model(noise_frames=100)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        model.init_stream(mode="fast")
    with pytest.raises(ValueError, match="more than the flow's noise"):
        model.token2wav(units(51))
    assert model.token2wav(units(50), nsf_noise=False).shape == (48000,)
