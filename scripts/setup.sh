#!/usr/bin/env bash
# Installs the Debian packages edkm needs (idempotent: only what is missing) and builds edkm in
# Release into build/. Safe to run again; a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  build-essential cmake ninja-build pkg-config
  libtorch-dev libgloo-dev libopenblas0-openmp
  libsentencepiece-dev libcli11-dev nlohmann-json3-dev libfmt-dev
  libpcre2-dev libutf8proc-dev libbz2-dev libxxhash-dev libgtest-dev libgmock-dev libbenchmark-dev gnuplot-nox clang
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build
