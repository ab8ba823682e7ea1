"""Spoken test questions from text, with the `espeak-ng` synthesizer.

The model takes mono 16 kHz float32 audio in [-1, 1] (spec §2). espeak-ng writes 16-bit mono WAV at its
native 22050 Hz, so `synthesize` reads it from memory and resamples it with `resample`, a Kaiser-windowed
sinc resampler (no scipy or torchaudio needed).

    python -m llama_omni_hf.espeak "What is the capital of France?" question.wav
"""

from __future__ import annotations

import argparse
import io
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

INSTALL_HINT = "install it with `apt-get install espeak-ng` (Debian/Ubuntu) or your system's package manager"
MIN_WPM, MAX_WPM = 80, 450  # espeak-ng's documented speed range; it silently clamps outside it


def resample(audio: np.ndarray, orig_sr: int, target_sr: int, zero_crossings: int = 64) -> np.ndarray:
    """Resample 1-D `audio` from `orig_sr` to `target_sr` Hz by band-limited (windowed sinc) interpolation.

    Output sample n sits at input time t = n * orig_sr / target_sr; it is the sum of the input samples within
    `zero_crossings` lobes of a Kaiser-windowed sinc low-pass centred on t. When downsampling, the cutoff
    is lowered to the new Nyquist frequency so that nothing aliases. Returns float32 of length
    ceil(len(audio) * target_sr / orig_sr).
    """
    audio = np.asarray(audio, dtype=np.float64)
    if audio.ndim != 1:
        raise ValueError(f"resample expects 1-D audio, got shape {audio.shape}")
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got orig_sr={orig_sr}, target_sr={target_sr}")
    g = math.gcd(int(orig_sr), int(target_sr))
    up, down = int(target_sr) // g, int(orig_sr) // g  # t_n = n * down / up input samples
    if up == down:
        return audio.astype(np.float32)

    # Cutoff as a fraction of the input Nyquist. With 64 lobes and Kaiser beta 8.6 (~80 dB stopband) the
    # transition band is narrow enough that 0.945 keeps the passband flat and the stopband at the new
    # Nyquist (22050 -> 16000 Hz: tone error < 1e-4 up to 7 kHz, aliases of 8.1+ kHz below -90 dB).
    cutoff = min(1.0, up / down) * 0.945
    half_width = zero_crossings / cutoff  # kernel half-length in input samples
    k = math.ceil(half_width)
    offsets = np.arange(-k + 1, k + 1)  # input taps relative to floor(t_n)

    # One kernel row per phase: t_n - floor(t_n) takes only the `up` values p / up.
    dist = np.arange(up)[:, None] / up - offsets[None, :]  # [up, 2k]: t_n minus each tap's time
    inside = np.clip(1.0 - (dist / half_width) ** 2, 0.0, None)
    window = np.i0(8.6 * np.sqrt(inside)) / np.i0(8.6) * (np.abs(dist) < half_width)
    kernels = cutoff * np.sinc(cutoff * dist) * window

    n_out = -(-len(audio) * up // down)  # ceil
    padded = np.concatenate([np.zeros(k), audio, np.zeros(k + 1)])
    out = np.empty(n_out, dtype=np.float64)
    block = 1 << 12  # bounds the [block, 2k] gather to a few MB
    for start in range(0, n_out, block):
        n = np.arange(start, min(start + block, n_out))
        base, phase = np.divmod(n * down, up)
        taps = padded[base[:, None] + offsets[None, :] + k]  # [block, 2k]
        out[start : start + len(n)] = np.einsum("nt,nt->n", taps, kernels[phase])
    return out.astype(np.float32)


def synthesize(
    text: str, sample_rate: int = 16000, voice: str = "en-us", words_per_minute: int = 160
) -> np.ndarray:
    """Speak `text` with espeak-ng; returns mono float32 audio in [-1, 1] at `sample_rate` Hz.

    `voice` is an espeak-ng voice name (`espeak-ng --voices` lists them); `words_per_minute` is the
    speaking rate, between 80 and 450.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive int (Hz), got {sample_rate!r}")
    if not MIN_WPM <= words_per_minute <= MAX_WPM:
        raise ValueError(f"words_per_minute must be between {MIN_WPM} and {MAX_WPM}, got {words_per_minute}")
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(f"the espeak-ng command was not found on PATH; {INSTALL_HINT}")

    # Text goes in on stdin (as UTF-8, `-b 1`) so that text starting with "-" is never read as an option.
    cmd = [exe, "--stdout", "-v", voice, "-s", str(int(words_per_minute)), "-b", "1", "--stdin"]
    proc = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        message = proc.stderr.decode("utf-8", "replace").strip() or "no audio written"
        raise RuntimeError(f"espeak-ng failed (exit code {proc.returncode}, voice {voice!r}): {message}")

    # espeak-ng's streamed WAV header has placeholder sizes; soundfile reads up to the real end.
    audio, native_sr = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)
    audio = resample(audio.mean(axis=1), native_sr, sample_rate)
    return np.clip(audio, -1.0, 1.0)  # the interpolation can overshoot full scale by a hair


def write_wav(
    path: str | Path, text: str, sample_rate: int = 16000, voice: str = "en-us", words_per_minute: int = 160
) -> np.ndarray:
    """Speak `text` (see `synthesize`) into a 16-bit mono WAV file at `path`; returns the audio written."""
    audio = synthesize(text, sample_rate=sample_rate, voice=voice, words_per_minute=words_per_minute)
    sf.write(str(path), audio, sample_rate, subtype="PCM_16")
    return audio


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llama_omni_hf.espeak", description="Speak English text into a mono WAV file with espeak-ng."
    )
    parser.add_argument("text", help="what to say")
    parser.add_argument("out", help="output .wav path")
    parser.add_argument("--sample-rate", type=int, default=16000, help="Hz (default 16000, the model's rate)")
    parser.add_argument("--voice", default="en-us", help="espeak-ng voice (default en-us)")
    parser.add_argument("--wpm", type=int, default=160, help=f"words per minute, {MIN_WPM}-{MAX_WPM} (default 160)")
    args = parser.parse_args(argv)
    try:
        audio = write_wav(args.out, args.text, args.sample_rate, args.voice, args.wpm)
    except (ValueError, RuntimeError) as err:
        parser.exit(1, f"error: {err}\n")
    print(f"wrote {args.out}: {len(audio) / args.sample_rate:.2f} s at {args.sample_rate} Hz")


if __name__ == "__main__":
    main()
