// GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
// Transformers", ICLR 2023; the authors' gptq.py is the reference this follows step for step).
//
// For a linear layer y = W x with calibration inputs X, GPTQ minimises ||W X - Q X||^2 over Q on
// the grid, one input column at a time. With H = X X^T (the layer-wise Hessian, up to a factor
// 2), quantizing column i to q leaves the error e = (w_i - q) / [H^-1]_ii, and the optimal update
// of the columns not yet quantized is W_:,j -= e [H^-1]_ij (the OBS update, eq. 2 of the paper,
// restricted to a fixed column order so that H^-1 is shared by every row). The successive
// H^-1 of the remaining columns are the rows of the upper Cholesky factor of H^-1 (eq. 4), so one
// factorisation serves the whole matrix; updates within a block of 128 columns are applied at
// once to the columns after it ("lazy batch" updates, sec. 4 step 2).
#include <ATen/ATen.h>

#include "cluster/cluster.h"
#include "cluster/layout.h"
#include "cluster/uniform_grid.h"
#include "common/error.h"

namespace edkm {

void GPTQConfig::validate() const {
  if (bits < 1 || bits > 8) throw_invalid("GPTQ bits must be in 1..8, got {}", bits);
  if (group_size < 0) throw_invalid("GPTQ group_size must be >= 0, got {}", group_size);
  if (block_size < 1) throw_invalid("GPTQ block_size must be >= 1, got {}", block_size);
  if (!(damp > 0) || damp > 1) throw_invalid("GPTQ damp must be in (0, 1], got {}", damp);
}

at::Tensor gptq_quantize(const at::Tensor& weight, const at::Tensor& hessian, const GPTQConfig& cfg) {
  cfg.validate();
  if (!weight.defined() || weight.dim() != 2 || weight.numel() == 0)
    throw_invalid("GPTQ: expected a non-empty [rows, cols] weight, got {}", weight.defined() ? c10::str(weight.sizes()) : "none");
  const int64_t cols = weight.size(1);
  if (!hessian.defined() || hessian.dim() != 2 || hessian.size(0) != cols || hessian.size(1) != cols)
    throw_invalid("GPTQ: the Hessian must be [{}, {}] for a weight of {} columns, got {}", cols, cols, cols,
                  hessian.defined() ? c10::str(hessian.sizes()) : "none");
  detail::check_finite(weight, "weight");
  detail::check_finite(hessian, "Hessian");
  at::NoGradGuard no_grad;
  at::Tensor W = weight.detach().to(at::kFloat).clone();
  at::Tensor H = hessian.detach().to(at::kFloat).clone();

  // Inputs that were always zero carry no information: their weights are set to 0 and their
  // diagonal to 1 so that H stays invertible.
  at::Tensor dead = H.diagonal() == 0;
  H.diagonal().masked_fill_(dead, 1);
  W.masked_fill_(dead.unsqueeze(0), 0);
  // Dampening by a fraction of the mean diagonal keeps the factorisation stable.
  H.diagonal().add_(cfg.damp * H.diagonal().mean().item<double>());
  at::Tensor L = at::linalg_cholesky(H);
  at::Tensor Hinv = at::linalg_cholesky(at::cholesky_inverse(L), /*upper=*/true);

  at::Tensor Q = at::zeros_like(W);
  detail::UniformGrid grid;
  if (cfg.group_size == 0) grid = detail::UniformGrid::fit(W, cfg.bits, cfg.symmetric);
  for (int64_t i1 = 0; i1 < cols; i1 += cfg.block_size) {
    const int64_t count = std::min(cfg.block_size, cols - i1);
    at::Tensor W1 = W.narrow(1, i1, count).clone();
    at::Tensor Err1 = at::zeros_like(W1);
    at::Tensor Hinv1 = Hinv.narrow(0, i1, count).narrow(1, i1, count);
    for (int64_t i = 0; i < count; ++i) {
      // A group's grid is fitted to its columns when its first column is reached, with the
      // updates of the blocks before (as the reference does; when the group size divides the
      // block size, the group's columns have also received every update of this block).
      if (cfg.group_size > 0 && (i1 + i) % cfg.group_size == 0) {
        const int64_t g = std::min(cfg.group_size, cols - (i1 + i));
        grid = detail::UniformGrid::fit(W.narrow(1, i1 + i, g), cfg.bits, cfg.symmetric);
      }
      at::Tensor w = W1.select(1, i);
      at::Tensor q = grid.apply(w.unsqueeze(1)).squeeze(1);
      Q.select(1, i1 + i).copy_(q);
      at::Tensor err = (w - q) / Hinv1[i][i];
      W1.narrow(1, i, count - i).sub_(at::outer(err, Hinv1[i].narrow(0, i, count - i)));
      Err1.select(1, i).copy_(err);
    }
    if (i1 + count < cols)
      W.narrow(1, i1 + count, cols - i1 - count).sub_(at::matmul(Err1, Hinv.narrow(0, i1, count).narrow(1, i1 + count, cols - i1 - count)));
  }
  return Q.to(weight.scalar_type());
}

}  // namespace edkm
