"""Reading ICTNLP/cosy2_decoder's weight files and the flow noise for convert_cosy2_decoder.py, each failing with a
clear message: flow.pt / hift.pt (torch.load weights_only, recognising other checkpoints passed by mistake) and
`--flow-noise` (`seed0` or a saved tensor).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from conversion.original_formats import ConversionError, load_torch_pickle


def read_state_dict(path: Path, what: str, required: tuple[str, str]) -> dict:
    """A plain {name: tensor} pickle holding `required` = (a key, a key prefix); a clear error for other files."""
    data = load_torch_pickle(path, what)
    if not isinstance(data, dict) or not data:
        raise ConversionError(f"{path} is not {what}: expected a state dict, found {type(data).__name__}")
    keys = [k for k in data if isinstance(k, str)]
    strip = lambda k: k.removeprefix("generator.")  # noqa: E731  (hift.pt's optional prefix)
    if required[0] not in map(strip, keys) or not any(strip(k).startswith(required[1]) for k in keys):
        raise ConversionError(f"{path} is not {what}: {_what_it_looks_like(data)}; expected keys `{required[0]}` and "
                              f"`{required[1]}*`, found {sorted(map(str, data))[:6]}")
    bad = [str(k) for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path} ({what}) holds entries that are not tensors: {bad[:8]}")
    return data


def _what_it_looks_like(data) -> str:
    keys = [str(k) for k in data] if isinstance(data, dict) else []
    if isinstance(data, dict) and isinstance(data.get("generator"), dict):
        return "it looks like a fairseq unit HiFi-GAN checkpoint (LLaMA-Omni v1's vocoder, g_00500000)"
    if "dims" in keys and "model_state_dict" in keys:
        return "it looks like an openai-whisper checkpoint"
    if any(k.startswith(("model.layers.", "model.embed_tokens", "lm_head")) for k in keys):
        return "it looks like a language-model checkpoint"
    if any(k.removeprefix("generator.").startswith("f0_predictor.") for k in keys):
        return "it looks like CosyVoice2's hift.pt (the vocoder)"
    if "input_embedding.weight" in keys:
        return "it looks like CosyVoice2's flow.pt"
    if any(isinstance(v, dict) for v in data.values()):
        return f"it is a wrapped checkpoint ({[k for k in keys if isinstance(data[k], dict)][:4]}), not a state dict"
    return "its keys are unknown"


def read_flow(path: Path) -> dict:
    return read_state_dict(path, "CosyVoice2's flow.pt", ("input_embedding.weight", "decoder.estimator."))


def read_hift(path: Path) -> dict:
    return read_state_dict(path, "CosyVoice2's hift.pt", ("m_source.l_linear.weight", "f0_predictor."))


def make_noise(spec: str, config) -> tuple[torch.Tensor, str]:
    """`seed0` or a saved tensor [1, num_mels, F >= noise_frames] -> (float32 [1, num_mels, noise_frames], how)."""
    shape = [1, config.num_mels, config.noise_frames]
    if spec == "seed0":
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        return noise, (f"`seed0`: torch.randn({shape}) from a generator seeded 0, the draw upstream CosyVoice later "
                       "pinned with set_all_random_seed(0); not the released process's own noise")
    path = Path(spec)
    if not path.is_file():
        raise ConversionError(f"--flow-noise {spec!r}: no such file; pass `seed0` or a .pt / .npy file holding "
                              f"[1, {config.num_mels}, F] with F >= {config.noise_frames}")
    if path.suffix.lower() == ".npy":
        try:
            noise = torch.from_numpy(np.array(np.load(path, allow_pickle=False)))
        except (ValueError, OSError) as err:
            raise ConversionError(f"--flow-noise {path}: not a readable .npy array ({err})") from None
    elif path.suffix.lower() in (".pt", ".pth"):
        data = load_torch_pickle(path, "--flow-noise file")
        values = list(data.values()) if isinstance(data, dict) else [data]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise ConversionError(f"--flow-noise {path}: expected one tensor (or a dict holding one), found "
                                  f"{type(data).__name__}")
        noise = tensors[0]
    else:
        raise ConversionError(f"--flow-noise {path}: use a .pt or .npy file")
    if not noise.is_floating_point() or noise.dim() != 3 or list(noise.shape[:2]) != shape[:2] or \
            noise.shape[2] < shape[2]:
        raise ConversionError(f"--flow-noise {path}: shape {list(noise.shape)} {noise.dtype}; expected floats of "
                              f"shape [1, {config.num_mels}, F] with F >= {config.noise_frames} (noise_frames)")
    frames = noise.shape[2]
    noise = noise[:, :, : shape[2]].to(torch.float32).contiguous()
    if not torch.isfinite(noise).all():
        raise ConversionError(f"--flow-noise {path}: has NaN or infinite values")
    digest = hashlib.sha256(noise.numpy().tobytes()).hexdigest()[:16]
    used = f"its first {shape[2]} of {frames} frames" if frames > shape[2] else f"all {frames} frames"
    return noise, f"read from `{path.name}` ({used}; float32 sha256 {digest}...)"
