#!/usr/bin/env bash
# Regenerates the spoken example questions in examples/ (16 kHz mono 16-bit WAV) with espeak-ng.
# Needs espeak-ng (`apt-get install espeak-ng`). Usage: bash scripts/make_examples.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
mkdir -p examples
while IFS='|' read -r name text; do
  "$PYTHON" -m llama_omni_hf.espeak "$text" "examples/$name.wav"
done <<'QUESTIONS'
capital_of_france|What is the capital of France?
cup_of_tea|How do I make a cup of tea?
ocean_fact|Tell me a fun fact about the ocean.
QUESTIONS
