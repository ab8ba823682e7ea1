#!/usr/bin/env bash
# Does the project still work on the newest releases? Installs it without the lock (torch 2.13.0 CPU, the
# newest transformers, huggingface_hub, tokenizers, gradio, accelerate, safetensors and everything else at the
# newest pyproject.toml allows), prints those versions beside the lock's, and runs the full suite.
# When tests fail it names the release that broke them: for each of those packages whose newest differs from
# the lock, a copy of the lock's venv with only that package moved to its newest (and what it requires)
# re-runs the failing tests; one summary line per package.
#
# Usage: bash scripts/check_latest.sh   (exit 0 when the suite passes on the newest releases)
# Venvs live in $LLAMA_OMNI_SCRATCH (default .scratch/) and are reused: a second run takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
SCRATCH="${LLAMA_OMNI_SCRATCH:-.scratch}"
mkdir -p "$SCRATCH" && SCRATCH="$(cd "$SCRATCH" && pwd)"
LOCK=requirements/lock.txt
PACKAGES="transformers huggingface_hub tokenizers gradio accelerate safetensors"
LATEST="$SCRATCH/latest-venv"
BASE="$SCRATCH/lock-venv"

version() {  # version PYTHON PACKAGE: the installed version, or "-"
  "$1" -c 'import sys, importlib.metadata as m
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: print("-")' "$2"
}
lock_version() {  # lock_version PACKAGE: its version in the lock (names compared normalised), or "-"
  python3 -c 'import re, sys
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
pins = dict(l.strip().split("==", 1) for l in open(sys.argv[1]) if "==" in l and not l.startswith("#"))
print(next((v for n, v in pins.items() if norm(n) == norm(sys.argv[2])), "-"))' "$LOCK" "$1"
}
failing() {  # failing CACHE_DIR: the node ids pytest recorded as failing, one a line
  python3 -c 'import json, pathlib, sys
f = pathlib.Path(sys.argv[1], "v", "cache", "lastfailed")
print("\n".join(sorted(json.loads(f.read_text())) if f.exists() else []))' "$1"
}
run_tests() {  # run_tests PYTHON CACHE_DIR [--lf]: pytest -q with its failures recorded in CACHE_DIR
  local py="$1" cache="$2"; shift 2
  "$py" -m pytest -q -o cache_dir="$cache" "$@"
}

echo "== newest releases ($LATEST)"
bash scripts/setup.sh --newest --venv "$LATEST"
printf '%-16s %-10s %-10s %s\n' package lock newest "newest on the index"
for p in $PACKAGES; do
  index="$("$LATEST/bin/python" -m pip index versions "$p" 2>/dev/null | sed -nE '1s/.*\((.*)\).*/\1/p')"
  got="$(version "$LATEST/bin/python" "$p")"
  note="${index:-?}"; [ "$index" != "$got" ] && note="$note (not installed: excluded by a requirement)"
  printf '%-16s %-10s %-10s %s\n' "$p" "$(lock_version "$p")" "$got" "$note"
done
others="$(comm -13 <(grep -v '^#' "$LOCK" | sort) <("$LATEST/bin/python" -m pip freeze --exclude-editable \
  | sed -E 's/^(torch==[^+]+)\+.*/\1/' | sort) | tr '\n' ' ')"
echo "all packages newer than (or missing from) the lock: ${others:-none}"

rm -rf "$SCRATCH/latest-cache"
echo "== full suite on the newest releases"
if run_tests "$LATEST/bin/python" "$SCRATCH/latest-cache"; then
  echo "check_latest: the suite passes on the newest releases"
  exit 0
fi
mapfile -t FAILED < <(failing "$SCRATCH/latest-cache")
echo "== ${#FAILED[@]} failing tests on the newest releases; finding the release that broke them"

# still_failing NAME PYTHON: re-runs the failing tests in that venv; prints those that still fail there.
still_failing() {
  local cache="$SCRATCH/cache-$1"
  rm -rf "$cache" && cp -r "$SCRATCH/latest-cache" "$cache"
  run_tests "$2" "$cache" --lf > "$SCRATCH/$1.log" 2>&1 || true
  failing "$cache" | { grep -xFf <(printf '%s\n' "${FAILED[@]}") || true; }
}
listed() {  # listed ID...: "N (first three ids, and K more)"
  local more=$(($# - 3))
  printf '%s' "$#"; [ $# -eq 0 ] || printf ' (%s' "$1"; [ $# -lt 2 ] || printf ', %s' "${@:2:2}"
  [ $more -le 0 ] || printf ', and %s more' "$more"; [ $# -eq 0 ] || printf ')'
}

bash scripts/setup.sh --venv "$BASE" >/dev/null
mapfile -t BASE_FAILED < <(still_failing lock "$BASE/bin/python")
EXPLAINED=("${BASE_FAILED[@]}")
SUMMARY=("the lock itself: ${#BASE_FAILED[@]} of the ${#FAILED[@]} fail there too: not a new release's doing")

for p in $PACKAGES; do
  old="$(lock_version "$p")" new="$(version "$LATEST/bin/python" "$p")"
  [ "$old" = "$new" ] && continue
  venv="$SCRATCH/only-$p-venv"
  rm -rf "$venv" && cp -a "$BASE" "$venv"
  # a copied venv's scripts still name the original's python (tests run console scripts such as llama-omni)
  { grep -rlIF "$BASE" "$venv/bin" || true; } | xargs -r sed -i "s|$BASE|$venv|g"
  before="$("$venv/bin/python" -m pip freeze --exclude-editable | sort)"
  if ! "$venv/bin/python" -m pip install -q "$p==$new" > "$SCRATCH/only-$p.pip.log" 2>&1; then
    SUMMARY+=("$p $old -> $new: cannot be installed beside the lock's other versions ($SCRATCH/only-$p.pip.log)")
    continue
  fi
  moved="$(comm -13 <(echo "$before") <("$venv/bin/python" -m pip freeze --exclude-editable | sort) \
    | { grep -viE "^${p//_/[-_]}==" || true; } | tr '\n' ' ')"
  # what fails with this package moved and not on the lock
  mapfile -t BROKEN < <(comm -23 <(still_failing "only-$p" "$venv/bin/python" | sort) \
                                 <(printf '%s\n' "${BASE_FAILED[@]}" | sort) | { grep -v '^$' || true; })
  SUMMARY+=("$p $old -> $new${moved:+ (with $moved)}: breaks $(listed "${BROKEN[@]}") (log: $SCRATCH/only-$p.log)")
  EXPLAINED+=("${BROKEN[@]}")
done
mapfile -t REST < <(comm -23 <(printf '%s\n' "${FAILED[@]}" | sort) <(printf '%s\n' "${EXPLAINED[@]}" | sort -u) \
                    | { grep -v '^$' || true; })
[ ${#REST[@]} -eq 0 ] || SUMMARY+=("no single package above: $(listed "${REST[@]}") (several upgrades together, another package, or a flaky test)")

echo "== failing on the newest releases:"
printf '  %s\n' "${FAILED[@]}"
echo "== which release broke them (the failing tests re-run on the lock with one package at its newest):"
printf '  %s\n' "${SUMMARY[@]}"
exit 1
