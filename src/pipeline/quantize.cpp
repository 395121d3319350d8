#include "pipeline/quantize.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <chrono>

#include "common/atomic_file.h"
#include "common/error.h"
#include "common/memory.h"
#include "format/format.h"
#include "format/size.h"
#include "train/calibration.h"

namespace edkm {
namespace {

// Serves a projection as the dense product x W^T while summing x x^T over its inputs: the
// layer's GPTQ Hessian H = sum_t x_t x_t^T (the paper's 2 X X^T up to the factor, which the
// relative dampening makes irrelevant).
class HessianCapture : public LinearKernel {
 public:
  explicit HessianCapture(at::Tensor w) : w_(std::move(w)), h_(at::zeros({w_.size(1), w_.size(1)}, w_.options().dtype(at::kFloat))) {}
  at::Tensor forward(const at::Tensor& x) const override {
    at::Tensor x2 = x.reshape({-1, x.size(-1)}).to(at::kFloat);
    h_.addmm_(x2.t(), x2);
    return at::linear(x, w_);
  }
  at::Tensor dense(at::ScalarType dtype) const override { return w_.to(dtype); }
  const at::Tensor& hessian() const { return h_; }

 private:
  at::Tensor w_;
  mutable at::Tensor h_;
};

// Bits per weight of a packed uniform grid: b per weight plus an fp16 scale and zero point per
// group of `group` weights along a row (per row when 0 and per_row, per tensor when 0).
double grid_bits(const at::Tensor& w, int bits, int64_t group, bool per_row) {
  const int64_t rows = w.size(0), cols = w.numel() / rows;
  const int64_t groups = group > 0 ? rows * ((cols + group - 1) / group) : per_row ? rows : 1;
  return double(bits) * w.numel() + 32.0 * groups;
}

// GPTQ layer by layer (the reference's llama.py): the calibration windows' hidden states enter
// layer l as the quantized layers before it left them; the Hessians of layer l's projections are
// collected on them with l still in full precision; its projections are quantized; and the
// hidden states go on through the quantized layer.
void gptq_model(Llama& model, const std::vector<Example>& windows,
                const std::vector<std::pair<std::string, DKMConfig>>& chosen, const QuantizeOptions& o) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> hidden;  // one [B, T, dim] per batch of windows
  constexpr int64_t kBatch = 8;
  for (size_t s = 0; s < windows.size(); s += kBatch) {
    std::vector<int64_t> idx;
    for (size_t j = s; j < std::min(windows.size(), s + kBatch); ++j) idx.push_back(static_cast<int64_t>(j));
    hidden.push_back(model.embed(make_batch(windows, idx, 0).tokens.to(model.device())));
  }
  std::map<std::string, int> bits;
  for (const auto& [name, cfg] : chosen) bits[name] = cfg.bits;
  for (int64_t l = 0; l < model.config().n_layers; ++l) {
    std::vector<std::pair<std::string, std::shared_ptr<HessianCapture>>> captures;
    for (const char* p : tensor_name::kProjections) {
      const std::string name = layer_tensor_name(l, p);
      if (!bits.count(name)) continue;
      captures.emplace_back(name, std::make_shared<HessianCapture>(model.weight(name)));
      model.set_kernel(name, captures.back().second);
    }
    for (const at::Tensor& h : hidden) model.layer(l, h);
    for (const auto& [name, capture] : captures) {
      model.set_kernel(name, nullptr);
      at::Tensor& w = model.weights()[name];
      w = gptq_quantize(w, capture->hessian(), {bits[name], o.gptq_group, o.symmetric});
    }
    for (at::Tensor& h : hidden) h = model.layer(l, h);
  }
}

}  // namespace

std::string to_string(PtqMethod m) {
  switch (m) {
    case PtqMethod::kKMeans: return "kmeans";
    case PtqMethod::kSensitiveKMeans: return "sensitive-kmeans";
    case PtqMethod::kRTN: return "rtn";
    case PtqMethod::kGPTQ: return "gptq";
  }
  return "?";
}

PtqMethod parse_ptq_method(const std::string& s) {
  for (PtqMethod m : {PtqMethod::kKMeans, PtqMethod::kSensitiveKMeans, PtqMethod::kRTN, PtqMethod::kGPTQ})
    if (s == to_string(m)) return m;
  throw_invalid("unknown post-training method '{}' (expected kmeans, sensitive-kmeans, rtn or gptq)", s);
}

bool needs_calibration(PtqMethod m) { return m == PtqMethod::kSensitiveKMeans || m == PtqMethod::kGPTQ; }

QuantizeReport quantize(LoadedModel& m, const QuantizeOptions& o) {
  check_writable(o.out);
  const auto start = std::chrono::steady_clock::now();
  const auto chosen = o.plan.resolve(m.model);
  QuantizeReport rep;
  std::vector<Example> windows;
  if (needs_calibration(o.method)) {
    if (o.calib.empty()) throw_input("{} needs calibration text (--calib)", to_string(o.method));
    if (!m.tokenizer) throw_input("{} needs the model's tokenizer to read {} (--tokenizer)", to_string(o.method), o.calib);
    windows = calibration_windows(o.calib, *m.tokenizer, o.calib_samples, o.calib_seq_len);
    for (const auto& w : windows) rep.calib_tokens += static_cast<int64_t>(w.tokens.size());
  }
  if (o.method == PtqMethod::kGPTQ)
    for (const auto& [name, cfg] : chosen)
      if (name.rfind("model.layers.", 0) != 0)
        throw_input("GPTQ quantizes the decoder layers' projections only, not {}; drop --include-embeddings "
                    "or the rule that selects it", name);

  CompressedModel cm;
  if (o.method == PtqMethod::kKMeans || o.method == PtqMethod::kSensitiveKMeans) {
    std::map<std::string, at::Tensor> fisher;
    if (o.method == PtqMethod::kSensitiveKMeans) {
      std::vector<std::string> names;
      for (const auto& [name, cfg] : chosen) names.push_back(name);
      fisher = fisher_diagonal(m.model, windows, names, o.checkpoint_layers);
    }
    Clustering c(m.model, chosen, TrainMethod::kDKM, fisher.empty() ? nullptr : &fisher);
    std::vector<nlohmann::json> settings;
    for (const auto& w : c.weights()) settings.push_back(dkm_to_json(w.cfg));
    cm = make_compressed(m.model, c.palettize(m.model), settings, m.tokenizer.get());
    rep.bits_per_weight = size_of(cm).clustered_bits_per_weight();
  } else {
    if (o.method == PtqMethod::kGPTQ) gptq_model(m.model, windows, chosen, o);
    double bits = 0, n = 0;
    for (const auto& [name, cfg] : chosen) {
      at::Tensor& w = m.model.weights()[name];
      if (o.method == PtqMethod::kRTN) {
        w = rtn_quantize(w, {cfg.bits, o.rtn_group, o.symmetric});
        bits += grid_bits(w, cfg.bits, o.rtn_group, false);
      } else {
        bits += grid_bits(w, cfg.bits, o.gptq_group, true);
      }
      n += double(w.numel());
    }
    cm = make_compressed(m.model, {}, {}, m.tokenizer.get());
    rep.bits_per_weight = bits / n;
    cm.metadata["bits_per_weight"] = fmt::format("{:.6f}", rep.bits_per_weight);
    cm.metadata["grid_group"] = std::to_string(o.method == PtqMethod::kRTN ? o.rtn_group : o.gptq_group);
  }
  if (needs_calibration(o.method)) {
    cm.metadata["calib"] = o.calib;
    cm.metadata["calib_tokens"] = std::to_string(rep.calib_tokens);
  }
  cm.metadata["method"] = to_string(o.method);
  cm.metadata["bits"] = std::to_string(o.plan.defaults.bits);
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  rep.peak_rss = peak_rss_bytes();
  write_compressed(o.out, cm);
  rep.out = o.out;
  rep.quantized = static_cast<int64_t>(chosen.size());
  return rep;
}

}  // namespace edkm
