// Weight sensitivities from calibration text, for the post-training methods that weigh weights
// by their effect on the loss.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <vector>

#include "model/llama.h"
#include "train/data.h"

namespace edkm {

// The first `samples` windows of `seq_len` tokens of a calibration text (any file
// load_dataset() reads: {"text"} documents such as C4, Alpaca, plain text), nothing held out.
std::vector<Example> calibration_windows(const std::string& path, const Tokenizer& tok, int64_t samples,
                                         int64_t seq_len);

// The diagonal of the empirical Fisher information of the next-token loss,
//   F_w = sum_s (dL_s / dw)^2,
// L_s the mean loss of calibration window s, for each weight in `names` (weight-shaped, fp32).
// SqueezeLLM (Kim et al. 2023, sec. 3.1) weighs k-means by it: to second order, the loss grows
// by sum_w F_w (w - w_q)^2 / 2 when w is rounded to w_q. The model is not modified.
std::map<std::string, at::Tensor> fisher_diagonal(const Llama& model, const std::vector<Example>& windows,
                                                  const std::vector<std::string>& names,
                                                  bool checkpoint_layers = false);

}  // namespace edkm
