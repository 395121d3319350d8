#include "train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>
#include <torch/version.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>
#include <string_view>

#include "common/atomic_file.h"
#include "common/checksum.h"
#include "common/error.h"
#include "common/mapped_file.h"
#include "common/memory.h"
#include "common/progress.h"

namespace edkm {
namespace {

bool is_matrix(const std::string& name, const at::Tensor& t) { return t.dim() == 2; }

// Turns CUDA autocast on in `dtype` for its lifetime (TrainOptions::autocast), restoring the
// previous state after. libtorch 2 renamed the calls and keyed them by device type.
class AutocastGuard {
 public:
  AutocastGuard(at::ScalarType dtype, const at::Device& device)
      : on_(dtype != at::ScalarType::Undefined && device.is_cuda()) {
    if (!on_) return;
#if TORCH_VERSION_MAJOR >= 2
    was_enabled_ = at::autocast::is_autocast_enabled(at::kCUDA);
    was_dtype_ = at::autocast::get_autocast_dtype(at::kCUDA);
    at::autocast::set_autocast_dtype(at::kCUDA, dtype);
    at::autocast::set_autocast_enabled(at::kCUDA, true);
#else
    was_enabled_ = at::autocast::is_enabled();
    was_dtype_ = at::autocast::get_autocast_gpu_dtype();
    at::autocast::set_autocast_gpu_dtype(dtype);
    at::autocast::set_enabled(true);
#endif
  }
  ~AutocastGuard() {
    if (!on_) return;
#if TORCH_VERSION_MAJOR >= 2
    at::autocast::set_autocast_enabled(at::kCUDA, was_enabled_);
    at::autocast::set_autocast_dtype(at::kCUDA, was_dtype_);
#else
    at::autocast::set_enabled(was_enabled_);
    at::autocast::set_autocast_gpu_dtype(was_dtype_);
#endif
    at::autocast::clear_cache();  // the casts of this step's weights
  }
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool on_;
  bool was_enabled_ = false;
  at::ScalarType was_dtype_ = at::kFloat;
};

// What determines the trajectory of a run: resuming with anything else would not reproduce it.
nlohmann::json fingerprint(const TrainOptions& o, const Dataset& data, const Clustering* c, int64_t total) {
  nlohmann::json clustered = nlohmann::json::object();
  if (c)
    for (const auto& w : c->weights()) clustered[w.name] = dkm_to_json(w.cfg);
  nlohmann::json fp = {{"steps", total},
                       {"batch", o.batch},
                       {"grad_accum", o.grad_accum},
                       {"lr", o.lr},
                       {"min_lr_ratio", o.min_lr_ratio},
                       {"warmup", o.warmup},
                       {"weight_decay", o.weight_decay},
                       {"betas", {o.beta1, o.beta2}},
                       {"adam_eps", o.adam_eps},
                       {"grad_clip", o.grad_clip},
                       {"seed", o.seed},
                       {"data", data.digest},
                       {"train_examples", data.train.size()},
                       {"clustered", clustered}};
  if (o.teacher) fp["distill"] = {{"temperature", o.distill_temperature}, {"alpha", o.distill_alpha}};
  if (c && c->method() != TrainMethod::kDKM) fp["method"] = to_string(c->method());
  if (c && c->weighted_updates()) fp["weighted_updates"] = true;
  if (o.autocast != at::ScalarType::Undefined) fp["autocast"] = c10::toString(o.autocast);
  return fp;
}

// The settings in which two fingerprints differ, as "path: saved -> now", values cut to 60
// characters (a clustering plan holds a line per weight).
void settings_diff(const nlohmann::json& saved, const nlohmann::json& now, const std::string& path,
                   std::vector<std::string>& out) {
  if (saved.is_object() && now.is_object()) {
    std::set<std::string> keys;
    for (auto it = saved.begin(); it != saved.end(); ++it) keys.insert(it.key());
    for (auto it = now.begin(); it != now.end(); ++it) keys.insert(it.key());
    for (const auto& k : keys)
      settings_diff(saved.value(k, nlohmann::json()), now.value(k, nlohmann::json()), path.empty() ? k : path + "." + k, out);
    return;
  }
  if (saved == now) return;
  auto brief = [](const nlohmann::json& j) {
    std::string s = j.is_null() ? "(none)" : j.dump();
    return s.size() > 60 ? s.substr(0, 57) + "..." : s;
  };
  if (path == "data")
    out.push_back("data: a file with other contents (the same file under another path is the same data)");
  else
    out.push_back(fmt::format("{}: {} -> {}", path, brief(saved), brief(now)));
}

// Checkpoint: every weight (in canonical order), every palette and scale, the optimizer state,
// the step and the fingerprint, written atomically. Archive keys cannot contain dots, so
// tensors are numbered. After the archive come 16 bytes: kCheckpointMagic and the XXH3-64
// digest of the archive (little-endian), verified before anything is read back.
constexpr char kCheckpointMagic[8] = {'E', 'D', 'K', 'M', 'X', 'X', 'H', '3'};
void save_checkpoint(const std::string& path, const Llama& model, const Clustering* c,
                     torch::optim::Optimizer& opt, int64_t step, const nlohmann::json& fp) {
  torch::serialize::OutputArchive ar;
  ar.write("step", c10::IValue(step));
  ar.write("fingerprint", c10::IValue(fp.dump()));
  int64_t i = 0;
  for (const auto& [name, shape] : tensor_shapes(model.config())) ar.write(fmt::format("weight_{}", i++), model.weight(name).detach());
  if (c) {
    for (size_t j = 0; j < c->weights().size(); ++j) {
      ar.write(fmt::format("palette_{}", j), c->weights()[j].palette);
      if (c->weights()[j].scale.defined()) ar.write(fmt::format("scale_{}", j), c->weights()[j].scale);
      if (c->weights()[j].grid.scale.defined()) {
        ar.write(fmt::format("grid_scale_{}", j), c->weights()[j].grid.scale.detach());
        ar.write(fmt::format("grid_zero_{}", j), c->weights()[j].grid.zero.detach());
      }
    }
  }
  torch::serialize::OutputArchive optimizer;
  opt.save(optimizer);
  ar.write("optimizer", optimizer);
  AtomicFile out(path);
  Checksum sum;
  ar.save_to([&](const void* data, size_t n) {
    out.write(data, n);
    sum.update(data, n);
    return n;
  });
  const uint64_t digest = sum.digest();
  unsigned char trailer[16];
  std::memcpy(trailer, kCheckpointMagic, 8);
  for (int i = 0; i < 8; ++i) trailer[8 + i] = static_cast<unsigned char>(digest >> (8 * i));
  out.write(trailer, sizeof trailer);
  out.commit();
}

int64_t load_checkpoint(const std::string& path, Llama& model, Clustering* c, torch::optim::Optimizer& opt,
                        const nlohmann::json& fp) {
  if (!std::filesystem::exists(path)) throw_input("{}: no checkpoint to resume from", path);
  // Mapped rather than read: a checkpoint with optimizer state is several times the model.
  const MappedFile file(path);
  const std::string_view bytes = file.bytes();
  if (bytes.size() < 16 || std::memcmp(bytes.data() + bytes.size() - 16, kCheckpointMagic, 8) != 0)
    throw_input("{}: not an edkm checkpoint with a checksum (checkpoints written before edkm recorded "
                "checksums cannot be resumed); start again with --overwrite", path);
  const size_t size = bytes.size() - 16;
  if (verify_checksums()) {
    uint64_t recorded = 0;
    for (int i = 0; i < 8; ++i) recorded |= uint64_t(static_cast<unsigned char>(bytes[size + 8 + i])) << (8 * i);
    Checksum sum;
    sum.update(bytes.data(), size);
    if (sum.digest() != recorded)
      throw_input("{}: checksum mismatch: the checkpoint records {}, its contents give {}; it is damaged (start "
                  "again with --overwrite, or pass --no-verify to resume from it anyway)", path,
                  Checksum::format(recorded), Checksum::format(sum.digest()));
  }
  torch::serialize::InputArchive ar;
  try {
    ar.load_from(bytes.data(), size);
  } catch (const c10::Error& e) {
    throw_input("{}: not a readable edkm checkpoint: {}", path, e.what_without_backtrace());
  }
  c10::IValue v;
  ar.read("fingerprint", v);
  const nlohmann::json saved = nlohmann::json::parse(v.toStringRef());
  std::vector<std::string> diffs;
  settings_diff(saved, fp, "", diffs);
  if (!diffs.empty()) {
    std::string list;
    for (size_t i = 0; i < std::min<size_t>(diffs.size(), 5); ++i) list += "\n  " + diffs[i];
    if (diffs.size() > 5) list += fmt::format("\n  ... and {} more", diffs.size() - 5);
    throw_input("{}: this run's settings differ from the checkpoint's (checkpoint -> now):{}\nresume with the same "
                "settings, or start again with --overwrite", path, list);
  }
  at::NoGradGuard no_grad;
  int64_t i = 0;
  for (const auto& [name, shape] : tensor_shapes(model.config())) {
    at::Tensor t;
    ar.read(fmt::format("weight_{}", i++), t);
    model.weights()[name].copy_(t);
  }
  if (c) {
    for (size_t j = 0; j < c->weights().size(); ++j) {
      ar.read(fmt::format("palette_{}", j), c->weights()[j].palette);
      if (c->weights()[j].scale.defined()) ar.read(fmt::format("scale_{}", j), c->weights()[j].scale);
      // The optimizer holds the grid tensors themselves: their values are copied in.
      LearnedGrid& grid = c->weights()[j].grid;
      if (grid.scale.defined()) {
        at::Tensor t;
        ar.read(fmt::format("grid_scale_{}", j), t);
        grid.scale.copy_(t);
        ar.read(fmt::format("grid_zero_{}", j), t);
        grid.zero.copy_(t);
      }
    }
  }
  torch::serialize::InputArchive optimizer;
  ar.read("optimizer", optimizer);
  opt.load(optimizer);
  ar.read("step", v);
  return v.toInt();
}

// After a resume from step `step`, the metrics file keeps only the lines of steps up to it:
// the steps after the checkpoint are run again and would otherwise appear twice.
void keep_metrics_until(const std::string& path, int64_t step) {
  if (!std::filesystem::exists(path)) return;
  std::istringstream in(read_file(path));
  std::string kept;
  for (std::string line; std::getline(in, line);) {
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("step") && j["step"].is_number_integer() && j["step"].get<int64_t>() <= step)
      kept += line + "\n";
  }
  write_file_atomic(path, kept);
}

// The first weight (or soft-clustered weight) that holds NaN or Inf, as "weight 'X' holds NaN or
// Inf"; "" when all are finite.
std::string non_finite_weight(const Llama& model, const StepWeights* made) {
  at::NoGradGuard no_grad;
  auto bad = [](const at::Tensor& t) { return !at::isfinite(t.detach()).all().item<bool>(); };
  for (const auto& [name, shape] : tensor_shapes(model.config())) {
    const at::Tensor& w = model.weight(name);
    if (bad(w)) return fmt::format("weight '{}' holds NaN or Inf", name);
    if (made && made->provides(name) && bad(made->weight(name, w)))
      return fmt::format("the clustered weight '{}' holds NaN or Inf", name);
  }
  return "";
}

// Training diverged at `step`: says what went non-finite and what to change.
[[noreturn]] void throw_diverged(int64_t step, const std::string& what) {
  throw_input("training step {}: {}; lower --lr, or keep --grad-clip on", step, what);
}

}  // namespace

double learning_rate(const TrainOptions& o, int64_t step, int64_t total) {
  if (step < o.warmup) return o.lr * double(step + 1) / double(o.warmup);
  const double span = std::max<int64_t>(1, total - o.warmup);
  const double progress = std::min(1.0, double(step - o.warmup) / span);
  const double min_lr = o.lr * o.min_lr_ratio;
  return min_lr + 0.5 * (o.lr - min_lr) * (1 + std::cos(M_PI * progress));
}

double evaluate(const Llama& model, const WeightOverrides* overrides, const std::vector<Example>& examples,
                int64_t batch, int pad_id, const WeightSource* source) {
  if (examples.empty()) return 0;
  at::NoGradGuard no_grad;
  double nll = 0;
  int64_t n = 0;
  for (size_t i = 0; i < examples.size(); i += batch) {
    std::vector<int64_t> idx;
    for (size_t j = i; j < std::min(examples.size(), i + batch); ++j) idx.push_back(static_cast<int64_t>(j));
    Batch b = make_batch(examples, idx, pad_id);
    ForwardOptions fo;
    fo.overrides = overrides;
    fo.source = source;
    at::Tensor logits = model.forward(b.tokens.to(model.device()), fo);
    nll += next_token_loss(logits, b.labels.to(model.device()), at::Reduction::Sum)
               .item<double>();
    n += b.loss_tokens;
  }
  return nll / std::max<int64_t>(1, n);
}

namespace {

// One run of train(): the state that lives across steps, and each part of a step as a method
// of its own. A step (train() below) is
//   micro_batches    this learner's examples of the step, and the step's loss-token count
//   dkm_forward      DKM's iterations, once per step (StepWeights); each layer makes its
//                    soft-clustered weights w~ from them when the forward needs them
//   accumulate       forward and backward of each micro-batch; dL/dw~ accumulates in w's .grad
//   reduce           gradients (and the loss) summed over the data-parallel learners
//   backward         each clustered weight's summed dL/dw~ carried through DKM to dL/dw
//   optimizer_step   gradient clipping and the AdamW update
//   log              the metrics line, validation when due, the progress bar
//   checkpoint       when due or when asked to stop
class TrainingRun {
 public:
  TrainingRun(Llama& model, Clustering* clustering, const Dataset& data, const TrainOptions& o)
      : model_(model), clustering_(clustering), data_(data), o_(o),
        n_(static_cast<int64_t>(data.train.size())),
        world_(o.dist ? o.dist->world() : 1), rank_(o.dist ? o.dist->rank() : 0),
        per_step_(o.batch * o.grad_accum * world_), pad_(static_cast<int>(model.config().eos_id)),
        optimizer_(make_optimizer()) {
    rep_.total_steps = o.steps > 0 ? o.steps : (n_ + per_step_ - 1) / per_step_;
    fingerprint_ = fingerprint(o, data, clustering, rep_.total_steps);
    fingerprint_["learners"] = world_;
    if (o.resume) rep_.start_step = load_checkpoint(o.checkpoint_path, model, clustering, *optimizer_, fingerprint_);
    if (!o.metrics_path.empty() && main()) {
      if (rep_.start_step > 0) keep_metrics_until(o.metrics_path, rep_.start_step);
      metrics_.open(o.metrics_path, rep_.start_step > 0 ? std::ios::app : std::ios::trunc);
      if (!metrics_) throw_input("{}: cannot write the metrics file", o.metrics_path);
    }
  }

  bool main() const { return rank_ == 0; }
  TrainReport& report() { return rep_; }

  // Validation loss of the model as trained (soft-clustered weights under DKM).
  double val_loss() {
    at::NoGradGuard no_grad;
    std::optional<StepWeights> made;
    if (clustering_) made = clustering_->step(model_, /*advance=*/false);
    return evaluate(model_, nullptr, data_.val, o_.eval_batch, pad_, made ? &*made : nullptr);
  }

  double set_learning_rate(int64_t step) {
    const double lr = learning_rate(o_, step, rep_.total_steps);
    for (auto& g : optimizer_->param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
    return lr;
  }

  struct StepData {
    std::vector<Batch> batches;  // this learner's micro-batches
    int64_t loss_tokens = 0;     // of the whole step, over all learners: the loss's normaliser
  };

  // This step's examples: positions [step * per_step, (step + 1) * per_step) of the sequence of
  // epochs, each epoch in its own seeded order; this learner's micro-batches are
  // rank * grad_accum .. of them. Every learner counts the whole step's loss tokens from the
  // data it holds.
  StepData micro_batches(int64_t step) {
    StepData d;
    for (int64_t j = 0; j < per_step_; ++j)
      for (int v : data_.train[example(step * per_step_ + j)].labels) d.loss_tokens += v != kIgnoreIndex;
    for (int64_t m = 0; m < o_.grad_accum; ++m) {
      std::vector<int64_t> idx;
      for (int64_t k = 0; k < o_.batch; ++k)
        idx.push_back(example(step * per_step_ + (rank_ * o_.grad_accum + m) * o_.batch + k));
      d.batches.push_back(make_batch(data_.train, idx, pad_));
    }
    return d;
  }

  // The soft weights' dtype: under autocast, the autocast dtype, the only one the forward
  // reads them in (their gradients are summed in the weights' own .grad, in its dtype).
  at::ScalarType soft_dtype() const {
    const bool autocast = o_.autocast != at::ScalarType::Undefined && model_.device().is_cuda();
    return autocast ? o_.autocast : at::ScalarType::Undefined;
  }

  // DKM once per step; the layers make their soft weights from it (StepWeights).
  std::optional<StepWeights> dkm_forward(int64_t step) {
    if (!clustering_) return std::nullopt;
    try {
      return clustering_->step(model_, /*advance=*/true, soft_dtype());
    } catch (const std::invalid_argument&) {
      // DKM refuses non-finite weights: the previous step's update made them so.
      const std::string weight = non_finite_weight(model_, nullptr);
      if (!weight.empty()) throw_diverged(step + 1, weight + " after the previous step's update");
      throw;
    }
  }

  // Forward and backward of every micro-batch; returns the summed loss (nats).
  double accumulate(const StepData& d, const std::optional<StepWeights>& made, int64_t step) {
    double loss_sum = 0;
    // One autocast scope for the step's micro-batches, so that its cast weights serve them all;
    // the backward stays under it too: checkpointed layers recompute their forward in it.
    const AutocastGuard autocast(o_.autocast, model_.device());
    for (const Batch& b : d.batches) {
      ForwardOptions fo;
      fo.source = made ? &*made : nullptr;
      fo.checkpoint_layers = o_.checkpoint_layers;
      at::Tensor logits = model_.forward(b.tokens.to(model_.device()), fo);
      at::Tensor labels = b.labels.to(model_.device());
      at::Tensor loss = next_token_loss(logits, labels, at::Reduction::Sum);
      if (o_.teacher) {
        at::Tensor teacher;
        {
          at::NoGradGuard no_grad;
          teacher = o_.teacher->forward(b.tokens.to(o_.teacher->device()));
        }
        at::Tensor kd = distillation_loss(logits, teacher.to(logits.device()), labels, o_.distill_temperature, at::Reduction::Sum);
        loss = o_.distill_alpha == 1 ? kd : o_.distill_alpha * kd + (1 - o_.distill_alpha) * loss;
      }
      const double loss_value = loss.item<double>();
      if (!std::isfinite(loss_value)) {
        const std::string weight = non_finite_weight(model_, made ? &*made : nullptr);
        throw_diverged(step + 1, fmt::format("the loss is {} ({})", loss_value,
                                             weight.empty() ? "the weights are finite, the activations overflowed" : weight));
      }
      loss_sum += loss_value;
      (loss / double(std::max<int64_t>(1, d.loss_tokens))).backward();
    }
    return loss_sum;
  }

  // Sums over learners what the micro-batches produced: every weight's gradient (a clustered
  // weight's holds dL/dw~ until StepWeights::backward, which then runs on the sum, identically
  // everywhere), and the loss, which is returned.
  double reduce(double loss_sum) {
    if (world_ == 1) return loss_sum;
    std::vector<at::Tensor> reduce;
    for (auto& [name, t] : model_.weights()) {
      if (!t.grad().defined()) t.mutable_grad() = at::zeros_like(t);
      reduce.push_back(t.grad());
    }
    at::Tensor loss_t = at::full({1}, loss_sum, at::kDouble);
    reduce.push_back(loss_t);
    o_.dist->allreduce_sum(reduce);
    return loss_t.item<double>();
  }

  void optimizer_step() {
    if (o_.grad_clip > 0) {
      std::vector<at::Tensor> params;
      for (auto& [name, t] : model_.weights()) params.push_back(t);
      if (clustering_)
        for (const at::Tensor& t : clustering_->trainable()) params.push_back(t);
      torch::nn::utils::clip_grad_norm_(params, o_.grad_clip);
    }
    optimizer_->step();
    optimizer_->zero_grad();
  }

  // Records step `step` (0-based): the metrics line, validation when due, the progress bar.
  void log(int64_t step, double lr, double loss, int64_t loss_tokens, Progress& bar) {
    rep_.losses.push_back(loss);
    rep_.tokens += loss_tokens;
    rep_.steps_done = step + 1 - rep_.start_step;
    nlohmann::json line = {{"step", step + 1}, {"loss", loss}, {"lr", lr}, {"tokens", loss_tokens},
                           {"elapsed_s", bar.elapsed()}, {"rss_mb", current_rss_bytes() / 1048576.0}};
    if (!data_.val.empty() && ((o_.eval_every > 0 && (step + 1) % o_.eval_every == 0) || last(step))) {
      rep_.val_loss_end = val_loss();
      line["val_loss"] = rep_.val_loss_end;
    }
    if (metrics_.is_open()) metrics_ << line.dump() << "\n" << std::flush;
    const std::string val = data_.val.empty() ? std::string("none") : fmt::format("{:.4f}", rep_.val_loss_end);
    bar.update(step + 1, fmt::format("loss {:.4f} val {} | {:.0f} tok/s | RSS {:.0f} MB", loss, val,
                                     rep_.tokens / std::max(1e-9, bar.elapsed()), current_rss_bytes() / 1048576.0));
  }

  // Whether to stop after this step: a learner's should_stop() stops all of them after the
  // same step.
  bool stop_requested() {
    bool stop = o_.should_stop && o_.should_stop();
    if (world_ > 1) {
      at::Tensor flag = at::full({1}, stop ? 1.0f : 0.0f);
      o_.dist->allreduce_sum({flag});
      stop = flag.item<float>() > 0;
    }
    return stop;
  }

  void checkpoint(int64_t step, bool stop) {
    if (!o_.checkpoint_path.empty() && main() &&
        (stop || (o_.checkpoint_every > 0 && (step + 1) % o_.checkpoint_every == 0)))
      save_checkpoint(o_.checkpoint_path, model_, clustering_, *optimizer_, step + 1, fingerprint_);
  }

  bool last(int64_t step) const { return step + 1 == rep_.total_steps; }

 private:
  // Trainable leaves: matrices with weight decay; norms and QAT's grids without.
  std::unique_ptr<torch::optim::AdamW> make_optimizer() {
    std::vector<at::Tensor> decay, no_decay;
    for (auto& [name, t] : model_.weights()) {
      t = t.detach().requires_grad_(true);
      (is_matrix(name, t) && o_.weight_decay > 0 ? decay : no_decay).push_back(t);
    }
    auto adam = torch::optim::AdamWOptions(o_.lr).betas({o_.beta1, o_.beta2}).eps(o_.adam_eps);
    std::vector<torch::optim::OptimizerParamGroup> groups;
    if (!decay.empty())
      groups.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>(adam.weight_decay(o_.weight_decay)));
    if (clustering_)
      for (const at::Tensor& t : clustering_->trainable()) no_decay.push_back(t);
    groups.emplace_back(no_decay, std::make_unique<torch::optim::AdamWOptions>(adam.weight_decay(0)));
    return std::make_unique<torch::optim::AdamW>(groups, adam);
  }

  // The example at position pos of the sequence of epochs.
  int64_t example(int64_t pos) {
    if (pos / n_ != order_epoch_) order_ = epoch_order(n_, o_.seed, order_epoch_ = pos / n_);
    return order_[pos % n_];
  }

  Llama& model_;
  Clustering* clustering_;
  const Dataset& data_;
  const TrainOptions& o_;
  const int64_t n_;
  const int world_, rank_;
  const int64_t per_step_;
  const int pad_;
  std::unique_ptr<torch::optim::AdamW> optimizer_;
  TrainReport rep_;
  nlohmann::json fingerprint_;
  std::ofstream metrics_;
  std::vector<int64_t> order_;
  int64_t order_epoch_ = -1;
};

}  // namespace

std::shared_ptr<const Llama> frozen_teacher(const Llama& model, at::ScalarType dtype) {
  std::map<std::string, at::Tensor> frozen;
  for (const auto& [name, w] : model.weights()) frozen[name] = w.detach().to(dtype, false, /*copy=*/true);
  return std::make_shared<const Llama>(model.config(), std::move(frozen), "teacher");
}

TrainReport train(Llama& model, Clustering* clustering, const Dataset& data, const TrainOptions& o) {
  if (o.batch < 1 || o.grad_accum < 1) throw_invalid("batch and grad_accum must be >= 1");
  if (!(o.lr > 0)) throw_invalid("learning rate must be positive");
  if (o.teacher && !(o.distill_temperature > 0))
    throw_invalid("distillation temperature must be > 0, got {}", o.distill_temperature);
  if (o.teacher && !(o.distill_alpha >= 0 && o.distill_alpha <= 1))
    throw_invalid("distillation alpha must be in [0, 1], got {}", o.distill_alpha);
  TrainingRun run(model, clustering, data, o);
  TrainReport& rep = run.report();
  rep.val_loss_start = rep.val_loss_end = run.val_loss();

  Progress bar(clustering ? "compress" : "fine-tune", rep.total_steps, o.quiet || !run.main());
  bar.update(rep.start_step);
  for (int64_t step = rep.start_step; step < rep.total_steps; ++step) {
    const double lr = run.set_learning_rate(step);
    const auto batches = run.micro_batches(step);
    double loss_sum;
    {
      const std::optional<StepWeights> made = run.dkm_forward(step);
      loss_sum = run.reduce(run.accumulate(batches, made, step));
      if (made) made->backward(model);
    }
    run.optimizer_step();
    run.log(step, lr, loss_sum / std::max<int64_t>(1, batches.loss_tokens), batches.loss_tokens, bar);
    const bool stop = run.stop_requested();
    run.checkpoint(step, stop);
    if (stop && !run.last(step)) {
      rep.interrupted = true;
      break;
    }
  }
  rep.seconds = bar.elapsed();
  bar.finish(!data.val.empty() ? fmt::format("val loss {:.4f} -> {:.4f}", rep.val_loss_start, rep.val_loss_end)
                               : std::string("val loss none (nothing held out)"));
  rep.peak_rss = peak_rss_bytes();
  for (auto& [name, t] : model.weights()) t = t.detach();
  return rep;
}

}  // namespace edkm
