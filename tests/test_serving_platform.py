"""The serving foundation (issue 12) in its own environment, .venv-serve: the torchvision/torchaudio stand-ins,
CpuOmniPlatform and its CPU workers, the model registration, and a tiny Llama served by `vllm-omni serve` on the
CPU with one streamed chat completion (serving/smoke.py).

Everything runs in .venv-serve through subprocesses (this suite's venv has no vLLM). Skipped, with the reason,
where that venv does not exist (`bash scripts/setup_serving.sh` makes it) or cannot import vllm and vllm_omni;
with LLAMA_OMNI_REQUIRE_SERVING=1 (CI, after setting the venv up) that is a failure instead of a skip.
LLAMA_OMNI_SERVE_PYTHON names another interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVE_PYTHON = Path(os.environ.get("LLAMA_OMNI_SERVE_PYTHON", REPO / ".venv-serve" / "bin" / "python"))
ENV = dict(os.environ, OMP_NUM_THREADS="1", VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1")


def _run_in_serve_venv(code: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(SERVE_PYTHON), "-c", textwrap.dedent(code)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _skip_reason() -> str | None:
    if not SERVE_PYTHON.exists():
        return f"no serving environment ({SERVE_PYTHON} does not exist): bash scripts/setup_serving.sh makes it"
    probe = _run_in_serve_venv("import vllm, vllm_omni, serving", timeout=300)
    if probe.returncode != 0:
        return f"{SERVE_PYTHON} cannot import vllm, vllm_omni and serving: {probe.stderr.strip()[-500:]}"
    return None


def skip_without_serving() -> None:
    """Skips the calling test (or fixture) without a usable serving environment; fails instead where
    LLAMA_OMNI_REQUIRE_SERVING=1, so a CI run whose setup broke cannot pass by skipping."""
    reason = _skip_reason()
    if reason and os.environ.get("LLAMA_OMNI_REQUIRE_SERVING") == "1":
        pytest.fail(f"LLAMA_OMNI_REQUIRE_SERVING=1 but {reason}")
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def serve_venv():
    skip_without_serving()
    return SERVE_PYTHON


CHECKS = """
import importlib.metadata as md, importlib.util, json, sys, types
out = {"serving_imported_at_start": "serving" in sys.modules}  # llama_omni_serving_stubs.pth

# stand-ins: probes see no torchvision; imports get a stand-in whose functions raise
out["find_spec_torchvision"] = repr(importlib.util.find_spec("torchvision"))
import vllm_omni.entrypoints.cli.main  # the server's import chain (pipeline registry, audio mixin)
import transformers.utils.import_utils as tu
out["transformers_sees_torchvision"] = tu.is_torchvision_available()
from torchvision.transforms.v2 import functional as tvF
import torchaudio
try:
    torchaudio.functional.resample(None, 24000, 16000)
except ModuleNotFoundError as e:
    out["stub_call_error"] = str(e)

import torch
from vllm.platforms import current_platform
from vllm_omni.platforms import current_omni_platform
from vllm_omni.worker.omni_connector_validation import validate_worker_omni_connector
import serving.platform
out["vllm_platform"] = type(current_platform).__name__
out["omni_platform"] = type(current_omni_platform).__qualname__
out["ar_worker"] = current_omni_platform.get_omni_ar_worker_cls()
out["generation_worker"] = current_omni_platform.get_omni_generation_worker_cls()
out["device"] = str(current_omni_platform.get_torch_device(0))
out["device_count"] = current_omni_platform.get_device_count()
out["is_cpu"] = current_omni_platform.is_cpu()
free, total = current_omni_platform.get_device_memory()
out["memory_ok"] = 0 < free <= total
for cls_path in (out["ar_worker"], out["generation_worker"]):
    validate_worker_omni_connector(cls_path, True)  # raises unless the runner has the omni connector mixin
import serving.cpu_workers as w
out["mro"] = {name: [c.__name__ for c in getattr(w, name).__mro__]
              for name in ("CPUARModelRunner", "CPUGenerationModelRunner")}

# why stage 0 refuses chunked prefill on the CPU: vLLM rewinds a seeded generator after a partial prefill
try:
    torch.Generator().set_offset(torch.Generator().get_offset() - 4)
except RuntimeError as e:
    out["cpu_generator_offset_error"] = str(e)
def vllm_config(chunked):
    return types.SimpleNamespace(scheduler_config=types.SimpleNamespace(enable_chunked_prefill=chunked),
                                 model_config=types.SimpleNamespace(max_model_len=2048))
try:
    w.check_no_chunked_prefill(vllm_config(True))
except ValueError as e:
    out["chunked_prefill_refused"] = str(e)
out["unchunked_accepted"] = w.check_no_chunked_prefill(vllm_config(False)) is None

# on a GPU machine (vLLM's platform not the CPU) the plugin stays out of the way
current_platform.is_cpu = lambda: False
out["register_when_not_cpu"] = serving.platform.register()

from vllm_omni.plugins import load_omni_general_plugins
load_omni_general_plugins()  # what every stage worker does: vllm.general_plugins, then vllm_omni.general_plugins
from vllm import ModelRegistry
from vllm_omni.model_executor.models.registry import OmniModelRegistry
out["registered"] = ["LlamaOmniSmokeForCausalLM" in r.get_supported_archs() for r in (ModelRegistry, OmniModelRegistry)]
print("JSON" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def checks(serve_venv):
    done = _run_in_serve_venv(CHECKS, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("JSON", 1)[1])


def test_import_stubs(checks):
    assert checks["serving_imported_at_start"]
    assert checks["find_spec_torchvision"] == "None"
    assert checks["transformers_sees_torchvision"] is False
    assert checks["stub_call_error"].startswith("torchaudio.functional.resample was called, but torchaudio is not "
                                                "installed in the serving environment")


def test_cpu_omni_platform(checks):
    assert checks["vllm_platform"] == "CpuPlatform"
    assert checks["omni_platform"] == "CpuOmniPlatform"
    assert checks["ar_worker"] == "serving.cpu_workers.CPUARWorker"
    assert checks["generation_worker"] == "serving.cpu_workers.CPUGenerationWorker"
    assert checks["device"] == "cpu" and checks["device_count"] >= 1 and checks["is_cpu"] and checks["memory_ok"]
    assert checks["register_when_not_cpu"] is None


@pytest.mark.parametrize("runner, omni", [("CPUARModelRunner", "GPUARModelRunner"),
                                          ("CPUGenerationModelRunner", "GPUGenerationModelRunner")])
def test_runner_order(checks, runner, omni):
    """vllm-omni's runner overrides first, then vLLM's CPU runner, then vLLM's GPU runner they both extend."""
    mro = checks["mro"][runner]
    assert mro.index(omni) < mro.index("CPUModelRunner") < mro.index("GPUModelRunner")


def test_cpu_stage_0_refuses_chunked_prefill(checks):
    """The CPU generator cannot rewind (what vLLM does to a seeded request after a partial prefill, so a split
    prompt crashed stage 0 under load), so the CPU AR worker refuses chunked prefill at startup, saying what to set."""
    assert "does not use offset" in checks["cpu_generator_offset_error"]
    refused = checks["chunked_prefill_refused"]
    assert "enable_chunked_prefill: false" in refused and ">= max_model_len (2048)" in refused
    assert checks["unchunked_accepted"]


def test_models_registered_in_both_registries(checks):
    assert checks["registered"] == [True, True]


def _smoke(serve_venv, tmp_path, *options) -> dict:
    done = subprocess.run([str(serve_venv), "-m", "serving.smoke", "--keep", str(tmp_path), "--timeout", "900",
                           *options], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1200)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0 and result["ok"], json.dumps(result, indent=1)[-5000:]
    assert result["platform"] == "CpuOmniPlatform"
    assert result["chat"]["deltas"]
    assert result["left_running"] == []
    return result


def test_tiny_llama_served_on_cpu(serve_venv, tmp_path):
    """`vllm-omni serve` starts the one-stage pipeline on CpuOmniPlatform's AR worker, streams a chat completion
    back, and leaves no process running once stopped by PID."""
    result = _smoke(serve_venv, tmp_path)
    assert result["workers"] == [["CPUARWorker", "CPUARModelRunner"]]
    assert result["chat"]["finish_reason"] == "length"  # max_tokens 16, greedy


def test_generation_stage_served_on_cpu(serve_venv, tmp_path):
    """Two stages: the Llama's answer goes to a weightless LLM_GENERATION stage on CpuOmniPlatform's generation
    worker, whose 16 kHz audio (10 ms per answer token) streams back after the text."""
    result = _smoke(serve_venv, tmp_path, "--audio")
    assert result["workers"] == [["CPUARWorker", "CPUARModelRunner"],
                                 ["CPUGenerationWorker", "CPUGenerationModelRunner"]]
    [audio] = result["chat"]["audio_chunks"]
    assert audio["sample_rate_hz"] == 16000 and audio["channels"] == 1
    assert 0 < audio["frame_count"] <= 16 * 160 and audio["frame_count"] % 160 == 0
