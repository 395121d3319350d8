// DKM iterations in unique-value space as host loops: scalar clustering (d = 1) in fp64. The
// math, notation and derivations are those of uspace.cpp; here each iteration is one loop over
// a group's values with the k per-centroid numbers in registers, and groups run in parallel.
//
// Two savings over the ATen code besides dispatch: the emit's attention map is the last
// iteration's (both use C^{T-1}), so the forward computes T maps, not T + 1, and the backward
// shares the map of its emit and of its step t = T - 1 (T maps, not T + 1), whenever a group's
// values fit in one block.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cluster/uspace.h"

namespace edkm::detail {
namespace {

constexpr int64_t kMaxValues = 65536;

// The softmax attention of a block of values to a palette, P [len, k] row-major. The
// exponentials go through one ATen call per block (vectorised: 1.3 ns against 3.1 ns for
// std::exp per value here).
class AttentionBlock {
 public:
  AttentionBlock(int64_t U, int64_t k) : k_(k), cap_(std::min(U, std::max<int64_t>(1, (int64_t(1) << 20) / k))) {
    P_.resize(cap_ * k);
  }
  int64_t capacity() const { return cap_; }
  const double* row(int64_t u) const { return P_.data() + u * k_; }

  // D_uj = (v_u - C_j)^2 - b [j = 0], P_u = softmax(-D_u / tau); dmin (optional) gets min_j D_uj.
  void compute(const double* v, int64_t len, const double* C, const SoftKMeans& p, double* dmin) {
    const double scale = -1.0 / p.tau, bias = p.prune_threshold;
    for (int64_t u = 0; u < len; ++u) {
      double* z = P_.data() + u * k_;
      double m = std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < k_; ++j) {
        const double d = v[u] - C[j];
        z[j] = d * d - (j == 0 ? bias : 0.0);
        m = std::min(m, z[j]);
      }
      if (dmin) dmin[u] = m;
      for (int64_t j = 0; j < k_; ++j) z[j] = z[j] * scale - m * scale;  // Z_j - max_l Z_l
    }
    at::from_blob(P_.data(), {len * k_}, at::TensorOptions().dtype(at::kDouble)).exp_();
    for (int64_t u = 0; u < len; ++u) {
      double* z = P_.data() + u * k_;
      double sum = 0;
      for (int64_t j = 0; j < k_; ++j) sum += z[j];
      const double inv = 1.0 / sum;
      for (int64_t j = 0; j < k_; ++j) z[j] *= inv;
    }
  }

 private:
  int64_t k_, cap_;
  std::vector<double> P_;
};

// One group's inputs and the host arrays its results go to.
struct Group {
  const double* v;  // [U]
  const double* n;  // [U], null: all 1
  int64_t U;
  int64_t k;
  double count(int64_t u) const { return n ? n[u] : 1.0; }
};

// The parameters as the loops use them, in locals (stores through the output pointers could
// otherwise alias them and force reloads).
struct Params {
  explicit Params(const SoftKMeans& p)
      : z(p.zero_threshold), neg_inv_tau(-1.0 / p.tau), two_over_tau(2.0 / p.tau) {}
  double z, neg_inv_tau, two_over_tau;
};

// dL/dD_u through the clamp and the softmax, from dL/dA_u in gD (overwritten):
// dL/dP = dL/dA [P >= z], dL/dD = -P (dL/dP - sum_l P_l dL/dP_l) / tau.
void softmax_clamp_backward(const double* P, int64_t k, const Params& c, double* gD) {
  double dot = 0;
  for (int64_t j = 0; j < k; ++j) {
    if (P[j] < c.z) gD[j] = 0;
    dot += P[j] * gD[j];
  }
  for (int64_t j = 0; j < k; ++j) gD[j] = P[j] * (gD[j] - dot) * c.neg_inv_tau;
}

// Forward of one group: palettes C^0 .. C^{T_g} into C ((max_iters + 1) x k), sums into S
// (max_iters x k), out [U]; returns T_g.
int forward_group(const Group& g, const double* c0, const SoftKMeans& p, double* C, double* S, double* out) {
  const int64_t k = g.k;
  const Params c(p);
  AttentionBlock att(g.U, k);
  std::vector<double> dmin(att.capacity()), M(k);
  std::copy(c0, c0 + k, C);
  double last = 0;
  int T = 0;
  for (int t = 0; t < p.max_iters; ++t) {
    const double* Ct = C + t * k;
    double* St = S + t * k;
    std::fill(St, St + k, 0.0);
    std::fill(M.begin(), M.end(), 0.0);
    double inertia = 0;
    for (int64_t u0 = 0; u0 < g.U; u0 += att.capacity()) {
      const int64_t len = std::min(att.capacity(), g.U - u0);
      att.compute(g.v + u0, len, Ct, p, dmin.data());
      for (int64_t u = 0; u < len; ++u) {
        const double nu = g.count(u0 + u), vu = g.v[u0 + u];
        const double* P = att.row(u);
        inertia += dmin[u] * nu;
        for (int64_t j = 0; j < k; ++j) {
          const double a = std::max(P[j], c.z) * nu;
          St[j] += a;
          M[j] += a * vu;
        }
      }
    }
    for (int64_t j = 0; j < k; ++j) C[(t + 1) * k + j] = M[j] / St[j];
    T = t + 1;
    const bool converged = t > 0 && std::abs(inertia - last) <= p.eps;
    last = inertia;
    if (converged) break;
  }
  // out_u = sum_j A^{T-1}_uj C^T_j; the map is still in the block if it held every value.
  const double* c_prev = C + (T - 1) * k;
  const double* c_fin = C + T * k;
  for (int64_t u0 = 0; u0 < g.U; u0 += att.capacity()) {
    const int64_t len = std::min(att.capacity(), g.U - u0);
    if (len < g.U) att.compute(g.v + u0, len, c_prev, p, nullptr);
    for (int64_t u = 0; u < len; ++u) {
      const double* P = att.row(u);
      double o = 0;
      for (int64_t j = 0; j < k; ++j) o += std::max(P[j], c.z) * c_fin[j];
      out[u0 + u] = o;
    }
  }
  return T;
}

// Backward of one group: C and S as the forward left them, gsum [U] the aggregated dL/dout;
// writes jac [U] (J_u, d = 1) and h [U].
void backward_group(const Group& g, const double* C, const double* S, int T, const double* gsum,
                    const SoftKMeans& p, double* jac, double* h) {
  const int64_t k = g.k;
  const Params c(p);
  AttentionBlock att(g.U, k);
  const bool one_block = att.capacity() >= g.U;
  std::vector<double> g_next(k, 0.0), g_prev(k, 0.0), g_cur(k), gM(k), gS(k), gD(k);

  // (1) The emit, with A^{T-1}: g_next = dL/dC^T, g_prev = dL/dC^{T-1} through its attention,
  // and J_u = sum_j w_uj (C^{T-1}_j - pbar_u) C^T_j, w_uj = (2 / tau) [P_uj >= z] P_uj.
  const double* c_prev = C + (T - 1) * k;
  const double* c_fin = C + T * k;
  for (int64_t u0 = 0; u0 < g.U; u0 += att.capacity()) {
    const int64_t len = std::min(att.capacity(), g.U - u0);
    att.compute(g.v + u0, len, c_prev, p, nullptr);
    for (int64_t u = 0; u < len; ++u) {
      const double gu = gsum[u0 + u], vu = g.v[u0 + u];
      const double* P = att.row(u);
      double pbar = 0, first = 0, wsum = 0;
      for (int64_t j = 0; j < k; ++j) {
        g_next[j] += std::max(P[j], c.z) * gu;
        gD[j] = c_fin[j] * gu;
        pbar += P[j] * c_prev[j];
        const double w = P[j] < c.z ? 0.0 : P[j] * c.two_over_tau;
        first += c_prev[j] * w * c_fin[j];
        wsum += w * c_fin[j];
      }
      jac[u0 + u] = first - pbar * wsum;
      h[u0 + u] = 0;
      softmax_clamp_backward(P, k, c, gD.data());
      for (int64_t j = 0; j < k; ++j) g_prev[j] += -2 * gD[j] * (vu - c_prev[j]);
    }
  }

  // (2) Back through the updates C^{t+1} = M^t / S^t, t = T-1 .. 0 (uspace.cpp, "update").
  for (int t = T - 1; t >= 0; --t) {
    const double* Ct = C + t * k;
    const double* Cn = C + (t + 1) * k;
    const double* St = S + t * k;
    for (int64_t j = 0; j < k; ++j) {
      gM[j] = g_next[j] / St[j];
      gS[j] = -(g_next[j] * Cn[j]) / St[j];
    }
    std::fill(g_cur.begin(), g_cur.end(), 0.0);
    for (int64_t u0 = 0; u0 < g.U; u0 += att.capacity()) {
      const int64_t len = std::min(att.capacity(), g.U - u0);
      if (!(one_block && t == T - 1)) att.compute(g.v + u0, len, Ct, p, nullptr);
      for (int64_t u = 0; u < len; ++u) {
        const double nu = g.count(u0 + u), vu = g.v[u0 + u];
        const double* P = att.row(u);
        double hu = 0;
        for (int64_t j = 0; j < k; ++j) {
          hu += std::max(P[j], c.z) * gM[j];
          gD[j] = gM[j] * vu + gS[j];
        }
        softmax_clamp_backward(P, k, c, gD.data());
        for (int64_t j = 0; j < k; ++j) {
          hu += 2 * gD[j] * (vu - Ct[j]);
          g_cur[j] += -2 * (gD[j] * nu) * (vu - Ct[j]);
        }
        h[u0 + u] += hu;
      }
    }
    if (t == T - 1)
      for (int64_t j = 0; j < k; ++j) g_cur[j] += g_prev[j];
    g_next.swap(g_cur);
  }
}

Group group_of(const at::Tensor& v, const at::Tensor& n, int64_t g, int64_t k) {
  const int64_t U = v.size(1);
  return {v.data_ptr<double>() + g * U, n.defined() ? n.data_ptr<double>() + g * U : nullptr, U, k};
}

}  // namespace

bool uspace_host_applies(const at::Tensor& v) {
  return v.device().is_cpu() && v.scalar_type() == at::kDouble && v.size(2) == 1 && v.size(1) <= kMaxValues;
}

UniqueSpaceState uspace_forward_host(const at::Tensor& v_in, const at::Tensor& n_in, const at::Tensor& c0_in,
                                     const SoftKMeans& p, at::Tensor* out) {
  const at::Tensor v = v_in.contiguous(), c0 = c0_in.contiguous();
  const at::Tensor n = n_in.defined() ? n_in.contiguous() : n_in;
  const int64_t G = v.size(0), U = v.size(1), k = c0.size(1), I = p.max_iters;
  std::vector<double> C(G * (I + 1) * k), S(G * I * k);
  std::vector<int> iters(G);
  *out = at::empty_like(v);
  double* o = out->data_ptr<double>();
  const double* c0p = c0.data_ptr<double>();
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      iters[g] = forward_group(group_of(v, n, g, k), c0p + g * k, p, &C[g * (I + 1) * k], &S[g * I * k], o + g * U);
  });

  // The state as uspace_forward lays it out: T = the most updates any group made; a group that
  // stopped early repeats its last palette (its later sums are not used).
  const int T = *std::max_element(iters.begin(), iters.end());
  at::Tensor palettes = at::empty({T + 1, G, k, 1}, v.options());
  at::Tensor sums = at::empty({T, G, k}, v.options());
  at::Tensor it = at::empty({G}, v.options().dtype(at::kLong));
  double *pp = palettes.data_ptr<double>(), *sp = sums.data_ptr<double>();
  for (int64_t g = 0; g < G; ++g) {
    it.data_ptr<int64_t>()[g] = iters[g];
    for (int t = 0; t <= T; ++t) {
      const double* src = &C[(g * (I + 1) + std::min(t, iters[g])) * k];
      std::copy(src, src + k, pp + (t * G + g) * k);
      if (t < T) {
        const double* ssrc = &S[(g * I + std::min(t, iters[g] - 1)) * k];
        std::copy(ssrc, ssrc + k, sp + (t * G + g) * k);
      }
    }
  }
  return {palettes, sums, it};
}

UniqueSpaceGrad uspace_backward_host(const at::Tensor& v_in, const at::Tensor& n_in, const UniqueSpaceState& state,
                                     const at::Tensor& g_in, const SoftKMeans& p) {
  const at::Tensor v = v_in.contiguous(), gsum = g_in.contiguous();
  const at::Tensor n = n_in.defined() ? n_in.contiguous() : n_in;
  const at::Tensor palettes = state.palettes.contiguous(), sums = state.sums.contiguous();
  const int64_t G = v.size(0), U = v.size(1), k = palettes.size(2), T = sums.size(0);
  UniqueSpaceGrad out{at::empty({G, U, 1, 1}, v.options()), at::empty({G, U, 1}, v.options())};
  const int64_t* iters = state.iters.data_ptr<int64_t>();
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    std::vector<double> C((T + 1) * k), S(T * k);
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t t = 0; t <= T; ++t) {
        const double* src = palettes.data_ptr<double>() + (t * G + g) * k;
        std::copy(src, src + k, &C[t * k]);
        if (t < T) std::copy(sums.data_ptr<double>() + (t * G + g) * k, sums.data_ptr<double>() + (t * G + g + 1) * k, &S[t * k]);
      }
      backward_group(group_of(v, n, g, k), C.data(), S.data(), static_cast<int>(iters[g]),
                     gsum.data_ptr<double>() + g * U, p, out.jac.data_ptr<double>() + g * U,
                     out.h.data_ptr<double>() + g * U);
    }
  });
  return out;
}

}  // namespace edkm::detail
