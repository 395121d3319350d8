#include "runtime/lut_kernel.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>

#include "common/cpu.h"
#include "common/error.h"

namespace edkm {
namespace {

// The 8 consecutive b-bit indices starting at bit `pos` of the stream (8b <= 32 bits), in the
// low bits of the result. Reads at most 8 bytes and never past `bytes`.
inline uint64_t read_bits(const uint8_t* data, int64_t bytes, int64_t pos) {
  const int64_t at = pos >> 3;
  uint64_t v = 0;
  if (at + 8 <= bytes) std::memcpy(&v, data + at, 8);
  else std::memcpy(&v, data + at, static_cast<size_t>(bytes - at));
  return v >> (pos & 7);
}

struct RowArgs {
  const uint8_t* idx;
  int64_t bytes;
  int64_t row_bits;  // bits of one row's indices
  int64_t cols;
  int bits;
  int dim;
};

// Portable: row r of W (unscaled) decoded into out[cols].
void decode_row(const RowArgs& a, int64_t r, const float* palette, float* out) {
  const int64_t n = a.cols / a.dim;
  const uint64_t mask = (uint64_t(1) << a.bits) - 1;
  int64_t pos = r * a.row_bits;
  for (int64_t j = 0; j < n; ++j, pos += a.bits) {
    const uint64_t u = read_bits(a.idx, a.bytes, pos) & mask;
    std::memcpy(out + j * a.dim, palette + u * a.dim, sizeof(float) * a.dim);
  }
}

// Portable: sum_c W[r, c] x[c] (unscaled).
float dot_row(const RowArgs& a, int64_t r, const float* palette, const float* x) {
  const int64_t n = a.cols / a.dim;
  const uint64_t mask = (uint64_t(1) << a.bits) - 1;
  int64_t pos = r * a.row_bits;
  float acc = 0;
  for (int64_t j = 0; j < n; ++j, pos += a.bits) {
    const float* c = palette + (read_bits(a.idx, a.bytes, pos) & mask) * a.dim;
    for (int e = 0; e < a.dim; ++e) acc += c[e] * x[j * a.dim + e];
  }
  return acc;
}

// Vectorised rows: scalar palettes of up to 16 entries (b <= 4) whose rows start on a byte
// boundary, so that every group of eight b-bit indices occupies exactly b bytes.
inline uint32_t load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Scalar tail of a row: indices [from, cols), unscaled.
float dot_tail(const RowArgs& a, int64_t r, int64_t from, const float* palette, const float* x) {
  const uint64_t m = (uint64_t(1) << a.bits) - 1;
  float total = 0;
  for (int64_t c = from, pos = r * a.row_bits + from * a.bits; c < a.cols; ++c, pos += a.bits)
    total += palette[read_bits(a.idx, a.bytes, pos) & m] * x[c];
  return total;
}

// How many leading indices of row r the AVX2 loop may take: whole groups of `lanes`, and
// never a 32-bit load that runs past the end of the stream.
int64_t vector_span(const RowArgs& a, int64_t r, int lanes) {
  const int64_t start = r * a.row_bits / 8;
  int64_t n = a.cols / lanes * lanes;
  while (n > 0 && start + (n / 8 - 1) * a.bits + 4 > a.bytes) n -= lanes;
  return n;
}

// How far ahead of the indices being decoded the loops prefetch. Out of cache (a model larger
// than L3) the hardware prefetcher alone left the kernel waiting on memory, at half its in-cache
// speed; 1 KB is ~1 us of work ahead. A prefetch past the end of the stream is harmless.
constexpr int kPrefetchBytes = 1024;

// (GCC does not extend a function's target attribute to lambdas inside it: helpers are functions.)
__attribute__((target("avx2,fma"))) inline __m256 weights8(const uint8_t* q, __m256i shifts, __m256i mask, __m256 lo,
                                                          __m256 hi, int b) {
  const __m256i i = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(load32(q))), shifts), mask);
  __m256 w = _mm256_permutevar8x32_ps(lo, i);
  if (b == 4)
    w = _mm256_blendv_ps(w, _mm256_permutevar8x32_ps(hi, i), _mm256_castsi256_ps(_mm256_cmpgt_epi32(i, _mm256_set1_epi32(7))));
  return w;
}

// AVX2 (and AVX-512 CPUs without VBMI): each group of eight indices comes from one 32-bit load
// at a byte address, is spread over the lanes by variable shifts, and selects palette entries
// with a permute (two for b = 4, whose 16 entries span two registers).
__attribute__((target("avx2,fma"))) float dot_row_avx2(const RowArgs& a, int64_t r, const float* palette, const float* x) {
  alignas(32) float pal[16] = {0};
  std::memcpy(pal, palette, sizeof(float) << a.bits);
  const __m256 lo = _mm256_load_ps(pal), hi = _mm256_load_ps(pal + 8);
  const int b = a.bits;
  const __m256i shifts = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
  const __m256i mask = _mm256_set1_epi32((1 << b) - 1);
  const uint8_t* p = a.idx + r * a.row_bits / 8;
  const int64_t n = vector_span(a, r, 8);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= n; c += 16, p += 2 * b) {
    _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
    acc0 = _mm256_fmadd_ps(weights8(p, shifts, mask, lo, hi, b), _mm256_loadu_ps(x + c), acc0);
    acc1 = _mm256_fmadd_ps(weights8(p + b, shifts, mask, lo, hi, b), _mm256_loadu_ps(x + c + 8), acc1);
  }
  for (; c < n; c += 8, p += b) acc0 = _mm256_fmadd_ps(weights8(p, shifts, mask, lo, hi, b), _mm256_loadu_ps(x + c), acc0);
  acc0 = _mm256_add_ps(acc0, acc1);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc0), _mm256_extractf128_ps(acc0, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s) + dot_tail(a, r, c, palette, x);
}

// AVX-512 VBMI: one masked 64-byte load holds 128 indices (16b bytes; the mask never touches a
// byte past them, so no bounds arithmetic). Each group of sixteen indices then costs four
// vector instructions: a byte permute (vpermb) hands lane i the two bytes that hold index i, a
// variable shift by (i b mod 8) brings it to the low bits, a permute of the palette register
// (vpermps) looks it up, and an FMA. vpermps reads only bits [3:0] of each lane, so with the
// palette repeated to fill 16 entries the bits above the index need no mask. This is two
// instructions fewer per group than broadcasting and inserting 32-bit loads, and the
// instruction count is what bounds the kernel (it reads ~5x fewer bytes than bf16 rows).

// vpermb controls for the eight groups of a 128-index block and the per-lane shifts, per b.
struct VbmiPlan {
  alignas(64) uint8_t control[8][64];
  alignas(64) uint32_t shift[16];
};

const VbmiPlan& vbmi_plan(int b) {
  static const std::array<VbmiPlan, 5> plans = [] {
    std::array<VbmiPlan, 5> all{};
    for (int bits = 1; bits <= 4; ++bits) {
      VbmiPlan& p = all[bits];
      for (int i = 0; i < 16; ++i) {
        p.shift[i] = static_cast<uint32_t>(i * bits % 8);
        for (int g = 0; g < 8; ++g) {
          const int byte = g * 2 * bits + i * bits / 8;  // at most 7 * 8 + 7 = 63
          p.control[g][4 * i] = static_cast<uint8_t>(byte);
          p.control[g][4 * i + 1] = static_cast<uint8_t>(std::min(byte + 1, 63));
        }
      }
    }
    return all;
  }();
  return plans[b];
}

__attribute__((target("avx512f,avx512bw,avx512vbmi"))) inline __m512 vbmi_weights(__m512i bytes, __m512i control,
                                                                                   __m512i shift, __m512 table) {
  return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_permutexvar_epi8(control, bytes), shift), table);
}

// acc[i][g % 2] += (row i's weights of group g) * x[16g, 16g + 16) for the first `groups` groups
// of one 128-index block; v[i] holds row i's block.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) inline void accumulate_groups(
    const __m512i* v, int groups, const __m512i* control, __m512i shift, const __m512* table, const float* x,
    __m512 (*acc)[2]) {
  for (int g = 0; g < groups; ++g) {
    const __m512 xg = _mm512_loadu_ps(x + 16 * g);
    for (int i = 0; i < R; ++i)
      acc[i][g & 1] = _mm512_fmadd_ps(vbmi_weights(v[i], control[g], shift, table[i]), xg, acc[i][g & 1]);
  }
}

// R consecutive rows at once: x (44 KB for a row of 11008) does not stay in a 48 KB L1 beside
// the index stream, so each x load is shared by R rows. palettes[i] is row r + i's palette;
// out[i] receives its unscaled dot product.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) void dot_rows_avx512(const RowArgs& a, int64_t r,
                                                                             const float* const* palettes,
                                                                             const float* x, float* out) {
  const int b = a.bits;
  __m512 table[R];
  for (int i = 0; i < R; ++i) {
    alignas(64) float pal[16];
    for (int e = 0; e < 16; ++e) pal[e] = palettes[i][e & ((1 << b) - 1)];
    table[i] = _mm512_load_ps(pal);
  }
  const VbmiPlan& plan = vbmi_plan(b);
  __m512i control[8];
  for (int g = 0; g < 8; ++g) control[g] = _mm512_load_si512(plan.control[g]);
  const __m512i shift = _mm512_load_si512(plan.shift);
  auto bytes_mask = [](int n) { return n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1; };
  const int64_t row_bytes = a.row_bits / 8;
  const uint8_t* p = a.idx + r * row_bytes;
  __m512 acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  int64_t c = 0;
  const __mmask64 block = bytes_mask(16 * b);
  for (; c + 128 <= a.cols; c += 128, p += 16 * b) {
    __m512i v[R];
    for (int i = 0; i < R; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(p + i * row_bytes) + kPrefetchBytes, _MM_HINT_T0);
      v[i] = _mm512_maskz_loadu_epi8(block, p + i * row_bytes);
    }
    accumulate_groups<R>(v, 8, control, shift, table, x + c, acc);
  }
  const int groups = static_cast<int>((a.cols - c) / 16);
  if (groups > 0) {
    __m512i v[R];
    for (int i = 0; i < R; ++i) v[i] = _mm512_maskz_loadu_epi8(bytes_mask(groups * 2 * b), p + i * row_bytes);
    accumulate_groups<R>(v, groups, control, shift, table, x + c, acc);
    c += 16 * groups;
  }
  for (int i = 0; i < R; ++i)
    out[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1])) + dot_tail(a, r + i, c, palettes[i], x);
}

}  // namespace

PalettizedLinear::PalettizedLinear(PackedWeight w) : w_(std::move(w)) {
  palette_ = w_.palette.to(at::kCPU, at::kFloat).contiguous();
  row_bits_ = (w_.cols() / w_.cluster_dim) * w_.bits;
}

bool PalettizedLinear::vectorised() const {
  return w_.cluster_dim == 1 && w_.bits <= 4 && row_bits_ % 8 == 0 && (cpu_has_avx2() || cpu_has_avx512_vbmi());
}

at::Tensor PalettizedLinear::matvec(const at::Tensor& xin) const {
  at::Tensor x = xin.to(at::kCPU, at::kFloat).contiguous();
  const int64_t rows = w_.rows();
  at::Tensor y = at::empty({rows}, at::kFloat);
  const RowArgs a{w_.indices.data_ptr<uint8_t>(), w_.indices.numel(), row_bits_, w_.cols(), w_.bits, w_.cluster_dim};
  const int64_t rpg = w_.group_size > 0 ? w_.group_size : rows;
  const int64_t pstride = (int64_t(1) << w_.bits) * w_.cluster_dim;
  const float* pal = palette_.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* sp = w_.scale.defined() ? w_.scale.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const bool vbmi = vectorised() && cpu_has_avx512_vbmi();
  const auto dot = !vectorised() ? dot_row : dot_row_avx2;
  // The vectorised kernels hold a palette of at most 16 entries in registers (16-float buffers),
  // and vbmi_plan() has plans for b = 1..4 only.
  if (vectorised()) EDKM_ASSERT(w_.bits >= 1 && w_.bits <= 4);
  constexpr int kRows = 4;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    const float* pals[kRows];
    float v[kRows];
    auto run = [&](int64_t r, int n) {
      for (int i = 0; i < n; ++i) pals[i] = pal + ((r + i) / rpg) * pstride;
      if (!vbmi) v[0] = dot(a, r, pals[0], xp);
      else if (n == kRows) dot_rows_avx512<kRows>(a, r, pals, xp, v);
      else dot_rows_avx512<1>(a, r, pals, xp, v);
      for (int i = 0; i < n; ++i) yp[r + i] = sp ? v[i] * sp[r + i] : v[i];
    };
    int64_t r = r0;
    if (vbmi)
      for (; r + kRows <= r1; r += kRows) run(r, kRows);
    for (; r < r1; ++r) run(r, 1);
  });
  return y;
}

at::Tensor PalettizedLinear::matmul(const at::Tensor& xin) const {
  at::Tensor x = xin.to(at::kCPU, at::kFloat).contiguous();
  const int64_t rows = w_.rows(), cols = w_.cols();
  at::Tensor y = at::empty({x.size(0), rows}, at::kFloat);
  const RowArgs a{w_.indices.data_ptr<uint8_t>(), w_.indices.numel(), row_bits_, cols, w_.bits, w_.cluster_dim};
  const int64_t rpg = w_.group_size > 0 ? w_.group_size : rows;
  const int64_t pstride = (int64_t(1) << w_.bits) * w_.cluster_dim;
  // Tiles of ~1 MB of decoded weights: small enough to stay in cache, large enough for BLAS.
  const int64_t tile = std::max<int64_t>(1, (int64_t(1) << 18) / cols);
  at::Tensor buf = at::empty({tile, cols}, at::kFloat);
  for (int64_t r0 = 0; r0 < rows; r0 += tile) {
    const int64_t n = std::min(tile, rows - r0);
    float* b = buf.data_ptr<float>();
    at::parallel_for(0, n, 4, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        decode_row(a, r0 + i, palette_.data_ptr<float>() + ((r0 + i) / rpg) * pstride, b + i * cols);
    });
    at::Tensor t = buf.narrow(0, 0, n);
    if (w_.scale.defined()) t = t * w_.scale.narrow(0, r0, n).unsqueeze(1);
    y.narrow(1, r0, n).copy_(at::mm(x, t.t()));
  }
  return y;
}

at::Tensor PalettizedLinear::forward(const at::Tensor& x) const {
  if (x.size(-1) != w_.cols())
    throw_invalid("palettized linear: input has {} features, the weight {} columns", x.size(-1), w_.cols());
  if (!x.device().is_cpu())
    throw_invalid("palettized linear: the lookup-table kernels serve CPU tensors, the input is on {} "
                  "(Llama::to() decodes the weights for other devices)", x.device().str());
  auto shape = x.sizes().vec();
  shape.back() = w_.rows();
  at::Tensor flat = x.reshape({-1, w_.cols()});
  at::Tensor y = flat.size(0) == 1 ? matvec(flat[0]).unsqueeze(0) : matmul(flat);
  return y.to(x.scalar_type()).view(shape);
}

Llama packed_llama(const CompressedModel& m, at::ScalarType dense_dtype) {
  std::map<std::string, at::Tensor> w;
  std::vector<std::pair<std::string, std::shared_ptr<const LinearKernel>>> kernels;
  for (const auto& [name, t] : m.dense) w[name] = t.to(dense_dtype);
  for (const auto& [name, p] : m.packed) {
    if (name == tensor_name::kEmbed) {
      // Embedding lookups gather rows: decode the table (a tied classifier still multiplies
      // through the kernel).
      w[name] = p.dense(dense_dtype);
      if (m.config.tie_embeddings) kernels.emplace_back(name, std::make_shared<PalettizedLinear>(p));
      continue;
    }
    // A stand-in with the right shape and no storage; the kernel computes the products.
    w[name] = at::zeros({1}, dense_dtype).expand(p.shape);
    kernels.emplace_back(name, std::make_shared<PalettizedLinear>(p));
  }
  Llama model(m.config, std::move(w), "compressed model");
  for (auto& [name, k] : kernels) model.set_kernel(name, k);
  return model;
}

}  // namespace edkm
