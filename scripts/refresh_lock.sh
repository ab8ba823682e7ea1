#!/usr/bin/env bash
# Refreshes requirements/lock.txt: builds a fresh scratch venv without the lock (the newest releases
# pyproject.toml allows, every extra, torch 2.13.0 CPU), runs the full suite there, and writes the lock from
# that venv only when the suite passes. Then commit the lock (and the minimum, if it moved).
#
# Usage: bash scripts/refresh_lock.sh   (scratch space: $LLAMA_OMNI_SCRATCH, default .scratch/; about 5 min)
# A failing suite leaves the lock alone; the would-be lock is kept in the scratch space to look at.
set -euo pipefail
cd "$(dirname "$0")/.."
SCRATCH="${LLAMA_OMNI_SCRATCH:-.scratch}"
VENV="$SCRATCH/refresh-venv"
CANDIDATE="$SCRATCH/lock.candidate.txt"
LOCK=requirements/lock.txt
mkdir -p "$SCRATCH"

rm -rf "$VENV"  # fresh: nothing left over from an earlier resolve can end up in the lock
bash scripts/setup.sh --newest --venv "$VENV" "app,test,whisper"
PY="$VENV/bin/python"

# The project itself (editable) is not a dependency. torch is pinned to its release, not the local CPU build
# (+cpu), so the CPU wheel and PyPI's both satisfy it.
{
  echo "# Tested versions: scripts/setup.sh installs with \`pip install -c $LOCK\`."
  echo "# Written by scripts/refresh_lock.sh on $(date -u +%Y-%m-%d) from a fresh venv where the full suite passed"
  echo "# ($("$PY" -c 'import platform, sys; print(f"Python {platform.python_version()}, {sys.platform} {platform.machine()}")'))."
  echo "# Do not edit by hand: run \`bash scripts/refresh_lock.sh\`."
  "$PY" -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > "$CANDIDATE"
if grep -n ' @ ' "$CANDIDATE"; then
  echo "refresh_lock: the lines above are installed from a URL or path, not a release; the lock needs releases" >&2
  exit 1
fi

echo "== full suite on transformers $("$PY" -c 'import transformers; print(transformers.__version__)')"
if ! "$PY" -m pytest -q -p no:cacheprovider; then
  echo "refresh_lock: the suite failed; $LOCK is unchanged (the untested candidate: $CANDIDATE)" >&2
  exit 1
fi
echo "== changes to $LOCK"
diff <(grep -v '^#' "$LOCK" 2>/dev/null) <(grep -v '^#' "$CANDIDATE") || true
cp "$CANDIDATE" "$LOCK"
sed -i -E "s/(newest tested: transformers )[0-9][^*]*/\1$("$PY" -c 'import transformers; print(transformers.__version__)')/" README.md
echo "refresh_lock: wrote $LOCK (and the README's newest tested version); check requirements/minimum.txt still resolves (bash scripts/setup.sh --minimum)"
