"""Speaker x-vectors for the converted token2wav repo (spec §4), computed once at conversion time.

The original computes the voice on every start-up from a prompt wav (cosyvoice/cli/frontend.py):

    load_wav(wav, 16000)            torchaudio.load, mean over channels, torchaudio Resample to 16 kHz
    kaldi.fbank(num_mel_bins=80, dither=0, sample_frequency=16000)     torchaudio.compliance.kaldi defaults
    feat - feat.mean(dim=0)         mean normalisation over time
    campplus.onnx (CPU)             -> [1, 192]

torchaudio does not install next to this project's torch, so `resample` and `kaldi_fbank` below re-implement those
two functions operation by operation (same dtypes, same order), and onnxruntime, needed only here, is an optional
extra: pip install 'llama-omni-hf[convert-speakers]'. Precomputed vectors (.npy / .pt / .safetensors) need neither.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from conversion.original_formats import ConversionError, load_torch_pickle

EXTRA = "convert-speakers"
CAMPPLUS_RATE = 16000


def check_xvector(vector, what: str, dim: int = 192) -> torch.Tensor:
    """A [dim] or [1, dim] float vector, finite and not all zeros -> float32 [dim]."""
    tensor = torch.as_tensor(vector)
    if not tensor.is_floating_point() or tuple(tensor.shape) not in ((dim,), (1, dim)):
        raise ConversionError(f"{what}: expected a float x-vector of shape [{dim}] or [1, {dim}], got "
                              f"{list(tensor.shape)} {tensor.dtype}")
    tensor = tensor.reshape(dim).to(torch.float32)
    if not torch.isfinite(tensor).all():
        raise ConversionError(f"{what}: the x-vector has NaN or infinite values")
    if not tensor.abs().sum() > 0:
        raise ConversionError(f"{what}: the x-vector is all zeros (the flow normalises it: it has no direction)")
    return tensor.contiguous()


def read_speaker_file(path, name: str, dim: int = 192) -> torch.Tensor:
    """An x-vector saved as .npy, .pt (a tensor, or a dict holding one) or .safetensors (one tensor, or `name`)."""
    path = Path(path)
    what = f"speaker {name!r} ({path})"
    if not path.is_file():
        raise ConversionError(f"{what}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            value = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise ConversionError(f"{what}: not a readable .npy array ({err})") from None
        if value.dtype.kind != "f":
            raise ConversionError(f"{what}: expected floats, the array holds {value.dtype}")
        return check_xvector(torch.from_numpy(np.array(value)), what, dim)
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as err:  # safetensors raises its own error type
            raise ConversionError(f"{what}: cannot read ({err})") from None
    elif suffix in (".pt", ".pth", ".bin"):
        tensors = load_torch_pickle(path, f"speaker file for {name!r}")
    else:
        raise ConversionError(f"{what}: use .npy, .pt or .safetensors")
    return check_xvector(_single_tensor(tensors, name, what), what, dim)


def _single_tensor(value, name: str, what: str):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        if name in value:
            value = value[name]
            if isinstance(value, dict) and "embedding" in value:  # CosyVoice's spk2info format
                value = value["embedding"]
            return _single_tensor(value, name, what)
        tensors = [v for v in value.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1 and len(value) == 1:
            return tensors[0]
        raise ConversionError(f"{what}: holds {sorted(map(str, value))}; expected one tensor or the key {name!r}")
    raise ConversionError(f"{what}: expected a tensor, found {type(value).__name__}")


# --------------------------------------------------------------------------- the original's front end


def load_wav_mono(path) -> tuple[torch.Tensor, int]:
    """float32 [N] in [-1, 1] (integer PCM scaled as torchaudio.load does) and the file's rate."""
    import soundfile

    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # [N, C]
    except (RuntimeError, OSError, soundfile.LibsndfileError) as err:
        raise ConversionError(f"cannot read prompt wav {path}: {err}") from None
    wave = torch.from_numpy(np.ascontiguousarray(data.T))  # [C, N] as torchaudio.load
    return wave.mean(dim=0), int(rate)  # original: speech.mean(dim=0, keepdim=True)


def resample(wave: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """torchaudio.transforms.Resample(orig_freq, new_freq) with its defaults (sinc_interp_hann,
    lowpass_filter_width 6, rolloff 0.99), on float32 [N]: the same kernel in the same dtypes, then conv1d."""
    if orig_freq == new_freq:
        return wave
    gcd = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // gcd, int(new_freq) // gcd
    width_zeros, rolloff = 6, 0.99
    base_freq = min(orig, new) * rolloff
    width = math.ceil(width_zeros * orig / base_freq)
    # dtype=None in Resample: the filter taps in float64, the output phases j/new in float32 (an int arange / int)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = torch.arange(0, -new, -1)[:, None, None] / new + idx
    t *= base_freq
    t = t.clamp_(-width_zeros, width_zeros)
    window = torch.cos(t * math.pi / width_zeros / 2) ** 2
    t *= math.pi
    kernels = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)
    kernels *= window * (base_freq / orig)
    kernels = kernels.to(torch.float32)  # [new, 1, 2 * width + orig]
    padded = torch.nn.functional.pad(wave.reshape(1, -1), (width, width + orig))
    out = torch.nn.functional.conv1d(padded[:, None], kernels, stride=orig)  # [1, new, frames]
    out = out.transpose(1, 2).reshape(1, -1)
    target = int(torch.ceil(torch.as_tensor(new * wave.shape[-1] / orig)).long())
    return out[0, :target]


def kaldi_fbank(wave: torch.Tensor, num_mel_bins: int = 80, sample_frequency: float = 16000.0) -> torch.Tensor:
    """torchaudio.compliance.kaldi.fbank(wave[None], num_mel_bins, dither=0, sample_frequency) with every other
    argument at its default: 25 ms povey windows every 10 ms (snip edges), DC removed, pre-emphasis 0.97, FFT
    padded to a power of two, power spectrum, triangular mel banks from 20 Hz to Nyquist, log floored at the
    float32 epsilon. float32 [N] -> [frames, num_mel_bins]."""
    shift, size = int(sample_frequency * 0.010), int(sample_frequency * 0.025)
    padded_size = 1 if size == 0 else 2 ** (size - 1).bit_length()
    if wave.dim() != 1 or wave.shape[0] < size:
        raise ConversionError(f"the prompt is too short for one {size}-sample window ({wave.shape[-1]} samples)")
    frames = wave.as_strided((1 + (wave.shape[0] - size) // shift, size), (shift * wave.stride(0), wave.stride(0)))
    frames = frames - frames.mean(dim=1).unsqueeze(1)
    previous = torch.nn.functional.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)
    frames = frames - 0.97 * previous[:, :-1]
    frames = frames * torch.hann_window(size, periodic=False, dtype=wave.dtype).pow(0.85).unsqueeze(0)
    frames = torch.nn.functional.pad(frames.unsqueeze(0), (0, padded_size - size)).squeeze(0)
    spectrum = torch.fft.rfft(frames).abs().pow(2.0)
    banks = _mel_banks(num_mel_bins, padded_size, sample_frequency).to(wave.dtype)
    banks = torch.nn.functional.pad(banks, (0, 1))  # no weight on the Nyquist bin
    energies = torch.mm(spectrum, banks.T)
    return torch.max(energies, torch.tensor(torch.finfo(torch.float).eps, dtype=wave.dtype)).log()


def _mel_banks(num_bins: int, padded_size: int, sample_frequency: float) -> torch.Tensor:
    """torchaudio.compliance.kaldi.get_mel_banks without VTLN: low 20 Hz, high = Nyquist. [num_bins, padded/2]."""
    def mel(freq):
        return 1127.0 * math.log(1.0 + freq / 700.0)

    low, high = mel(20.0), mel(0.5 * sample_frequency)
    delta = (high - low) / (num_bins + 1)
    index = torch.arange(num_bins).unsqueeze(1)
    left, center, right = low + index * delta, low + (index + 1.0) * delta, low + (index + 2.0) * delta
    fft_mel = 1127.0 * (1.0 + (sample_frequency / padded_size) * torch.arange(padded_size / 2) / 700.0).log()
    fft_mel = fft_mel.unsqueeze(0)
    up, down = (fft_mel - left) / (center - left), (right - fft_mel) / (right - center)
    return torch.max(torch.zeros(1), torch.min(up, down))


def campplus_features(wav_path) -> torch.Tensor:
    """The original's CAM++ input for a prompt wav: mean-normalised 80-bin fbank [frames, 80] at 16 kHz."""
    wave, rate = load_wav_mono(wav_path)
    if rate < CAMPPLUS_RATE:
        raise ConversionError(f"prompt wav {wav_path} is {rate} Hz; the original needs at least {CAMPPLUS_RATE} Hz")
    feat = kaldi_fbank(resample(wave, rate, CAMPPLUS_RATE), num_mel_bins=80, sample_frequency=CAMPPLUS_RATE)
    return feat - feat.mean(dim=0, keepdim=True)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ConversionError(f"computing x-vectors with campplus.onnx needs onnxruntime: pip install "
                              f"'llama-omni-hf[{EXTRA}]' (or pip install onnxruntime); or pass precomputed vectors "
                              "with --speaker NAME=FILE") from None
    return onnxruntime


def campplus_session(campplus_path):
    """An onnxruntime CPU session with the original's options (frontend.py)."""
    ort = _onnxruntime()
    if not Path(campplus_path).is_file():
        raise ConversionError(f"campplus model not found: {campplus_path}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    try:
        return ort.InferenceSession(str(campplus_path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own error types for bad files
        raise ConversionError(f"cannot load {campplus_path} with onnxruntime: {str(err)[:300]}") from None


def campplus_xvector(session, wav_path, name: str, dim: int = 192) -> torch.Tensor:
    """x-vector [dim] of one prompt wav."""
    feat = campplus_features(wav_path)
    inputs = {session.get_inputs()[0].name: feat.unsqueeze(0).numpy()}
    try:
        output = session.run(None, inputs)[0]
    except Exception as err:  # onnxruntime's own error types
        raise ConversionError(f"campplus.onnx failed on {wav_path}: {str(err)[:300]}") from None
    return check_xvector(torch.from_numpy(np.asarray(output, dtype=np.float32).reshape(1, -1)),
                         f"speaker {name!r} (campplus.onnx on {wav_path})", dim)
