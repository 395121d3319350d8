#include "pipeline/compress.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <filesystem>

#include "common/atomic_file.h"
#include "common/error.h"
#include "train/calibration.h"

namespace fs = std::filesystem;

namespace edkm {

namespace {

// compress() proper; the public function adds the clean-up of a run that fails.
CompressReport run_compress(LoadedModel& m, const CompressOptions& o) {
  if (!m.tokenizer) throw_input("compress needs a tokenizer for the data");
  Dataset data = load_datasets(o.data_paths, *m.tokenizer, o.data);
  CompressReport r;
  r.out = o.out;
  r.method = o.cluster ? to_string(o.method) : "fine-tuned";
  r.train_examples = static_cast<int64_t>(data.train.size());
  r.val_examples = static_cast<int64_t>(data.val.size());
  r.train_tokens = data.train_tokens();
  r.truncated = data.truncated;
  r.dropped = data.dropped;
  const int pad = static_cast<int>(m.model.config().eos_id);
  Llama& model = m.model;

  r.val_pretrained = evaluate(model, nullptr, data.val, o.train.eval_batch, pad);
  Clustering clustering;
  if (o.cluster) {
    const auto chosen = o.plan.resolve(model);
    std::map<std::string, at::Tensor> fisher;
    if (!o.sensitive_init.empty() && o.method != TrainMethod::kQAT) {
      std::vector<std::string> names;
      for (const auto& [name, cfg] : chosen) names.push_back(name);
      fisher = fisher_diagonal(model, calibration_windows(o.sensitive_init, *m.tokenizer, o.calib_samples, o.calib_seq_len),
                               names, o.train.checkpoint_layers);
    }
    clustering = Clustering(model, chosen, o.method, fisher.empty() ? nullptr : &fisher,
                            !fisher.empty() && o.sensitive_updates);
    r.clustered = static_cast<int64_t>(clustering.weights().size());
    WeightOverrides ptq = clustering.hard(model);
    r.val_start = evaluate(model, &ptq, data.val, o.train.eval_batch, pad);
  }
  TrainOptions topts = o.train;
  if (o.distill) {
    const at::ScalarType dtype = o.teacher_dtype != at::ScalarType::Undefined ? o.teacher_dtype
                                 : model.device().is_cpu()                    ? at::kFloat
                                                                              : at::kBFloat16;
    topts.teacher = frozen_teacher(model, dtype);
  }
  r.train = train(model, o.cluster ? &clustering : nullptr, data, topts);
  r.val_soft = r.train.val_loss_end;
  // Every learner holds the same trained model; the first writes it.
  if (r.train.interrupted || (o.train.dist && !o.train.dist->is_main())) return r;

  std::vector<std::pair<std::string, Palettized>> packed;
  std::vector<nlohmann::json> settings;
  if (o.cluster) {
    packed = clustering.palettize(model);
    for (const auto& w : clustering.weights()) settings.push_back(dkm_to_json(w.cfg));
  }
  CompressedModel cm = make_compressed(model, packed, settings, m.tokenizer.get(), o.dense_dtype);
  cm.metadata["edkm_version"] = EDKM_VERSION;
  cm.metadata["method"] = r.method;
  if (o.distill) cm.metadata["distill"] = fmt::format("T={} alpha={}", o.train.distill_temperature, o.train.distill_alpha);
  if (o.cluster) cm.metadata["bits"] = std::to_string(o.plan.defaults.bits);
  cm.metadata["source_model"] = model.config().to_hf().dump();
  write_compressed(o.out, cm);
  // The file as written, evaluated: reading it back checks it too.
  CompressedModel back = read_compressed(o.out);
  Llama exported = back.to_llama(at::kFloat);
  r.val_exported = evaluate(exported, nullptr, data.val, o.train.eval_batch, pad);
  r.size = size_of(back);
  // The run is complete: its checkpoint can only repeat it.
  if (!o.train.checkpoint_path.empty()) fs::remove(o.train.checkpoint_path);
  return r;
}

}  // namespace

CompressReport compress(LoadedModel& m, const CompressOptions& o) {
  check_writable(o.out);
  if (!o.train.checkpoint_path.empty()) check_writable(o.train.checkpoint_path);
  // An interrupted run's checkpoint is hours of work: never replaced unless asked to.
  if (!o.train.resume && !o.train.overwrite && !o.train.checkpoint_path.empty() && fs::exists(o.train.checkpoint_path))
    throw_input("{}: a checkpoint of an earlier run exists; continue that run with --resume, or start again with "
                "--overwrite", o.train.checkpoint_path);
  const bool main = !o.train.dist || o.train.dist->is_main();
  if (main) {
    remove_stale_temporaries(o.out);
    if (!o.train.checkpoint_path.empty()) remove_stale_temporaries(o.train.checkpoint_path);
  }
  try {
    return run_compress(m, o);
  } catch (...) {
    // A metrics file is worth keeping only beside a checkpoint that a --resume continues.
    if (main && !o.train.metrics_path.empty() &&
        (o.train.checkpoint_path.empty() || !fs::exists(o.train.checkpoint_path)))
      fs::remove(o.train.metrics_path);
    throw;
  }
}

nlohmann::json CompressReport::to_json() const {
  return {{"out", out},
          {"method", method},
          {"interrupted", train.interrupted},
          {"train_examples", train_examples},
          {"val_examples", val_examples},
          {"train_tokens", train_tokens},
          {"truncated_examples", truncated},
          {"dropped_examples", dropped},
          {"clustered_weights", clustered},
          {"steps", train.total_steps},
          {"tokens_seen", train.tokens},
          {"seconds", train.seconds},
          {"tokens_per_second", train.tokens / std::max(1e-9, train.seconds)},
          {"peak_rss_bytes", train.peak_rss},
          {"val_loss", val_examples == 0 ? nlohmann::json(nullptr)
                                         : nlohmann::json{{"pretrained", val_pretrained}, {"start", val_start},
                                                          {"soft", val_soft}, {"exported", val_exported}}},
          {"size", size.to_json()}};
}

std::string CompressReport::text() const {
  std::string s = fmt::format("data: {} training examples ({} loss tokens), {} held out", train_examples, train_tokens,
                              val_examples);
  if (truncated || dropped)
    s += fmt::format("; {} examples cut at --seq-len, {} dropped (response beyond it)", truncated, dropped);
  s += "\n";
  s += fmt::format("training: {} steps in {:.1f} s ({:.0f} tokens/s), peak RSS {:.0f} MB\n", train.total_steps,
                   train.seconds, train.tokens / std::max(1e-9, train.seconds), train.peak_rss / 1048576.0);
  if (val_examples == 0)
    s += "validation loss: none (nothing held out; --val-fraction 0)\n";
  else
    s += fmt::format("validation loss (nats/token): pretrained {:.4f} | {}, no training {:.4f} | as trained {:.4f} | "
                     "written file {:.4f}\n", val_pretrained, method == "qat" ? "min-max grid" : "k-means", val_start,
                     val_soft, val_exported);
  s += size.table(true);
  s += fmt::format("wrote {}\n", out);
  return s;
}

}  // namespace edkm
