#include "train/calibration.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include "common/error.h"

namespace edkm {

std::vector<Example> calibration_windows(const std::string& path, const Tokenizer& tok, int64_t samples,
                                         int64_t seq_len) {
  if (samples < 1) throw_invalid("calibration samples must be >= 1, got {}", samples);
  std::vector<Example> windows = load_dataset(path, tok, {seq_len, /*val_fraction=*/0.0}).train;
  if (static_cast<int64_t>(windows.size()) > samples) windows.resize(samples);
  return windows;
}

std::map<std::string, at::Tensor> fisher_diagonal(const Llama& model, const std::vector<Example>& windows,
                                                  const std::vector<std::string>& names, bool checkpoint_layers) {
  if (windows.empty()) throw_invalid("fisher_diagonal: no calibration windows");
  // Gradients go to leaf copies passed as overrides, so the model's tensors stay untouched.
  WeightOverrides leaves;
  std::map<std::string, at::Tensor> fisher;
  for (const auto& name : names) {
    const at::Tensor& w = model.weight(name);
    leaves[name] = w.detach().requires_grad_(true);
    fisher[name] = at::zeros(w.sizes(), w.options().dtype(at::kFloat));
  }
  at::AutoGradMode grad(true);
  ForwardOptions fo;
  fo.overrides = &leaves;
  fo.checkpoint_layers = checkpoint_layers;
  for (size_t s = 0; s < windows.size(); ++s) {
    const Batch b = make_batch(windows, {static_cast<int64_t>(s)}, 0);
    at::Tensor loss = next_token_loss(model.forward(b.tokens.to(model.device()), fo), b.labels.to(model.device()));
    std::vector<at::Tensor> inputs;
    for (const auto& name : names) inputs.push_back(leaves[name]);
    const auto grads = torch::autograd::grad({loss}, inputs, {}, false, false, /*allow_unused=*/true);
    for (size_t i = 0; i < names.size(); ++i)
      if (grads[i].defined()) fisher[names[i]].add_(grads[i].to(at::kFloat).square());
  }
  return fisher;
}

}  // namespace edkm
