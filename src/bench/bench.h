// bench: side-by-side measurements behind `edkm bench ...` and the Google Benchmark targets.
#pragma once

#include <ATen/core/Tensor.h>
#include <nlohmann/json_fwd.hpp>

#include <functional>
#include <string>
#include <vector>

#include "pipeline/compress.h"

namespace edkm::bench {

// Seconds of the fastest of `reps` runs of f, after one warm-up run.
double best_seconds(const std::function<void()>& f, int reps);
// Waits until the work queued on `device` is done (nothing to wait for on the CPU), so that a
// clock read after it times that work.
void synchronize(const at::Device& device);

// The seven projection weights of one LLaMA-7B decoder layer (q, k, v, o: 4096 x 4096; gate,
// up: 11008 x 4096; down: 4096 x 11008), entries N(0, 0.02), in `dtype`. `scale` < 1 shrinks
// every output dimension (for quick runs); 1 is the real layer.
std::vector<at::Tensor> llama7b_layer(at::ScalarType dtype, double scale = 1.0, uint64_t seed = 0);

struct DKMBenchOptions {
  // The layer's dtype: bf16 (the benchmark), or fp32 as the master weights of training,
  // which DKM rounds to its bf16 cluster dtype.
  at::ScalarType weight_dtype = at::kBFloat16;
  int bits = 3;
  int reps = 3;
  double layer_scale = 1.0;   // 1 = the real LLaMA-7B layer
  int64_t dense_slice = int64_t(1) << 22;  // weights the dense method is run on
  // Where the layer lives: the CPU, or a GPU (extra memory then from the CUDA caching
  // allocator's count of allocated bytes).
  at::Device device = at::kCPU;
};

struct DKMBenchRow {
  std::string method;       // floor | unique | auto | dense
  std::string scope;        // "layer" or "slice"
  bool extrapolated = false;
  int64_t weights = 0;
  double seconds = 0;       // forward + backward
  int64_t saved_bytes = 0;  // held between forward and backward, beyond the output
  int64_t extra_bytes = 0;  // peak during forward + backward beyond inputs, outputs, gradients
};

// One pass of the unique method on one matrix (src/cluster/value_index.h, uspace.h).
struct DKMPassRow {
  std::string matrix;  // "q_proj" (4096 x 4096) or "gate_proj" (11008 x 4096), at layer_scale
  std::string pass;    // index | uspace_forward | emit | gradient_sum | uspace_backward | gradient, and
                       // on a GPU "index, warp atomics" | "gradient_sum, warp atomics"
  double seconds = 0;  // best of reps
};

struct DKMBenchResult {
  DKMBenchOptions options;
  int threads = 0;
  std::vector<DKMBenchRow> rows;
  std::vector<DKMPassRow> passes;
  // dense / unique time on the same slice, dense / unique extra memory for the layer
  // (dense extrapolated), unique / floor time on the layer.
  double speedup_vs_dense = 0, memory_ratio = 0, vs_floor = 0;
};

DKMBenchResult run_dkm_bench(const DKMBenchOptions& opts);
std::string format_table(const DKMBenchResult& r);
nlohmann::json to_json(const DKMBenchResult& r);

// `edkm bench model`: training forward + backward throughput, fp32 beside bf16.
struct ModelBenchOptions {
  int reps = 3;
  std::string stories260k;  // path to stories260K.bin ("" = skip that row)
};

struct ModelBenchRow {
  std::string model;   // "4-layer dim-512 (random)" or "stories260K"
  std::string dtype;
  int64_t batch = 0, seq = 0;
  double seconds = 0;  // one forward + backward
  double tokens_per_second() const { return batch * seq / seconds; }
};

struct ModelBenchResult {
  int threads = 0;
  int reps = 0;
  std::vector<ModelBenchRow> rows;
};

ModelBenchResult run_model_bench(const ModelBenchOptions& opts);
std::string format_table(const ModelBenchResult& r);
nlohmann::json to_json(const ModelBenchResult& r);

// `edkm bench compress`: held-out perplexity of the compression methods at several bit widths,
// on the same data with the same fine-tuning budget, and the peak memory and step time of DKM
// fine-tuning, with and without distillation, beside plain fine-tuning.
struct CompressBenchOptions {
  std::string model;           // default: stories260K
  std::string data;            // default: TinyStories val_a.txt
  std::vector<int> bits{3, 2};
  int64_t rtn_group = 64;      // RTN: asymmetric, one scale and zero per 64 weights of a row
  int64_t memory_steps = 6;    // steps of the memory comparison (4-layer dim-512 model)
};

struct CompressBenchRow {
  std::string method;
  int bits = 0;                // 0: full precision
  double bits_per_weight = 0;  // of the projections, palettes / scales / zeros included
  double val_loss = 0;
  double perplexity() const;
};

struct MemoryRow {
  std::string model, mode;     // mode: "fine-tune" or "DKM b-bit"
  int64_t peak_tensor_bytes = 0, peak_rss = 0;
  double seconds_per_step = 0;
};

struct CompressBenchResult {
  int threads = 0;
  int64_t train_tokens = 0, val_tokens = 0, steps = 0;
  std::vector<CompressBenchRow> rows;
  std::vector<MemoryRow> memory;
  std::string markdown() const;
};

CompressBenchResult run_compress_bench(const CompressBenchOptions& opts, const CompressOptions& train_opts);
nlohmann::json to_json(const CompressBenchResult& r);

// `edkm bench step`: one fine-tuning step of a LLaMA-7B-shaped model with random weights (fp32
// master weights, AdamW, gradient checkpointing; bf16 autocast on a GPU) with DKM on every
// projection, beside the same step without DKM and with the train-time baselines (hard k-means,
// QAT) in its place: peak tensor memory and step time.
struct StepBenchOptions {
  // LLaMA-7B: dim 4096, SwiGLU 11008, 32 heads, vocabulary 32000, 32 layers (fewer fit a
  // smaller memory: the per-layer cost is the same).
  int64_t layers = 32, dim = 4096, hidden = 11008, heads = 32, vocab = 32000;
  int64_t seq_len = 2048, batch = 1;
  int bits = 3;
  int steps = 2;  // timed steps (their mean is reported), after one untimed step
  at::Device device = at::kCPU;
};
struct StepBenchRow {
  std::string mode;               // "fine-tune", "DKM b-bit", "hard k-means b-bit" or "QAT b-bit"
  int64_t peak_tensor_bytes = 0;  // the device's peak of bytes held by tensors, model included
  double seconds_per_step = 0;
  double memory_over_finetune = 0, time_over_finetune = 0;  // this row / the fine-tune row
  // The clustered modes' own work per step, each part timed alone after the timed steps, on the
  // trained weights (mean of `steps`): before the forward (DKM's iterations, hard k-means'
  // Lloyd step), in the layers (every clustered weight made twice, in the forward and in the
  // checkpointed recomputation) and after the backward (DKM's backward, QAT's straight-through).
  double before_forward_seconds = 0, in_layers_seconds = 0, after_backward_seconds = 0;
};
struct StepBenchResult {
  StepBenchOptions options;
  int64_t parameters = 0;
  std::vector<StepBenchRow> rows;  // fine-tune, DKM, hard k-means, QAT
};
StepBenchResult run_step_bench(const StepBenchOptions& opts);
std::string format_table(const StepBenchResult& r);
nlohmann::json to_json(const StepBenchResult& r);

// `edkm bench threads`: 1 thread, every core (the old default) and the default (the cores idle
// at start, common/threads.h) side by side, idle and with a busy process on one core, for
// decoding, perplexity and a training step of stories260K.
struct ThreadsBenchOptions {
  std::string model;               // stories260K.bin
  std::string text;                // perplexity text (TinyStories val_a.txt)
  int64_t text_bytes = 20000;
  int decode_tokens = 200;
  int64_t train_seq = 256;  // the training step's sequence length (batch 8)
  int reps = 3;
};
struct ThreadsBenchRow {
  std::string workload, machine, setting;  // machine: "idle" or "one core busy"
  int threads = 0;
  double seconds = 0;        // best of the rounds
  double vs_one_thread = 0;  // seconds / the 1-thread seconds (> 1: slower)
};
struct ThreadsBenchResult {
  int usable_cores = 0;
  int64_t perplexity_tokens = 0;
  std::vector<ThreadsBenchRow> rows;
  std::string table() const;
};
ThreadsBenchResult run_threads_bench(const ThreadsBenchOptions& opts);
nlohmann::json to_json(const ThreadsBenchResult& r);

// `edkm bench lut`: matrix-vector products from packed palettes beside libtorch's dense
// products (fp32, bf16), on one 4096 x 11008 matrix and when decoding with a 4-layer dim-2048
// model: time and bytes read per product / token.
struct LutBenchRow {
  std::string workload;  // "matvec 4096x11008" or "decode 4-layer dim-2048"
  std::string storage;   // "fp32", "bf16", "3-bit LUT", "4-bit LUT"
  double seconds = 0;    // per matvec / per token
  int64_t bytes = 0;     // weight bytes read per matvec / per token
};
struct LutBenchResult {
  int threads = 0;
  std::vector<LutBenchRow> rows;
  std::string table() const;
};
LutBenchResult run_lut_bench(int reps, int decode_tokens);
nlohmann::json to_json(const LutBenchResult& r);

// `edkm bench memory`: what DKM keeps for backward on one LLaMA-7B decoder layer (bf16 weights),
// for the dense formulation plain, with eDKM's marshaling (M), uniquification (U) and sharding
// over L learner processes (S), and for the unique-value method.
struct MemoryBenchOptions {
  int bits = 3;
  int64_t slice = int64_t(1) << 21;  // weights of q_proj the dense configurations run on
  std::vector<int> learners{2, 4};
};

struct MemoryBenchRow {
  std::string config;
  int learners = 1;
  bool extrapolated = false;
  double seconds = 0;      // forward + backward, the layer
  int64_t device_bytes = 0, host_bytes = 0;  // saved for backward, per learner
  int64_t total() const { return device_bytes + host_bytes; }
};

struct MemoryBenchResult {
  int threads = 0;
  int64_t layer_weights = 0, slice = 0;
  std::vector<MemoryBenchRow> rows;
  std::string table() const;
};

MemoryBenchResult run_memory_bench(const MemoryBenchOptions& opts);
// One learner's share of the sharded configuration (run by the learner processes): the row,
// for the slice, measured with the default process group.
MemoryBenchRow run_memory_learner(const MemoryBenchOptions& opts);
nlohmann::json to_json(const MemoryBenchRow& r);
MemoryBenchRow row_from_json(const nlohmann::json& j);
nlohmann::json to_json(const MemoryBenchResult& r);

// `edkm bench tokenizer`: encode tokens/s of each tokenizer on one text (one thread).
struct TokenizerBenchOptions {
  std::vector<std::string> tokenizers;  // tokenizer files
  std::string text;
  int reps = 3;
};
struct TokenizerBenchRow {
  std::string tokenizer;
  int64_t tokens = 0;
  double seconds = 0;  // best of the rounds
};
struct TokenizerBenchResult {
  std::string text;
  int64_t bytes = 0;
  std::vector<TokenizerBenchRow> rows;
  std::string table() const;
};
TokenizerBenchResult run_tokenizer_bench(const TokenizerBenchOptions& opts);
nlohmann::json to_json(const TokenizerBenchResult& r);

}  // namespace edkm::bench
