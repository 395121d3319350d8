#!/usr/bin/env bash
# The comparison in BENCHMARKS.md: stories260K in fp32 and compressed to 2, 3 and 4 bits with
# round-to-nearest, post-training k-means and DKM fine-tuning, on the seven zero-shot tasks
# (first LIMIT items each, default 1000) and TinyStories perplexity on the last 10% of val_a.txt,
# the part DKM's fine-tuning holds out (--val-fraction 0.1, the default); then the report.
# Usage: scripts/compare_stories260k.sh [OUT_DIR] [LIMIT]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/compare}
limit=${2:-1000}
assets=${EDKM_ASSETS:-../shared/assets}
model=$assets/models/stories260K/stories260K.bin
data=$assets/eval/tinystories/val_a.txt
tasks=piqa,winogrande,hellaswag,arc_easy,arc_challenge,boolq,copa,tinystories
mkdir -p "$out"
edkm=build/edkm

$edkm eval -q -m "$model" --tasks $tasks --limit "$limit" --heldout 0.1 --label fp32 -o "$out/fp32.json" > /dev/null
results=("$out/fp32.json")
for bits in 4 3 2; do
  $edkm quantize -m "$model" --method rtn --bits $bits -o "$out/rtn$bits.edkm"
  $edkm quantize -m "$model" --method kmeans --bits $bits -o "$out/kmeans$bits.edkm"
  $edkm compress -q -m "$model" -d "$data" --bits $bits --val-fraction 0.1 -o "$out/dkm$bits.edkm" > "$out/dkm$bits.report.txt"
  for method in rtn kmeans dkm; do
    $edkm eval -q -m "$out/$method$bits.edkm" --tasks $tasks --limit "$limit" --heldout 0.1 --label "$method $bits-bit" \
      -o "$out/$method$bits.json" > /dev/null
    results+=("$out/$method$bits.json")
  done
done
$edkm report "${results[@]}" -o "$out"
