// DKM iterations in unique-value space, forward and backward spelled out.
//
// Notation (one group; all groups run batched): distinct values v_u with multiplicities n_u,
// palettes C^t (k x d), t = 0 .. T. Iteration t:
//
//     D^t_uj = |v_u - C^t_j|^2 - b [j = 0]          b = prune_threshold
//     P^t    = softmax_j(-D^t / tau)
//     A^t    = max(P^t, z)                          z = zero_threshold
//     S^t_j  = sum_u n_u A^t_uj ,   M^t_j = sum_u n_u A^t_uj v_u ,   C^{t+1}_j = M^t_j / S^t_j
//
// and the emitted value (coremltools emits with the last attention map and the last palette):
//
//     out_u = sum_j A^{T-1}_uj C^T_j .
//
// Every weight i of value u receives out_u. Given G_i = dL/d out_{u(i)}, its gradient has two
// parts: the direct path (palettes fixed), J_u^T G_i with J_u = d out_u / d v_u, which differs
// per weight through G_i; and the palette path h_u, the same for every weight of value u
// because each such weight enters S and M identically. Backward therefore needs only
// g_u = sum_{i: u(i)=u} G_i and per-value tables J_u, h_u.
//
// Building blocks (derived once, used for the emit and for every iteration):
//   softmax + clamp: given dL/dA, dL/dP = dL/dA [P >= z] (clamp passes gradient where it did
//     not clip) and dL/dZ = P (dL/dP - sum_l P_l dL/dP_l) with Z = -D / tau, so
//     dL/dD = -dL/dZ / tau.
//   distances: dD_uj/dv_u = 2 (v_u - C_j), dD_uj/dC_j = -2 (v_u - C_j).
//   direct Jacobian: dP_j/dv = (2 / tau) P_j (C_j - pbar), pbar = sum_l P_l C_l, hence
//     J_u^T = sum_j w_uj (C^{T-1}_j - pbar_u) (C^T_j)^T,   w_uj = (2 / tau) [P_uj >= z] P_uj.
//   update: C' = M / S gives, per weight of value u (A held fixed),
//     dL/dA_uj = dL/dC'_j . (v_u - C'_j) / S_j = gM_j . v_u + gS_j,
//       gM_j = dL/dC'_j / S_j,  gS_j = -(dL/dC'_j . C'_j) / S_j,
//     and through M's factor v_u: sum_j A_uj gM_j.
//   The palette gradient sums the per-weight terms over all weights: n_u times the per-value
//   term, except for the emit, whose g_u already is that sum.
#include "cluster/uspace.h"

#include <ATen/ATen.h>

#include <vector>

namespace edkm::detail {
namespace {

// Attention maps are laid out [G, k, Uc] (centroid before value): every reduction over the k
// centroids (softmax, min) then runs along a strided axis that ATen vectorises across values,
// ~2x faster for k = 8 than along a contiguous axis of length 8, and the sums over values are
// plain matrix products with [G, Uc, d] tensors.
struct Attention {
  at::Tensor P;     // [G, k, Uc] softmax
  at::Tensor A;     // [G, k, Uc] clamped
  at::Tensor diff;  // [G, k, Uc, d]: v_u - C_j
};

// v [G, Uc, d], C [G, k, d]. Dmin (optional) receives min_j D_uj [G, Uc] for the inertia.
Attention attention(const at::Tensor& v, const at::Tensor& C, const SoftKMeans& p,
                    at::Tensor* dmin = nullptr) {
  Attention a;
  a.diff = v.unsqueeze(1) - C.unsqueeze(2);
  // Scalar clustering (d = 1) needs no reduction over d.
  at::Tensor D = a.diff.size(-1) == 1 ? a.diff.square().squeeze(-1) : a.diff.square().sum(-1);
  if (p.prune_threshold > 0) D.select(1, 0).sub_(p.prune_threshold);
  if (dmin) *dmin = D.amin(1);
  a.P = at::softmax(D.mul(-1.0 / p.tau), 1);
  a.A = a.P.clamp_min(p.zero_threshold);
  return a;
}

// Where the clamp clipped: P < zero_threshold.
at::Tensor clipped(const Attention& a, const SoftKMeans& p) { return a.P < p.zero_threshold; }

// dL/dD from dL/dA (a temporary, overwritten) through the clamp (gradient only where it did not
// clip, as autograd's clamp_min) and the softmax (ATen's fused P (gP - sum_l P_l gP_l)).
at::Tensor softmax_clamp_backward(const Attention& a, const at::Tensor& clip, at::Tensor gA,
                                  const SoftKMeans& p) {
  gA.masked_fill_(clip, 0);
  return at::_softmax_backward_data(gA, a.P, 1, a.P.scalar_type()).div_(-p.tau);
}

// sum_u gD_uj dD_uj/dC_j = -2 sum_u gD_uj (v_u - C_j)                  -> [G, k, d]
at::Tensor dist_grad_palette(const at::Tensor& gD, const Attention& a) {
  return (gD.unsqueeze(-1) * a.diff).sum(2).mul_(-2);
}

// sum_j gD_uj dD_uj/dv_u = 2 sum_j gD_uj (v_u - C_j)                  -> [G, Uc, d]
at::Tensor dist_grad_value(const at::Tensor& gD, const Attention& a) {
  return (gD.unsqueeze(-1) * a.diff).sum(1).mul_(2);
}

// Calls f(u0, len) over chunks of the U axis small enough that [G, k, Uc, d] stays ~8 MB.
template <typename F>
void for_chunks(const at::Tensor& v, int64_t k, F&& f) {
  const int64_t G = v.size(0), U = v.size(1), d = v.size(2);
  const int64_t step = std::max<int64_t>(1, (int64_t(1) << 21) / (G * k * d));
  for (int64_t u0 = 0; u0 < U; u0 += step) f(u0, std::min(step, U - u0));
}

// Multiplicities of a chunk, shaped to scale a [G, k, Uc] map (undefined: all 1).
at::Tensor chunk_counts(const at::Tensor& n, int64_t u0, int64_t len) {
  return n.defined() ? n.narrow(1, u0, len).unsqueeze(1) : at::Tensor();
}

// Per-group palettes at the group's own iteration count: C^{T_g + offset}.
at::Tensor palette_at(const UniqueSpaceState& s, int64_t offset) {
  at::Tensor t = s.iters + offset;
  at::Tensor g = at::arange(s.iters.size(0), s.iters.options());
  return s.palettes.index({t, g});
}

UniqueSpaceState on_device(const UniqueSpaceState& s, const at::Device& device) {
  return {s.palettes.to(device), s.sums.to(device), s.iters.to(device)};
}

at::Tensor on_host(const at::Tensor& t) { return t.defined() ? t.cpu() : t; }

}  // namespace

UniqueSpaceState uspace_forward(const at::Tensor& v, const at::Tensor& n, const at::Tensor& c0,
                                const SoftKMeans& p, at::Tensor* out, Kernels kernels) {
#ifdef EDKM_CUDA
  if (kernels == Kernels::kAuto && uspace_host_applies(v) && v.is_cuda()) return uspace_forward_cuda(v, n, c0, p, out);
#endif
  if (kernels == Kernels::kAuto && uspace_host_applies(v)) {  // the copies are no-ops on the CPU
    at::Tensor host_out;
    UniqueSpaceState s = uspace_forward_host(v.cpu(), on_host(n), c0.cpu(), p, &host_out);
    *out = host_out.to(v.device());
    return on_device(s, v.device());
  }
  const int64_t G = v.size(0), k = c0.size(1), d = v.size(2);
  const auto opts = v.options();
  std::vector<at::Tensor> palettes{c0}, sums;
  at::Tensor C = c0;
  at::Tensor active = at::ones({G}, opts.dtype(at::kBool));
  at::Tensor iters = at::zeros({G}, opts.dtype(at::kLong));
  at::Tensor last_inertia = at::zeros({G}, opts.dtype(at::kDouble));

  for (int t = 0; t < p.max_iters; ++t) {
    at::Tensor S = at::zeros({G, k}, opts), M = at::zeros({G, k, d}, opts);
    // Inertia in fp64 so that the early-stop decision does not depend on summation order.
    at::Tensor inertia = at::zeros({G}, opts.dtype(at::kDouble));
    for_chunks(v, k, [&](int64_t u0, int64_t len) {
      at::Tensor vc = v.narrow(1, u0, len), nc = chunk_counts(n, u0, len);
      at::Tensor dmin;
      Attention a = attention(vc, C, p, &dmin);
      at::Tensor An = nc.defined() ? a.A * nc : a.A;
      S += An.sum(2);
      M += at::bmm(An, vc);
      at::Tensor dm = dmin.to(at::kDouble);
      inertia += (nc.defined() ? dm * nc.squeeze(1).to(at::kDouble) : dm).sum(1);
    });
    C = at::where(active.view({G, 1, 1}), M / S.unsqueeze(-1), C);
    palettes.push_back(C);
    sums.push_back(S);
    iters += active.to(at::kLong);
    if (t > 0) active = active & ((inertia - last_inertia).abs() > p.eps);
    last_inertia = inertia;
    if (!active.any().item<bool>()) break;
  }

  UniqueSpaceState state{at::stack(palettes), at::stack(sums), iters};
  at::Tensor c_prev = palette_at(state, -1), c_fin = palette_at(state, 0);
  *out = at::empty_like(v);
  for_chunks(v, k, [&](int64_t u0, int64_t len) {
    Attention a = attention(v.narrow(1, u0, len), c_prev, p);
    out->narrow(1, u0, len).copy_(at::bmm(a.A.transpose(1, 2), c_fin));
  });
  return state;
}

UniqueSpaceGrad uspace_backward(const at::Tensor& v, const at::Tensor& n,
                                const UniqueSpaceState& state, const at::Tensor& g,
                                const SoftKMeans& p, Kernels kernels) {
#ifdef EDKM_CUDA
  if (kernels == Kernels::kAuto && uspace_host_applies(v) && v.is_cuda()) return uspace_backward_cuda(v, n, state, g, p);
#endif
  if (kernels == Kernels::kAuto && uspace_host_applies(v)) {
    UniqueSpaceGrad r = uspace_backward_host(v.cpu(), on_host(n), on_device(state, at::kCPU), g.cpu(), p);
    return {r.jac.to(v.device()), r.h.to(v.device())};
  }
  const int64_t G = v.size(0), U = v.size(1), d = v.size(2);
  const int64_t k = state.palettes.size(2);
  const int64_t T = state.sums.size(0);
  const auto opts = v.options();
  at::Tensor c_prev = palette_at(state, -1), c_fin = palette_at(state, 0);

  // (1) The emit out_u = sum_j A_uj(v_u, C^{T-1}) C^T_j: palette gradients from the aggregated
  // g_u, and the per-value direct Jacobian.
  at::Tensor g_fin = at::zeros({G, k, d}, opts);   // dL/dC^T through the emit
  at::Tensor g_prev = at::zeros({G, k, d}, opts);  // dL/dC^{T-1} through the emit's attention
  UniqueSpaceGrad out{at::empty({G, U, d, d}, opts), at::zeros({G, U, d}, opts)};
  for_chunks(v, k, [&](int64_t u0, int64_t len) {
    at::Tensor gc = g.narrow(1, u0, len);
    Attention a = attention(v.narrow(1, u0, len), c_prev, p);
    g_fin += at::bmm(a.A, gc);
    const at::Tensor clip = clipped(a, p);
    at::Tensor gD = softmax_clamp_backward(a, clip, at::bmm(c_fin, gc.transpose(1, 2)), p);
    g_prev += dist_grad_palette(gD, a);
    // J_u^T = sum_j w_uj (C^{T-1}_j - pbar_u) (C^T_j)^T: the first term is, per value u, the
    // product C^{T-1 T} [d, k] x (w_u C^T) [k, d], batched over u as one [d, k] x [k, Uc d].
    at::Tensor w = a.P.masked_fill(clip, 0).mul_(2.0 / p.tau);                      // [G, k, Uc]
    at::Tensor pbar = at::bmm(a.P.transpose(1, 2), c_prev);                         // [G, Uc, d]
    at::Tensor wc = w.unsqueeze(-1) * c_fin.unsqueeze(2);                           // [G, k, Uc, d]
    at::Tensor first = at::bmm(c_prev.transpose(1, 2), wc.view({G, k, len * d}));   // [G, d, Uc d]
    at::Tensor jt = first.view({G, d, len, d}).permute({0, 2, 1, 3}) -
                    pbar.unsqueeze(-1) * wc.sum(1).unsqueeze(2);
    out.jac.narrow(1, u0, len).copy_(jt);
  });

  // (2) Back through the updates, t = T-1 .. 0. g_next is dL/dC^{t+1}; a group that stopped
  // before t kept its palette, so its gradient passes through unchanged.
  at::Tensor g_next = g_fin;
  for (int64_t t = T - 1; t >= 0; --t) {
    at::Tensor active = state.iters > t;                 // [G]
    at::Tensor emit_here = state.iters == t + 1;         // groups whose emit used A^t
    at::Tensor C = state.palettes[t], C_next = state.palettes[t + 1], S = state.sums[t];
    at::Tensor gM = g_next / S.unsqueeze(-1);                  // [G, k, d]
    at::Tensor gS = -(g_next * C_next).sum(-1) / S;            // [G, k]
    at::Tensor g_cur = at::zeros({G, k, d}, opts);
    at::Tensor keep = active.view({G, 1, 1}), stopped = keep.logical_not();
    for_chunks(v, k, [&](int64_t u0, int64_t len) {
      at::Tensor vc = v.narrow(1, u0, len), nc = chunk_counts(n, u0, len);
      Attention a = attention(vc, C, p);
      at::Tensor gA = at::bmm(gM, vc.transpose(1, 2)) + gS.unsqueeze(-1);  // per weight
      at::Tensor gD = softmax_clamp_backward(a, clipped(a, p), gA, p);
      at::Tensor h = at::bmm(a.A.transpose(1, 2), gM) + dist_grad_value(gD, a);
      out.h.narrow(1, u0, len).add_(h.masked_fill_(stopped, 0));
      g_cur += dist_grad_palette(nc.defined() ? gD * nc : gD, a);
    });
    g_cur += at::where(emit_here.view({G, 1, 1}), g_prev, at::zeros({}, opts));
    g_next = at::where(keep, g_cur, g_next);
  }
  return out;
}

}  // namespace edkm::detail
