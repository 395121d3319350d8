// llama2.c header parsing and the checkpoint layout. Kept free of ATen tensors so that the
// fuzz target (fuzz/) builds it quickly with clang.
#include <cstring>

#include "common/error.h"
#include "model/io/llama2c.h"
#include "model/io/llama2c_layout.h"

namespace edkm {
namespace llama2c {

struct Block {
  const char* leaf;  // HF name within a layer, or a full name for embeddings
  bool per_layer;
};
// In file order (llama2.c's w1, w2, w3 are gate, down, up).
const Block kMatrices[] = {{tensor_name::kEmbed, false}, {tensor_name::kQ, true},    {tensor_name::kK, true},
                           {tensor_name::kV, true},      {tensor_name::kO, true},    {tensor_name::kGate, true},
                           {tensor_name::kDown, true},   {tensor_name::kUp, true}};

std::vector<std::string> matrix_names(const LlamaConfig& c, bool shared) {
  std::vector<std::string> names;
  for (const Block& b : kMatrices) {
    if (!b.per_layer) names.push_back(b.leaf);
    else
      for (int64_t l = 0; l < c.n_layers; ++l) names.push_back(layer_tensor_name(l, b.leaf));
  }
  if (!shared) names.push_back(tensor_name::kLmHead);
  return names;
}

std::map<std::string, std::vector<int64_t>> shapes(const LlamaConfig& c) {
  const auto all = tensor_shapes(c);
  std::map<std::string, std::vector<int64_t>> m(all.begin(), all.end());
  m[tensor_name::kLmHead] = {c.vocab_size, c.dim};
  return m;
}

int64_t numel(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

std::vector<std::string> norm_names(const LlamaConfig& c) {
  std::vector<std::string> n;
  for (int64_t l = 0; l < c.n_layers; ++l) n.push_back(layer_tensor_name(l, tensor_name::kAttnNorm));
  for (int64_t l = 0; l < c.n_layers; ++l) n.push_back(layer_tensor_name(l, tensor_name::kMlpNorm));
  n.push_back(tensor_name::kFinalNorm);
  return n;
}

}  // namespace llama2c

namespace {
int32_t read_i32(std::string_view f, size_t off) {
  int32_t v;
  std::memcpy(&v, f.data() + off, 4);
  return v;
}
}  // namespace

using namespace llama2c;

Llama2cHeader parse_llama2c_header(std::string_view f, uint64_t file_size, const std::string& source) {
  Llama2cHeader h;
  if (f.size() < 28) throw_input("{}: truncated llama2.c checkpoint ({} bytes, smaller than any header)", source, f.size());
  size_t params = 0;
  uint32_t magic;
  std::memcpy(&magic, f.data(), 4);
  if (magic == kMagic) {
    if (f.size() < kHeaderV1) throw_input("{}: truncated llama2.c header ({} of 256 bytes)", source, f.size());
    h.version = read_i32(f, 4);
    if (h.version != 1 && h.version != 2)
      throw_input("{}: llama2.c checkpoint version {} is not supported (expected 1 or 2)", source, h.version);
    params = 8;
    h.header_bytes = kHeaderV1;
  } else {
    h.version = 0;
    h.header_bytes = 28;
  }
  const char* names[] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"};
  int64_t v[7];
  for (int i = 0; i < 7; ++i) v[i] = read_i32(f, params + 4 * i);
  if (h.version == 0) {
    h.shared_classifier = v[5] > 0;
    v[5] = std::abs(v[5]);
  } else {
    const uint8_t flag = static_cast<uint8_t>(f[params + 28]);
    if (flag > 1) throw_input("{}: shared_classifier flag is {}, expected 0 or 1", source, flag);
    h.shared_classifier = flag == 1;
  }
  // Bound every field before any arithmetic: a lying header must not overflow the size check.
  const int64_t limits[] = {1 << 16, 1 << 20, 1 << 10, 1 << 10, 1 << 10, 1 << 22, 1 << 22};
  for (int i = 0; i < 7; ++i)
    if (v[i] <= 0 || v[i] > limits[i])
      throw_input("{}: header field {} = {} is out of range (1..{})", source, names[i], v[i], limits[i]);
  LlamaConfig& c = h.config;
  c.dim = v[0], c.hidden_dim = v[1], c.n_layers = v[2], c.n_heads = v[3], c.n_kv_heads = v[4];
  c.vocab_size = v[5], c.max_seq_len = v[6];
  c.tie_embeddings = h.shared_classifier;
  c.norm_eps = 1e-5;  // llama2.c's RMSNorm epsilon
  c.validate(source);

  uint64_t floats = 0, int8s = 0;
  const auto shape = shapes(c);
  const std::vector<std::string> mats = matrix_names(c, h.shared_classifier);
  for (const auto& n : norm_names(c)) floats += numel(shape.at(n));
  uint64_t matrix_elems = 0;
  for (const auto& n : mats) matrix_elems += numel(shape.at(n));
  if (h.version == 2) {
    h.group_size = read_i32(f, params + 29);
    if (h.group_size <= 0 || h.group_size > (1 << 20))
      throw_input("{}: group_size {} is out of range", source, h.group_size);
    for (const auto& n : mats)
      if (numel(shape.at(n)) % h.group_size != 0)
        throw_input("{}: {} has {} weights, not a multiple of group_size {}", source, n, numel(shape.at(n)), h.group_size);
    int8s = matrix_elems;
    floats += matrix_elems / h.group_size;
  } else {
    floats += matrix_elems;
    if (h.version == 0) floats += uint64_t(c.max_seq_len) * c.head_dim();  // RoPE cos and sin tables
  }
  h.expected_size = h.header_bytes + 4 * floats + int8s;
  if (file_size < h.expected_size)
    throw_input("{}: truncated llama2.c checkpoint: the header (v{}, dim {}, {} layers, vocab {}) implies {} bytes, "
                "the file has {}", source, h.version, c.dim, c.n_layers, c.vocab_size, h.expected_size, file_size);
  if (file_size > h.expected_size)
    throw_input("{}: the header (v{}, dim {}, {} layers, vocab {}) implies {} bytes but the file has {}: "
                "wrong header or trailing data", source, h.version, c.dim, c.n_layers, c.vocab_size,
                h.expected_size, file_size);
  return h;
}

}  // namespace edkm
