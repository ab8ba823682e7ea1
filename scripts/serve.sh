#!/usr/bin/env bash
# Serve a converted LLaMA-Omni checkpoint with vLLM-Omni (issue 12): streamed text and 16 kHz speech on an
# OpenAI-compatible /v1/chat/completions, two stages (serving/pipeline.py) with our deploy config
# (serving/deploy/llama_omni_cpu.yaml) on 127.0.0.1. Sets up .venv-serve first when it is missing
# (scripts/setup_serving.sh, ~7-10 min the first time).
#
# Usage: bash scripts/serve.sh MODEL [--port 8000] [other `vllm-omni serve` options]
#   MODEL: a converted checkpoint directory or Hub id (config model_type llama_omni)
#   e.g. python -m serving.tiny_checkpoint /tmp/tiny-omni && bash scripts/serve.sh /tmp/tiny-omni
# Then: python app.py --backend http://127.0.0.1:8000  (or any OpenAI-compatible client)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  sed -n '2,10p' "$0" >&2
  exit 2
fi
MODEL="$1"; shift
if [ ! -x .venv-serve/bin/python ]; then bash scripts/setup_serving.sh; fi
HOST_ARGS=(--host 127.0.0.1)
for arg in "$@"; do [ "$arg" = --host ] && HOST_ARGS=(); done
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
exec .venv-serve/bin/python -m serving.pipeline serve "$MODEL" "${HOST_ARGS[@]}" "$@"
