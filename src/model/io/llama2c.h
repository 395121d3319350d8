// llama2.c checkpoints (karpathy/llama2.c export.py):
//   v0 (legacy): int32 dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (negative:
//       separate classifier), max_seq_len; then fp32 embeddings, per-kind layer blocks, final
//       norm, RoPE tables (max_seq_len x head_dim/2 cos, then sin), [classifier].
//   v1: uint32 magic "ak42", int32 version 1, the 7 ints, uint8 shared_classifier, zero padding
//       to 256 bytes; fp32 norms, embeddings, per-kind layer blocks, [classifier].
//   v2: as v1 with version 2 and an int32 group size after the flag; fp32 norms, then every
//       matrix as int8 (Q8_0), then all their fp32 group scales.
// Weights are stored in Meta's layout, where RoPE rotates adjacent pairs; q and k rows are
// permuted into Hugging Face's rotate-half layout on load (and back on save).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "model/config.h"
#include "model/llama.h"

namespace edkm {

struct Llama2cHeader {
  int version = 0;
  LlamaConfig config;
  bool shared_classifier = true;
  int64_t group_size = 0;     // v2 only
  uint64_t header_bytes = 0;  // where the weights start
  uint64_t expected_size = 0; // the file size the header implies
};

// Parses and validates the header at the start of `file` against `file_size` (every field,
// and the size the weights must take). InputError naming `source` otherwise.
Llama2cHeader parse_llama2c_header(std::string_view file, uint64_t file_size, const std::string& source);

// Loads a checkpoint into fp32 weights (v2 is dequantised).
Llama load_llama2c(const std::string& path);

// Writes `model` as a v1 (fp32) checkpoint, atomically.
void save_llama2c(const Llama& model, const std::string& path);

// Row permutations between Meta's interleaved and HF's rotate-half RoPE layouts, for a
// [n_heads * head_dim, in] projection.
at::Tensor meta_to_hf_rows(const at::Tensor& w, int64_t n_heads);
at::Tensor hf_to_meta_rows(const at::Tensor& w, int64_t n_heads);

}  // namespace edkm
