#!/usr/bin/env bash
# Serve a converted LLaMA-Omni checkpoint with vLLM-Omni (issue 12): streamed text and 16 kHz speech on an
# OpenAI-compatible /v1/chat/completions, two stages (serving/pipeline.py) on 127.0.0.1, with the deploy config of
# the platform (serving/deploy/llama_omni_cpu.yaml on the CPU, llama_omni_cuda.yaml on a GPU: --deploy-config to
# choose). Sets up .venv-serve first when it is missing (scripts/setup_serving.sh: the CPU or, where nvidia-smi
# lists a GPU, the CUDA flavour; ~5-10 min the first time). docs/serving.md has the details.
#
# Usage: bash scripts/serve.sh MODEL [--port 8000] [other `vllm-omni serve` options]
#   MODEL: a converted checkpoint directory or Hub id (config model_type llama_omni), or `tiny`: the tiny random
#   serving checkpoint (serving/tiny_checkpoint.py), built on first use in ~/.cache/llama-omni-hf/tiny-serving
#   (LLAMA_OMNI_TINY_SERVING_DIR) and served as "tiny-omni": one command from a fresh clone to a running server.
#   /v1/models lists MODEL as typed
#   (or --served-model-name NAME); requests may name it as `model`, but any name is accepted (one model per server)
#   e.g. bash scripts/setup_serving.sh && .venv-serve/bin/python -m serving.tiny_checkpoint /tmp/tiny-omni
#        bash scripts/serve.sh /tmp/tiny-omni
# Then: .venv/bin/python app.py --backend http://127.0.0.1:8000  (or any OpenAI-compatible client)
set -euo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  sed -n '2,16p' "$0" >&2
  exit 2
fi
MODEL="$1"; shift
NAME_ARGS=(--served-model-name "$MODEL")
for arg in "$@"; do case "$arg" in --served-model-name|--served-model-name=*) NAME_ARGS=() ;; esac; done
# a relative checkpoint directory is the caller's, not the repository's (this script changes directory)
if [ -d "$MODEL" ]; then MODEL="$(cd "$MODEL" && pwd)"; fi
cd "$(dirname "$0")/.."
if [ ! -x .venv-serve/bin/python ]; then bash scripts/setup_serving.sh; fi
if [ "$MODEL" = tiny ]; then
  MODEL="${LLAMA_OMNI_TINY_SERVING_DIR:-$HOME/.cache/llama-omni-hf/tiny-serving}"
  if [ ! -f "$MODEL/config.json" ]; then  # built aside, then moved: an interrupted build leaves no half checkpoint
    rm -rf "$MODEL" "$MODEL.partial" && mkdir -p "$(dirname "$MODEL")"
    .venv-serve/bin/python -m serving.tiny_checkpoint "$MODEL.partial" >/dev/null && mv "$MODEL.partial" "$MODEL"
  fi
  if [ ${#NAME_ARGS[@]} -gt 0 ]; then NAME_ARGS=(--served-model-name tiny-omni); fi
fi
HOST_ARGS=(--host 127.0.0.1)
for arg in "$@"; do case "$arg" in --host|--host=*) HOST_ARGS=() ;; esac; done
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# one model per server: accept whatever `model` a client sends (vLLM's own switch; 0 makes names strict again)
export VLLM_SKIP_MODEL_NAME_VALIDATION="${VLLM_SKIP_MODEL_NAME_VALIDATION:-1}"
exec .venv-serve/bin/python -m serving.pipeline serve "$MODEL" "${HOST_ARGS[@]}" "${NAME_ARGS[@]}" "$@"
