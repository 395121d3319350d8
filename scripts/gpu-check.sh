#!/usr/bin/env bash
# The GPU check in one command, for a fresh GPU machine with PyTorch 2.x (CUDA), nvcc, CMake and
# ninja, and no network or apt. Run scripts/gpu-prepare.sh first where apt works; its .gpu/ must
# travel with the working tree. Then, from the repository root:
#
#   scripts/gpu-check.sh            # results in $OUT (default: gpu-results/)
#
# It unpacks .gpu/debs into a private prefix, builds the CUDA build with every core, runs the
# CUDA tests (CPU and GPU paths compared) and the GPU benchmarks, and writes:
#   tests.json        GoogleTest's report of the Cuda.* tests (and remove_tree against that libtorch)
#   bench_dkm.json    `edkm bench dkm --device cuda`: one LLaMA-7B decoder layer, 3 bits
#   bench_step.json   `edkm bench step --device cuda`: a fine-tuning step with DKM vs without (and
#                     with hard k-means or QAT in DKM's place)
#   bench_dkm_fp32.json  the layer with fp32 weights (training's master weights)
#   coremltools_dkm.json  coremltools' DKMPalettizer on that layer: its defaults, and eDKM's options
#                     on the GPU and offloaded to the CPU; last, with what is left of the budget,
#                     and written row by row
#   summary.json      each stage's exit status and seconds, and the machine
#   gpu-check.log     everything the stages printed
# Every stage runs under its time limit, cut to what is left of the whole budget (EDKM_GPU_BUDGET,
# 480 s; a stage with under 20 s left is skipped), so that the whole stays within 8 minutes; a
# failing stage is recorded and the next one still runs. The exit status is 0 only if all passed.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/gpu-results}
gpu=${EDKM_GPU_DIR:-$root/.gpu}
prefix=${EDKM_GPU_PREFIX:-/tmp/edkm-gpu-deps}
build=${EDKM_GPU_BUILD:-$root/build-gpu}
python=${PYTHON:-python3}
mkdir -p "$out"
exec > >(tee "$out/gpu-check.log") 2>&1
t0=$(date +%s)
status=0
stages="{}"

budget=${EDKM_GPU_BUDGET:-480}
# stage NAME SECONDS COMMAND...: runs the command under a time limit, records its status and time.
stage() {
  local name=$1 limit=$2 s rc left
  shift 2
  s=$(date +%s)
  left=$((budget - (s - t0)))
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "== $name: skipped, ${left} s of the budget left"
    rc=125
  else
    echo "== $name (limit ${limit} s, at $((s - t0)) s)"
    timeout --signal=TERM --kill-after=5 "$limit" "$@"
    rc=$?
  fi
  echo "== $name: exit $rc after $(($(date +%s) - s)) s"
  [ $rc -eq 0 ] || status=1
  stages=$("$python" -c 'import json,sys; d=json.loads(sys.argv[1]); d[sys.argv[2]]={"exit":int(sys.argv[3]),"seconds":int(sys.argv[4])}; print(json.dumps(d))' \
    "$stages" "$name" "$rc" "$(($(date +%s) - s))")
  return $rc
}

if [ ! -d "$gpu/debs" ] || [ ! -d "$gpu/assets" ]; then
  echo "gpu-check: $gpu/debs or $gpu/assets is missing: run scripts/gpu-prepare.sh where apt works, and carry .gpu/" >&2
  exit 1
fi

unpack() {
  rm -rf "$prefix" && mkdir -p "$prefix" || return 1
  for f in "$gpu"/debs/*.deb; do
    if command -v dpkg > /dev/null; then
      dpkg -x "$f" "$prefix" || return 1
    else  # a .deb is an ar archive; Debian 12's packages hold data.tar.xz
      ar p "$f" data.tar.xz | tar -xJ -C "$prefix" || return 1
    fi
  done
  # Some packages link into / (libbz2.so -> /lib/...): point those links into the prefix.
  find "$prefix" -type l | while read -r link; do
    target=$(readlink "$link")
    case $target in /*) ln -sfn "$prefix$target" "$link" ;; esac
  done
}
export prefix gpu
export -f unpack
stage unpack 60 bash -c unpack || exit 1
export LD_LIBRARY_PATH="$prefix/usr/lib/x86_64-linux-gnu:$prefix/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The packages' .pc files say prefix=/usr: pkgconf reads them from the prefix and prepends it.
export PKG_CONFIG_LIBDIR="$prefix/usr/lib/x86_64-linux-gnu/pkgconfig:$prefix/usr/share/pkgconfig"
export PKG_CONFIG_SYSROOT_DIR="$prefix"

# libtorch's CMake files, and its root, so that its libraries are found there before any other
# libtorch on the machine.
torch_cmake=$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__) + ";" + torch.utils.cmake_prefix_path)') || {
  echo "gpu-check: $python cannot import torch" >&2
  exit 1
}
configure() {
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    "-DCMAKE_PREFIX_PATH=$prefix/usr;$torch_cmake" -DPKG_CONFIG_EXECUTABLE="$prefix/usr/bin/pkgconf" \
    -DEDKM_BUILD_BENCH=OFF -DEDKM_ASSETS_DIR="$gpu/assets"
}
export root build torch_cmake
export -f configure
stage configure 120 bash -c configure || { echo "$stages" > "$out/summary.json"; exit 1; }
stage build "${EDKM_GPU_BUILD_LIMIT:-330}" cmake --build "$build" --parallel "$(nproc)" --target edkm-cli edkm_tests || {
  echo "$stages" > "$out/summary.json"
  exit 1
}

export EDKM_ASSETS="$gpu/assets" OMP_NUM_THREADS=8
stage tests 180 "$build/tests/edkm_tests" --gtest_filter='Cuda.*:Robustness.RemoveTree*' --gtest_output="json:$out/tests.json"
stage bench_dkm 60 sh -c "'$build/edkm' bench dkm --device cuda --reps 5 --json > '$out/bench_dkm.json'"
# 8 of LLaMA-7B's 32 layers: 1.9B parameters, with AdamW's fp32 state well inside 141 GB.
stage bench_step 120 sh -c "'$build/edkm' bench step --device cuda --layers 8 --json > '$out/bench_step.json'"
stage bench_dkm_fp32 60 sh -c "'$build/edkm' bench dkm --device cuda --weights fp32 --reps 5 --json > '$out/bench_dkm_fp32.json'"
# Last, with what is left of the budget: its rows are written as each completes.
coremltools() {
  "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/edkm-gpu-site "$gpu"/wheels/*.whl &&
    PYTHONPATH=/tmp/edkm-gpu-site "$python" "$root/scripts/coremltools_dkm_bench.py" --device cuda --reps 2 \
      --out "$out/coremltools_dkm.json"
}
export python out
export -f coremltools
stage coremltools 240 bash -c coremltools

machine=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
"$python" -c 'import json,sys; print(json.dumps({"machine": sys.argv[1], "seconds": int(sys.argv[2]), "stages": json.loads(sys.argv[3])}, indent=2))' \
  "$machine" "$(($(date +%s) - t0))" "$stages" > "$out/summary.json"
echo "gpu-check: done in $(($(date +%s) - t0)) s, exit $status; results in $out"
exit $status
