#include <cmath>

#include "cluster/cluster.h"
#include "common/error.h"

namespace edkm {

void DKMConfig::validate() const {
  if (bits < 1 || bits > 8) throw_invalid("bits must be in 1..8 (k = 2^bits <= 256), got {}", bits);
  if (cluster_dim < 1) throw_invalid("cluster_dim must be >= 1, got {}", cluster_dim);
  if (!(tau > 0) || !std::isfinite(tau)) throw_invalid("tau must be a positive number, got {}", tau);
  if (max_iters < 1) throw_invalid("max_iters must be >= 1, got {}", max_iters);
  if (!(eps >= 0)) throw_invalid("eps must be >= 0, got {}", eps);
  if (group_size < 0) throw_invalid("group_size must be >= 0, got {}", group_size);
  if (!(zero_threshold >= 0) || zero_threshold >= 1)
    throw_invalid("zero_threshold must be in [0, 1), got {}", zero_threshold);
  if (!(prune_threshold >= 0)) throw_invalid("prune_threshold must be >= 0, got {}", prune_threshold);
  if (kmeans_max_iters < 0) throw_invalid("kmeans_max_iters must be >= 0, got {}", kmeans_max_iters);
  if ((marshal || uniquify || shard) && method != DKMMethod::kEDKM)
    throw_invalid("marshal / uniquify / shard are eDKM techniques of method 'edkm', not '{}'", to_string(method));
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
  throw_invalid("unknown palette init '{}' (expected kmeans++, quantile or given)", s);
}

DKMMethod parse_dkm_method(const std::string& s) {
  if (s == "dense") return DKMMethod::kDense;
  if (s == "unique") return DKMMethod::kUnique;
  if (s == "auto") return DKMMethod::kAuto;
  if (s == "edkm") return DKMMethod::kEDKM;
  throw_invalid("unknown DKM method '{}' (expected dense, unique, auto or edkm)", s);
}

}  // namespace edkm
