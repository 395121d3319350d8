// The fine-tuning loop: AdamW with warm-up and cosine decay, gradient accumulation, gradient
// clipping, periodic validation, atomic checkpoints and exact resume. With a Clustering, every
// optimizer step runs DKM once on each clustered weight and the forward pass uses the
// soft-clustered weights; without one it is plain fine-tuning (the memory baseline).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "dist/dist.h"
#include "model/llama.h"
#include "train/clustering.h"
#include "train/data.h"

namespace edkm {

struct TrainOptions {
  int64_t steps = 0;          // optimizer steps; 0: one epoch
  int64_t batch = 8;          // examples per micro-batch
  int64_t grad_accum = 1;     // micro-batches per optimizer step
  double lr = 3e-4;
  double min_lr_ratio = 0.1;  // cosine decays to lr * min_lr_ratio
  int64_t warmup = 0;         // linear warm-up steps
  double weight_decay = 0.0;  // AdamW, matrices only (not norms)
  double beta1 = 0.9, beta2 = 0.95, adam_eps = 1e-8;
  double grad_clip = 1.0;     // max global gradient norm; 0: off
  int64_t eval_every = 0;     // validation every N steps (0: at the start and the end only)
  int64_t eval_batch = 16;
  int64_t checkpoint_every = 0;
  std::string checkpoint_path;  // "" = no checkpoints
  bool resume = false;          // continue from checkpoint_path
  bool overwrite = false;       // compress(): start again although checkpoint_path exists
  uint64_t seed = 0;            // data order
  bool checkpoint_layers = false;
  bool quiet = false;
  std::string metrics_path;     // JSONL, one line per step ("" = none)
  std::function<bool()> should_stop;  // polled after each step; true: checkpoint and return
  // Data-parallel learners (null: one). Each step's global batch is batch x grad_accum x world
  // examples; learner r computes micro-batches r * grad_accum .. (r + 1) * grad_accum - 1 of it,
  // gradients are summed over learners before DKM's backward (so that L learners with
  // batch B/L match one learner accumulating L micro-batches of B/L, bit for bit for L = 2),
  // and only learner 0 writes checkpoints and metrics.
  std::shared_ptr<Dist> dist;
  // Knowledge distillation (Hinton et al. 2015): with a teacher, each loss token's loss is
  //   distill_alpha * T^2 KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - distill_alpha) * CE,
  // z_t the teacher's logits (computed without gradients), z_s the student's, T the
  // temperature (the T^2 keeps the gradient's scale independent of T). Training losses are this
  // objective; validation losses stay the cross-entropy.
  std::shared_ptr<const Llama> teacher;
  double distill_temperature = 1.0;
  double distill_alpha = 1.0;
  // Mixed precision on a GPU (PyTorch's torch.autocast): the forward and backward run their
  // matrix products in this dtype (bf16, fp16) while the weights, their gradients and AdamW's
  // state stay in the model's dtype (fp32 master weights). Undefined, or a CPU model: off.
  at::ScalarType autocast = at::ScalarType::Undefined;
};

struct TrainReport {
  int64_t start_step = 0, steps_done = 0, total_steps = 0;
  int64_t tokens = 0;          // loss tokens processed in this run
  double seconds = 0;
  double val_loss_start = 0, val_loss_end = 0;  // of the model as trained (soft weights under DKM)
  std::vector<double> losses;  // training loss per step of this run
  bool interrupted = false;
  int64_t peak_rss = 0;
};

TrainReport train(Llama& model, Clustering* clustering, const Dataset& data, const TrainOptions& opts);

// A distillation teacher: the model's weights copied in `dtype` (copies of their own, since
// training updates the student's tensors in place).
std::shared_ptr<const Llama> frozen_teacher(const Llama& model, at::ScalarType dtype);

// Mean loss per loss token over `examples`, with `overrides` and the weights of `source` in the
// forward pass.
double evaluate(const Llama& model, const WeightOverrides* overrides, const std::vector<Example>& examples,
                int64_t batch, int pad_id, const WeightSource* source = nullptr);

// The learning rate of step `step` (0-based) of `total`.
double learning_rate(const TrainOptions& o, int64_t step, int64_t total);

}  // namespace edkm
