// Internal to model/io: the order and shapes of the tensors in llama2.c checkpoints.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "model/config.h"

namespace edkm::llama2c {

constexpr uint32_t kMagic = 0x616b3432;  // "ak42"
constexpr uint64_t kHeaderV1 = 256;

// The matrices in checkpoint order, the layer blocks of each kind together: embeddings,
// wq x L, wk x L, wv x L, wo x L, w1 x L, w2 x L, w3 x L, [classifier].
std::vector<std::string> matrix_names(const LlamaConfig& c, bool shared_classifier);
// The RMSNorm gains in v1/v2 order: attention x L, MLP x L, final.
std::vector<std::string> norm_names(const LlamaConfig& c);
// Every tensor's shape by name (the classifier included, tied or not).
std::map<std::string, std::vector<int64_t>> shapes(const LlamaConfig& c);
int64_t numel(const std::vector<int64_t>& shape);

}  // namespace edkm::llama2c
