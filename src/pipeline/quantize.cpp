#include "pipeline/quantize.h"

#include <fmt/format.h>

#include "common/atomic_file.h"
#include "common/error.h"
#include "format/format.h"

namespace edkm {

std::string to_string(PtqMethod m) { return m == PtqMethod::kKMeans ? "kmeans" : "rtn"; }

PtqMethod parse_ptq_method(const std::string& s) {
  if (s == "kmeans") return PtqMethod::kKMeans;
  if (s == "rtn") return PtqMethod::kRTN;
  throw_invalid("unknown post-training method '{}' (expected kmeans or rtn)", s);
}

QuantizeReport quantize(LoadedModel& m, const QuantizeOptions& o) {
  check_writable(o.out);
  const auto chosen = o.plan.resolve(m.model);
  CompressedModel cm;
  if (o.method == PtqMethod::kKMeans) {
    Clustering c(m.model, chosen);
    std::vector<nlohmann::json> settings;
    for (const auto& w : c.weights()) settings.push_back(dkm_to_json(w.cfg));
    cm = make_compressed(m.model, c.palettize(m.model), settings, m.tokenizer.get());
  } else {
    // A packed RTN weight: b bits per weight plus an fp16 scale and zero point per group.
    double bits = 0, n = 0;
    for (const auto& [name, cfg] : chosen) {
      at::Tensor& w = m.model.weights()[name];
      w = rtn_quantize(w, {cfg.bits, o.rtn_group, o.symmetric});
      const int64_t rows = w.size(0), cols = w.size(1);
      const int64_t groups = o.rtn_group > 0 ? rows * ((cols + o.rtn_group - 1) / o.rtn_group) : 1;
      bits += double(cfg.bits) * w.numel() + 32.0 * groups;
      n += w.numel();
    }
    cm = make_compressed(m.model, {}, {}, m.tokenizer.get());
    cm.metadata["bits_per_weight"] = fmt::format("{:.6f}", bits / n);
    cm.metadata["rtn_group"] = std::to_string(o.rtn_group);
  }
  cm.metadata["method"] = to_string(o.method);
  cm.metadata["bits"] = std::to_string(o.plan.defaults.bits);
  write_compressed(o.out, cm);
  return {o.out, static_cast<int64_t>(chosen.size())};
}

}  // namespace edkm
