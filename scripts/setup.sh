#!/usr/bin/env bash
# Sets up everything this project needs on a fresh Debian machine (root or sudo):
# system packages, a virtualenv in .venv, CPU-only torch and the project with its extras.
# Usage: bash scripts/setup.sh [extras]   (default extras: app,test)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-app,test}"

APT_PACKAGES="espeak-ng sox ffmpeg libsndfile1"
if [[ ",$EXTRAS," == *",test,"* ]]; then APT_PACKAGES="$APT_PACKAGES chromium chromium-driver"; fi
missing=""
for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# CPU build of torch first, so nothing below pulls the multi-GB CUDA build.
$PIP install -q "torch==2.13.0"
# openai-whisper declares triton on Linux; we only use its CPU encoder and mel code, so skip its deps
# and install the ones it really imports.
$PIP install -q --no-deps "openai-whisper==20250625"
$PIP install -q "torch==2.13.0" -e ".[$EXTRAS]"
