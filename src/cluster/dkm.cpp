// dkm() and DeferredDKM: argument checks, method choice, and the unique-value method's forward
// and backward (as an autograd function for dkm(), called directly by DeferredDKM).
#include <torch/csrc/autograd/autograd.h>
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

at::Tensor counts(const IndexedState& st) {
  if (st.weights.defined()) return st.weights.to(st.dtype);
  const at::Tensor& n = st.index->counts();
  return n.defined() ? n.to(st.dtype) : n;
}

// The iterations in unique-value space from `palette`: records their state in `st` and returns
// the emitted value of each distinct value ([G, U, d], the index's value dtype).
at::Tensor indexed_iterations(IndexedState& st, const at::Tensor& palette) {
  at::Tensor out;
  const ValueIndex& index = *st.index;
  st.state = uspace_forward(index.values().to(st.dtype), counts(st), palette.to(st.dtype), st.params, &out);
  return out.to(index.values().scalar_type());
}

// Each group's palette after its last update, detached.
at::Tensor final_palette(const IndexedState& st, at::ScalarType dtype) {
  const UniqueSpaceState& s = st.state;
  at::Tensor groups = at::arange(s.iters.size(0), s.iters.options());
  return s.palettes.index({s.iters, groups}).detach().to(dtype);
}

// dL/dw from dL/dw~ = grad: O(1) passes over the N weights (through the index) plus O(U k T)
// work per group.
at::Tensor indexed_backward(const IndexedState& st, const at::Tensor& grad) {
  const ValueIndex& index = *st.index;
  at::Tensor g = index.aggregate(grad).to(st.dtype);
  UniqueSpaceGrad ug = uspace_backward(index.values().to(st.dtype), counts(st), st.state, g, st.params);
  const auto cdt = index.values().scalar_type();
  if (!st.importance.defined()) return index.input_grad(grad, ug.jac.to(cdt), ug.h.to(cdt));
  // A weight of value u enters S and M with its own importance f_i, so its palette path is
  // f_i times the per-unit term h_u that uspace_backward computes from the summed weights:
  // f_i h_u / s_r = (f_i / s_r^2) emit(h)_i.
  at::Tensor direct = index.input_grad(grad, ug.jac.to(cdt), at::zeros_like(ug.h, cdt));
  const GroupLayout& l = st.layout;
  at::Tensor f = spread_vectors(st.importance, l);
  if (st.scale.defined()) f = f / st.scale.square().unsqueeze(1);
  at::Tensor path = f * index.emit(ug.h.to(cdt)).reshape({l.rows, l.cols});
  return direct + path.to(direct.scalar_type()).view(direct.sizes());
}

// w~ = emit(out) with out computed in unique-value space.
struct IndexedDKMFunction : torch::autograd::Function<IndexedDKMFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight,
                            c10::intrusive_ptr<IndexedState> st, const at::Tensor& palette) {
    at::Tensor out = indexed_iterations(*st, palette);
    // Saving the input keeps autograd's check that it is not modified before backward; the
    // index refers to the same storage, so this costs no memory.
    ctx->save_for_backward({weight});
    ctx->saved_data["state"] = c10::IValue::make_capsule(st);
    return st->index->emit(out);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    ctx->get_saved_variables();  // the version check
    c10::intrusive_ptr<torch::CustomClassHolder> capsule = ctx->saved_data["state"].toCapsule();
    return {indexed_backward(*static_cast<IndexedState*>(capsule.get()), grads[0]), at::Tensor(), at::Tensor()};
  }
};

c10::intrusive_ptr<IndexedState> make_indexed_state(const at::Tensor& weight, const DKMConfig& cfg,
                                                    const at::Tensor& scale, const GroupLayout& layout,
                                                    IndexKind kind, const at::Tensor& importance) {
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
  return st;
}

}  // namespace

DKMResult dkm_indexed(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
                      const at::Tensor& scale, const GroupLayout& layout, IndexKind kind,
                      const at::Tensor& importance) {
  c10::intrusive_ptr<IndexedState> st = make_indexed_state(weight, cfg, scale, layout, kind, importance);
  DKMResult r;
  r.method = kind == IndexKind::kIdentity ? DKMMethod::kAuto : DKMMethod::kUnique;
  r.weight = IndexedDKMFunction::apply(weight, st, palette);
  r.palette = final_palette(*st, compute_dtype(weight));
  at::Tensor iters = st->state.iters.cpu();
  for (int64_t g = 0; g < iters.numel(); ++g) r.iterations.push_back(static_cast<int>(iters[g].item<int64_t>()));
  return r;
}

}  // namespace detail

namespace {

// dkm()'s arguments, checked, and the method it runs.
struct Prepared {
  detail::GroupLayout layout;
  at::Tensor scale, palette, importance;
  bool pattern = false;  // the pattern index applies (16-bit cluster dtype, scalar clustering)
  bool indexed(const DKMConfig& cfg) const { return cfg.method == DKMMethod::kUnique || cfg.method == DKMMethod::kAuto; }
  detail::IndexKind kind(const DKMConfig& cfg) const {
    using detail::IndexKind;
    if (pattern) return IndexKind::kPattern;
    return cfg.method == DKMMethod::kUnique ? IndexKind::kSorted : IndexKind::kIdentity;
  }
};

Prepared prepare(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
                 const at::Tensor& scale, const Importance& importance) {
  using namespace detail;
  Prepared p{GroupLayout::of(weight, cfg), {}, {}, {}, false};
  const ScaleAndPalette args = checked_scale_and_palette(scale, palette, p.layout, cfg, weight);
  p.scale = args.scale;
  p.palette = args.collapsed ? repair_collapsed(args.palette) : args.palette;
  p.importance = checked_importance(importance, p.layout, weight);
  p.pattern = is_16bit(rounding_dtype(weight, cfg.cluster_dtype)) && p.layout.dim == 1;
  return p;
}

// dkm() on arguments prepare() has checked.
DKMResult run(const at::Tensor& weight, const Prepared& p, const DKMConfig& cfg) {
  using namespace detail;
  if (p.indexed(cfg)) return dkm_indexed(weight, p.palette, cfg, p.scale, p.layout, p.kind(cfg), p.importance);
  if (cfg.method == DKMMethod::kDense) return dkm_dense(weight, p.palette, cfg, p.scale, p.layout, p.importance);
  if (p.importance.defined()) throw_invalid("importance-weighted DKM runs with the dense, unique and auto methods, not edkm");
  return dkm_stored(weight, p.palette, cfg, p.scale, p.layout, nullptr, nullptr);
}

}  // namespace

DKMResult dkm(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
              const at::Tensor& scale, const Importance& importance) {
  return run(weight, prepare(weight, palette, cfg, scale, importance), cfg);
}

// Unique-value methods: the index and the iteration state (`indexed`, `table`: the emitted
// value per distinct value). kDense and kEDKM: w~ with its graph (`soft`) from a leaf that
// shares the caller's storage (`weight`).
struct DeferredDKM::State {
  at::Tensor weight;
  int64_t version = 0;
  c10::intrusive_ptr<detail::IndexedState> indexed;
  at::Tensor table;
  at::Tensor soft;

  void check_unchanged() const {
    detail::check_unchanged(weight, version, "DeferredDKM: the weight was modified after DKM ran on it");
  }
};

DeferredDKM::DeferredDKM(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
                         const at::Tensor& scale, const Importance& importance)
    : state_(std::make_unique<State>()) {
  using namespace detail;
  const Prepared p = prepare(weight, palette, cfg, scale, importance);
  if (p.indexed(cfg)) {
    at::NoGradGuard no_grad;
    state_->weight = weight;
    state_->indexed = make_indexed_state(weight, cfg, p.scale, p.layout, p.kind(cfg), p.importance);
    state_->table = indexed_iterations(*state_->indexed, p.palette);
    palette_ = final_palette(*state_->indexed, compute_dtype(weight));
  } else {
    // The graph only when a backward may follow (grad mode on), as dkm() would record it.
    state_->weight = at::GradMode::is_enabled() ? weight.detach().requires_grad_(true) : weight;
    DKMResult r = run(state_->weight, p, cfg);
    state_->soft = r.weight;
    palette_ = r.palette;
  }
  state_->version = state_->weight._version();
}

DeferredDKM::~DeferredDKM() = default;
DeferredDKM::DeferredDKM(DeferredDKM&&) noexcept = default;
DeferredDKM& DeferredDKM::operator=(DeferredDKM&&) noexcept = default;

at::Tensor DeferredDKM::weight() const {
  state_->check_unchanged();
  if (state_->soft.defined()) return state_->soft.detach();
  at::NoGradGuard no_grad;
  return state_->indexed->index->emit(state_->table);
}

at::Tensor DeferredDKM::backward(const at::Tensor& grad) const {
  state_->check_unchanged();
  const at::Tensor& w = state_->weight;
  if (!grad.sizes().equals(w.sizes()))
    throw_invalid("DeferredDKM::backward: the gradient must have the weight's shape {}, got {}",
                  c10::str(w.sizes()), c10::str(grad.sizes()));
  const at::Tensor g = grad.to(w.scalar_type());
  if (state_->soft.defined()) {
    if (!state_->soft.requires_grad()) throw std::logic_error("DeferredDKM: made without grad mode, it has no backward");
    return torch::autograd::grad({state_->soft}, {w}, {g}, /*retain_graph=*/true)[0];
  }
  at::NoGradGuard no_grad;
  return detail::indexed_backward(*state_->indexed, g);
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
