// GGUF (llama.cpp's model file, versions 2 and 3; ggml/docs/gguf.md):
//   "GGUF", uint32 version, uint64 tensor count, uint64 metadata count;
//   metadata: key (uint64 length + bytes), uint32 type, value (integers, floats, bool, string,
//     or an array: uint32 element type, uint64 count, elements), little-endian;
//   tensor infos: name, uint32 n_dims, uint64 ne[n_dims] (ne[0] the fastest-varying), uint32
//     ggml type, uint64 offset into the data section;
//   the data section, at the header's end rounded up to general.alignment (default 32), each
//     tensor at an aligned offset.
// The parser (gguf_header.cpp) and the block dequantizers (gguf_quants.cpp) use no ATen, for the
// fuzz target; gguf.cpp builds the model, its config and its tokenizer from them.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "model/llama.h"
#include "tokenizer/tokenizer.h"

namespace edkm::gguf {

// ggml's tensor types (ggml.h enum ggml_type), the ones edkm dequantizes.
enum class Type : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30,
};

// Elements per block and bytes per block of a type; false for a type edkm does not read.
bool type_layout(uint32_t type, int64_t& block_elems, int64_t& block_bytes);
std::string type_name(uint32_t type);

struct TensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // GGUF order: ne[0] is the row length (the last PyTorch dimension)
  uint32_t type = 0;
  uint64_t offset = 0;      // from the start of the data section
  uint64_t bytes = 0;       // what ne and type imply
  std::vector<int64_t> shape() const { return {ne.rbegin(), ne.rend()}; }
  int64_t numel() const;
};

struct Header {
  uint32_t version = 0;
  nlohmann::json metadata;           // key -> value; arrays as JSON arrays
  std::vector<TensorInfo> tensors;
  uint64_t data_start = 0;           // file offset of the data section
  uint64_t alignment = 32;
};

bool is_gguf(std::string_view head);

// Validates the whole header against the file size: magic and version (2, 3), every length
// against the bytes left, known value types, nesting (arrays of arrays of scalars at most),
// unique keys and tensor names, ranks 1..4, types edkm reads, block-aligned rows, aligned
// offsets, and tensor data inside the file without overlap. InputError naming `source` otherwise.
Header parse_header(std::string_view file, const std::string& source);

// n elements (a multiple of the type's block size) from `src` into fp32 `dst`, exactly as ggml's
// dequantize_row_* computes them.
void dequantize(uint32_t type, const uint8_t* src, int64_t n, float* dst);

// A GGUF model as edkm uses it: fp32 weights under Hugging Face names (q and k rows permuted back
// to rotate-half for llama-architecture files), the config from the architecture's metadata, and
// the tokenizer from tokenizer.ggml.* as a tokenizer.json.
struct Model {
  Llama model;
  std::unique_ptr<Tokenizer> tokenizer;
};
Model load(const std::string& path);

}  // namespace edkm::gguf
