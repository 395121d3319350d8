// dkm(): argument checks, method choice, and the autograd function of the unique-value method.
#include <torch/csrc/autograd/custom_function.h>

#include <ATen/ATen.h>

#include "cluster/dkm_internal.h"
#include "cluster/edkm.h"
#include "cluster/uspace.h"
#include "cluster/value_index.h"
#include "common/error.h"

namespace edkm {
namespace detail {
namespace {

// What the backward needs besides the saved weight: the value index and the iteration state.
struct IndexedState : torch::CustomClassHolder {
  std::unique_ptr<ValueIndex> index;
  UniqueSpaceState state;
  SoftKMeans params;
  // Importance-weighted DKM: the caller's per-unit importance [G, vectors] (a reference, not a
  // copy, so that nothing N-sized is saved) and the summed importance of each value [G, U] in
  // place of its count.
  at::Tensor importance;
  at::Tensor weights;
  GroupLayout layout;
  at::Tensor scale;
  // The dtype of the unique-value-space arithmetic. With a sharp softmax (tau = 1e-4 on raw
  // weights) a few weights near the midpoints between centroids dominate the gradient, and fp32
  // sums leave it 1e-4..1e-3 from the exact value; over U << N values fp64 costs nothing and
  // makes the result exact to fp32 output rounding. The dense fallback (U = N) stays in the
  // compute dtype.
  at::ScalarType dtype;
};

// w~ = emit(out) with out computed in unique-value space. Forward and backward each make O(1)
// passes over the N weights (through the index) plus O(U k T) work per group.
struct IndexedDKMFunction : torch::autograd::Function<IndexedDKMFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight,
                            c10::intrusive_ptr<IndexedState> st, const at::Tensor& palette) {
    at::Tensor out;
    const ValueIndex& index = *st->index;
    st->state = uspace_forward(index.values().to(st->dtype), counts(*st), palette.to(st->dtype),
                               st->params, &out);
    // Saving the input keeps autograd's check that it is not modified before backward; the
    // index refers to the same storage, so this costs no memory.
    ctx->save_for_backward({weight});
    ctx->saved_data["state"] = c10::IValue::make_capsule(st);
    return index.emit(out.to(index.values().scalar_type()));
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor weight = ctx->get_saved_variables()[0];  // with the version check
    c10::intrusive_ptr<torch::CustomClassHolder> capsule = ctx->saved_data["state"].toCapsule();
    auto* st = static_cast<IndexedState*>(capsule.get());
    const ValueIndex& index = *st->index;
    const at::Tensor& grad = grads[0];
    at::Tensor g = index.aggregate(grad).to(st->dtype);
    UniqueSpaceGrad ug = uspace_backward(index.values().to(st->dtype), counts(*st), st->state, g,
                                         st->params);
    const auto cdt = index.values().scalar_type();
    if (!st->importance.defined()) return {index.input_grad(grad, ug.jac.to(cdt), ug.h.to(cdt)), at::Tensor(), at::Tensor()};
    // A weight of value u enters S and M with its own importance f_i, so its palette path is
    // f_i times the per-unit term h_u that uspace_backward computes from the summed weights:
    // f_i h_u / s_r = (f_i / s_r^2) emit(h)_i.
    at::Tensor direct = index.input_grad(grad, ug.jac.to(cdt), at::zeros_like(ug.h, cdt));
    const GroupLayout& l = st->layout;
    at::Tensor f = spread_vectors(st->importance, l);
    if (st->scale.defined()) f = f / st->scale.square().unsqueeze(1);
    at::Tensor path = f * index.emit(ug.h.to(cdt)).reshape({l.rows, l.cols});
    return {direct + path.to(direct.scalar_type()).view(direct.sizes()), at::Tensor(), at::Tensor()};
  }

  static at::Tensor counts(const IndexedState& st) {
    if (st.weights.defined()) return st.weights.to(st.dtype);
    const at::Tensor& n = st.index->counts();
    return n.defined() ? n.to(st.dtype) : n;
  }
};

}  // namespace

DKMResult dkm_indexed(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
                      const at::Tensor& scale, const GroupLayout& layout, IndexKind kind,
                      const at::Tensor& importance) {
  auto st = c10::make_intrusive<IndexedState>();
  st->params = SoftKMeans::from(cfg);
  // MPS has no fp64.
  const bool exact = kind != IndexKind::kIdentity && weight.device().type() != c10::DeviceType::MPS;
  st->dtype = exact ? at::kDouble : compute_dtype(weight);
  switch (kind) {
    case IndexKind::kPattern: st->index = make_pattern_index(weight, layout, cfg, scale); break;
    case IndexKind::kSorted: st->index = make_sorted_index(weight, layout, cfg, scale); break;
    case IndexKind::kIdentity: st->index = make_identity_index(weight, layout, cfg, scale); break;
  }
  if (importance.defined()) {
    st->importance = importance;
    st->layout = layout;
    st->scale = scale;
    st->weights = value_weights(*st->index, importance, layout, scale, weight);
  }
  DKMResult r;
  r.method = kind == IndexKind::kIdentity ? DKMMethod::kAuto : DKMMethod::kUnique;
  r.weight = IndexedDKMFunction::apply(weight, st, palette);
  const UniqueSpaceState& s = st->state;
  at::Tensor groups = at::arange(s.iters.size(0), s.iters.options());
  r.palette = s.palettes.index({s.iters, groups}).detach().to(compute_dtype(weight));
  at::Tensor iters = s.iters.cpu();
  for (int64_t g = 0; g < iters.numel(); ++g) r.iterations.push_back(static_cast<int>(iters[g].item<int64_t>()));
  return r;
}

}  // namespace detail

DKMResult dkm(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
              const at::Tensor& scale, const Importance& importance) {
  using namespace detail;
  const GroupLayout layout = GroupLayout::of(weight, cfg);
  at::Tensor s = checked_scale(scale, layout, cfg, weight);
  at::Tensor c0 = repair_collapsed(checked_palette(palette, layout, cfg, weight));
  const at::Tensor f = checked_importance(importance, layout, weight);
  const bool pattern = is_16bit(rounding_dtype(weight, cfg.cluster_dtype)) && layout.dim == 1;
  switch (cfg.method) {
    case DKMMethod::kDense:
      return dkm_dense(weight, c0, cfg, s, layout, f);
    case DKMMethod::kUnique:
      return dkm_indexed(weight, c0, cfg, s, layout, pattern ? IndexKind::kPattern : IndexKind::kSorted, f);
    case DKMMethod::kAuto:
      return dkm_indexed(weight, c0, cfg, s, layout, pattern ? IndexKind::kPattern : IndexKind::kIdentity, f);
    case DKMMethod::kEDKM:
      if (f.defined()) throw_invalid("importance-weighted DKM runs with the dense, unique and auto methods, not edkm");
      return dkm_stored(weight, c0, cfg, s, layout, nullptr, nullptr);
  }
  throw_invalid("unknown DKM method");
}

at::Tensor row_scales(const at::Tensor& weight) {
  if (!weight.defined() || weight.numel() == 0) throw_invalid("row_scales: empty weight");
  at::NoGradGuard no_grad;
  at::Tensor w = weight.detach().reshape({weight.dim() == 1 ? 1 : weight.size(0), -1}).to(at::kFloat);
  detail::check_finite(w, "weight");
  at::Tensor s = (std::get<0>(w.max(1)) - std::get<0>(w.min(1))) * 0.5;
  return at::where(s > 0, s, at::ones_like(s));
}

Importance::Importance(const at::Tensor& importance, const at::Tensor& weight, const DKMConfig& cfg) {
  using namespace detail;
  const GroupLayout layout = GroupLayout::of(weight, cfg);
  if (!importance.defined()) throw_invalid("importance is undefined");
  if (!importance.sizes().equals(weight.sizes()))
    throw_invalid("importance must have the weight's shape {}, got {}", c10::str(weight.sizes()),
                  c10::str(importance.sizes()));
  if (!at::isFloatingType(importance.scalar_type())) throw_invalid("importance must be floating-point");
  at::NoGradGuard no_grad;
  at::Tensor f = importance.detach().to(weight.device());
  check_finite(f, "importance");
  if (f.lt(0).any().item<bool>()) throw_invalid("importance must be >= 0");
  f = f.to(compute_dtype(weight)).reshape({layout.groups, layout.vectors, layout.dim}).sum(-1);
  at::Tensor total = f.sum(1, /*keepdim=*/true);
  per_unit_ = at::where(total > 0, f * (double(layout.vectors) / total), at::ones_like(f));
}

}  // namespace edkm
