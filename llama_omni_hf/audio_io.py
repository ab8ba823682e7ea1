"""Reading audio files for the command line and the app (not part of the Hub remote code)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np


class AudioFileError(ValueError):
    """An audio file that cannot be read; the message says which file and why."""


def load_audio(path) -> tuple[np.ndarray, int]:
    """Read an audio file -> (float32 samples [samples] or [channels, samples], sampling rate).

    WAV/FLAC/OGG are read with soundfile; other formats (mp3, m4a, webm from a browser) through ffmpeg
    when it is installed. Resampling and downmixing are left to the processor.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioFileError(f"audio file not found: {path}")
    if path.stat().st_size == 0:
        raise AudioFileError(f"audio file is empty: {path}")
    import soundfile

    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # [samples, channels]
        return np.ascontiguousarray(samples.T if samples.shape[1] > 1 else samples[:, 0]), int(rate)
    except Exception as error:  # soundfile raises LibsndfileError/RuntimeError for unknown formats
        soundfile_error = error
    if shutil.which("ffmpeg") is None:
        raise AudioFileError(f"cannot read {path.name} as audio ({soundfile_error}); install ffmpeg for mp3/m4a/webm")
    result = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "f32le", "-ac", "1", "-ar", "16000", "-"],
        capture_output=True,
    )
    if result.returncode != 0 or not result.stdout:
        message = result.stderr.decode(errors="replace").strip().splitlines()
        reason = message[-1].replace(str(path), path.name) if message else "no audio stream"
        raise AudioFileError(f"cannot read {path.name} as audio: {reason}")
    return np.frombuffer(result.stdout, dtype=np.float32).copy(), 16000
