#!/usr/bin/env bash
# Fetch the wheels that `python -m skd.bench gpu` needs beyond a CUDA PyTorch image (which has
# torch, triton, timm, accelerate, numpy, pyyaml, packaging, six, typing-extensions), for a GPU
# machine without a package index:
#
#   webdataset   webdataset, braceexpand: skd's shard reader (the loader stage)
#   liger        liger-kernel: the Liger provider of the kernel benchmark
#   dali         nvidia-dali-cuda130 and the libraries it loads (nvImageCodec, nvJPEG, nvCOMP, ...):
#                the DALI loader backends, about 270 MB
#
#   bash launch/fetch_wheels.sh [webdataset] [liger] [dali]      # no argument: all three
#
# The wheels are for CPython $PYTHON_VERSION (default 3.12) on x86-64 Linux, pinned below, each
# without its dependencies (the list names every one the image lacks). They are packed into
# .whl/load-1/, .whl/load-2/, ... (git-ignored), each at most LOAD_MIB MiB: by default 64 MiB
# less this checkout's working tree and 2 MiB, so that one load plus the checkout fits a 64 MiB
# transfer (set LOAD_MIB for another limit). A wheel larger than a load is split into
# NAME.whl.part-000, -001, ... across loads, with NAME.whl.sha256 beside its first part; by
# hand it reassembles as
#     cat NAME.whl.part-* > NAME.whl && sha256sum -c NAME.whl.sha256
# and launch/gpu_check.sh does exactly that before it installs every wheel of .whl/load-*/.
#
# Copying N loads to the GPU machine: one transfer per load into the checkout there, then
# `bash launch/gpu_check.sh` once all of .whl/load-*/ has arrived. webdataset and liger make one
# load of about 1 MB: without DALI a single transfer is enough.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
declare -A PINS=(
  [webdataset]="webdataset==1.0.2 braceexpand==0.1.7"
  [liger]="liger-kernel==0.8.5"
  [dali]="nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43
          nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82
          nvidia-libnvcomp-cu13==5.3.0.16 astunparse==1.6.3 gast==0.7.0 optree==0.20.0
          nvtx==0.2.17 makefun==1.16.0 libcst==1.9.0"
)

groups=("$@")
[[ ${#groups[@]} -gt 0 ]] || groups=(webdataset liger dali)
specs=()
for group in "${groups[@]}"; do
  if [[ -z ${PINS[$group]:-} ]]; then
    echo "fetch_wheels.sh: unknown group '$group' (choose from: webdataset liger dali)" >&2
    exit 2
  fi
  specs+=(${PINS[$group]})  # split on whitespace: one pin per word
done

# Room per load: 64 MiB less the working tree (tracked and untracked, not ignored, files).
mib=$((1024 * 1024))
if [[ -z ${LOAD_MIB:-} ]]; then
  tree_bytes=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
  LOAD_MIB=$((64 - (${tree_bytes:-0} + mib - 1) / mib - 2))
fi
load_bytes=$((LOAD_MIB * mib))

rm -rf .whl/download .whl/load-*
mkdir -p .whl/download
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl/download "${specs[@]}"

# Split what exceeds a load; then pack the pieces, largest first, into the first load with room.
pieces=()
for wheel in .whl/download/*.whl; do
  if (( $(stat -c %s "$wheel") > load_bytes )); then
    (cd .whl/download && sha256sum "$(basename "$wheel")" > "$(basename "$wheel").sha256")
    split -b "$load_bytes" -d -a 3 "$wheel" "$wheel.part-"
    rm "$wheel"
    pieces+=(.whl/download/"$(basename "$wheel")".part-*)
  else
    pieces+=("$wheel")
  fi
done
mapfile -t pieces < <(for p in "${pieces[@]}"; do echo "$(stat -c %s "$p") $p"; done | sort -rn | cut -d' ' -f2)
used=()
for piece in "${pieces[@]}"; do
  size=$(stat -c %s "$piece")
  k=0
  while (( k < ${#used[@]} )) && (( used[k] + size > load_bytes )); do k=$((k + 1)); done
  (( k < ${#used[@]} )) || used+=(0)
  used[k]=$((used[k] + size))
  mkdir -p ".whl/load-$((k + 1))"
  mv "$piece" ".whl/load-$((k + 1))/"
  if [[ $piece == *.part-000 ]]; then
    mv "${piece%.part-000}.sha256" ".whl/load-$((k + 1))/"
  fi
done
rmdir .whl/download

echo "fetched ${#specs[@]} wheels for CPython $PYTHON_VERSION into ${#used[@]} load(s) of at most $LOAD_MIB MiB:"
for k in "${!used[@]}"; do
  echo "  .whl/load-$((k + 1))  $(( (used[k] + mib - 1) / mib )) MiB: $(ls ".whl/load-$((k + 1))" | tr '\n' ' ')"
done
if (( ${#used[@]} > 1 )); then
  echo "carry one load per device call, in a row; the last call runs: bash launch/gpu_check.sh"
fi
