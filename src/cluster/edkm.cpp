// The dense DKM with eDKM's storage of saved tensors. The N x k formulation is written as three
// custom ops per iteration with hand-written backward passes (the derivations are those of
// uspace.cpp, with every weight its own row):
//
//   attention  A = max(softmax(-|x - c|^2 / tau), z)        saves x, P = softmax(...)   (C small)
//   update     C' = (A^T x) / (A^T 1)                        saves A, x                  (S, C' small)
//   emit       out = A C                                     saves A                     (C small)
//
// so that every N-sized tensor kept for backward passes through the SaveStore.
#include "cluster/edkm.h"

#include <torch/csrc/autograd/custom_function.h>

#include <ATen/ATen.h>

#include <fmt/ranges.h>

#include <tuple>

#include "cluster/dkm_internal.h"
#include "common/error.h"
#include "dist/dist.h"

namespace edkm {

// ---------------------------------------------------------------------------------------------
// SaveStore

struct SaveStore::Entry {
  enum Kind { kKept, kUnique } kind = kKept;
  at::Tensor tensor;       // kKept: the tensor itself or its host copy
  c10::Device device{c10::kCPU};  // where it was computed
  size_t table = 0, index = 0;    // kUnique: entries of the table and of the (sharded) index
  int64_t rows = 0;               // kUnique: n
  bool sharded = false;
};

SaveStore::SaveStore(Options o, std::shared_ptr<Dist> dist) : opts_(o), dist_(std::move(dist)) {}

// The duplicate check: the same storage (still alive: a freed storage's address can be
// reused), view and version was saved before. Only weak references are kept, so the store
// never holds on to what it did not copy.
SaveStore::Seen SaveStore::identity(const at::Tensor& t, size_t handle) {
  return {fmt::format("{}/{}/{}/{}", t.storage_offset(), t.sizes(), t.strides(), t._version()),
          t.storage().getWeakStorageImpl(), handle};
}

bool SaveStore::find(const std::vector<Seen>& list, const at::Tensor& t, size_t* handle) {
  const Seen me = identity(t, 0);
  for (const Seen& s : list) {
    if (s.view != me.view) continue;
    auto alive = s.storage.lock();
    if (alive && alive.get() == t.storage().unsafeGetStorageImpl()) {
      *handle = s.handle;
      return true;
    }
  }
  return false;
}

size_t SaveStore::keep(const at::Tensor& t) {
  ++stats_.saves;
  size_t h;
  if (find(seen_, t, &h)) {
    ++stats_.duplicates;
    return h;
  }
  auto e = std::make_shared<Entry>();
  e->device = t.device();
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  if (opts_.marshal) {
    // To host memory: pinned on accelerators (fast copies back), a plain copy on CPU builds,
    // where "device" and host are the same RAM but the store is accounted on its own.
    e->tensor = t.device().is_cpu() ? t.detach().clone()
                                    : at::empty(t.sizes(), t.options().device(at::kCPU).pinned_memory(true)).copy_(t);
    stats_.host_bytes += bytes;
  } else {
    e->tensor = t.detach();
    stats_.device_bytes += bytes;
  }
  entries_.push_back(e);
  seen_.push_back(identity(t, entries_.size() - 1));
  return entries_.size() - 1;
}

size_t SaveStore::save(const at::Tensor& t, const at::Tensor& rows) {
  if (!opts_.uniquify || !rows.defined()) return keep(t);
  // A tensor uniquified before (x is saved by every op) is not stored again.
  size_t h;
  if (find(unique_seen_, t, &h)) {
    ++stats_.saves;
    ++stats_.duplicates;
    return h;
  }
  // One representative row per distinct value: any will do, equal values give equal rows.
  const int64_t n = rows.numel();
  at::Tensor r = rows.to(at::kLong);
  const int64_t U = r.max().item<int64_t>() + 1;
  at::Tensor reps = at::zeros({U}, r.options()).index_put_({r}, at::arange(n, r.options()));
  auto e = std::make_shared<Entry>();
  e->kind = Entry::kUnique;
  e->device = t.device();
  e->rows = n;
  e->table = keep(t.index_select(0, reps));
  if (opts_.shard && dist_ && dist_->world() > 1) {
    // This learner's slice of the index, padded so that every slice has the same length; made
    // once per index, so that the maps sharing it share the slice.
    size_t slice;
    if (!find(shards_, rows, &slice)) {
      const int64_t L = dist_->world(), per = (n + L - 1) / L;
      at::Tensor padded = at::zeros({per * L}, rows.options());
      padded.narrow(0, 0, n).copy_(rows);
      slice = keep(padded.narrow(0, dist_->rank() * per, per).clone());
      shards_.push_back(identity(rows, slice));
    }
    e->index = slice;
    e->sharded = true;
  } else {
    e->index = keep(rows);
  }
  entries_.push_back(e);
  unique_seen_.push_back(identity(t, entries_.size() - 1));
  return entries_.size() - 1;
}

at::Tensor SaveStore::load(size_t h) const {
  const Entry& e = *entries_.at(h);
  if (e.kind == Entry::kKept) return e.tensor.to(e.device, /*non_blocking=*/false);
  at::Tensor table = load(e.table);
  at::Tensor index = load(e.index);
  if (e.sharded) index = dist_->all_gather(index).narrow(0, 0, e.rows);
  return table.index_select(0, index.to(at::kLong).to(table.device()));
}

// ---------------------------------------------------------------------------------------------
// The ops

namespace detail {
namespace {

struct StoreHolder : torch::CustomClassHolder {
  std::shared_ptr<SaveStore> store;
};

c10::IValue handle(size_t h) { return c10::IValue(static_cast<int64_t>(h)); }
SaveStore& store_of(torch::autograd::AutogradContext* ctx) {
  return *static_cast<StoreHolder*>(ctx->saved_data["store"].toCapsule().get())->store;
}

struct AttentionFn : torch::autograd::Function<AttentionFn> {
  // x [n, d], C [k, d] -> A [n, k]; *inertia = sum_i min_j D_ij (fp64).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& C,
                            c10::intrusive_ptr<StoreHolder> st, const c10::optional<at::Tensor>& rows,
                            const DKMConfig& cfg, double* inertia) {
    at::Tensor D = (x.unsqueeze(1) - C.unsqueeze(0)).pow(2).sum(-1);
    if (cfg.prune_threshold > 0) D.select(-1, 0).sub_(cfg.prune_threshold);
    *inertia = std::get<0>(D.min(-1)).to(at::kDouble).sum().item<double>();
    at::Tensor P = at::softmax(D.neg().div(cfg.tau), -1);
    ctx->saved_data["store"] = c10::IValue::make_capsule(st);
    // x's rows are the weight values themselves: uniquified with the same index.
    ctx->saved_data["x"] = handle(st->store->save(x, rows.value_or(at::Tensor())));
    ctx->saved_data["P"] = handle(st->store->save(P, rows.value_or(at::Tensor())));
    ctx->saved_data["tau"] = cfg.tau;
    ctx->saved_data["z"] = cfg.zero_threshold;
    ctx->save_for_backward({C});
    return P.clamp_min(cfg.zero_threshold);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list g) {
    SaveStore& s = store_of(ctx);
    const at::Tensor x = s.load(ctx->saved_data["x"].toInt()), P = s.load(ctx->saved_data["P"].toInt());
    const at::Tensor C = ctx->get_saved_variables()[0];
    const double tau = ctx->saved_data["tau"].toDouble(), z = ctx->saved_data["z"].toDouble();
    at::Tensor gP = g[0] * (P >= z);
    at::Tensor gD = (P * (gP - (P * gP).sum(-1, true))).div(-tau);  // softmax, then -D / tau
    at::Tensor diff = x.unsqueeze(1) - C.unsqueeze(0);               // dD/dx = 2 diff, dD/dC = -2 diff
    at::Tensor gdiff = gD.unsqueeze(-1) * diff;
    return {gdiff.sum(1).mul(2), gdiff.sum(0).mul(-2), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct UpdateFn : torch::autograd::Function<UpdateFn> {
  // C' = (A^T x) / S, S = sum_i A_i.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& A, const at::Tensor& x,
                            c10::intrusive_ptr<StoreHolder> st, const c10::optional<at::Tensor>& rows) {
    at::Tensor S = A.sum(0);
    at::Tensor Cn = at::matmul(A.t(), x) / S.unsqueeze(1);
    ctx->saved_data["store"] = c10::IValue::make_capsule(st);
    ctx->saved_data["A"] = handle(st->store->save(A, rows.value_or(at::Tensor())));
    ctx->saved_data["x"] = handle(st->store->save(x, rows.value_or(at::Tensor())));
    ctx->save_for_backward({S, Cn});
    return Cn;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list g) {
    SaveStore& s = store_of(ctx);
    const at::Tensor A = s.load(ctx->saved_data["A"].toInt()), x = s.load(ctx->saved_data["x"].toInt());
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &S = saved[0], &Cn = saved[1];
    at::Tensor gM = g[0] / S.unsqueeze(1);        // dC'/dM = 1/S
    at::Tensor gS = -(g[0] * Cn).sum(-1) / S;     // dC'/dS = -C'/S
    return {at::matmul(x, gM.t()) + gS.unsqueeze(0), at::matmul(A, gM), at::Tensor(), at::Tensor()};
  }
};

struct EmitFn : torch::autograd::Function<EmitFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& A, const at::Tensor& C,
                            c10::intrusive_ptr<StoreHolder> st, const c10::optional<at::Tensor>& rows) {
    ctx->saved_data["store"] = c10::IValue::make_capsule(st);
    ctx->saved_data["A"] = handle(st->store->save(A, rows.value_or(at::Tensor())));
    ctx->save_for_backward({C});
    return at::matmul(A, C);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list g) {
    const at::Tensor A = store_of(ctx).load(ctx->saved_data["A"].toInt());
    const at::Tensor C = ctx->get_saved_variables()[0];
    return {at::matmul(g[0], C.t()), at::matmul(A.t(), g[0]), at::Tensor(), at::Tensor()};
  }
};

// The index of each weight's distinct value, in the narrowest integer type that holds it.
at::Tensor distinct_rows(const at::Tensor& x) {
  at::NoGradGuard ng;
  at::Tensor inv;
  if (x.size(1) == 1) std::tie(std::ignore, inv, std::ignore) = at::_unique2(x.view({-1}), true, true, false);
  else std::tie(std::ignore, inv, std::ignore) = at::unique_dim(x, 0, true, true, false);
  inv = inv.view({-1});
  return inv.max().item<int64_t>() < 32767 ? inv.to(at::kShort) : inv.to(at::kInt);
}

}  // namespace

DKMResult dkm_stored(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg, const at::Tensor& scale,
                     const GroupLayout& layout, SaveStats* stats, std::shared_ptr<Dist> dist) {
  check_finite(weight, "weight");
  at::Tensor x = prepare(weight, layout, cfg, scale);
  check_finite(x.detach(), "weight after rounding to the cluster dtype");
  auto st = c10::make_intrusive<StoreHolder>();
  st->store = std::make_shared<SaveStore>(SaveStore::Options{cfg.marshal, cfg.uniquify, cfg.shard},
                                          dist ? std::move(dist) : default_dist());
  DKMResult result;
  result.method = DKMMethod::kEDKM;
  std::vector<at::Tensor> outs, palettes;
  for (int64_t g = 0; g < layout.groups; ++g) {
    at::Tensor X = x[g];
    c10::optional<at::Tensor> rows;
    if (cfg.uniquify) rows = distinct_rows(X.detach());
    at::Tensor C = palette[g], A;
    double last = 0, inertia = 0;
    int iters = 0;
    for (int t = 0; t < cfg.max_iters; ++t) {
      A = AttentionFn::apply(X, C, st, rows, cfg, &inertia);
      C = UpdateFn::apply(A, X, st, rows);
      ++iters;
      if (t > 0 && std::abs(last - inertia) <= cfg.eps) break;
      last = inertia;
    }
    outs.push_back(EmitFn::apply(A, C, st, rows));
    palettes.push_back(C.detach());
    result.iterations.push_back(iters);
  }
  result.weight = restore(at::stack(outs), layout, scale, weight);
  result.palette = at::stack(palettes);
  if (stats) *stats = st->store->stats();
  return result;
}

}  // namespace detail

DKMResult dkm_with_stats(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg, SaveStats* stats,
                         const at::Tensor& scale, std::shared_ptr<Dist> dist) {
  if (cfg.method != DKMMethod::kEDKM) throw_invalid("dkm_with_stats: method must be edkm");
  using namespace detail;
  const GroupLayout layout = GroupLayout::of(weight, cfg);
  const ScaleAndPalette args = checked_scale_and_palette(scale, palette, layout, cfg, weight);
  return dkm_stored(weight, args.collapsed ? repair_collapsed(args.palette) : args.palette, cfg, args.scale, layout,
                    stats, std::move(dist));
}

}  // namespace edkm
