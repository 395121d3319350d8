#!/usr/bin/env bash
# Prepares, on a machine with Debian's apt and the shared assets, what scripts/gpu-check.sh needs
# on a GPU machine that has PyTorch 2.x with CUDA, nvcc, CMake and ninja but no network and no
# apt. Writes .gpu/ (git-ignored; about 3 MB), which travels with the working tree:
#   .gpu/debs/    Debian's packages of edkm's other dependencies, unpacked there with dpkg -x
#   .gpu/assets/  the shared assets the GPU tests read (stories260K, TinyStories' val_a.txt, COPA)
#   .gpu/wheels/  coremltools and the two of its dependencies that machine lacks (for the
#                 peer benchmark, scripts/coremltools_dkm_bench.py), for its Python 3.12
#
#   scripts/gpu-prepare.sh            # then, on the GPU machine: scripts/gpu-check.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
assets=${EDKM_ASSETS:-$root/../shared/assets}
out=$root/.gpu

# What the CUDA build links besides libtorch (fmt comes from libtorch's own headers there; Gloo
# is inside libtorch, whose wheel ships no Gloo headers). Runtime libraries ride along with
# their -dev packages; pkgconf finds the .pc files inside the unpacked tree.
packages=(
  nlohmann-json3-dev libcli11-dev libgtest-dev libgloo-dev
  libxxhash-dev libxxhash0 libpcre2-dev libpcre2-8-0 libutf8proc-dev libutf8proc2
  libbz2-dev libbz2-1.0 libsentencepiece-dev libsentencepiece0
  pkgconf pkgconf-bin libpkgconf3
)

rm -rf "$out"
mkdir -p "$out/wheels" "$out/debs" "$out/assets/models/stories260K" "$out/assets/eval/tinystories" "$out/assets/eval/copa"
# apt's sandbox user cannot write into most directories: download in /tmp, then move.
tmp=$(mktemp -d)
chmod 755 "$tmp"
(cd "$tmp" && apt-get download "${packages[@]}")
mv "$tmp"/*.deb "$out/debs/"
rmdir "$tmp"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$out/wheels" coremltools==9.0 cattrs==26.2.1 pyaml==26.7.0
for f in models/stories260K/stories260K.bin models/stories260K/tok512.bin eval/tinystories/val_a.txt eval/copa/val.jsonl; do
  if [ ! -f "$assets/$f" ]; then
    echo "gpu-prepare: missing asset $assets/$f (set EDKM_ASSETS to the shared assets directory)" >&2
    exit 1
  fi
  cp "$assets/$f" "$out/assets/$f"
done
echo "gpu-prepare: $(ls "$out/debs" | wc -l) packages, $(ls "$out/wheels" | wc -l) wheels and 4 assets in $out ($(du -sh "$out" | cut -f1))"
