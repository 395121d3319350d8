// format: the compressed model file (docs/format.md has the byte-level specification).
//
// A safetensors file, readable by any safetensors reader. Each clustered weight W is stored as
//   W.indices  U8   [ceil(n * b / 8)]  n = rows * cols / d palette indices of b bits, packed
//                                       LSB-first (index i is bits [i b, i b + b) of the stream)
//   W.palette  F16  [G, 2^b, d]        one palette per group of rows
//   W.scale    F32  [rows]             per-row scales, when the weight was clustered with them
// and every other tensor as it was. __metadata__ holds the format name and version, the model
// config, the tokenizer's name (and EOS text, for a tokenizer.json), and each clustered weight's shape and settings; the tokenizer
// file itself travels as the U8 tensor "__tokenizer__".
#pragma once

#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "cluster/cluster.h"
#include "model/llama.h"
#include "tokenizer/tokenizer.h"

namespace edkm {

constexpr const char* kFormatName = "edkm-palettized";
constexpr int kFormatVersion = 1;

// b-bit indices (uint8 values < 2^b) <-> the packed LSB-first bit stream.
at::Tensor pack_bits(const at::Tensor& indices, int bits);
at::Tensor unpack_bits(const at::Tensor& packed, int bits, int64_t count);

struct PackedWeight {
  std::vector<int64_t> shape;  // the original weight's shape [rows, cols]
  int bits = 0;
  int cluster_dim = 1;
  int64_t group_size = 0;      // 0: one palette
  at::Tensor indices;          // U8 packed stream
  at::Tensor palette;          // F16 [G, 2^b, d]
  at::Tensor scale;            // F32 [rows] or undefined
  nlohmann::json settings;     // the DKM settings it was trained with (informational)

  int64_t rows() const { return shape[0]; }
  int64_t cols() const;
  int64_t count() const { return rows() * cols() / cluster_dim; }  // indices
  int64_t bytes() const;                                           // on disk, all parts
  // The weights W = palette[g][index] * s as a dense tensor.
  at::Tensor dense(at::ScalarType dtype = at::kFloat) const;
  // Indices unpacked to uint8 [rows, cols / d].
  at::Tensor unpacked() const;

  static PackedWeight from(const Palettized& p, nlohmann::json settings = {});
};

struct CompressedModel {
  LlamaConfig config;
  std::map<std::string, at::Tensor> dense;          // tensors stored as they are
  std::map<std::string, PackedWeight> packed;       // clustered weights
  std::string tokenizer_name;                       // "" when none is embedded
  std::string tokenizer_data;
  std::string tokenizer_eos;                        // Tokenizer::eos_token(), "" when the file says
  std::map<std::string, std::string> metadata;      // extra __metadata__ entries

  // All weights dense, as a Llama (dtype: of the de-palettised weights; dense tensors keep theirs
  // unless `all` casts them too).
  Llama to_llama(at::ScalarType dtype = at::kFloat) const;
  std::unique_ptr<Tokenizer> tokenizer() const;
};

// From a model and the hard assignment of its clustered weights; `dense_dtype` (Undefined: keep)
// applies to the tensors that are not clustered.
CompressedModel make_compressed(const Llama& model, const std::vector<std::pair<std::string, Palettized>>& packed,
                                const std::vector<nlohmann::json>& settings, const Tokenizer* tokenizer,
                                at::ScalarType dense_dtype = at::ScalarType::Undefined);

// The structure of a compressed file, validated from its safetensors header alone (no tensor
// data is read): format name and version, config, every tensor of the model present exactly
// once with the right dtype and shape, index byte counts. Kept free of ATen tensors for the
// fuzz target.
struct PackedLayout {
  std::vector<int64_t> shape;
  int bits = 0, cluster_dim = 1;
  int64_t group_size = 0;
  bool scaled = false;
  nlohmann::json settings;
};
struct CompressedLayout {
  LlamaConfig config;
  std::map<std::string, PackedLayout> packed;
  std::vector<std::string> dense;
  bool has_tokenizer = false;
  std::string tokenizer_name;
  std::string tokenizer_eos;
  std::map<std::string, std::string> metadata;  // entries beyond the format's own
};
namespace safetensors { struct Header; }
CompressedLayout parse_layout(const safetensors::Header& header, const std::string& source);

void write_compressed(const std::string& path, const CompressedModel& m);
// Strict: parse_layout, then zero padding bits, finite palettes, positive scales. InputError
// naming the file and problem.
CompressedModel read_compressed(const std::string& path);
// True if path is a safetensors file whose metadata names this format.
bool is_compressed_file(const std::string& path);

}  // namespace edkm
