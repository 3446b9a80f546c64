// CPU INT4 linear for small M (decode): y[M, N] = x[M, K] @ W[K, N] (+ bias), W = (q - z) * s per group of G rows.
//
// Built on first use by kernels/cpu_native.py (torch.utils.cpp_extension, -O3 -march=native), with cpu_int8.cpp (the
// int8 lm_head) into one library; cpu_common.h says how the engine (AMX, AVX512-BF16, AVX512F, portable) is chosen.
//
// Packed layout (written by kernels/cpu_native.py:repack), uint8 [NB, NG, R], NB = ceil(N / 16) blocks of 16 columns,
// NG = K / G groups, Gp = G rounded up to a multiple of 32 (rows G..Gp-1 of a group are zero codes), R = Gp * 8 + 64:
//   bytes [0, Gp * 8): Gp / 8 "octets" of 64 bytes, octet o holding rows 8o..8o+7 of the group for the 16 columns.
//     Read as 32 little-endian 16-bit words, word l belongs to column l / 2 and row parity l % 2, and its nibble i
//     (bits 4i..4i+3) is the code of row 8o + 2i + l % 2. So (word & 0xF) | 0x4300 is, in every word, the bf16 number
//     128 + q (0x4300 is 128.0; the low 7 mantissa bits count units there), and the 32 words are 16 (row, row + 1)
//     pairs: exactly the operand layout of VDPBF16PS and of an AMX bf16 B-tile row. Nibble i gives row pair 4o + i.
//   bytes [Gp * 8, +32): the 16 columns' fp16 scales s; [+32, +48): their zero points plus 128 (u8); then 16 zero bytes.
//
// Arithmetic, identical for every row whatever M is and wherever the row sits (row invariance by construction):
//   x is rounded to bf16 (round to nearest even) and each group zero-padded to Gp; xsum_g = sum of the rounded x of
//   group g, in fp32 (16 lane partial sums, then a fixed reduction). Per output column and group g:
//     inner_g = sum over the group's rows of x * (128 + q)     fp32 accumulation (products are exact in fp32)
//     t_g     = inner_g - (z + 128) * xsum_g                    one rounding (FMA)
//     acc    += s * t_g                                         one rounding (FMA)
//   y = acc (+ bias), rounded once to x's dtype. Rows never share a floating-point operation: the row and column blocking
//   below only decides which rows and columns are computed side by side, never how one output is summed. The 128
//   offset makes the weight decode one AND-OR per 32 values; it cancels in t_g (the cancellation costs ~2^-24 * 140 of
//   |x| per group, far below bf16's 2^-9).

// The narrowest ATen headers: with ATen/ATen.h a build took ~14 s here instead of ~10 s.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"

namespace {

constexpr int64_t BN = 16;     // columns per block
constexpr int64_t META = 64;   // metadata bytes after each group's codes
constexpr int64_t KALIGN = 32;  // group rows are padded to a multiple of this (one AMX tile of bf16 pairs)
constexpr int64_t MR_MAX = 8;  // rows computed side by side (register blocking) by the AVX-512 engines

inline float half_float(uint16_t h) {  // IEEE fp16 bits -> float (normals, subnormals, inf, nan)
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  float f;
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(man), -24);
  } else if (exp == 31) {
    uint32_t u = 0x7f800000u | (man << 13);
    std::memcpy(&f, &u, 4);
  } else {
    uint32_t u = ((exp + 112) << 23) | (man << 13);
    std::memcpy(&f, &u, 4);
  }
  return sign ? -f : f;
}

struct Problem {
  int64_t M, N, NB, NG, G, Gp, R, Kp;
  const uint16_t* xb;  // [M, Kp] bf16 bits, Kp = NG * Gp: x rounded to bf16, each group zero-padded to Gp
  const float* xf;     // [M, Kp] the same values as fp32 (AVX512F and portable engines), else null
  const float* xsum;   // [M, NG]
  const uint8_t* w;    // [NB, NG, R]
  const float* bias;   // [N] or null
  void* y;             // [M, N] fp32 or bf16
  bool y_bf16;

  const uint8_t* group(int64_t b, int64_t g) const { return w + (b * NG + g) * R; }
};

// Write 16 columns of row m starting at block b: acc (+ bias), rounded once to y's dtype; columns >= N are dropped.
inline void store_row(const Problem& p, int64_t m, int64_t b, const float* acc16) {
  const int64_t n0 = b * BN, n = std::min<int64_t>(BN, p.N - n0);
  for (int64_t c = 0; c < n; ++c) {
    const float v = p.bias ? acc16[c] + p.bias[n0 + c] : acc16[c];
    if (p.y_bf16)
      static_cast<uint16_t*>(p.y)[m * p.N + n0 + c] = bf16_round(v);
    else
      static_cast<float*>(p.y)[m * p.N + n0 + c] = v;
  }
}

// ------------------------------------------------------------------------------------------------ portable engine

void rows_portable(const Problem& p, int64_t m0, int64_t mr, int64_t b) {
  for (int64_t r = 0; r < mr; ++r) {
    const float* x = p.xf + (m0 + r) * p.Kp;
    float acc[BN] = {0};
    for (int64_t g = 0; g < p.NG; ++g) {
      const uint8_t* wg = p.group(b, g);
      const float* xg = x + g * p.Gp;
      float inner[BN] = {0};
      for (int64_t o = 0; o < p.Gp / 8; ++o) {
        const uint8_t* oct = wg + o * 64;
        for (int i = 0; i < 4; ++i) {
          const float x0 = xg[8 * o + 2 * i], x1 = xg[8 * o + 2 * i + 1];
          for (int64_t c = 0; c < BN; ++c) {
            const uint16_t w0 = oct[4 * c] | (oct[4 * c + 1] << 8), w1 = oct[4 * c + 2] | (oct[4 * c + 3] << 8);
            inner[c] = std::fma(x0, static_cast<float>(128 + ((w0 >> (4 * i)) & 0xF)), inner[c]);
            inner[c] = std::fma(x1, static_cast<float>(128 + ((w1 >> (4 * i)) & 0xF)), inner[c]);
          }
        }
      }
      const uint8_t* meta = wg + p.Gp * 8;
      const float xs = p.xsum[(m0 + r) * p.NG + g];
      for (int64_t c = 0; c < BN; ++c) {
        const float s = half_float(meta[2 * c] | (meta[2 * c + 1] << 8)), zb = static_cast<float>(meta[32 + c]);
        acc[c] = std::fma(s, std::fma(-zb, xs, inner[c]), acc[c]);
      }
    }
    store_row(p, m0 + r, b, acc);
  }
}

#if defined(TS_AVX512)
// ------------------------------------------------------------------------------------------------ AVX-512 engines

// Four vectors of 32 bf16 words (128 + q) from one 64-byte octet: vector i holds row pair 4o + i of the 16 columns.
// Shifts are 32-bit (AVX512F only); the AND with 0xF drops whatever the shift carried in from the neighbouring word.
struct Octet {
  __m512i v[4];
};

inline Octet decode_octet(const uint8_t* p) {
  const __m512i nib = _mm512_set1_epi16(0x000F), one28 = _mm512_set1_epi16(0x4300);
  const __m512i w = _mm512_load_si512(p);
  Octet o;
  o.v[0] = _mm512_ternarylogic_epi32(w, nib, one28, 0xEA);  // (w & nib) | one28
  o.v[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(w, 4), nib, one28, 0xEA);
  o.v[2] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(w, 8), nib, one28, 0xEA);
  o.v[3] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(w, 12), nib, one28, 0xEA);
  return o;
}

// The group's 16 scales and zero points + 128 as fp32 vectors.
inline void load_meta(const uint8_t* meta, __m512& s, __m512& zb) {
  s = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(meta)));
  zb = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(meta + 32))));
}

inline void store_acc(const Problem& p, int64_t m, int64_t b, __m512 acc) {
  const int64_t n0 = b * BN, n = std::min<int64_t>(BN, p.N - n0);
  if (n <= 0) return;
  const __mmask16 mask = n == BN ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
  if (p.bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, p.bias + n0));
  if (!p.y_bf16) {
    _mm512_mask_storeu_ps(static_cast<float*>(p.y) + m * p.N + n0, mask, acc);
    return;
  }
  _mm512_mask_cvtepi32_storeu_epi16(static_cast<uint16_t*>(p.y) + m * p.N + n0, mask, bf16_round16(acc));
}

// One inner-product step for one row and one column block: inner += x pair * weight pairs.
#if defined(__AVX512BF16__)
inline __m512 dot2(__m512 acc, __m512i w, XPair x) { return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x); }
#else
// Even words are row k, odd words row k + 1: a bf16 word becomes an fp32 by moving it to the top half of its dword.
inline __m512 dot2(__m512 acc, __m512i w, XPair x) {
  const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  const __m512 w1 = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  return _mm512_fmadd_ps(x.x1, w1, _mm512_fmadd_ps(x.x0, w0, acc));
}
#endif

// MR rows x NR column blocks, the whole K, accumulators in registers.
template <int MR, int NR>
void tile_avx512(const Problem& p, int64_t m0, int64_t b0) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.NG; ++g) {
    __m512 inner[MR][NR];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NR; ++j) inner[r][j] = _mm512_setzero_ps();
    const int64_t k0 = g * p.Gp;
    for (int64_t o = 0; o < p.Gp / 8; ++o) {
      for (int j = 0; j < NR; ++j) {
        const Octet w = decode_octet(p.group(b0 + j, g) + o * 64);
        for (int i = 0; i < 4; ++i)
          for (int r = 0; r < MR; ++r) inner[r][j] = dot2(inner[r][j], w.v[i], x_pair(p, m0 + r, k0 + 8 * o + 2 * i));
      }
    }
    for (int j = 0; j < NR; ++j) {
      __m512 s, zb;
      load_meta(p.group(b0 + j, g) + p.Gp * 8, s, zb);
      for (int r = 0; r < MR; ++r) {
        const __m512 xs = _mm512_set1_ps(p.xsum[(m0 + r) * p.NG + g]);
        acc[r][j] = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(zb, xs, inner[r][j]), acc[r][j]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) store_acc(p, m0 + r, b0 + j, acc[r][j]);
}

using TileFn = void (*)(const Problem&, int64_t, int64_t);

// Column blocks computed side by side for a chunk of MR rows: enough independent accumulator chains to hide the
// dot-product latency at M = 1, at most 16 accumulator registers (acc + inner) in all.
constexpr int nr_for(int64_t mr) { return mr <= 1 ? 8 : mr == 2 ? 4 : mr <= 4 ? 2 : 1; }

template <int NR>
TileFn tile_fn(int64_t mr) {
  static_assert(NR == 1 || NR == 2 || NR == 4 || NR == 8, "");
  switch (mr) {
    case 1: return tile_avx512<1, NR>;
    case 2: if constexpr (NR <= 4) return tile_avx512<2, NR>; break;
    case 3: if constexpr (NR <= 2) return tile_avx512<3, NR>; break;
    case 4: if constexpr (NR <= 2) return tile_avx512<4, NR>; break;
    case 5: if constexpr (NR == 1) return tile_avx512<5, NR>; break;
    case 6: if constexpr (NR == 1) return tile_avx512<6, NR>; break;
    case 7: if constexpr (NR == 1) return tile_avx512<7, NR>; break;
    case 8: if constexpr (NR == 1) return tile_avx512<8, NR>; break;
  }
  return nullptr;
}

TileFn pick_tile(int64_t mr, int nr) {
  switch (nr) {
    case 8: return tile_fn<8>(mr);
    case 4: return tile_fn<4>(mr);
    case 2: return tile_fn<2>(mr);
    default: return tile_fn<1>(mr);
  }
}

// Blocks [b_begin, b_end) for all M rows (for_blocks in cpu_common.h).
void blocks_avx512(const Problem& p, int64_t b_begin, int64_t b_end) {
  for_blocks(p.M, MR_MAX, nr_for(std::min<int64_t>(p.M, MR_MAX)), b_begin, b_end,
             [&](int64_t m0, int64_t mr, int step, int64_t b) { pick_tile(mr, step)(p, m0, b); });
}
#endif  // TS_AVX512

#if defined(TS_HAVE_AMX)
// ------------------------------------------------------------------------------------------------ AMX engine
//
// Tiles: C0..C3 = tmm0..3 (up to 16 rows x 16 fp32: one column block each), A = tmm4 (the rows' 32 bf16 of x),
// B = tmm5..7 (32 rows of 16 columns as 16 pair-rows: one decoded 32-row step of a block). Per group: C = x * (128+q)
// over the group's rows in Gp / 32 TDPBF16PS steps, then stored and folded into fp32 accumulators exactly as above.
// TDPBF16PS computes each row of C from the same row of A only, so rows stay independent whatever M is.

constexpr int AMX_NR = 4;
constexpr int64_t AMX_MR = 16;

void configure_tiles(int64_t mr) {
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = static_cast<uint8_t>(mr), cfg.colsb[t] = 64;  // C: mr x 16 fp32
  cfg.rows[4] = static_cast<uint8_t>(mr), cfg.colsb[4] = 64;                              // A: mr x 32 bf16
  for (int t = 5; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;                        // B: 16 pair-rows
  _tile_loadconfig(&cfg);
}

// Decode the 32-row step `step` of one block's group into a B tile image: 16 rows of 64 bytes, pair-row 4o + i.
inline void decode_b(const uint8_t* wg, int64_t step, uint8_t* buf) {
  for (int o = 0; o < 4; ++o) {
    const Octet w = decode_octet(wg + (step * 4 + o) * 64);
    for (int i = 0; i < 4; ++i) _mm512_store_si512(buf + (4 * o + i) * 64, w.v[i]);
  }
}

constexpr int64_t AMX_CHUNK = 4;  // 32-row steps decoded ahead of their tile loads (a tile load that reads a line
                                  // just written stalls until the store retires: keep stores and loads apart)

// Rows m0..m0+mr-1 (mr <= 16, tiles configured for mr rows) x blocks b0..b0+NR-1 (NR <= 4).
template <int NR>
void tile_amx(const Problem& p, int64_t m0, int64_t mr, int64_t b0) {
  alignas(64) uint8_t bbuf[AMX_CHUNK][NR][16 * 64];
  alignas(64) float cbuf[NR][AMX_MR * BN];
  alignas(64) float acc[NR][AMX_MR * BN];
  std::fill(&acc[0][0], &acc[0][0] + NR * AMX_MR * BN, 0.f);
  const uint16_t* xa = p.xb + m0 * p.Kp;
  const int64_t xstride = p.Kp * 2, steps = p.Gp / 32;
  for (int64_t g = 0; g < p.NG; ++g) {
    const uint8_t* wg[NR];
    for (int j = 0; j < NR; ++j) wg[j] = p.group(b0 + j, g);
    _tile_zero(0);
    if constexpr (NR > 1) _tile_zero(1);
    if constexpr (NR > 2) _tile_zero(2);
    if constexpr (NR > 3) _tile_zero(3);
    for (int64_t c0 = 0; c0 < steps; c0 += AMX_CHUNK) {
      const int64_t nc = std::min<int64_t>(AMX_CHUNK, steps - c0);
      for (int64_t c = 0; c < nc; ++c)
        for (int j = 0; j < NR; ++j) decode_b(wg[j], c0 + c, bbuf[c][j]);
      for (int64_t c = 0; c < nc; ++c) {
        _tile_loadd(4, xa + g * p.Gp + (c0 + c) * 32, xstride);
        _tile_loadd(5, bbuf[c][0], 64);
        _tile_dpbf16ps(0, 4, 5);
        if constexpr (NR > 1) {
          _tile_loadd(6, bbuf[c][1], 64);
          _tile_dpbf16ps(1, 4, 6);
        }
        if constexpr (NR > 2) {
          _tile_loadd(7, bbuf[c][2], 64);
          _tile_dpbf16ps(2, 4, 7);
        }
        if constexpr (NR > 3) {
          _tile_loadd(5, bbuf[c][3], 64);
          _tile_dpbf16ps(3, 4, 5);
        }
      }
    }
    _tile_stored(0, cbuf[0], 64);
    if constexpr (NR > 1) _tile_stored(1, cbuf[1], 64);
    if constexpr (NR > 2) _tile_stored(2, cbuf[2], 64);
    if constexpr (NR > 3) _tile_stored(3, cbuf[3], 64);
    for (int j = 0; j < NR; ++j) {
      __m512 s, zb;
      load_meta(wg[j] + p.Gp * 8, s, zb);
      for (int64_t r = 0; r < mr; ++r) {
        const __m512 xs = _mm512_set1_ps(p.xsum[(m0 + r) * p.NG + g]);
        const __m512 c = _mm512_load_ps(cbuf[j] + r * BN);
        _mm512_store_ps(acc[j] + r * BN, _mm512_fmadd_ps(s, _mm512_fnmadd_ps(zb, xs, c), _mm512_load_ps(acc[j] + r * BN)));
      }
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int64_t r = 0; r < mr; ++r) store_acc(p, m0 + r, b0 + j, _mm512_load_ps(acc[j] + r * BN));
}

void blocks_amx(const Problem& p, int64_t b_begin, int64_t b_end) {
  int64_t configured = -1;
  for (int64_t m0 = 0; m0 < p.M; m0 += AMX_MR) {
    const int64_t mr = std::min<int64_t>(AMX_MR, p.M - m0);
    if (mr != configured) configure_tiles(mr), configured = mr;
    int64_t b = b_begin;
    for (; b + AMX_NR <= b_end; b += AMX_NR) tile_amx<AMX_NR>(p, m0, mr, b);
    for (; b < b_end; ++b) tile_amx<1>(p, m0, mr, b);
  }
  _tile_release();
}
#endif  // TS_HAVE_AMX

// x [M, K] (fp32 or bf16) -> xb [M, Kp] bf16 bits (and xf, the same values in fp32, when the engine reads fp32),
// groups zero-padded to Gp, and xsum [M, NG]: per group, 16 lane-wise partial sums (lane l adds rows l, l + 16, ...
// in order), then lanes 0 to 15 added in order. Only row m's values enter row m's numbers; the vector and the scalar
// code below compute the same sums.
void prepare_x(const at::Tensor& x, int64_t G, int64_t Gp, int64_t NG, uint16_t* xb, float* xf, float* xsum) {
  const int64_t M = x.size(0), K = x.size(1), Kp = NG * Gp;
  const bool is_bf16 = x.scalar_type() == at::kBFloat16;
  const float* x32 = is_bf16 ? nullptr : x.data_ptr<float>();
  const uint16_t* x16 = is_bf16 ? reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) : nullptr;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < NG; ++g) {
      const int64_t src = m * K + g * G, dst = m * Kp + g * Gp;
      alignas(64) float part[16] = {0};
#if defined(TS_AVX512)
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < Gp; k += 16) {
        const int64_t n = std::clamp<int64_t>(G - k, 0, 16);
        const __mmask16 mask = n == 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
        __m512i h;  // 16 bf16 values in the low halves of 32-bit lanes
        if (is_bf16) {
          h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, x16 + src + k));
        } else {
          const __m512i u = _mm512_castps_si512(_mm512_maskz_loadu_ps(mask, x32 + src + k));
          h = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)))), 16);
          const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
          h = _mm512_mask_mov_epi32(h, nan, _mm512_set1_epi32(0x7fc0));
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xb + dst + k), _mm512_cvtepi32_epi16(h));
        const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
        if (xf) _mm512_storeu_ps(xf + dst + k, v);
        acc = _mm512_add_ps(acc, v);
      }
      _mm512_store_ps(part, acc);
#else
      for (int64_t k = 0; k < Gp; ++k) {
        uint16_t h = 0;
        if (k < G) h = is_bf16 ? x16[src + k] : bf16_round(x32[src + k]);
        xb[dst + k] = h;
        const float v = bf16_float(h);
        if (xf) xf[dst + k] = v;
        part[k % 16] += v;
      }
#endif
      float s = 0.f;
      for (int l = 0; l < 16; ++l) s += part[l];
      xsum[m * NG + g] = s;
    }
  }
}

// y = x @ W (+ bias). x: [M, K] fp32 or bf16 (contiguous); packed: [NB, NG, R] uint8; bias: [N] or None.
// Returns [M, N] in x's dtype.
at::Tensor int4_mm(const at::Tensor& x_in, const at::Tensor& packed, const c10::optional<at::Tensor>& bias, int64_t N,
                   int64_t G) {
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [M, K]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be [NB, NG, R] uint8");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), NB = packed.size(0), NG = packed.size(1), R = packed.size(2);
  const int64_t Gp = (R - META) / 8;
  TORCH_CHECK(G > 0 && NG * G == K && Gp >= G && Gp % KALIGN == 0 && R == Gp * 8 + META, "packed does not match K = ", K, " and G = ", G);
  TORCH_CHECK(NB == (N + BN - 1) / BN, "packed holds ", NB, " blocks of 16 columns, N = ", N);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 64 == 0, "packed must be 64-byte aligned");
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const Engine eng = engine();
  const int64_t Kp = NG * Gp;
  std::vector<uint16_t> xb_store(static_cast<size_t>(M * Kp));
  uint16_t* xb = xb_store.data();
  std::vector<float> xf, xsum(static_cast<size_t>(M * NG));
  if (eng == PORTABLE || eng == AVX512F) xf.resize(static_cast<size_t>(M * Kp));
  prepare_x(x, G, Gp, NG, xb, xf.empty() ? nullptr : xf.data(), xsum.data());
  std::vector<float> bias32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bias must have N = ", N, " elements");
    const at::Tensor b = bias->to(at::kFloat).contiguous();
    bias32.assign(b.data_ptr<float>(), b.data_ptr<float>() + N);
  }
  const Problem p{M, N, NB, NG, G, Gp, R, Kp, xb, xf.empty() ? nullptr : xf.data(), xsum.data(), packed.data_ptr<uint8_t>(),
                  bias32.empty() ? nullptr : bias32.data(), y.data_ptr(), x.scalar_type() == at::kBFloat16};
  // Enough blocks per task that a thread's share is worth waking it (~64k weights).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (K * BN));
  at::parallel_for(0, NB, grain, [&](int64_t b0, int64_t b1) {
    switch (eng) {
#if defined(TS_HAVE_AMX)
      case AMX: blocks_amx(p, b0, b1); return;
#endif
#if defined(TS_AVX512)
      case AVX512BF16:
      case AVX512F: blocks_avx512(p, b0, b1); return;
#endif
      default:
        for (int64_t b = b0; b < b1; ++b) rows_portable(p, 0, M, b);
    }
  });
  return y;
}

int64_t engine_id() { return static_cast<int64_t>(engine()); }

// How many threads at::parallel_for runs n one-item tasks on, as the kernels call it (the largest thread number seen,
// plus one): code built without OpenMP runs it sequentially whatever torch.set_num_threads says (a test checks this).
int64_t parallel_threads(int64_t n) {
  std::atomic<int64_t> top{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int64_t t = at::get_thread_num();
    for (int64_t seen = top.load(); t > seen && !top.compare_exchange_weak(seen, t);) {
    }
  });
  return top.load() + 1;
}

}  // namespace

// One library per variant, one op namespace per variant (cpu_common.h); cpu_int8.cpp adds its op as a fragment.
#define TS_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define TS_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

TS_LIBRARY(TS_NAMESPACE, m) {
  m.def("int4_mm(Tensor x, Tensor packed, Tensor? bias, int N, int G) -> Tensor");
  m.def("engine() -> int", &engine_id);
  m.def("parallel_threads(int n) -> int", &parallel_threads);
}

TS_LIBRARY_IMPL(TS_NAMESPACE, CPU, m) { m.impl("int4_mm", &int4_mm); }
