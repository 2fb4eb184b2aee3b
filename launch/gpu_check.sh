#!/usr/bin/env bash
# The GPU check in one command, on a machine with a CUDA PyTorch (torch, triton, timm, accelerate)
# and no package index: install the wheels carried in .whl/load-*/ (launch/fetch_wheels.sh) into a
# temporary directory, make skd and skd_kernels importable from this checkout without installing
# it, and run `python -m skd.bench gpu` under a hard time limit.
#
#   bash launch/gpu_check.sh [OUT_DIR] [options of python -m skd.bench gpu]
#
# OUT_DIR (default: $OUT, else gpu-check/) receives gpu_check.json, gpu_check.md,
# correctness_pytest.log and gpu_check.log (everything printed). Every stage writes its results
# before the next starts, so the limit (GPU_CHECK_LIMIT_S, default 345 s, after the install) only
# ever costs the stage it interrupts. A copy of the checkout without .git records no commit: pass
# --commit SHA. PYTHON selects the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
python=${PYTHON:-python3}
if [[ $# -gt 0 && $1 != -* ]]; then
  out_dir=$1
  shift
else
  out_dir=${OUT:-gpu-check}
fi
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
log=$out_dir/gpu_check.log
: > "$log"
say() { echo "$@" | tee -a "$log"; }

tmp=$(mktemp -d /tmp/skd-gpu-check.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

# skd is the folder skd/; skd_kernels is the folder kernels/, reached through a link named for it.
mkdir -p "$tmp/path" "$tmp/site" "$tmp/wheels"
ln -s "$repo/kernels" "$tmp/path/skd_kernels"

# Wheels: whole ones as they are; split ones reassembled from their parts (in any load) and
# checked against their checksum. A wheel whose parts are not all here is left out, with a note.
wheels=()
shopt -s nullglob
for wheel in .whl/load-*/*.whl; do
  wheels+=("$wheel")
done
for first in .whl/load-*/*.whl.part-000; do
  name=$(basename "${first%.part-000}")
  parts=(.whl/load-*/"$name".part-*)
  mapfile -t parts < <(printf '%s\n' "${parts[@]}" | awk -F'.part-' '{print $NF" "$0}' | sort | cut -d' ' -f2-)
  cat "${parts[@]}" > "$tmp/wheels/$name"
  cp "$(dirname "$first")/$name.sha256" "$tmp/wheels/" 2>/dev/null
  if (cd "$tmp/wheels" && sha256sum --quiet -c "$name.sha256" > /dev/null 2>&1); then
    wheels+=("$tmp/wheels/$name")
  else
    say "gpu_check.sh: $name: parts missing or damaged (${#parts[@]} found); left out"
  fi
done
shopt -u nullglob
if [[ ${#wheels[@]} -gt 0 ]]; then
  if "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
       --target "$tmp/site" "${wheels[@]}" >> "$log" 2>&1; then
    say "gpu_check.sh: installed ${#wheels[@]} carried wheels"
  else
    say "gpu_check.sh: installing the carried wheels failed (see $log); the stages that need them skip"
  fi
else
  say "gpu_check.sh: no wheels in .whl/load-*/ (launch/fetch_wheels.sh): the stages that need them skip"
fi
export PYTHONPATH="$repo:$tmp/path:$tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if ! "$python" -c "import skd.bench.gpu, skd_kernels" >> "$log" 2>&1; then
  say "gpu_check.sh: skd does not import from $repo with $python (see $log)"
  exit 2
fi
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv >> "$log" 2>&1
fi

# SIGINT first: the script records the interrupted stage and prints the goals; SIGKILL 20 s later.
timeout --signal=INT --kill-after=20 "${GPU_CHECK_LIMIT_S:-345}" \
  "$python" -m skd.bench gpu --out "$out_dir" "$@" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
say "gpu_check.sh: exit status $status; results in $out_dir"
exit "$status"
