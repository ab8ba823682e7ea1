"""espeak-ng synthesis of test questions, and the windowed-sinc resampler behind it."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from llama_omni_hf import espeak
from llama_omni_hf.espeak import resample, synthesize, write_wav

REPO = Path(__file__).resolve().parents[1]
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def _tone(freq, sr, seconds=1.0):
    return np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)


@pytest.mark.parametrize("freq", [100.0, 440.0, 3000.0, 6500.0])
def test_resample_22050_to_16000_keeps_tones(freq):
    out = resample(_tone(freq, 22050), 22050, 16000)
    assert out.dtype == np.float32 and len(out) == 16000
    ref = _tone(freq, 16000)
    inner = slice(300, -300)  # the kernel sees zeros past the ends
    assert np.abs(out[inner] - ref[inner]).max() < 1e-4


@pytest.mark.parametrize("freq", [8200.0, 10000.0])
def test_resample_removes_what_would_alias(freq):
    out = resample(_tone(freq, 22050), 22050, 16000)
    assert np.abs(out[300:-300]).max() < 1e-3


def test_resample_up_and_identity():
    out = resample(_tone(440.0, 16000), 16000, 24000)
    assert len(out) == 24000
    assert np.abs(out[300:-300] - _tone(440.0, 24000)[300:-300]).max() < 1e-4
    x = np.random.default_rng(0).standard_normal(100)
    np.testing.assert_array_equal(resample(x, 16000, 16000), x.astype(np.float32))
    assert len(resample(x[:7], 22050, 16000)) == 6  # ceil(7 * 320 / 441)


@pytest.mark.parametrize(
    "args, match",
    [((np.zeros((2, 10)), 22050, 16000), "1-D"), ((np.zeros(10), 0, 16000), "positive")],
)
def test_resample_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        resample(*args)


@needs_espeak
def test_synthesize_is_model_ready_speech():
    text = "What is the capital of France?"
    audio = synthesize(text)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert -1.0 <= audio.min() and audio.max() <= 1.0
    assert np.sqrt(np.mean(audio**2)) > 0.02  # not silent
    # 6 words at 160 words per minute is 2.25 s of speech; allow generous room for pauses.
    seconds = len(audio) / 16000
    assert 1.0 < seconds < 4.5


@needs_espeak
def test_rate_and_speed_change_the_length():
    text = "Tell me a fun fact about the ocean."
    base = synthesize(text)
    assert abs(len(synthesize(text, sample_rate=22050)) / len(base) - 22050 / 16000) < 0.01
    assert len(synthesize(text, words_per_minute=320)) < 0.75 * len(base)
    longer = synthesize(text + " And another one about the mountains, please.")
    assert len(longer) > 1.5 * len(base)


@needs_espeak
def test_text_starting_with_dash_is_spoken_not_parsed():
    assert len(synthesize("-v hello")) > 8000


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"text": "   "}, "non-empty"),
        ({"text": "hi", "sample_rate": 0}, "sample_rate"),
        ({"text": "hi", "words_per_minute": 20}, "between 80 and 450"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthesize(**kwargs)


@needs_espeak
def test_unknown_voice_is_a_clear_error():
    with pytest.raises(RuntimeError, match="voice 'nosuchvoice'"):
        synthesize("hello", voice="nosuchvoice")


def test_missing_binary_says_how_to_install(monkeypatch):
    monkeypatch.setattr(espeak.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"apt-get install espeak-ng"):
        synthesize("hello")


@needs_espeak
def test_write_wav_and_command_line(tmp_path):
    audio = write_wav(tmp_path / "a.wav", "How do I make a cup of tea?")
    data, sr = sf.read(tmp_path / "a.wav", dtype="float32")
    assert sr == 16000 and data.shape == audio.shape
    assert np.abs(data - audio).max() < 1e-4  # 16-bit quantization

    out = tmp_path / "b.wav"
    proc = subprocess.run(
        [sys.executable, "-m", "llama_omni_hf.espeak", "How do I make a cup of tea?", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert sf.info(str(out)).samplerate == 16000 and sf.info(str(out)).channels == 1
    np.testing.assert_array_equal(sf.read(out, dtype="float32")[0], data)


@pytest.mark.parametrize("name", ["capital_of_france", "cup_of_tea", "ocean_fact"])
def test_committed_examples_are_16k_mono_speech(name):
    path = REPO / "examples" / f"{name}.wav"
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    audio, _ = sf.read(path, dtype="float32")
    assert 1.0 < len(audio) / 16000 < 5.0 and np.sqrt(np.mean(audio**2)) > 0.02
