#include "train/trainer.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
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

// What determines the trajectory of a run: resuming with anything else would not reproduce it.
nlohmann::json fingerprint(const TrainOptions& o, const Dataset& data, const Clustering* c, int64_t total) {
  nlohmann::json clustered = nlohmann::json::object();
  if (c)
    for (const auto& w : c->weights()) clustered[w.name] = dkm_to_json(w.cfg);
  return {{"steps", total},         {"batch", o.batch},         {"grad_accum", o.grad_accum},
          {"lr", o.lr},             {"min_lr_ratio", o.min_lr_ratio}, {"warmup", o.warmup},
          {"weight_decay", o.weight_decay}, {"betas", {o.beta1, o.beta2}}, {"adam_eps", o.adam_eps},
          {"grad_clip", o.grad_clip}, {"seed", o.seed},         {"data", data.digest},
          {"train_examples", data.train.size()}, {"clustered", clustered}};
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
std::string non_finite_weight(const Llama& model, const WeightOverrides& soft) {
  auto bad = [](const at::Tensor& t) { return !at::isfinite(t.detach()).all().item<bool>(); };
  for (const auto& [name, shape] : tensor_shapes(model.config())) {
    if (bad(model.weight(name))) return fmt::format("weight '{}' holds NaN or Inf", name);
    if (soft.count(name) && bad(soft.at(name))) return fmt::format("the clustered weight '{}' holds NaN or Inf", name);
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
                int64_t batch, int pad_id) {
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
    at::Tensor logits = model.forward(b.tokens.to(model.device()), fo);
    nll += next_token_loss(logits, b.labels.to(model.device()), at::Reduction::Sum)
               .item<double>();
    n += b.loss_tokens;
  }
  return nll / std::max<int64_t>(1, n);
}

TrainReport train(Llama& model, Clustering* clustering, const Dataset& data, const TrainOptions& o) {
  if (o.batch < 1 || o.grad_accum < 1) throw_invalid("batch and grad_accum must be >= 1");
  if (!(o.lr > 0)) throw_invalid("learning rate must be positive");
  const int64_t n = static_cast<int64_t>(data.train.size());
  const int world = o.dist ? o.dist->world() : 1, rank = o.dist ? o.dist->rank() : 0;
  const bool main = rank == 0;
  const int64_t per_step = o.batch * o.grad_accum * world;
  TrainReport rep;
  rep.total_steps = o.steps > 0 ? o.steps : (n + per_step - 1) / per_step;
  const int pad = static_cast<int>(model.config().eos_id);
  nlohmann::json fp = fingerprint(o, data, clustering, rep.total_steps);
  fp["learners"] = world;

  // Trainable leaves: matrices with weight decay, norms without.
  std::vector<at::Tensor> decay, no_decay;
  for (auto& [name, t] : model.weights()) {
    t = t.detach().requires_grad_(true);
    (is_matrix(name, t) && o.weight_decay > 0 ? decay : no_decay).push_back(t);
  }
  auto adam = torch::optim::AdamWOptions(o.lr).betas({o.beta1, o.beta2}).eps(o.adam_eps);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  if (!decay.empty()) groups.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>(adam.weight_decay(o.weight_decay)));
  groups.emplace_back(no_decay, std::make_unique<torch::optim::AdamWOptions>(adam.weight_decay(0)));
  torch::optim::AdamW optimizer(groups, adam);

  if (o.resume) rep.start_step = load_checkpoint(o.checkpoint_path, model, clustering, optimizer, fp);
  std::ofstream metrics;
  if (!o.metrics_path.empty() && main) {
    if (rep.start_step > 0) keep_metrics_until(o.metrics_path, rep.start_step);
    metrics.open(o.metrics_path, rep.start_step > 0 ? std::ios::app : std::ios::trunc);
    if (!metrics) throw_input("{}: cannot write the metrics file", o.metrics_path);
  }

  auto val_loss = [&] {
    WeightOverrides ov;
    if (clustering) {
      at::NoGradGuard ng;
      ov = clustering->soft(model, /*advance=*/false);
    }
    return evaluate(model, clustering ? &ov : nullptr, data.val, o.eval_batch, pad);
  };
  rep.val_loss_start = rep.val_loss_end = val_loss();
  double last_val = rep.val_loss_start;
  const bool validated = !data.val.empty();
  auto val_text = [&](double v) { return validated ? fmt::format("{:.4f}", v) : std::string("none"); };

  Progress bar(clustering ? "compress" : "fine-tune", rep.total_steps, o.quiet || !main);
  bar.update(rep.start_step);
  std::vector<int64_t> order;
  int64_t order_epoch = -1;
  for (int64_t step = rep.start_step; step < rep.total_steps; ++step) {
    const double lr = learning_rate(o, step, rep.total_steps);
    for (auto& g : optimizer.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);

    // This step's examples: positions [step * per_step, (step + 1) * per_step) of the sequence
    // of epochs, each epoch in its own seeded order; this learner's micro-batches are
    // rank * grad_accum .. of them. Every learner counts the whole step's loss tokens (the
    // normaliser of the loss) from the data it holds.
    auto example = [&](int64_t pos) {
      if (pos / n != order_epoch) order = epoch_order(n, o.seed, order_epoch = pos / n);
      return order[pos % n];
    };
    int64_t step_tokens = 0;
    for (int64_t j = 0; j < per_step; ++j)
      for (int v : data.train[example(step * per_step + j)].labels) step_tokens += v >= 0;
    std::vector<Batch> batches;
    for (int64_t m = 0; m < o.grad_accum; ++m) {
      std::vector<int64_t> idx;
      for (int64_t k = 0; k < o.batch; ++k) idx.push_back(example(step * per_step + (rank * o.grad_accum + m) * o.batch + k));
      batches.push_back(make_batch(data.train, idx, pad));
    }

    // DKM once per step; micro-batches accumulate into leaf copies of the soft weights, and one
    // backward through DKM carries their gradients to the weights.
    WeightOverrides soft, leaves;
    if (clustering) {
      try {
        soft = clustering->soft(model, /*advance=*/true);
      } catch (const std::invalid_argument&) {
        // DKM refuses non-finite weights: the previous step's update made them so.
        const std::string weight = non_finite_weight(model, {});
        if (!weight.empty()) throw_diverged(step + 1, weight + " after the previous step's update");
        throw;
      }
      for (const auto& [name, w] : soft) leaves[name] = w.detach().requires_grad_(true);
    }
    double loss_sum = 0;
    for (const Batch& b : batches) {
      ForwardOptions fo;
      fo.overrides = clustering ? &leaves : nullptr;
      fo.checkpoint_layers = o.checkpoint_layers;
      at::Tensor logits = model.forward(b.tokens.to(model.device()), fo);
      at::Tensor loss = next_token_loss(logits, b.labels.to(model.device()), at::Reduction::Sum);
      const double loss_value = loss.item<double>();
      if (!std::isfinite(loss_value)) {
        const std::string weight = non_finite_weight(model, leaves);
        throw_diverged(step + 1, fmt::format("the loss is {} ({})", loss_value,
                                             weight.empty() ? "the weights are finite, the activations overflowed" : weight));
      }
      loss_sum += loss_value;
      (loss / double(std::max<int64_t>(1, step_tokens))).backward();
    }
    if (world > 1) {
      // Sum over learners what the micro-batches produced: the soft weights' gradients (DKM's
      // backward then runs on the sum, identically everywhere) and the unclustered weights'.
      std::vector<at::Tensor> reduce;
      auto add = [&](at::Tensor& t) {
        if (!t.grad().defined()) t.mutable_grad() = at::zeros_like(t);
        reduce.push_back(t.grad());
      };
      for (auto& [name, leaf] : leaves) add(leaf);
      for (auto& [name, t] : model.weights())
        if (!leaves.count(name)) add(t);
      at::Tensor loss_t = at::full({1}, loss_sum, at::kDouble);
      reduce.push_back(loss_t);
      o.dist->allreduce_sum(reduce);
      loss_sum = loss_t.item<double>();
    }
    if (clustering) {
      std::vector<at::Tensor> outs, grads;
      for (const auto& [name, w] : soft) {
        const at::Tensor& g = leaves[name].grad();
        if (!g.defined()) continue;
        outs.push_back(w);
        grads.push_back(g);
      }
      if (!outs.empty()) torch::autograd::backward(outs, grads);
    }
    if (o.grad_clip > 0) {
      std::vector<at::Tensor> params;
      for (auto& [name, t] : model.weights()) params.push_back(t);
      torch::nn::utils::clip_grad_norm_(params, o.grad_clip);
    }
    optimizer.step();
    optimizer.zero_grad();

    const double loss = loss_sum / std::max<int64_t>(1, step_tokens);
    rep.losses.push_back(loss);
    rep.tokens += step_tokens;
    rep.steps_done = step + 1 - rep.start_step;
    const bool last = step + 1 == rep.total_steps;
    nlohmann::json line = {{"step", step + 1}, {"loss", loss}, {"lr", lr}, {"tokens", step_tokens},
                           {"elapsed_s", bar.elapsed()}, {"rss_mb", current_rss_bytes() / 1048576.0}};
    if (validated && ((o.eval_every > 0 && (step + 1) % o.eval_every == 0) || last)) {
      last_val = val_loss();
      line["val_loss"] = last_val;
    }
    if (metrics.is_open()) metrics << line.dump() << "\n" << std::flush;
    bool stop = o.should_stop && o.should_stop();
    if (world > 1) {  // one learner's Ctrl-C stops all of them after the same step
      at::Tensor flag = at::full({1}, stop ? 1.0f : 0.0f);
      o.dist->allreduce_sum({flag});
      stop = flag.item<float>() > 0;
    }
    if (!o.checkpoint_path.empty() && main &&
        (stop || (o.checkpoint_every > 0 && (step + 1) % o.checkpoint_every == 0)))
      save_checkpoint(o.checkpoint_path, model, clustering, optimizer, step + 1, fp);
    const double tps = rep.tokens / std::max(1e-9, bar.elapsed());
    bar.update(step + 1, fmt::format("loss {:.4f} val {} | {:.0f} tok/s | RSS {:.0f} MB", loss, val_text(last_val), tps,
                                     current_rss_bytes() / 1048576.0));
    if (stop && !last) {
      rep.interrupted = true;
      break;
    }
  }
  rep.val_loss_end = last_val;
  rep.seconds = bar.elapsed();
  bar.finish(validated ? fmt::format("val loss {:.4f} -> {:.4f}", rep.val_loss_start, rep.val_loss_end)
                       : std::string("val loss none (nothing held out)"));
  rep.peak_rss = peak_rss_bytes();
  for (auto& [name, t] : model.weights()) t = t.detach();
  return rep;
}

}  // namespace edkm
