"""Readers for the original release files (spec sections 1 and 5), each failing with a clear message.

Nothing here holds more than one tensor at a time except the small vocoder pickle: shards are opened with
`safe_open` (memory-mapped, read tensor by tensor) and torch pickles with `mmap=True`.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open


class ConversionError(Exception):
    """A problem with the inputs, explained so the user can fix it. Raised before OUT exists."""


def read_json(path: Path, what: str) -> dict:
    if not Path(path).is_file():
        raise ConversionError(f"{what} not found: {path}")
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{what} {path} is not valid JSON ({err}); is the download complete?") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{what} {path} must hold a JSON object, found {type(data).__name__}")
    return data


def parse_ctc_decoder_config(value) -> tuple[int, int, int, int]:
    """The release's STRING `"(2,4096,32,11008)"` -> (layers, dim, heads, intermediate), no eval."""
    match = re.fullmatch(r"\s*\(\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\)\s*", str(value))
    if not isinstance(value, str) or match is None:
        raise ConversionError(
            f"config.json field `ctc_decoder_config` is {value!r}; expected a string like "
            "\"(2,4096,32,11008)\" (unit decoder layers, dim, heads, intermediate size)"
        )
    return tuple(int(g) for g in match.groups())


# --------------------------------------------------------------------------- safetensors shards


class ShardSet:
    """The released shards: key -> (file, shape, dtype) from the headers. `safe_open` validates each file
    (a truncated download fails here); tensors are then read one at a time with plain file reads, not a
    memory map, so resident memory stays near one tensor instead of growing with the pages touched."""

    def __init__(self, checkpoint_dir: Path):
        self.dir = Path(checkpoint_dir)
        self.files = self._shard_files()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.file_of: dict[str, str] = {}
        self._offsets: dict[str, tuple[int, int]] = {}  # key -> absolute [begin, end) in its file
        for name in self.files:
            self._validate(name)
            for key, (dtype, shape, begin, end) in _read_header(self.dir / name).items():
                if key in self.file_of:
                    raise ConversionError(f"key {key} is in both {self.file_of[key]} and {name}")
                self.shapes[key], self.dtypes[key], self.file_of[key] = shape, dtype, name
                self._offsets[key] = (begin, end)
        self._check_index()

    def _shard_files(self) -> list[str]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index, "shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index} has no `weight_map`; the download looks incomplete")
            self.weight_map = weight_map
            files = sorted(set(weight_map.values()))
        elif (self.dir / "model.safetensors").is_file():
            self.weight_map, files = None, ["model.safetensors"]
        else:
            found = sorted(p.name for p in self.dir.glob("*")) if self.dir.is_dir() else "the directory does not exist"
            raise ConversionError(
                f"{self.dir} has neither model.safetensors.index.json nor model.safetensors (found: {found}); "
                "pass the released model directory as --checkpoint"
            )
        missing = [f for f in files if not (self.dir / f).is_file()]
        if missing:
            raise ConversionError(f"shards listed in the index are missing from {self.dir}: {', '.join(missing)}")
        return files

    def _validate(self, name: str):
        try:
            with safe_open(str(self.dir / name), framework="pt", device="cpu"):
                pass
        except Exception as err:  # safetensors raises its own error type for truncated or corrupt files
            raise ConversionError(f"cannot read shard {self.dir / name}: {err} (truncated or corrupt download?)") from None

    def _check_index(self):
        if self.weight_map is None:
            return
        wrong = [f"{k} (index: {f}, found in: {self.file_of.get(k, 'no shard')})"
                 for k, f in self.weight_map.items() if self.file_of.get(k) != f]
        unlisted = sorted(set(self.file_of) - set(self.weight_map))
        if wrong or unlisted:
            lines = wrong[:10] + [f"{k} (in {self.file_of[k]}, not in the index)" for k in unlisted[:10]]
            raise ConversionError("the shard index does not match the shards:\n    " + "\n    ".join(lines))

    def get(self, key: str) -> torch.Tensor:
        begin, end = self._offsets[key]
        data = bytearray(end - begin)
        with open(self.dir / self.file_of[key], "rb") as f:
            f.seek(begin)
            if f.readinto(data) != len(data):
                raise ConversionError(f"shard {self.file_of[key]} ended inside {key}; was it changed while converting?")
        dtype = SAFETENSORS_TO_TORCH[self.dtypes[key]]
        if not data:
            return torch.zeros(self.shapes[key], dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(self.shapes[key])


SAFETENSORS_TO_TORCH = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """safetensors header: key -> (dtype code, shape, absolute begin, absolute end)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    start = 8 + size
    return {k: (v["dtype"], tuple(v["shape"]), start + v["data_offsets"][0], start + v["data_offsets"][1])
            for k, v in header.items()}


# --------------------------------------------------------------------------- torch pickles


def load_torch_pickle(path: Path, what: str):
    """torch.load(weights_only=True): tensors and plain containers only; memory-mapped when possible."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{what} not found: {path}")
    mmap = zipfile.is_zipfile(path)  # mmap needs the zip format of torch >= 1.6; older pickles load fully
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        reason = str(err).split("\n")[0][:300]
        if "Weights only load failed" in str(err):
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            reason = ("it holds objects other than tensors and plain containers"
                      + (f" ({found.group(1)})" if found else "") + ", which are not unpickled (weights_only=True)")
        raise ConversionError(f"cannot read {what} {path}: {reason}") from None


def read_whisper_checkpoint(path: Path) -> tuple[dict, dict]:
    """openai-whisper `{"dims": {...}, "model_state_dict": {...}}` -> (dims, state dict)."""
    data = load_torch_pickle(path, "Whisper checkpoint")
    if not isinstance(data, dict) or not isinstance(data.get("dims"), dict) or not isinstance(
            data.get("model_state_dict"), dict):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConversionError(
            f"{path} is not an openai-whisper checkpoint: expected keys 'dims' and 'model_state_dict', found {found}"
        )
    return data["dims"], data["model_state_dict"]


def whisper_dims_from_shapes(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict:
    """Encoder dims from the shard shapes, when no large-v3.pt is given. openai-whisper's heads are 64 wide in
    every model size (tiny 384/6 ... large 1280/20), which gives the head count."""
    conv1 = shapes[f"{prefix}conv1.weight"]  # [n_state, n_mels, 3]
    layers = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))}
    return {
        "n_mels": conv1[1], "n_audio_state": conv1[0], "n_audio_head": conv1[0] // 64,
        "n_audio_ctx": shapes[f"{prefix}positional_embedding"][0], "n_audio_layer": len(layers),
    }


def read_vocoder_checkpoint(path: Path) -> dict:
    data = load_torch_pickle(path, "vocoder checkpoint")
    if not isinstance(data, dict) or not isinstance(data.get("generator"), dict):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConversionError(
            f"{path} is not a fairseq CodeHiFiGAN checkpoint: expected a 'generator' state dict, found {found}"
        )
    return data["generator"]


def read_vocoder_config(path: Path) -> dict:
    """fairseq CodeHiFiGAN config.json -> LlamaOmniVocoderConfig keyword arguments."""
    cfg = read_json(path, "vocoder config")
    required = ["upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel", "resblock_kernel_sizes",
                "resblock_dilation_sizes", "num_embeddings", "embedding_dim", "code_hop_size", "dur_predictor_params"]
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ConversionError(f"vocoder config {path} lacks {', '.join(missing)}; is it the CodeHiFiGAN config.json?")
    unsupported = []
    if str(cfg.get("resblock", "1")) != "1":
        unsupported.append(f"resblock {cfg['resblock']!r} (only \"1\" exists in the release)")
    if cfg.get("f0"):
        unsupported.append("f0 conditioning")
    if cfg.get("multispkr") or cfg.get("num_speakers"):
        unsupported.append("speaker embeddings")
    if cfg.get("model_in_dim", cfg["embedding_dim"]) != cfg["embedding_dim"]:
        unsupported.append(f"model_in_dim {cfg['model_in_dim']} != embedding_dim {cfg['embedding_dim']}")
    dur = cfg["dur_predictor_params"]
    if dur.get("encoder_embed_dim", cfg["embedding_dim"]) != cfg["embedding_dim"]:
        unsupported.append("dur_predictor_params.encoder_embed_dim != embedding_dim")
    if unsupported:
        raise ConversionError(f"vocoder config {path} uses what LlamaOmniVocoder does not implement: "
                              + "; ".join(unsupported))
    return dict(
        num_embeddings=cfg["num_embeddings"], embedding_dim=cfg["embedding_dim"],
        upsample_rates=cfg["upsample_rates"], upsample_kernel_sizes=cfg["upsample_kernel_sizes"],
        upsample_initial_channel=cfg["upsample_initial_channel"], resblock_kernel_sizes=cfg["resblock_kernel_sizes"],
        resblock_dilation_sizes=cfg["resblock_dilation_sizes"],
        duration_predictor_hidden_dim=dur["var_pred_hidden_dim"],
        duration_predictor_kernel_size=dur["var_pred_kernel_size"],
        duration_predictor_dropout=dur.get("var_pred_dropout", 0.5),
        sampling_rate=cfg.get("sampling_rate", 16000), code_hop_size=cfg["code_hop_size"],
    )
