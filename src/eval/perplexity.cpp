#include "eval/perplexity.h"

#include <ATen/ATen.h>

#include <cmath>

#include "common/error.h"

namespace edkm {

double PerplexityResult::perplexity() const { return std::exp(nats_per_token()); }

PerplexityResult perplexity(const Llama& model, const std::vector<int>& tokens, const PerplexityOptions& opts,
                            const std::function<void(int64_t, int64_t, double)>& progress) {
  PerplexityResult r;
  r.context = opts.context > 0 ? opts.context : model.config().max_seq_len;
  r.stride = opts.stride > 0 ? opts.stride : r.context;
  if (r.context > model.config().max_seq_len)
    throw_invalid("context {} exceeds the model's {} tokens", r.context, model.config().max_seq_len);
  if (r.context < 2) throw_invalid("context must be at least 2 tokens, got {}", r.context);
  if (r.stride > r.context) throw_invalid("stride {} exceeds context {}", r.stride, r.context);
  if (opts.batch < 1) throw_invalid("batch must be >= 1");
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n < 2) throw_invalid("need at least 2 tokens to score, got {}", n);

  // Window [begin, end) scores the tokens in [max(prev_end, begin + 1), end): the first token
  // of a window has no history in it (with disjoint windows, as in HF, it is not scored). So a
  // last window of one token (n = k * context + 1 with disjoint windows) scores nothing and is
  // left out.
  struct Window {
    int64_t begin, end, first_scored;
  };
  std::vector<Window> windows;
  int64_t prev_end = 1;  // token 0 is never a target
  for (int64_t begin = 0;; begin += r.stride) {
    const int64_t end = std::min(begin + r.context, n);
    if (end > prev_end && end - begin >= 2) windows.push_back({begin, end, prev_end});
    prev_end = end;
    if (end == n) break;
  }
  r.windows = static_cast<int64_t>(windows.size());

  at::NoGradGuard no_grad;
  at::Tensor all = at::tensor(std::vector<int64_t>(tokens.begin(), tokens.end()), at::kLong);
  size_t w = 0;
  while (w < windows.size()) {
    // One forward pass over up to `batch` windows of equal length (only the last can be shorter).
    // Inputs are tokens [begin, end - 1); position j predicts token begin + j + 1, which is
    // scored if it is at or after first_scored.
    const int64_t len = windows[w].end - windows[w].begin;
    std::vector<at::Tensor> inputs, targets;
    for (; w < windows.size() && static_cast<int64_t>(inputs.size()) < opts.batch &&
           windows[w].end - windows[w].begin == len; ++w) {
      const Window& win = windows[w];
      inputs.push_back(all.slice(0, win.begin, win.end - 1));
      at::Tensor y = all.slice(0, win.begin + 1, win.end).clone();
      y.narrow(0, 0, std::max<int64_t>(0, win.first_scored - (win.begin + 1))).fill_(kIgnoreIndex);
      targets.push_back(y);
    }
    at::Tensor logits = model.forward(at::stack(inputs).to(model.device()));
    at::Tensor y = at::stack(targets).to(model.device());
    const double nll = next_token_loss(logits, y, at::Reduction::Sum).item<double>();
    if (!std::isfinite(nll))
      throw_input("the model's log-likelihood of window {} (tokens {}..{}) is not finite: its activations overflow", w,
                  windows[w - 1].begin, windows[w - 1].end - 1);
    r.nll += nll;
    r.tokens += (y != kIgnoreIndex).sum().item<int64_t>();
    if (progress) progress(static_cast<int64_t>(w), r.windows, r.nats_per_token());
  }
  return r;
}

}  // namespace edkm
