#!/usr/bin/env bash
# Checks the logic of edkm's CUDA kernels where no GPU is at hand: the kernels of
# src/cluster/pattern_index_cuda.cu, uspace_cuda.cu and fake_quantize_cuda.cu (the part of each
# file between its "scripts/cuda-emulation" and "End of the kernels" comments) compiled as host
# C++ over emu.h, a thread per CUDA thread, and compared with sequential loops and the host
# backends.
# It shows wrong indices, races and missing barriers; not timing, memory limits or the CUDA
# compiler's arithmetic. Needs the default build (build/, for libtorch and the host loops).
#
#   scripts/cuda-emulation/run.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${EDKM_BUILD:-$root/build}
[ -f "$build/libedkm_cluster.a" ] || { echo "cuda-emulation: $build/libedkm_cluster.a is missing: run scripts/setup.sh first" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The kernels of each file, with dynamic shared memory taken from the emulation.
extract() {
  python3 - "$1" "$2" <<'PY'
import re, sys
src = open(sys.argv[1]).read()
begin = src.find("// scripts/cuda-emulation runs the kernels")
end = src.find("// End of the kernels.")
if begin < 0 or end < begin:
    sys.exit(f"cuda-emulation: {sys.argv[1]} lacks the comments that mark its kernels")
part = re.sub(r"extern __shared__ ([\w ]+?) (\w+)\[\];", r"\1* \2 = emu_dynamic_shared<\1>();", src[begin:end])
open(sys.argv[2], "w").write(part)
PY
}
extract "$root/src/cluster/pattern_index_cuda.cu" "$work/pattern_index_kernels.inc"
extract "$root/src/cluster/uspace_cuda.cu" "$work/uspace_kernels.inc"
extract "$root/src/cluster/fake_quantize_cuda.cu" "$work/fake_quantize_kernels.inc"
torch=/usr/lib/x86_64-linux-gnu  # Debian's libtorch-dev, the default build's
[ -e "$torch/libtorch.so" ] || { echo "cuda-emulation: Debian's libtorch ($torch/libtorch.so) is missing: install libtorch-dev" >&2; exit 1; }
status=0
for check in pattern_index_check uspace_check fake_quantize_check; do
  c++ -std=c++17 -O2 -ffp-contract=off -fopenmp -D_GLIBCXX_USE_CXX11_ABI=1 -I"$root/src" -I"$here" -I"$work" \
    -isystem /usr/include/torch/csrc/api/include "$here/$check.cpp" -o "$work/$check" \
    "$build/libedkm_cluster.a" "$build/libedkm_dist.a" "$build/libedkm_common.a" \
    "$torch/libtorch.so" "$torch/libtorch_cpu.so" "$torch/libc10.so" -lpthread -ldl \
    $(pkg-config --libs fmt libxxhash 2>/dev/null) $( [ -e /usr/lib/libgloo.so ] && echo /usr/lib/libgloo.so )
  echo "== $check"
  "$work/$check" || status=1
done
[ $status -eq 0 ] && echo "cuda-emulation: every kernel matched" || echo "cuda-emulation: mismatches above" >&2
exit $status
