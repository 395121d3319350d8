// Sliding-window perplexity (the Hugging Face "perplexity of fixed-length models" procedure):
// windows of `context` tokens advance by `stride`; each scores only the tokens that the
// previous window did not, so every token after the first is scored exactly once, with up to
// context - stride tokens of history.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "model/llama.h"

namespace edkm {

struct PerplexityOptions {
  int64_t context = 0;  // 0: the model's max_seq_len
  int64_t stride = 0;   // 0: = context (disjoint windows)
  int64_t batch = 1;    // windows per forward pass
};

struct PerplexityResult {
  double nll = 0;        // total negative log-likelihood, nats
  int64_t tokens = 0;    // tokens scored
  int64_t windows = 0;
  int64_t context = 0, stride = 0;
  double nats_per_token() const { return tokens ? nll / tokens : 0; }
  double perplexity() const;
};

// tokens: the whole text, encoded once (with BOS at the start). progress(done, total) is
// called after each batch of windows.
PerplexityResult perplexity(const Llama& model, const std::vector<int>& tokens, const PerplexityOptions& opts,
                            const std::function<void(int64_t, int64_t, double)>& progress = {});

}  // namespace edkm
