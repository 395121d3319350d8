// DKMConfig's settings, listed once. Each has the name that compression configs and the
// compressed file's metadata use, a command-line flag, a help text and, for numbers, its valid
// range. Reading and writing JSON, DKMConfig::validate() and the flags of `edkm compress` all
// walk this one list (for_each_dkm_setting), so a new setting is added here and nowhere else.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <limits>
#include <string>
#include <type_traits>

#include "cluster/cluster.h"

namespace edkm {

struct DKMSetting {
  static constexpr double kNone = std::numeric_limits<double>::infinity();
  const char* name;  // JSON key
  const char* flag;  // command-line flag, in CLI11's syntax ("-b,--bits")
  const char* help;
  // Valid range of a number (bounds included unless open); non-finite numbers never are.
  double lo = -kNone, hi = kNone;
  bool lo_open = false, hi_open = false;

  bool in_range(double v) const;
  std::string range_text() const;  // "in 1..8", ">= 0", "> 0", "in [0, 1)"
};

// Calls visit(setting, field) for every field of c, in the order of the struct; field is a
// reference to int, int64_t, uint64_t, double, bool, or one of the enums of cluster.h
// (converted to and from text with to_string and parse_setting).
template <typename Config, typename Visit>
void for_each_dkm_setting(Config& c, Visit&& visit) {
  static_assert(std::is_same_v<std::remove_const_t<Config>, DKMConfig>);
  visit(DKMSetting{"bits", "-b,--bits", "Bits per weight index (k = 2^bits)", 1, 8}, c.bits);
  visit(DKMSetting{"cluster_dim", "--cluster-dim", "Weights per centroid vector", 1}, c.cluster_dim);
  visit(DKMSetting{"tau", "--tau", "DKM softmax temperature", 0, DKMSetting::kNone, true}, c.tau);
  visit(DKMSetting{"max_iters", "--dkm-iters", "DKM iterations per step", 1}, c.max_iters);
  visit(DKMSetting{"eps", "--dkm-eps", "Stop DKM's iterations when the inertia moves by at most this", 0}, c.eps);
  visit(DKMSetting{"group_size", "--group-size", "Rows per palette (0: one palette per tensor)", 0}, c.group_size);
  visit(DKMSetting{"per_row_scale", "--per-row-scale", "Divide rows by (max - min) / 2 before clustering"},
        c.per_row_scale);
  visit(DKMSetting{"cluster_dtype", "--cluster-dtype", "Rounding before clustering: bf16, fp16, fp32 or native"},
        c.cluster_dtype);
  visit(DKMSetting{"init", "--palette-init", "First palettes: kmeans++, quantile (then Lloyd), or optimal (exact 1-D k-means)"}, c.init);
  visit(DKMSetting{"seed", "--kmeans-seed", "Seed of the k-means++ initialisation"}, c.seed);
  visit(DKMSetting{"method", "--dkm-method",
                   "auto, unique, dense, or edkm (dense with --marshal / --uniquify / --shard)"},
        c.method);
  visit(DKMSetting{"zero_threshold", "--zero-threshold", "Floor of DKM's attention", 0, 1, false, true},
        c.zero_threshold);
  visit(DKMSetting{"prune_threshold", "--prune-threshold", "Bias subtracted from centroid 0's distance", 0},
        c.prune_threshold);
  visit(DKMSetting{"kmeans_max_iters", "--kmeans-iters", "Lloyd iterations of the initial k-means", 0},
        c.kmeans_max_iters);
  visit(DKMSetting{"marshal", "--marshal", "eDKM: saved tensors to a host store with a duplicate check"}, c.marshal);
  visit(DKMSetting{"uniquify", "--uniquify", "eDKM: attention maps stored as distinct rows plus an index"},
        c.uniquify);
  visit(DKMSetting{"shard", "--shard", "eDKM: that index sharded over the data-parallel learners"}, c.shard);
}

void parse_setting(const std::string& s, ClusterDType& out);
void parse_setting(const std::string& s, PaletteInit& out);
void parse_setting(const std::string& s, DKMMethod& out);

// Reads the settings present in a JSON object into cfg and validates the result (InputError
// naming source and the setting: unknown keys, wrong types, fractional integers, ranges).
void apply_dkm_json(DKMConfig& cfg, const nlohmann::json& j, const std::string& source);
// Every setting of cfg.
nlohmann::json dkm_to_json(const DKMConfig& cfg);

}  // namespace edkm
