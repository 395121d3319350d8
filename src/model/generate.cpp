#include "model/generate.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "common/error.h"

namespace edkm {

Sampler::Sampler(SamplerConfig cfg) : cfg_(cfg), state_(cfg.seed) {
  if (!(cfg.temperature >= 0) || !std::isfinite(cfg.temperature))
    throw_invalid("temperature must be a finite number >= 0, got {}", cfg.temperature);
  if (!std::isfinite(cfg.top_p)) throw_invalid("top-p must be a finite number, got {}", cfg.top_p);
}

float Sampler::uniform() {
  state_ ^= state_ >> 12;
  state_ ^= state_ << 25;
  state_ ^= state_ >> 27;
  const uint32_t r = static_cast<uint32_t>((state_ * 0x2545F4914F6CDD1Dull) >> 32);
  return (r >> 8) / 16777216.0f;
}

int Sampler::sample(const at::Tensor& logits) {
  at::Tensor l = logits.detach().to(at::kCPU, at::kFloat).contiguous();
  const float* x = l.data_ptr<float>();
  const int n = static_cast<int>(l.numel());
  // NaN would make every comparison below false and the nucleus empty.
  if (!std::all_of(x, x + n, [](float v) { return std::isfinite(v); }))
    throw_input("the model produced NaN or Inf logits: its weights or activations are not finite");
  if (cfg_.temperature == 0.0f) return static_cast<int>(std::max_element(x, x + n) - x);
  // softmax(logits / T) in fp32, as llama2.c computes it
  std::vector<float> p(x, x + n);
  for (float& v : p) v /= cfg_.temperature;
  const float mx = *std::max_element(p.begin(), p.end());
  float sum = 0;
  for (float& v : p) sum += v = std::exp(v - mx);
  for (float& v : p) v /= sum;
  const float coin = uniform();
  if (cfg_.top_p <= 0 || cfg_.top_p >= 1) {
    float cdf = 0;
    for (int i = 0; i < n; ++i)
      if (coin < (cdf += p[i])) return i;
    return n - 1;
  }
  // Nucleus: tokens with p >= (1 - top_p) / (n - 1) cannot all be outside the nucleus, so only
  // they are sorted; then the smallest prefix whose mass exceeds top_p is sampled.
  const float cutoff = (1.0f - cfg_.top_p) / (n - 1);
  std::vector<int> idx;
  for (int i = 0; i < n; ++i)
    if (p[i] >= cutoff) idx.push_back(i);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return p[a] > p[b]; });
  float cum = 0;
  size_t last = idx.size() - 1;
  for (size_t i = 0; i < idx.size(); ++i) {
    cum += p[idx[i]];
    if (cum > cfg_.top_p) {
      last = i;
      break;
    }
  }
  const float r = coin * cum;
  float cdf = 0;
  for (size_t i = 0; i <= last; ++i)
    if (r < (cdf += p[idx[i]])) return idx[i];
  return idx[last];
}

GenerateStats generate(const Llama& model, const Tokenizer& tok, const GenerateOptions& opts,
                       const std::function<void(const std::string&)>& on_piece) {
  if (opts.max_tokens < 0) throw_invalid("max_tokens must be >= 0");
  at::NoGradGuard no_grad;
  std::vector<int> prompt = tok.encode(opts.prompt, /*bos=*/true, /*eos=*/false);
  if (prompt.empty()) throw_invalid("the prompt is empty and this tokenizer adds no BOS: give a prompt");
  const int64_t ctx = model.config().max_seq_len;
  if (static_cast<int64_t>(prompt.size()) > ctx)
    throw_invalid("the prompt has {} tokens, more than the model's context of {}", prompt.size(), ctx);
  const int64_t capacity = std::min<int64_t>(ctx, static_cast<int64_t>(prompt.size()) + opts.max_tokens);
  KVCache cache = model.new_cache(1, capacity);
  Sampler sampler(opts.sampler);
  GenerateStats stats;
  stats.prompt_tokens = static_cast<int>(prompt.size());

  auto ids = at::tensor(std::vector<int64_t>(prompt.begin(), prompt.end()), at::kLong).view({1, -1}).to(model.device());
  at::Tensor logits = model.forward(ids, cache);  // the prompt in one pass
  // Echo the prompt as llama2.c does: the text that follows the BOS, if the tokenizer adds one.
  for (size_t i = prompt[0] == tok.bos_id() ? 1 : 0; i < prompt.size(); ++i)
    on_piece(tok.piece(i > 0 ? prompt[i - 1] : -1, prompt[i]));
  int token = prompt.back();
  auto t0 = std::chrono::steady_clock::now();
  while (stats.generated < opts.max_tokens && cache.pos < capacity + 1) {
    // Only ids the tokenizer has: an embedding padded beyond the vocabulary (Qwen) has rows
    // for which there is no text.
    const int next = sampler.sample(logits[0][logits.size(1) - 1].narrow(0, 0, tok.vocab_size()));
    if (next == tok.bos_id() || next == tok.eos_id()) break;
    on_piece(tok.piece(token, next));
    token = next;
    ++stats.generated;
    if (cache.pos >= capacity) {
      stats.context_full = stats.generated < opts.max_tokens;
      break;
    }
    logits = model.forward(at::full({1, 1}, next, at::kLong).to(model.device()), cache);
  }
  stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return stats;
}

}  // namespace edkm
