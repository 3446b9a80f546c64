// CPU INT4 linear for small M (decode): y[M, N] = x[M, K] @ W[K, N] (+ bias), W = (q - z) * s per group of G rows.
//
// Built on first use by tinyserve_kernels/cpu_native.py (torch.utils.cpp_extension, -O3 -march=native), with cpu_int8.cpp (the
// int8 lm_head) into one library; cpu_common.h says how the engine is chosen. For this op the engines are:
//   AMX         AMX-INT8 tiles (TDPBSUD: signed x bytes times unsigned code bytes, int32 sums);
//   AVX512BF16  the same sums with VPDPBUSD (AVX512-VNNI, which every AVX512-BF16 CPU has);
//   AVX512F     the same sums with VPMADDUBSW + VPMADDWD (AVX512BW);
//   portable    plain C++ integer loops.
// The inner sums are exact integers, so every engine, every blocking and every thread count gives the same bits.
//
// Packed layout (written by tinyserve_kernels/cpu_native.py:repack), uint8 [NB, NG, R], NB = ceil(N / 16) blocks of 16 columns,
// NG = K / G groups, Gp = G rounded up to a multiple of 32 (rows G..Gp-1 of a group are zero codes), R = Gp * 8 + 64:
//   bytes [0, Gp * 8): Gp / 8 "octets" of 64 bytes, octet o holding rows 8o..8o+7 of the group for the 16 columns:
//     byte 4c + j holds the code of row 8o + j, column c, in its low nibble and that of row 8o + 4 + j in its high one.
//     So (octet & 0x0F) and ((octet >> 4) & 0x0F) are 64 code bytes each, 16 columns x 4 consecutive rows: the operand
//     layout of VPDPBUSD and one row of an AMX int8 B tile (two decode steps per 128 codes, no per-code shuffles).
//   bytes [Gp * 8, +32): the 16 columns' fp16 scales s; [+32, +48): their zero points (u8); then 16 zero bytes.
//
// Arithmetic, identical for every row whatever M is and wherever the row sits (row invariance by construction):
//   x (fp32, or bf16 widened exactly) becomes, per row and group, a block floating-point vector: with E the exponent
//   of the group's largest |x| (2^E <= amax < 2^(E+1)), xscale = 2^(E + 1 - B) and xi = round_half_even(x / xscale),
//   so |xi| <= 2^B and |x - xi * xscale| <= amax * 2^-B. B = 14 for G <= 4096 (fewer bits for larger groups, so
//   no int32 sum below can overflow; xbits()). That is ~32x finer than rounding x to bf16 (2^-9 of each |x|) at the
//   group's largest entries. xi = 256 * hi + lo with hi, lo signed bytes; xsum = sum of the group's xi.
//   Per output column and group, in int32, exact:
//     inner = 256 * sum(hi * q) + sum(lo * q)          (the two byte dot products the instructions compute)
//     t     = inner - z * xsum                          = sum of xi * (q - z)
//   then in fp32: acc = fma(s, float(t) * xscale, acc)  (float(t) rounds only when |t| > 2^24; * xscale is exact)
//   y = acc (+ bias), rounded once to x's dtype. A group whose x holds an inf or NaN gives NaN in that row.
//   A group with amax < 2^-100 counts as zero (its contribution would be below fp32's resolution of any output).

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

constexpr int64_t BN = 16;      // columns per block
constexpr int64_t META = 64;    // metadata bytes after each group's codes
constexpr int64_t KALIGN = 32;  // group rows are padded to a multiple of this (one AMX int8 step of 32 rows)
constexpr int64_t MR_MAX = 8;   // rows computed side by side (register blocking) by the AVX-512 engines
// One-row tiles prefetch the group this far ahead into L1 (into the next tile's blocks near a tile's end): 5-21%
// faster on cold weights at M = 1 (576x576 to 11008x4096); one group ahead did the same, four 2-9% slower, four or
// eight into L2 1-13% slower (BENCHMARKS.md, "Exact integer sums").
constexpr int64_t PREFETCH_GROUPS = 2;
constexpr int XBITS = 14;       // bits of |xi| for groups of up to 4096 rows

// Bits of xi for padded groups of Gp rows: |t| <= 2 * 15 * Gp * 2^B must stay below 2^31.
inline int xbits(int64_t Gp) {
  int b = XBITS;
  while (b > 1 && 30 * Gp * (int64_t{1} << b) >= (int64_t{1} << 31)) --b;
  return b;
}

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
  int64_t M, N, NB, NG, Gp, R, Kp;
  const int8_t* xq;      // [M, 2, Kp]: per row, hi bytes then lo bytes of xi, each group zero-padded to Gp
  const float* xscale;   // [M, NG] 2^(E + 1 - B), or NaN for a group holding an inf or NaN
  const int32_t* xsum;   // [M, NG] sum of the group's xi
  const uint8_t* w;      // [NB, NG, R]
  const float* bias;     // [N] or null
  void* y;               // [M, N] fp32 or bf16
  bool y_bf16;

  const uint8_t* group(int64_t b, int64_t g) const { return w + (b * NG + g) * R; }
  const int8_t* hi(int64_t m) const { return xq + m * 2 * Kp; }
  const int8_t* lo(int64_t m) const { return xq + (m * 2 + 1) * Kp; }
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
    const int64_t m = m0 + r;
    float acc[BN] = {0};
    for (int64_t g = 0; g < p.NG; ++g) {
      const uint8_t* wg = p.group(b, g);
      const int8_t *xh = p.hi(m) + g * p.Gp, *xl = p.lo(m) + g * p.Gp;
      int32_t dh[BN] = {0}, dl[BN] = {0};
      for (int64_t o = 0; o < p.Gp / 8; ++o)
        for (int64_t c = 0; c < BN; ++c)
          for (int j = 0; j < 4; ++j) {
            const uint8_t byte = wg[o * 64 + 4 * c + j];
            const int64_t k = 8 * o + j;
            dh[c] += (byte & 0xF) * xh[k] + (byte >> 4) * xh[k + 4];
            dl[c] += (byte & 0xF) * xl[k] + (byte >> 4) * xl[k + 4];
          }
      const uint8_t* meta = wg + p.Gp * 8;
      const int32_t xs = p.xsum[m * p.NG + g];
      const float sc = p.xscale[m * p.NG + g];
      for (int64_t c = 0; c < BN; ++c) {
        const int32_t t = dh[c] * 256 + dl[c] - static_cast<int32_t>(meta[32 + c]) * xs;
        acc[c] = std::fma(half_float(meta[2 * c] | (meta[2 * c + 1] << 8)), static_cast<float>(t) * sc, acc[c]);
      }
    }
    store_row(p, m, b, acc);
  }
}

#if defined(TS_AVX512)
// ------------------------------------------------------------------------------------------------ AVX-512 engines

// The two code vectors of one 64-byte octet: rows 8o..8o+3 (low nibbles) and 8o+4..8o+7 (high nibbles), each 16
// columns x 4 rows of bytes 0..15.
struct Codes {
  __m512i lo, hi;
};

inline Codes decode_octet(const uint8_t* p) {
  const __m512i nib = _mm512_set1_epi8(0x0F), w = _mm512_load_si512(p);
  return {_mm512_and_si512(w, nib), _mm512_and_si512(_mm512_srli_epi16(w, 4), nib)};
}

// The group's 16 fp32 scales and int32 zero points.
inline void load_meta(const uint8_t* meta, __m512& s, __m512i& z) {
  s = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(meta)));
  z = _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(meta + 32)));
}

// acc + s * float(256 * dh + dl - z * xsum) * xscale: one group of one row folded into its fp32 accumulator.
inline __m512 fold(__m512 acc, __m512 s, __m512i z, __m512i dh, __m512i dl, int32_t xsum, float xscale) {
  const __m512i t = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(dh, 8), dl), _mm512_mullo_epi32(z, _mm512_set1_epi32(xsum)));
  return _mm512_fmadd_ps(s, _mm512_mul_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(xscale)), acc);
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

// MR rows x NR column blocks, the whole K; fp32 accumulators in registers, int32 sums per group.
template <int MR, int NR>
void tile_avx512(const Problem& p, int64_t m0, int64_t b0) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.NG; ++g) {
    __m512i dh[MR][NR], dl[MR][NR];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NR; ++j) dh[r][j] = dl[r][j] = _mm512_setzero_si512();
    const int64_t k0 = g * p.Gp;
    if (MR == 1) {  // the group PREFETCH_GROUPS ahead, in the next tile's blocks once this tile's run out
      const int64_t ahead = g + PREFETCH_GROUPS, bp = ahead < p.NG ? b0 : b0 + NR, gp = ahead < p.NG ? ahead : ahead - p.NG;
      for (int j = 0; j < NR && bp + j < p.NB && gp < p.NG; ++j)
        for (int64_t l = 0; l < p.R; l += 64) _mm_prefetch(reinterpret_cast<const char*>(p.group(bp + j, gp) + l), _MM_HINT_T0);
    }
    for (int64_t o = 0; o < p.Gp / 8; ++o) {
      const int64_t k = k0 + 8 * o;
      for (int j = 0; j < NR; ++j) {
        const Codes w = decode_octet(p.group(b0 + j, g) + o * 64);
        for (int r = 0; r < MR; ++r) {
          const int8_t *xh = p.hi(m0 + r) + k, *xl = p.lo(m0 + r) + k;
          dh[r][j] = dot4(dot4(dh[r][j], w.lo, xh), w.hi, xh + 4);
          dl[r][j] = dot4(dot4(dl[r][j], w.lo, xl), w.hi, xl + 4);
        }
      }
    }
    for (int j = 0; j < NR; ++j) {
      __m512 s;
      __m512i z;
      load_meta(p.group(b0 + j, g) + p.Gp * 8, s, z);
      for (int r = 0; r < MR; ++r)
        acc[r][j] = fold(acc[r][j], s, z, dh[r][j], dl[r][j], p.xsum[(m0 + r) * p.NG + g], p.xscale[(m0 + r) * p.NG + g]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) store_acc(p, m0 + r, b0 + j, acc[r][j]);
}

using TileFn = void (*)(const Problem&, int64_t, int64_t);

// Column blocks computed side by side for a chunk of MR rows: enough independent dot-product chains to hide their
// latency at M = 1, at most 24 accumulator registers (acc + two int32 sums per row and block) in all.
constexpr int nr_for(int64_t mr) { return mr <= 1 ? 4 : mr <= 3 ? 2 : 1; }

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
// TDPBSUD multiplies A (signed bytes: x) by B (unsigned bytes: codes) into C (int32). One x row is two A rows, its hi
// and lo bytes (adjacent in xq, so A is one strided load), so a tile of 16 rows holds a "chunk" of up to 8 x rows.
// B is one K step of a block: ks / 4 rows of 64 code bytes, row i holding rows 4i..4i+3 of the step for the 16
// columns, exactly a decoded code vector. C row 2r holds the hi sums, row 2r + 1 the lo sums of x row r of the chunk.
// Per group: C = sum over the group's K steps, then stored and folded as above. Two tile layouts:
//   one chunk:  C = tmm0..3 (4 blocks), A = tmm4, B = tmm5..7 (tmm5 again for the 4th block);
//   two chunks: C = tmm0..3 (chunk c, block j: tmm 2c + j), A = tmm4, 5, B = tmm6, 7: each decoded B serves 16 rows.

constexpr int64_t AMX_MR = 8;  // x rows per chunk (2 byte rows each: 16 tile rows)
// One row runs on the AVX-512 code of the same build (the same bits): one VPDPBUSD pass over a decoded vector beats
// storing it for a tile load there (the AMX path took 1.14-1.41x its time on cold weights, 576x576 to 11008x4096);
// from 2 rows on AMX wins (0.89-1.02x the AVX-512 time at M = 2). BENCHMARKS.md, "Exact integer sums".
constexpr int64_t AMX_MIN_M = 2;
constexpr int64_t AMX_CHUNK = 4;  // K steps decoded ahead of their tile loads (a tile load that reads a line just
                                  // written stalls until the store retires: keep stores and loads apart)

// mr[c]: x rows of chunk c (0 for no second chunk); ks: rows of K per step (64 when the padded group allows, else 32).
void configure_tiles(const int64_t* mr, int64_t ks) {
  TileConfig cfg;
  const bool two = mr[1] > 0;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = static_cast<uint8_t>(2 * mr[two ? t / 2 : 0]), cfg.colsb[t] = 64;
  for (int c = 0; c < (two ? 2 : 1); ++c) cfg.rows[4 + c] = static_cast<uint8_t>(2 * mr[c]), cfg.colsb[4 + c] = static_cast<uint16_t>(ks);
  for (int t = two ? 6 : 5; t < 8; ++t) cfg.rows[t] = static_cast<uint8_t>(ks / 4), cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

// K steps [c0, c0 + nc) of NR blocks' group (wg[j]: block j's group) decoded into B tile images bbuf[step][j].
template <int NR>
inline void decode_steps(const uint8_t* const* wg, int64_t c0, int64_t nc, int64_t ks, uint8_t (*bbuf)[NR][16 * 64]) {
  for (int64_t c = 0; c < nc; ++c)
    for (int j = 0; j < NR; ++j)
      for (int64_t o = 0; o < ks / 8; ++o) {
        const Codes w = decode_octet(wg[j] + ((c0 + c) * ks / 8 + o) * 64);
        _mm512_store_si512(bbuf[c][j] + 128 * o, w.lo);
        _mm512_store_si512(bbuf[c][j] + 128 * o + 64, w.hi);
      }
}

// One group's C image (2 * mr rows x 16 int32) of one block folded into acc (mr rows x 16 fp32) for x rows m0...
inline void fold_tile(const Problem& p, const uint8_t* meta, const int32_t* cbuf, float* acc, int64_t m0, int64_t mr, int64_t g) {
  __m512 s;
  __m512i z;
  load_meta(meta, s, z);
  for (int64_t r = 0; r < mr; ++r) {
    const __m512i dh = _mm512_load_si512(cbuf + 2 * r * BN), dl = _mm512_load_si512(cbuf + (2 * r + 1) * BN);
    const __m512 a = fold(_mm512_load_ps(acc + r * BN), s, z, dh, dl, p.xsum[(m0 + r) * p.NG + g], p.xscale[(m0 + r) * p.NG + g]);
    _mm512_store_ps(acc + r * BN, a);
  }
}

// One chunk: rows m0..m0+mr-1 (mr <= 8) x blocks b0..b0+NR-1 (NR <= 4).
template <int NR>
void tile_amx(const Problem& p, int64_t m0, int64_t mr, int64_t ks, int64_t b0) {
  alignas(64) uint8_t bbuf[AMX_CHUNK][NR][16 * 64];
  alignas(64) int32_t cbuf[NR][2 * AMX_MR * BN];
  alignas(64) float acc[NR][AMX_MR * BN];
  std::fill(&acc[0][0], &acc[0][0] + NR * AMX_MR * BN, 0.f);
  const int8_t* xa = p.hi(m0);
  const int64_t steps = p.Gp / ks;
  for (int64_t g = 0; g < p.NG; ++g) {
    const uint8_t* wg[NR];
    for (int j = 0; j < NR; ++j) wg[j] = p.group(b0 + j, g);
    _tile_zero(0);
    if constexpr (NR > 1) _tile_zero(1);
    if constexpr (NR > 2) _tile_zero(2);
    if constexpr (NR > 3) _tile_zero(3);
    for (int64_t c0 = 0; c0 < steps; c0 += AMX_CHUNK) {
      const int64_t nc = std::min<int64_t>(AMX_CHUNK, steps - c0);
      decode_steps<NR>(wg, c0, nc, ks, bbuf);
      for (int64_t c = 0; c < nc; ++c) {
        _tile_loadd(4, xa + g * p.Gp + (c0 + c) * ks, p.Kp);
        _tile_loadd(5, bbuf[c][0], 64);
        _tile_dpbsud(0, 4, 5);
        if constexpr (NR > 1) {
          _tile_loadd(6, bbuf[c][1], 64);
          _tile_dpbsud(1, 4, 6);
        }
        if constexpr (NR > 2) {
          _tile_loadd(7, bbuf[c][2], 64);
          _tile_dpbsud(2, 4, 7);
        }
        if constexpr (NR > 3) {
          _tile_loadd(5, bbuf[c][3], 64);
          _tile_dpbsud(3, 4, 5);
        }
      }
    }
    _tile_stored(0, cbuf[0], 64);
    if constexpr (NR > 1) _tile_stored(1, cbuf[1], 64);
    if constexpr (NR > 2) _tile_stored(2, cbuf[2], 64);
    if constexpr (NR > 3) _tile_stored(3, cbuf[3], 64);
    for (int j = 0; j < NR; ++j) fold_tile(p, wg[j] + p.Gp * 8, cbuf[j], acc[j], m0, mr, g);
  }
  for (int j = 0; j < NR; ++j)
    for (int64_t r = 0; r < mr; ++r) store_acc(p, m0 + r, b0 + j, _mm512_load_ps(acc[j] + r * BN));
}

// Two chunks: rows m0..m0+7 and m0+8..m0+7+mr1 (mr1 <= 8) x blocks b0..b0+NR-1 (NR <= 2).
template <int NR>
void tile_amx2(const Problem& p, int64_t m0, int64_t mr1, int64_t ks, int64_t b0) {
  alignas(64) uint8_t bbuf[AMX_CHUNK][NR][16 * 64];
  alignas(64) int32_t cbuf[2][NR][2 * AMX_MR * BN];
  alignas(64) float acc[2][NR][AMX_MR * BN];
  std::fill(&acc[0][0][0], &acc[0][0][0] + 2 * NR * AMX_MR * BN, 0.f);
  const int8_t *xa0 = p.hi(m0), *xa1 = p.hi(m0 + AMX_MR);
  const int64_t steps = p.Gp / ks, mr[2] = {AMX_MR, mr1};
  for (int64_t g = 0; g < p.NG; ++g) {
    const uint8_t* wg[NR];
    for (int j = 0; j < NR; ++j) wg[j] = p.group(b0 + j, g);
    _tile_zero(0);
    _tile_zero(2);
    if constexpr (NR > 1) {
      _tile_zero(1);
      _tile_zero(3);
    }
    for (int64_t c0 = 0; c0 < steps; c0 += AMX_CHUNK) {
      const int64_t nc = std::min<int64_t>(AMX_CHUNK, steps - c0);
      decode_steps<NR>(wg, c0, nc, ks, bbuf);
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t k = g * p.Gp + (c0 + c) * ks;
        _tile_loadd(4, xa0 + k, p.Kp);
        _tile_loadd(5, xa1 + k, p.Kp);
        _tile_loadd(6, bbuf[c][0], 64);
        _tile_dpbsud(0, 4, 6);
        _tile_dpbsud(2, 5, 6);
        if constexpr (NR > 1) {
          _tile_loadd(7, bbuf[c][1], 64);
          _tile_dpbsud(1, 4, 7);
          _tile_dpbsud(3, 5, 7);
        }
      }
    }
    _tile_stored(0, cbuf[0][0], 64);
    _tile_stored(2, cbuf[1][0], 64);
    if constexpr (NR > 1) {
      _tile_stored(1, cbuf[0][1], 64);
      _tile_stored(3, cbuf[1][1], 64);
    }
    for (int c = 0; c < 2; ++c)
      for (int j = 0; j < NR; ++j) fold_tile(p, wg[j] + p.Gp * 8, cbuf[c][j], acc[c][j], m0 + c * AMX_MR, mr[c], g);
  }
  for (int c = 0; c < 2; ++c)
    for (int j = 0; j < NR; ++j)
      for (int64_t r = 0; r < mr[c]; ++r) store_acc(p, m0 + c * AMX_MR + r, b0 + j, _mm512_load_ps(acc[c][j] + r * BN));
}

// Rows in passes of 16 (two chunks; a last pass of up to 8 rows takes one), blocks [b_begin, b_end).
void blocks_amx(const Problem& p, int64_t b_begin, int64_t b_end) {
  const int64_t ks = p.Gp % 64 == 0 ? 64 : 32;
  for (int64_t m0 = 0; m0 < p.M; m0 += 2 * AMX_MR) {
    const int64_t rows = std::min<int64_t>(2 * AMX_MR, p.M - m0);
    const int64_t mr[2] = {std::min(rows, AMX_MR), std::max<int64_t>(0, rows - AMX_MR)};
    configure_tiles(mr, ks);
    int64_t b = b_begin;
    if (mr[1] > 0) {
      for (; b + 2 <= b_end; b += 2) tile_amx2<2>(p, m0, mr[1], ks, b);
      for (; b < b_end; ++b) tile_amx2<1>(p, m0, mr[1], ks, b);
    } else {
      for (; b + 4 <= b_end; b += 4) tile_amx<4>(p, m0, mr[0], ks, b);
      for (; b + 2 <= b_end; b += 2) tile_amx<2>(p, m0, mr[0], ks, b);
      for (; b < b_end; ++b) tile_amx<1>(p, m0, mr[0], ks, b);
    }
  }
  _tile_release();
}
#endif  // TS_HAVE_AMX

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

// y [M, N] = x [M, K] @ W (+ bias), x and y fp32 or bf16 bits (bf16) contiguous, W packed [NB, NG, R]; bias fp32 [N]
// or null. Shapes already checked (int4_mm, or the decode step's constructor).
void TS_NAMESPACE::int4_mm_into(const void* x, bool bf16, int64_t M, int64_t K, const uint8_t* packed, int64_t NB, int64_t NG,
                                int64_t R, const float* bias, int64_t N, int64_t G, void* y) {
  if (M == 0 || N == 0) return;
  const Engine eng = engine();
  const int64_t Gp = (R - META) / 8, Kp = NG * Gp;
  std::vector<int8_t> xq(static_cast<size_t>(M * 2 * Kp));  // zeroed: the groups' padding
  std::vector<float> xscale(static_cast<size_t>(M * NG));
  std::vector<int32_t> xsum(static_cast<size_t>(M * NG));
  prepare_x(bf16 ? nullptr : static_cast<const float*>(x), bf16 ? static_cast<const uint16_t*>(x) : nullptr, M, K, G, Gp, NG,
            xbits(Gp), xq.data(), xscale.data(), xsum.data());
  const Problem p{M, N, NB, NG, Gp, R, Kp, xq.data(), xscale.data(), xsum.data(), packed, bias, y, bf16};
  // Enough blocks per task that a thread's share is worth waking it (~64k weights).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (K * BN));
  at::parallel_for(0, NB, grain, [&](int64_t b0, int64_t b1) {
    switch (eng) {
#if defined(TS_HAVE_AMX)
      case AMX:
        if (M >= AMX_MIN_M) return blocks_amx(p, b0, b1);
        return blocks_avx512(p, b0, b1);
#endif
#if defined(TS_AVX512)
      case AVX512BF16:
      case AVX512F: blocks_avx512(p, b0, b1); return;
#endif
      default:
        for (int64_t b = b0; b < b1; ++b) rows_portable(p, 0, M, b);
    }
  });
}

void TS_NAMESPACE::check_int4_packed(const at::Tensor& packed, int64_t K, int64_t N, int64_t G) {
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be [NB, NG, R] uint8");
  const int64_t NB = packed.size(0), NG = packed.size(1), R = packed.size(2), Gp = (R - META) / 8;
  TORCH_CHECK(G > 0 && NG * G == K && Gp >= G && Gp % KALIGN == 0 && R == Gp * 8 + META, "packed does not match K = ", K, " and G = ", G);
  TORCH_CHECK(NB == (N + BN - 1) / BN, "packed holds ", NB, " blocks of 16 columns, N = ", N);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 64 == 0, "packed must be 64-byte aligned");
}

// y = x @ W (+ bias). x: [M, K] fp32 or bf16; packed: [NB, NG, R] uint8; bias: [N] or None. Returns [M, N] in x's dtype.
at::Tensor TS_NAMESPACE::int4_mm(const at::Tensor& x_in, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                                 int64_t N, int64_t G) {
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [M, K]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  check_int4_packed(packed, K, N, G);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor bias32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bias must have N = ", N, " elements");
    bias32 = bias->to(at::kFloat).contiguous();
  }
  int4_mm_into(x.data_ptr(), x.scalar_type() == at::kBFloat16, M, K, packed.data_ptr<uint8_t>(), packed.size(0), packed.size(1),
               packed.size(2), bias32.defined() ? bias32.data_ptr<float>() : nullptr, N, G, y.data_ptr());
  return y;
}

// One library per variant, one op namespace per variant (ops.h); cpu_int8.cpp adds its op as a fragment.
#define TS_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define TS_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

TS_LIBRARY(TS_NAMESPACE, m) {
  m.def("int4_mm(Tensor x, Tensor packed, Tensor? bias, int N, int G) -> Tensor");
  m.def("engine() -> int", &engine_id);
  m.def("parallel_threads(int n) -> int", &parallel_threads);
}

TS_LIBRARY_IMPL(TS_NAMESPACE, CPU, m) { m.impl("int4_mm", &TS_NAMESPACE::int4_mm); }
