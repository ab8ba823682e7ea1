"""LLaMA-Omni on vLLM-Omni (issue 12): the plugins that the serving environment (.venv-serve) loads.

Installed with the project (`pip install -e .[serve]`, done by scripts/setup_serving.sh) as the top-level package
`serving`, next to `llama_omni_hf`; only the serving environment imports it (the model package never imports vLLM).

- `serving._import_stubs`: stand-ins for torchvision/torchaudio, which vllm-omni 0.30 imports at module level
  and which cannot be installed beside the CPU torch; installed on import of this package, before anything
  imports vllm_omni.
- `serving.platform`: `CpuOmniPlatform`, the `vllm_omni.platform_plugins` entry point `llama_omni_cpu`: vllm-omni
  0.30 has no CPU platform and cannot start a stage without one.
- `serving.cpu_workers`: the CPU workers for `LLM_AR` and `LLM_GENERATION` stages that the platform names.
- `serving.models`: the architectures `serving` adds to vLLM's and vllm-omni's model registries
  (`vllm.general_plugins` / `vllm_omni.general_plugins` entry points `llama_omni_models`).
- `serving.smoke`: `python -m serving.smoke [--audio]`, a tiny Llama served on the CPU as a one-stage pipeline
  (or with a second, audio-making LLM_GENERATION stage): the check that the foundation works
  (scripts/serving_smoke.sh, tests/test_serving_platform.py).
"""

import logging

from . import _import_stubs

_import_stubs.install()
# Our loggers write through vLLM's handlers and format, as vllm-omni's do (vllm_omni/logger.py).
logging.getLogger(__name__).parent = logging.getLogger("vllm")
