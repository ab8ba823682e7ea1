#!/usr/bin/env bash
# Sets up everything this project needs on a fresh Debian machine (root or sudo):
# system packages, a virtualenv, CPU-only torch and the project with its extras, at the tested versions.
#
# Usage: bash scripts/setup.sh [--minimum | --newest] [--venv DIR] [extras]   (default extras: app,test)
#   (default)   .venv at the versions in requirements/lock.txt (the full suite passes on them)
#   --minimum   .venv-min at the oldest supported releases: requirements/minimum.txt replaces the lock's
#               lines for the packages it names (CI runs the remote-code tests there)
#   --newest    no lock: the newest releases pyproject.toml allows, upgrading an existing venv
#               (used by scripts/refresh_lock.sh and scripts/check_latest.sh)
#   --venv DIR  another virtualenv directory
# Running it again brings an existing venv back to those versions.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=lock VENV="" EXTRAS="app,test"
while [ $# -gt 0 ]; do
  case "$1" in
    --minimum) MODE=minimum ;;
    --newest) MODE=newest ;;
    --venv) VENV="${2:?--venv needs a directory}"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    -*) echo "setup.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) EXTRAS="$1" ;;
  esac
  shift
done
if [ -z "$VENV" ]; then
  if [ "$MODE" = minimum ]; then VENV=.venv-min; else VENV=.venv; fi
fi

APT_PACKAGES="espeak-ng sox ffmpeg libsndfile1"
if [[ ",$EXTRAS," == *",test,"* ]]; then APT_PACKAGES="$APT_PACKAGES chromium chromium-driver"; fi
missing=""
for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip

# What the installs below run under (the minimum's merged constraints are written into its venv).
CONSTRAINTS=()
UPGRADE=()
case "$MODE" in
  lock) CONSTRAINTS=(-c requirements/lock.txt) ;;
  minimum)
    # The lock with minimum.txt's lines in place of the lock's for the same packages (pip intersects
    # repeated constraints instead of overriding them). Names compare as PEP 503 normalises them.
    awk 'function name(l) { sub(/[ \t]*[<>=!~;@\[].*/, "", l); l = tolower(l); gsub(/[-_.]+/, "-", l); return l }
         /^[ \t]*(#|$)/ { next }
         FNR == NR { replaced[name($0)] = 1; print; next }
         !(name($0) in replaced)' requirements/minimum.txt requirements/lock.txt > "$VENV/constraints.txt"
    CONSTRAINTS=(-c "$VENV/constraints.txt") ;;
  newest) UPGRADE=(--upgrade --upgrade-strategy eager) ;;
esac

# CPU build of torch first, so nothing below pulls the multi-GB CUDA build.
$PIP install -q "${CONSTRAINTS[@]}" "torch==2.13.0"
# openai-whisper declares triton on Linux; we only use its CPU encoder and mel code, so skip its deps
# and install the ones it really imports.
$PIP install -q --no-deps "openai-whisper==20250625"
$PIP install -q "${CONSTRAINTS[@]}" "${UPGRADE[@]}" "torch==2.13.0" -e ".[$EXTRAS]"
