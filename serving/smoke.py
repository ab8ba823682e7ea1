"""Smoke check of the serving foundation: vllm-omni starts an LLM_AR stage on the CPU through CpuOmniPlatform
and streams a chat completion back.

    .venv-serve/bin/python -m serving.smoke [--audio] [--timeout 900] [--keep DIR]

Builds a tiny random LlamaForCausalLM (head_dim 32: vLLM's CPU attention needs one of 32, 64, ...,
vllm/v1/attention/backends/cpu_attn.py) with the project's tiny Llama-3 tokenizer, registers a one-stage
pipeline for it, starts `vllm-omni serve --omni` on 127.0.0.1 in a child process (its own process group), streams
one greedy chat completion, stops the server by PID and prints one JSON line: what was streamed, the timings, the
platform and workers that the stages used (read from the server log). Exit status 0 when every check passed.
With --audio the pipeline has a second, LLM_GENERATION stage (SmokeWaveForGeneration: the answer's token ids to
16 kHz audio, fed once the answer is finished), whose audio chunk is streamed back after the text.

The child shows the launcher pattern a served pipeline needs: vllm-omni's main process resolves the pipeline
from `OMNI_PIPELINES` before it loads any `vllm_omni.general_plugins`, so the launcher registers it itself, then
hands its arguments to vllm-omni's own CLI (`vllm_omni.entrypoints.cli.main.main`), under a `__main__` guard
because the stage processes start with spawn.
"""

from __future__ import annotations

import argparse
import base64
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
STAGE_YAML = """\
  - stage_id: {stage_id}
    devices: "0"
    max_num_seqs: 4
    max_model_len: 256
    max_num_batched_tokens: 256
    enable_chunked_prefill: false  # serving/cpu_workers.py: a seeded request split over steps crashes a CPU stage
    dtype: float32
    enforce_eager: true        # no torch.compile: minutes on 2 cores for nothing here
    async_scheduling: false    # vLLM's CpuPlatform turns it off; the stage's scheduler must agree
    default_sampling_params:
      temperature: 0.0
      max_tokens: {max_tokens}
"""


def deploy_yaml(audio: bool) -> str:
    """One stage (the Llama), or two (then the weightless wave stage, fed when the answer is finished)."""
    stages = STAGE_YAML.format(stage_id=0, max_tokens=16)
    if audio:
        stages += STAGE_YAML.format(stage_id=1, max_tokens=256)
    return f"pipeline: {PIPELINE}{'_audio' if audio else ''}\nasync_chunk: false\nstages:\n{stages}"


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


def _smoke_wave_cls():
    import math

    import torch
    from torch import nn
    from vllm_omni.model_executor.models.output_templates import OmniOutput

    class SmokeWaveForGeneration(nn.Module):
        """A weightless LLM_GENERATION stage model: each request's token ids (stage 0's answer) become 10 ms of
        a sine per id at 16 kHz, returned as one audio chunk (the OmniOutput layout of vllm-omni's code2wav
        stages: multimodal_outputs {"model_outputs": [wave per request], "sr": [rate per request]})."""

        sample_rate = 16000

        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__()
            self.hidden_size = vllm_config.model_config.get_hidden_size()
            self.have_multimodal_outputs = True
            self.has_preprocess = False
            self.has_postprocess = False
            self.requires_raw_input_tokens = True

        def embed_input_ids(self, input_ids, **_):
            return torch.zeros((input_ids.shape[0], self.hidden_size))

        def compute_logits(self, hidden_states, sampling_metadata=None):
            return None

        def load_weights(self, weights):
            for _ in weights:  # the checkpoint is stage 0's; nothing here to load
                pass
            return set()

        def forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **kwargs):
            ids = input_ids.reshape(-1).tolist() if input_ids is not None else []
            counts = kwargs.get("seq_token_counts") or [len(ids)]
            t = torch.arange(self.sample_rate // 100) / self.sample_rate
            waves, start = [], 0
            for count in counts:
                tones = [torch.sin(2 * math.pi * (100 + i) * t) for i in ids[start:start + count]]
                waves.append(0.1 * torch.cat(tones) if tones else torch.zeros(0))
                start += count
            sr = torch.tensor(self.sample_rate, dtype=torch.int32)
            return OmniOutput(text_hidden_states=None,
                              multimodal_outputs={"model_outputs": waves, "sr": [sr] * len(waves)})

    SmokeWaveForGeneration.__module__ = __name__
    return SmokeWaveForGeneration


_LAZY = {"SmokeLlamaForCausalLM": _smoke_model_cls, "SmokeWaveForGeneration": _smoke_wave_cls}


def __getattr__(name):  # serving/models.py registers these as "serving.smoke:NAME", imported on use
    if name in _LAZY:
        globals()[name] = cls = _LAZY[name]()
        return cls
    raise AttributeError(name)


def answer_to_wave_input(source_outputs, prompt=None, _requires_multimodal_data=False):
    """Stage 0 -> stage 1 (sync): each finished answer's token ids (serving.pipeline.finished_answers) become
    stage 1's prompt."""
    from vllm_omni.inputs.data import OmniTokensPrompt

    from serving.pipeline import finished_answers

    return [OmniTokensPrompt(prompt_token_ids=answer, multi_modal_data=None, mm_processor_kwargs=None,
                             additional_information=None) for answer in finished_answers(source_outputs)]


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


def register_smoke_pipelines() -> None:
    """PIPELINE: the smoke Llama alone (LLM_AR); PIPELINE + "_audio": then SmokeWaveForGeneration (LLM_GENERATION)."""
    from vllm_omni.config.pipeline_registry import register_pipeline
    from vllm_omni.config.stage_config import PipelineConfig, StageExecutionType, StagePipelineConfig

    llm = StagePipelineConfig(
        stage_id=0, model_stage="llm", execution_type=StageExecutionType.LLM_AR, final_output=True,
        final_output_type="text", owns_tokenizer=True, engine_output_type="text",
        model_arch="LlamaOmniSmokeForCausalLM", sampling_constraints={"detokenize": True},
    )
    wave = StagePipelineConfig(
        stage_id=1, model_stage="wave", execution_type=StageExecutionType.LLM_GENERATION, input_sources=(0,),
        final_output=True, final_output_type="audio", engine_output_type="audio",
        model_arch="LlamaOmniSmokeWave", sync_process_input_func=f"{__name__}.answer_to_wave_input",
        sampling_constraints={"detokenize": True},
    )
    register_pipeline(PipelineConfig(model_type=PIPELINE, model_arch=llm.model_arch, stages=(llm,)))
    register_pipeline(PipelineConfig(model_type=PIPELINE + "_audio", model_arch=llm.model_arch, stages=(llm, wave)))


def serve(argv: list[str]) -> None:
    """The child: `vllm-omni serve ARGS --omni` with the smoke pipeline registered first."""
    register_smoke_pipelines()
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


def stream_chat(base: str, model: str, text: str, timeout: float, audio: bool = False) -> dict:
    """One streamed chat completion: the text deltas, the seconds to the first, the finish reason; with `audio`,
    also the audio chunks' metadata (format, sample rate, frames) and their decoded size in bytes."""
    body = {"model": model, "messages": [{"role": "user", "content": text}], "stream": True,
            "max_tokens": 16, "temperature": 0.0, "modalities": ["text", "audio"] if audio else ["text"]}
    request = urllib.request.Request(f"{base}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    start, first, deltas, finish, audio_chunks = time.monotonic(), None, [], None, []
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                if content and chunk.get("modality") == "audio":
                    metadata = choice.get("audio_metadata") or {}
                    audio_chunks.append({**metadata, "bytes": len(base64.b64decode(content)),
                                         "at_s": round(time.monotonic() - start, 3)})
                elif content:
                    first = first if first is not None else time.monotonic() - start
                    deltas.append(content)
                if chunk.get("modality") != "audio":
                    finish = choice.get("finish_reason") or finish
    result = {"deltas": deltas, "first_delta_s": first, "total_s": time.monotonic() - start, "finish_reason": finish}
    if audio:
        result["audio_chunks"] = audio_chunks
    return result


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


def run(workdir: Path, timeout: float, audio: bool = False) -> dict:
    model_dir = build_tiny_llama(workdir / "tiny-llama")
    deploy = workdir / "deploy.yaml"
    deploy.write_text(deploy_yaml(audio))
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
            result["chat"] = stream_chat(base, "tiny", "Hello, who are you?", timeout=120, audio=audio)
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
                    and not result["left_running"] and (not audio or bool(chat.get("audio_chunks"))))
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
    parser.add_argument("--audio", action="store_true",
                        help="two stages: the Llama, then a weightless LLM_GENERATION stage turning its answer into "
                             "16 kHz audio (checks the generation worker and the audio stream)")
    args = parser.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run(args.keep, args.timeout, args.audio)
    else:
        with tempfile.TemporaryDirectory(prefix="serving-smoke-") as tmp:
            result = run(Path(tmp), args.timeout, args.audio)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
