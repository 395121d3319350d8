// ggml's block formats, dequantized as ggml-quants.c's dequantize_row_* does it, operation for
// operation in fp32 (this file is built without floating-point contraction, so that each product
// and sum is rounded as there and the results are bit-identical to llama.cpp's and to the gguf
// package's).
//
// Blocks of 32 (QK = 32), scale d (and min m) in fp16:
//   Q8_0  d, int8 q[32]:               x = d q
//   Q4_0  d, 4-bit q[32]:              x = d (q - 8)         q[j], q[j+16]: low, high nibble of byte j
//   Q4_1  d, m, 4-bit q[32]:           x = d q + m
//   Q5_0  d, 32 high bits, 4-bit low:  x = d (q - 16)        q = low | high bit << 4
//   Q5_1  d, m, as Q5_0:               x = d q + m
// Super-blocks of 256 (QK_K = 256) in sub-blocks with their own scales (and mins):
//   Q2_K  16 x (4-bit scale, 4-bit min), 2-bit q, d, dmin:    x = d sc q - dmin mn
//   Q3_K  high-bit mask, 2-bit low q, 16 x 6-bit scales, d:   x = d (sc - 32) (q - 4 [high bit clear])
//   Q4_K  d, dmin, 8 x (6-bit scale, 6-bit min), 4-bit q:     x = d sc q - dmin mn
//   Q5_K  as Q4_K with a fifth bit per weight from qh
//   Q6_K  4-bit low, 2-bit high q, 16 int8 scales, d:         x = d sc (q - 32)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>

#include "common/error.h"
#include "model/io/gguf.h"

namespace edkm::gguf {
namespace {

float half(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

void q8_0(const uint8_t* b, float* y) {
  const float d = half(b);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<int8_t>(b[2 + j]) * d;
}

void q4_0(const uint8_t* b, float* y) {
  const float d = half(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = ((qs[j] & 0x0F) - 8) * d;
    y[j + 16] = ((qs[j] >> 4) - 8) * d;
  }
}

void q4_1(const uint8_t* b, float* y) {
  const float d = half(b), m = half(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = (qs[j] & 0x0F) * d + m;
    y[j + 16] = (qs[j] >> 4) * d + m;
  }
}

void q5_0(const uint8_t* b, float* y) {
  const float d = half(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const uint8_t xh0 = ((qh >> j) << 4) & 0x10, xh1 = (qh >> (j + 12)) & 0x10;
    y[j] = (((qs[j] & 0x0F) | xh0) - 16) * d;
    y[j + 16] = (((qs[j] >> 4) | xh1) - 16) * d;
  }
}

void q5_1(const uint8_t* b, float* y) {
  const float d = half(b), m = half(b + 2);
  uint32_t qh;
  std::memcpy(&qh, b + 4, 4);
  const uint8_t* qs = b + 8;
  for (int j = 0; j < 16; ++j) {
    const uint8_t xh0 = ((qh >> j) << 4) & 0x10, xh1 = (qh >> (j + 12)) & 0x10;
    y[j] = ((qs[j] & 0x0F) | xh0) * d + m;
    y[j + 16] = ((qs[j] >> 4) | xh1) * d + m;
  }
}

// block_q2_K: scales[16], qs[64], d, dmin.
void q2_k(const uint8_t* b, float* y) {
  const uint8_t* scales = b;
  const uint8_t* q = b + 16;
  const float d = half(b + 80), min = half(b + 82);
  int is = 0;
  for (int n = 0; n < 256; n += 128) {
    int shift = 0;
    for (int j = 0; j < 4; ++j) {
      for (int half_block = 0; half_block < 2; ++half_block) {
        const uint8_t sc = scales[is++];
        const float dl = d * (sc & 0xF), ml = min * (sc >> 4);
        for (int l = 0; l < 16; ++l) *y++ = dl * static_cast<int8_t>((q[l + 16 * half_block] >> shift) & 3) - ml;
      }
      shift += 2;
    }
    q += 32;
  }
}

// block_q3_K: hmask[32], qs[64], scales[12] (16 six-bit values), d.
void q3_k(const uint8_t* b, float* y) {
  const uint8_t* hm = b;
  const uint8_t* q = b + 32;
  const float d_all = half(b + 108);
  // Unpack the 16 6-bit scales: low 4 bits from bytes 0..7, high 2 bits from bytes 8..11.
  constexpr uint32_t kmask1 = 0x03030303, kmask2 = 0x0f0f0f0f;
  uint32_t aux[4];
  std::memcpy(aux, b + 96, 12);
  const uint32_t tmp = aux[2];
  aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
  aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
  aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
  aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
  int8_t scales[16];
  std::memcpy(scales, aux, 16);
  int is = 0;
  uint8_t m = 1;
  for (int n = 0; n < 256; n += 128) {
    int shift = 0;
    for (int j = 0; j < 4; ++j) {
      for (int half_block = 0; half_block < 2; ++half_block) {
        const float dl = d_all * (scales[is++] - 32);
        for (int l = 0; l < 16; ++l) {
          const int i = l + 16 * half_block;
          *y++ = dl * (static_cast<int8_t>((q[i] >> shift) & 3) - ((hm[i] & m) ? 0 : 4));
        }
      }
      shift += 2;
      m <<= 1;
    }
    q += 32;
  }
}

// The j-th (6-bit scale, 6-bit min) pair of Q4_K / Q5_K's 12 packed bytes.
void scale_min_k4(int j, const uint8_t* q, uint8_t& d, uint8_t& m) {
  if (j < 4) {
    d = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// d * scale and dmin * min of sub-blocks `is` and `is + 1` of a Q4_K / Q5_K super-block.
struct SubBlockScales {
  float d1, m1, d2, m2;
};
SubBlockScales sub_block_scales(const uint8_t* scales, int is, float d, float min) {
  uint8_t sc, m;
  scale_min_k4(is, scales, sc, m);
  SubBlockScales s;
  s.d1 = d * sc;
  s.m1 = min * m;
  scale_min_k4(is + 1, scales, sc, m);
  s.d2 = d * sc;
  s.m2 = min * m;
  return s;
}

// block_q4_K: d, dmin, scales[12], qs[128].
void q4_k(const uint8_t* b, float* y) {
  const float d = half(b), min = half(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  for (int j = 0, is = 0; j < 256; j += 64, is += 2) {
    const auto [d1, m1, d2, m2] = sub_block_scales(scales, is, d, min);
    for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0xF) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - m2;
    q += 32;
  }
}

// block_q5_K: d, dmin, scales[12], qh[32], qs[128].
void q5_k(const uint8_t* b, float* y) {
  const float d = half(b), min = half(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* ql = b + 48;
  uint8_t u1 = 1, u2 = 2;
  for (int j = 0, is = 0; j < 256; j += 64, is += 2) {
    const auto [d1, m1, d2, m2] = sub_block_scales(scales, is, d, min);
    for (int l = 0; l < 32; ++l) *y++ = d1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
    ql += 32;
    u1 <<= 2;
    u2 <<= 2;
  }
}

// block_q6_K: ql[128], qh[64], int8 scales[16], d.
void q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half(b + 208);
  for (int n = 0; n < 256; n += 128) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int8_t q1 = static_cast<int8_t>((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int8_t q2 = static_cast<int8_t>((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int8_t q3 = static_cast<int8_t>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int8_t q4 = static_cast<int8_t>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * sc[is] * q1;
      y[l + 32] = d * sc[is + 2] * q2;
      y[l + 64] = d * sc[is + 4] * q3;
      y[l + 96] = d * sc[is + 6] * q4;
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

}  // namespace

void dequantize(uint32_t type, const uint8_t* src, int64_t n, float* dst) {
  int64_t block_elems = 0, block_bytes = 0;
  if (!type_layout(type, block_elems, block_bytes)) throw_invalid("cannot dequantize {}", type_name(type));
  EDKM_ASSERT(n % block_elems == 0);
  void (*block)(const uint8_t*, float*) = nullptr;
  switch (static_cast<Type>(type)) {
    case Type::F32:
      std::memcpy(dst, src, n * 4);
      return;
    case Type::F16:
      for (int64_t i = 0; i < n; ++i) dst[i] = half(src + 2 * i);
      return;
    case Type::BF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t bits;
        std::memcpy(&bits, src + 2 * i, 2);
        dst[i] = static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
      }
      return;
    case Type::Q4_0: block = q4_0; break;
    case Type::Q4_1: block = q4_1; break;
    case Type::Q5_0: block = q5_0; break;
    case Type::Q5_1: block = q5_1; break;
    case Type::Q8_0: block = q8_0; break;
    case Type::Q2_K: block = q2_k; break;
    case Type::Q3_K: block = q3_k; break;
    case Type::Q4_K: block = q4_k; break;
    case Type::Q5_K: block = q5_k; break;
    case Type::Q6_K: block = q6_k; break;
  }
  for (int64_t i = 0; i < n / block_elems; ++i) block(src + i * block_bytes, dst + i * block_elems);
}

}  // namespace edkm::gguf
