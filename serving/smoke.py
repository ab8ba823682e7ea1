"""Smoke check of the serving foundation: vllm-omni starts an LLM_AR stage on the CPU through CpuOmniPlatform
and streams a chat completion back.

    .venv-serve/bin/python -m serving.smoke [--timeout 900] [--keep DIR]

Builds a tiny random LlamaForCausalLM (head_dim 32: vLLM's CPU attention needs one of 32, 64, ...,
vllm/v1/attention/backends/cpu_attn.py) with the project's tiny Llama-3 tokenizer, registers a one-stage
pipeline for it, starts `vllm-omni serve --omni` on 127.0.0.1 in a child process (its own process group), streams
one greedy chat completion, stops the server by PID and prints one JSON line: what was streamed, the timings, the
platform and worker that the stage used (read from the server log). Exit status 0 when every check passed.

The child shows the launcher pattern a served pipeline needs: vllm-omni's main process resolves the pipeline
from `OMNI_PIPELINES` before it loads any `vllm_omni.general_plugins`, so the launcher registers it itself, then
hands its arguments to vllm-omni's own CLI (`vllm_omni.entrypoints.cli.main.main`), under a `__main__` guard
because the stage processes start with spawn.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PIPELINE = "llama_omni_serving_smoke"
# A minimal Llama-3 chat template (the tiny tokenizer has none): header, content, <|eot_id|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
DEPLOY_YAML = f"""\
pipeline: {PIPELINE}
async_chunk: false
stages:
  - stage_id: 0
    devices: "0"
    max_num_seqs: 4
    max_model_len: 256
    max_num_batched_tokens: 256
    dtype: float32
    enforce_eager: true        # no torch.compile: minutes on 2 cores for nothing here
    async_scheduling: false    # vLLM's CpuPlatform turns it off; the stage's scheduler must agree
    default_sampling_params:
      temperature: 0.0
      max_tokens: 16
"""


def _smoke_model_cls():
    from vllm.model_executor.models.llama import LlamaForCausalLM

    class SmokeLlamaForCausalLM(LlamaForCausalLM):
        """vLLM's Llama as a vllm-omni stage model: the omni runners pass extra keyword arguments to every
        stage model's forward (vllm_omni/worker/gpu_model_runner.py, `_model_forward` /
        `_build_model_kwargs_extra`: model_intermediate_buffer, request_token_spans, sampling_metadata, ...),
        which vLLM's own models do not take."""

        def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **omni_kwargs):
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)

    SmokeLlamaForCausalLM.__module__ = __name__
    return SmokeLlamaForCausalLM


def __getattr__(name):  # serving/models.py registers "serving.smoke:SmokeLlamaForCausalLM", imported on use
    if name == "SmokeLlamaForCausalLM":
        globals()[name] = cls = _smoke_model_cls()
        return cls
    raise AttributeError(name)


def build_tiny_llama(directory: Path) -> Path:
    """A 2-layer LlamaForCausalLM, hidden 128 / 4 heads (head_dim 32), random weights, saved with a tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_omni_hf.tiny_tokenizer import build_tiny_llama3_tokenizer

    tokenizer = build_tiny_llama3_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.config.architectures = ["LlamaOmniSmokeForCausalLM"]  # serving/models.py
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def register_smoke_pipeline() -> None:
    from vllm_omni.config.pipeline_registry import register_pipeline
    from vllm_omni.config.stage_config import PipelineConfig, StageExecutionType, StagePipelineConfig

    register_pipeline(PipelineConfig(
        model_type=PIPELINE,
        model_arch="LlamaOmniSmokeForCausalLM",
        stages=(StagePipelineConfig(
            stage_id=0, model_stage="llm", execution_type=StageExecutionType.LLM_AR, final_output=True,
            final_output_type="text", owns_tokenizer=True, engine_output_type="text",
            model_arch="LlamaOmniSmokeForCausalLM",
            sampling_constraints={"detokenize": True},
        ),),
    ))


def serve(argv: list[str]) -> None:
    """The child: `vllm-omni serve ARGS --omni` with the smoke pipeline registered first."""
    register_smoke_pipeline()
    from vllm_omni.entrypoints.cli.main import main

    sys.argv = ["vllm-omni", "serve", *argv, "--omni"]
    main()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(base: str, server: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError("the server was not ready in time")


def stream_chat(base: str, model: str, text: str, timeout: float) -> dict:
    """One streamed chat completion; returns the text deltas, the chunk count and the seconds to the first."""
    body = {"model": model, "messages": [{"role": "user", "content": text}], "stream": True,
            "max_tokens": 16, "temperature": 0.0}
    request = urllib.request.Request(f"{base}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    start, first, deltas, finish = time.monotonic(), None, [], None
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices", []):
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    first = first if first is not None else time.monotonic() - start
                    deltas.append(delta)
                finish = choice.get("finish_reason") or finish
    return {"deltas": deltas, "first_delta_s": first, "total_s": time.monotonic() - start, "finish_reason": finish}


def stop(server: subprocess.Popen, grace: float = 30) -> int:
    """SIGTERM to the server's process group (the API server and its stage processes), SIGKILL after `grace`."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    try:  # stragglers of the group (stage processes) after the leader is gone
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return server.returncode


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def run(workdir: Path, timeout: float) -> dict:
    model_dir = build_tiny_llama(workdir / "tiny-llama")
    deploy = workdir / "deploy.yaml"
    deploy.write_text(DEPLOY_YAML)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = workdir / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               VLLM_CPU_KVCACHE_SPACE="1",  # GiB; the default asks for most of the machine's memory
               HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    command = [sys.executable, "-m", "serving.smoke", "_serve", str(model_dir), "--deploy-config", str(deploy),
               "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny"]
    result: dict = {"ok": False, "command": command, "log": str(log_path)}
    start = time.monotonic()
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        result["server_pid"] = server.pid
        try:
            _wait_ready(base, server, start + timeout)
            result["startup_s"] = round(time.monotonic() - start, 1)
            result["chat"] = stream_chat(base, "tiny", "Hello, who are you?", timeout=120)
        except Exception as error:  # reported in the JSON line, with the log's tail
            result["error"] = f"{type(error).__name__}: {error}"
        finally:
            result["server_exit"] = stop(server)
            time.sleep(1)
            result["left_running"] = group_members(server.pid)
    text = log_path.read_text(errors="replace")
    result["platform"] = "CpuOmniPlatform" if "platform: CpuOmniPlatform" in text else None
    workers = sorted(set(re.findall(r"(CPU\w+Worker): (CPU\w+ModelRunner) \(serving", text)))
    result["workers"] = workers
    chat = result.get("chat") or {}
    result["ok"] = (bool(chat.get("deltas") and result["platform"] and workers) and "error" not in result
                    and not result["left_running"])
    if not result["ok"]:
        result["log_tail"] = text[-4000:]
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_serve"]:
        serve(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=900, help="seconds for the server to start (default 900)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (model, deploy config, log)")
    args = parser.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run(args.keep, args.timeout)
    else:
        with tempfile.TemporaryDirectory(prefix="serving-smoke-") as tmp:
            result = run(Path(tmp), args.timeout)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
