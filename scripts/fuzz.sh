#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (build-fuzz/) and runs each for SECONDS (default 30)
# from seeds made of real headers. Exits non-zero if a fuzzer finds a crash.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
assets=${EDKM_ASSETS:-../shared/assets}
cmake -S fuzz -B build-fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build-fuzz

le64() {  # the little-endian 8-byte encoding of $1
  local n=$1 out="" i
  for i in 0 1 2 3 4 5 6 7; do out+=$(printf '\\x%02x' $(((n >> (8 * i)) & 255))); done
  printf "$out"
}
corpus=build-fuzz/corpus
rm -rf "$corpus" && mkdir -p "$corpus/safetensors" "$corpus/llama2c" "$corpus/compressed" "$corpus/tokenizer" "$corpus/gguf"
json='{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"format":"pt"}}'
{ le64 ${#json}; printf '%s' "$json"; head -c 8 /dev/zero; } > "$corpus/safetensors/seed1"
stories=$assets/models/stories260K/stories260K.bin
{ le64 "$(stat -c %s "$stories")"; head -c 28 "$stories"; } > "$corpus/llama2c/v0"
# v1: magic "ak42" (0x616b3432 little-endian), version 1, the same 7 ints, shared flag, padding
{ le64 1056540; printf '\x32\x34\x6b\x61\x01\x00\x00\x00'; head -c 28 "$stories"; printf '\x01'; head -c 219 /dev/zero; } > "$corpus/llama2c/v1"

# compressed: a real compressed stories260K (one training step on a little text), and k-means
# palettes of the Qwen3 and Llama-3.1 fixtures (q/k norms, head_dim, llama3 rope scaling in the
# config), when the CLI has been built.
cp "$corpus/safetensors/seed1" "$corpus/compressed/seed-plain"
if [[ -x build/edkm ]]; then
  head -c 20000 "$assets/eval/tinystories/val_a.txt" > build-fuzz/seed.txt
  build/edkm compress -t 1 -q -m "$stories" -d build-fuzz/seed.txt --steps 1 --seq-len 32 --val-fraction 0.5 \
    -o "$corpus/compressed/seed" --metrics build-fuzz/seed.metrics --checkpoint build-fuzz/seed.ckpt > /dev/null
  for family in qwen3 llama3; do
    build/edkm quantize -t 1 -m "tests/fixtures/hf/$family" --bits 2 -o "$corpus/compressed/seed-$family" 2> /dev/null
  done
fi

# tokenizer: two small tokenizer.json files, byte-level (a Split regex, ByteLevel) and
# SentencePiece-style (Prepend and Replace, byte fallback), with the decoders that go with them.
cat > "$corpus/tokenizer/byte_level" <<'JSON'
{"added_tokens":[{"id":6,"content":"<|x|>","special":true}],"normalizer":{"type":"NFC"},
 "pre_tokenizer":{"type":"Sequence","pretokenizers":[{"type":"Split","pattern":{"Regex":"(?i:'s)|\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"},"behavior":"Isolated","invert":false},{"type":"ByteLevel","add_prefix_space":false,"use_regex":false}]},
 "post_processor":{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<|x|>","type_id":0}},{"Sequence":{"id":"A","type_id":0}}],"special_tokens":{"<|x|>":{"id":"<|x|>","ids":[6]}}},
 "decoder":{"type":"ByteLevel"},
 "model":{"type":"BPE","vocab":{"H":0,"e":1,"l":2,"o":3,"He":4,"ll":5},"merges":["H e","l l"],"ignore_merges":true}}
JSON
cat > "$corpus/tokenizer/sentencepiece" <<'JSON'
{"normalizer":{"type":"Sequence","normalizers":[{"type":"Prepend","prepend":"▁"},{"type":"Replace","pattern":{"String":" "},"content":"▁"}]},
 "decoder":{"type":"Sequence","decoders":[{"type":"Replace","pattern":{"String":"▁"},"content":" "},{"type":"ByteFallback"},{"type":"Fuse"},{"type":"Strip","content":" ","start":1,"stop":0}]},
 "model":{"type":"BPE","unk_token":"<unk>","fuse_unk":true,"byte_fallback":false,"vocab":{"<unk>":0,"▁":1,"H":2,"i":3,"▁H":4,"▁Hi":5},"merges":["▁ H","▁H i"]}}
JSON

# gguf: the fixtures made with the gguf package (every ggml type; a SentencePiece vocabulary).
cp tests/fixtures/gguf/quants.gguf tests/fixtures/gguf/stories_spm.gguf "$corpus/gguf/"

for target in safetensors llama2c compressed tokenizer gguf; do
  echo "fuzz: $target for ${seconds}s"
  ./build-fuzz/fuzz_$target -max_total_time="$seconds" -print_final_stats=1 -artifact_prefix=build-fuzz/crash-$target- \
    "$corpus/$target" 2>&1 | tail -n 4
done
