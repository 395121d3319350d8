#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <climits>
#include <cmath>
#include <cstdlib>

#include "cluster/cluster.h"
#include "cluster/settings.h"
#include "common/error.h"

namespace edkm {

bool DKMSetting::in_range(double v) const {
  if (!std::isfinite(v)) return false;
  return (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
}

std::string DKMSetting::range_text() const {
  if (std::isfinite(hi)) {
    if (!lo_open && !hi_open) return fmt::format("in {}..{}", lo, hi);
    return fmt::format("in {}{}, {}{}", lo_open ? "(" : "[", lo, hi, hi_open ? ")" : "]");
  }
  return fmt::format("{} {}", lo_open ? ">" : ">=", lo);
}

void DKMConfig::validate() const {
  for_each_dkm_setting(*this, [](const DKMSetting& s, const auto& v) {
    using T = std::decay_t<decltype(v)>;
    if constexpr (std::is_arithmetic_v<T> && !std::is_same_v<T, bool>)
      if (!s.in_range(static_cast<double>(v))) throw_invalid("{} must be {}, got {}", s.name, s.range_text(), v);
  });
  if ((marshal || uniquify || shard) && method != DKMMethod::kEDKM)
    throw_invalid("marshal / uniquify / shard are eDKM techniques of method 'edkm', not '{}'", to_string(method));
  if (init == PaletteInit::kOptimal && cluster_dim != 1)
    throw_invalid("init 'optimal' clusters scalars: it needs cluster_dim 1, got {}", cluster_dim);
}

void parse_setting(const std::string& s, ClusterDType& out) { out = parse_cluster_dtype(s); }
void parse_setting(const std::string& s, PaletteInit& out) { out = parse_palette_init(s); }
void parse_setting(const std::string& s, DKMMethod& out) { out = parse_dkm_method(s); }

void apply_dkm_json(DKMConfig& c, const nlohmann::json& j, const std::string& source) {
  if (!j.is_object()) throw_input("{}: DKM settings must be a JSON object", source);
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const nlohmann::json& v = it.value();
    bool known = false;
    try {
      for_each_dkm_setting(c, [&](const DKMSetting& s, auto& field) {
        if (k != s.name) return;
        known = true;
        using T = std::decay_t<decltype(field)>;
        if constexpr (std::is_same_v<T, uint64_t>) {
          if (!v.is_number_integer() || (!v.is_number_unsigned() && v.get<int64_t>() < 0))
            throw_input("{}: setting '{}' must be a non-negative integer, got {}", source, k, v.dump());
          field = v.get<uint64_t>();
        } else if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
          // nlohmann's get<int>() truncates 3.7 to 3: integer settings must be written as integers.
          if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > INT32_MAX) ||
              std::llabs(v.get<int64_t>()) > INT32_MAX)
            throw_input("{}: setting '{}' must be an integer of at most 2^31 - 1, got {}", source, k, v.dump());
          field = static_cast<T>(v.get<int64_t>());
        } else if constexpr (std::is_enum_v<T>) {
          parse_setting(v.get<std::string>(), field);
        } else {
          field = v.get<T>();  // double, bool
        }
      });
    } catch (const nlohmann::json::exception& e) {
      throw_input("{}: setting '{}' has the wrong type: {}", source, k, e.what());
    } catch (const std::invalid_argument& e) {
      throw_input("{}: {}", source, e.what());
    }
    if (!known) throw_input("{}: unknown DKM setting '{}'", source, k);
  }
  try {
    c.validate();
  } catch (const std::invalid_argument& e) {
    throw_input("{}: {}", source, e.what());
  }
}

nlohmann::json dkm_to_json(const DKMConfig& c) {
  nlohmann::json j = nlohmann::json::object();
  for_each_dkm_setting(c, [&](const DKMSetting& s, const auto& field) {
    if constexpr (std::is_enum_v<std::decay_t<decltype(field)>>) j[s.name] = to_string(field);
    else j[s.name] = field;
  });
  return j;
}

std::string to_string(ClusterDType t) {
  switch (t) {
    case ClusterDType::kFloat32: return "fp32";
    case ClusterDType::kBFloat16: return "bf16";
    case ClusterDType::kFloat16: return "fp16";
    case ClusterDType::kNative: return "native";
  }
  return "?";
}

std::string to_string(PaletteInit t) {
  switch (t) {
    case PaletteInit::kKMeansPP: return "kmeans++";
    case PaletteInit::kQuantile: return "quantile";
    case PaletteInit::kGiven: return "given";
    case PaletteInit::kOptimal: return "optimal";
  }
  return "?";
}

std::string to_string(DKMMethod m) {
  switch (m) {
    case DKMMethod::kDense: return "dense";
    case DKMMethod::kUnique: return "unique";
    case DKMMethod::kAuto: return "auto";
    case DKMMethod::kEDKM: return "edkm";
  }
  return "?";
}

ClusterDType parse_cluster_dtype(const std::string& s) {
  if (s == "fp32" || s == "float32") return ClusterDType::kFloat32;
  if (s == "bf16" || s == "bfloat16") return ClusterDType::kBFloat16;
  if (s == "fp16" || s == "float16") return ClusterDType::kFloat16;
  if (s == "native") return ClusterDType::kNative;
  throw_invalid("unknown cluster dtype '{}' (expected fp32, bf16, fp16 or native)", s);
}

PaletteInit parse_palette_init(const std::string& s) {
  if (s == "kmeans++") return PaletteInit::kKMeansPP;
  if (s == "quantile") return PaletteInit::kQuantile;
  if (s == "given") return PaletteInit::kGiven;
  if (s == "optimal") return PaletteInit::kOptimal;
  throw_invalid("unknown palette init '{}' (expected kmeans++, quantile, given or optimal)", s);
}

DKMMethod parse_dkm_method(const std::string& s) {
  if (s == "dense") return DKMMethod::kDense;
  if (s == "unique") return DKMMethod::kUnique;
  if (s == "auto") return DKMMethod::kAuto;
  if (s == "edkm") return DKMMethod::kEDKM;
  throw_invalid("unknown DKM method '{}' (expected dense, unique, auto or edkm)", s);
}

}  // namespace edkm
