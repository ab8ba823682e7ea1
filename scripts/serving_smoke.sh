#!/usr/bin/env bash
# Smoke check of the serving foundation (issue 12): in .venv-serve, vllm-omni serves a tiny random Llama as a
# one-stage LLM_AR pipeline on the CPU (CpuOmniPlatform, serving/cpu_workers.py) on 127.0.0.1, one chat completion
# is streamed back, the server is stopped by PID. Prints one JSON line; exit status 0 when it all worked.
# About 1-2 min on 2 cores (most of it the server's start).
#
# Usage: bash scripts/serving_smoke.sh [--setup] [--audio] [--keep DIR]
#   --setup     run scripts/setup_serving.sh first (a no-op when .venv-serve is up to date)
#   --audio     two stages: the Llama, then a weightless LLM_GENERATION stage (CPU generation worker) whose
#               16 kHz audio is streamed back too
#   --keep DIR  keep the tiny model, deploy config and server log in DIR
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --setup ]; then bash scripts/setup_serving.sh; shift; fi
if [ ! -x .venv-serve/bin/python ]; then
  echo "serving_smoke: no .venv-serve; run bash scripts/setup_serving.sh (or pass --setup)" >&2
  exit 2
fi
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" exec .venv-serve/bin/python -m serving.smoke "$@"
