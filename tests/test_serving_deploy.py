"""The deploy configs (serving/deploy/*.yaml) and how they are chosen, without starting a server:

- every YAML loads with vllm-omni 0.30's own loader and merges with the registered LLaMA-Omni pipeline into stage
  configs (`merge_pipeline_deploy`, what `vllm-omni serve` does), with only keys that vLLM's engine arguments know,
  and a device list that fits each stage's tensor-parallel size (vllm-omni's `check_device_layout`);
- the CUDA ones say what docs/serving.md says: bf16 thinker with CUDA graphs and async scheduling, fp32 eager
  unit2wav, prefix caching off; the multi-GPU one inherits the single-GPU one and puts TP 2 on "0,1", unit2wav on "2";
- `serving.pipeline.default_deploy_config` picks the CPU file on vLLM's CPU platform, the CUDA file on CUDA;
- scripts/setup_serving.sh refuses a venv built for the other flavour.
The first three run in .venv-serve (skipped without it, as tests/test_serving_platform.py); none needs a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_serving_platform import ENV, REPO, serve_venv  # noqa: E402,F401  (the skip-without-venv fixture)

DEPLOY = REPO / "serving" / "deploy"

CHECK = """
import dataclasses, json, types
from serving.pipeline import CUDA_DEPLOY_CONFIG, DEPLOY_CONFIG, PIPELINE, default_deploy_config, \\
    register_llama_omni_pipeline
from vllm_omni.config.composable_parallel.apply import check_device_layout
from vllm_omni.config.pipeline_registry import resolve_pipeline_config
from vllm_omni.config.stage_config import load_deploy_config, merge_pipeline_deploy
from vllm_omni.engine.arg_utils import OmniEngineArgs

register_llama_omni_pipeline()
known = {f.name for f in dataclasses.fields(OmniEngineArgs)}
out = {"files": {}}
for path in sorted(DEPLOY_CONFIG.parent.glob("*.yaml")):
    deploy = load_deploy_config(path)
    stages = merge_pipeline_deploy(resolve_pipeline_config(PIPELINE), deploy)
    entry = {"pipeline": deploy.pipeline, "async_chunk": deploy.async_chunk, "stages": []}
    for stage in stages:
        args = stage.yaml_engine_args
        devices = stage.yaml_runtime.get("devices")
        check_device_layout(devices, tensor_parallel_size=args.get("tensor_parallel_size") or 1, data_parallel_size=1,
                            pipeline_parallel_size=1, num_replicas=1, role=f"stage-{stage.stage_id}")
        entry["stages"].append({
            "id": stage.stage_id, "devices": devices, "scheduler": stage.scheduler_cls.rsplit(".", 1)[-1],
            "unknown_keys": sorted(set(args) - known - {"inline_diffusion"}),
            **{k: args.get(k) for k in ("dtype", "tensor_parallel_size", "gpu_memory_utilization", "enforce_eager",
                                        "async_scheduling", "enable_prefix_caching", "max_model_len",
                                        "enable_chunked_prefill", "max_num_batched_tokens", "logits_processors")}})
    out["files"][path.name] = entry


def platform(cpu=False, cuda=False):
    return types.SimpleNamespace(is_cpu=lambda: cpu, is_cuda_alike=lambda: cuda)


out["default"] = str(default_deploy_config())  # this machine: vLLM's CPU platform
out["default_cpu"] = str(default_deploy_config(platform(cpu=True)))
out["default_cuda"] = str(default_deploy_config(platform(cuda=True)))
try:
    default_deploy_config(platform())
except SystemExit as e:
    out["default_other"] = str(e)
out["cuda_file"], out["cpu_file"] = str(CUDA_DEPLOY_CONFIG), str(DEPLOY_CONFIG)
print("RESULT " + json.dumps(out))
"""


def _stage(config, stage_id):
    return next(s for s in config["stages"] if s["id"] == stage_id)


def test_deploy_configs_load_merge_and_are_chosen_by_platform(serve_venv):
    run = subprocess.run([str(serve_venv), "-c", textwrap.dedent(CHECK)], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    files = out["files"]
    assert set(files) == {"llama_omni_cpu.yaml", "llama_omni_cuda.yaml", "llama_omni_cuda_tp2.yaml"}
    for name, config in files.items():
        assert config["pipeline"] == "llama_omni" and config["async_chunk"], name
        assert [s["id"] for s in config["stages"]] == [0, 1], name
        for stage in config["stages"]:
            assert stage["unknown_keys"] == [], (name, stage)
            assert stage["enable_prefix_caching"] is False, (name, stage)  # stage 1 needs every prompt row
        assert _stage(config, 1)["scheduler"] == "OmniGenerationScheduler", name
        # stop strings would leave the answer open (vllm-omni aborts stage 0 only): refused by stage 0's hook
        assert "serving.llama_omni_thinker:RefuseStopStrings" in (_stage(config, 0)["logits_processors"] or []), name
        assert _stage(config, 1)["dtype"] == "float32" and _stage(config, 1)["enforce_eager"], name

    cpu = files["llama_omni_cpu.yaml"]
    assert _stage(cpu, 0)["scheduler"] == "OmniARScheduler" and _stage(cpu, 0)["dtype"] == "float32"
    # serving/cpu_workers.py: never split a prompt on the CPU (a seeded request would crash the stage)
    assert _stage(cpu, 0)["enable_chunked_prefill"] is False
    assert _stage(cpu, 0)["max_num_batched_tokens"] >= _stage(cpu, 0)["max_model_len"]
    cuda = files["llama_omni_cuda.yaml"]
    assert [s["devices"] for s in cuda["stages"]] == ["0", "0"]
    thinker = _stage(cuda, 0)
    assert thinker["dtype"] == "bfloat16" and thinker["scheduler"] == "OmniARAsyncScheduler"
    assert thinker["async_scheduling"] is True and thinker["enforce_eager"] is False
    assert sum(s["gpu_memory_utilization"] for s in cuda["stages"]) < 1  # both stages share GPU 0
    tp2 = files["llama_omni_cuda_tp2.yaml"]
    assert [(s["devices"], s["tensor_parallel_size"]) for s in tp2["stages"]] == [("0,1", 2), ("2", None)]
    # everything else inherited from llama_omni_cuda.yaml (base_config)
    assert {k: v for k, v in _stage(tp2, 0).items() if k not in ("devices", "tensor_parallel_size",
                                                                 "gpu_memory_utilization")} == \
        {k: v for k, v in thinker.items() if k not in ("devices", "tensor_parallel_size", "gpu_memory_utilization")}

    assert out["default"] == out["default_cpu"] == out["cpu_file"]
    assert Path(out["cpu_file"]).name == "llama_omni_cpu.yaml"
    assert out["default_cuda"] == out["cuda_file"] and Path(out["cuda_file"]).name == "llama_omni_cuda.yaml"
    assert "--deploy-config" in out["default_other"]


def test_setup_serving_refuses_a_venv_of_the_other_flavour(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".setup_serving.stamp").write_text("0123 lock\n")  # a stamp from before flavours: a CPU venv
    run = subprocess.run(["bash", "scripts/setup_serving.sh", "--cuda", "--venv", str(venv)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "built for the cpu flavour, not cuda" in run.stderr
    assert sorted(p.name for p in venv.iterdir()) == [".setup_serving.stamp"]  # nothing installed
