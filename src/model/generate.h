// Sampling and streaming generation, with llama2.c's semantics so that its published samples
// are references: xorshift64* random numbers, temperature scaling, top-p (nucleus) sampling
// with its cutoff pre-filter, and generation that stops at BOS or EOS.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>

#include "model/llama.h"
#include "tokenizer/tokenizer.h"

namespace edkm {

struct SamplerConfig {
  float temperature = 1.0f;  // 0: greedy (argmax)
  float top_p = 0.9f;        // <= 0 or >= 1: sample from the whole distribution
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(SamplerConfig cfg);
  // logits: [vocab] (any floating dtype, any device).
  int sample(const at::Tensor& logits);

 private:
  float uniform();  // [0, 1), llama2.c's random_f32
  SamplerConfig cfg_;
  uint64_t state_;
};

struct GenerateOptions {
  std::string prompt;
  int max_tokens = 256;  // new tokens after the prompt
  SamplerConfig sampler;
};

struct GenerateStats {
  int prompt_tokens = 0;
  int generated = 0;
  double seconds = 0;  // from the first sampled token to the last
  bool context_full = false;  // stopped short of max_tokens at the model's context length
  double tokens_per_second() const { return seconds > 0 ? generated / seconds : 0; }
};

// Streams each new piece of text to on_piece; stops after max_tokens, at BOS/EOS, or at the
// model's context length.
GenerateStats generate(const Llama& model, const Tokenizer& tok, const GenerateOptions& opts,
                       const std::function<void(const std::string&)>& on_piece);

}  // namespace edkm
