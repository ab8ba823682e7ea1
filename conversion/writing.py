"""Writing the output: streamed safetensors shards, an atomic output directory, a peak-memory monitor.

The shard layout is planned from shapes alone, so each shard's header is written first and every tensor's
bytes go to disk the moment it is converted: the converter never holds more than one tensor (plus its
source) in memory, whatever the shard size. The files follow the safetensors format (8-byte little-endian
header length, JSON header padded to 8 bytes, raw little-endian data) and are read back by `safe_open`.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from conversion.original_formats import ConversionError

SAFETENSORS_DTYPES = {
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class PlannedTensor:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty(0, dtype=self.dtype).element_size()


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive tensors grouped into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards, current, size = [], [], 0
    for tensor in tensors:
        if current and size + tensor.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(tensor)
        size += tensor.nbytes
    if current:
        shards.append(current)
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class StreamingShardWriter:
    """Receives the planned tensors in plan order and writes them straight into their shard files."""

    def __init__(self, directory: Path, shards: list[list[PlannedTensor]]):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors data is little-endian; this writer runs on little-endian machines only")
        self.directory = Path(directory)
        self.shards = shards
        self.names = shard_names(len(shards))
        self.queue = [(i, t) for i, shard in enumerate(shards) for t in shard]
        self.position = 0
        self.file = None
        self.file_index = -1

    def _open_shard(self, index: int):
        if self.file is not None:
            self.file.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for t in self.shards[index]:
            header[t.key] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.file = open(self.directory / self.names[index], "wb")
        self.file.write(len(raw).to_bytes(8, "little") + raw)
        self.file_index = index

    def write(self, key: str, tensor: torch.Tensor):
        if self.position >= len(self.queue):
            raise RuntimeError(f"tensor {key} was not planned")
        index, planned = self.queue[self.position]
        if key != planned.key or tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise RuntimeError(f"got {key} {tuple(tensor.shape)} {tensor.dtype}, planned "
                               f"{planned.key} {planned.shape} {planned.dtype}")
        if index != self.file_index:
            self._open_shard(index)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self.file.write(memoryview(data.numpy()))
        self.position += 1

    def close(self) -> dict:
        """Finish the last shard, write the index (several shards) and return the weight map."""
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.position != len(self.queue):
            raise RuntimeError(f"only {self.position} of {len(self.queue)} planned tensors were written")
        weight_map = {t.key: name for name, shard in zip(self.names, self.shards) for t in shard}
        if len(self.shards) > 1:
            total = sum(t.nbytes for shard in self.shards for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return weight_map

    def abort(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * factor)
    if upper.isdigit():
        return int(upper)
    raise ConversionError(f"--max-shard-size {text!r}: expected a size like 5GB or 500MB")


@contextmanager
def atomic_directory(out: Path, overwrite: bool = False):
    """Yield a fresh temporary directory next to `out`; rename it to `out` only if the block succeeds.

    On any error (or Ctrl-C) the temporary directory is removed and `out` is untouched.
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists; choose another --output-dir or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    if out.exists():
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


class MemoryMonitor:
    """Peak memory of this process: resident (ru_maxrss, the true peak, includes memory-mapped input pages)
    and anonymous (sampled by `sample()` at each tensor's peak: what really has to fit in RAM)."""

    def __init__(self):
        self.peak_anon = self._status("RssAnon")

    @staticmethod
    def _status(field: str) -> int:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def rss(self) -> int:
        return self._status("VmRSS")

    def sample(self):
        self.peak_anon = max(self.peak_anon, self._status("RssAnon"))

    def report(self) -> dict:
        self.sample()
        return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "peak_anon_bytes": self.peak_anon}
