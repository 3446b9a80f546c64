// CPU int8 weight-only linear for small M (the lm_head of batched decode): y[M, N] = (x[M, K] @ q[N, K]^T) * s[N]
// (+ bias), one symmetric scale per output row (tinyserve/model.py, Int8Linear).
//
// Why: torch's _weight_int8pack_mm reads the whole [N, K] weight again for every row of x, so a 16-row decode step
// pays for the lm_head 16 times. This kernel decodes each 32-byte piece of weights once for all rows (one AMX B tile
// serves up to 16 rows, one decoded vector up to 8 rows in registers). Built with cpu_int4.cpp into one library by
// kernels/cpu_native.py; the engines (AMX, AVX512-BF16, AVX512F, portable) are chosen as cpu_common.h says.
//
// Packed layout (written by kernels/cpu_native.py:repack_int8), int8 [NB, Kp / 2, 32]: NB blocks of 16 output columns,
// N padded to a multiple of 64 (NB % 4 == 0: the AMX engine takes 4 blocks at a time), Kp = K rounded up to a multiple
// of 32; padded rows and columns hold zero codes. Byte 2c + e of pair row j of block b is q[16b + c, 2j + e]: after
// sign extension to 16-bit words, the 32 words of a pair row are 16 (k, k + 1) pairs, one per column, which is the
// operand layout of VDPBF16PS and of one row of an AMX bf16 B tile. int8 codes are exact in bf16 (8 significant bits),
// so decoding is a conversion, not a rounding. scales: fp32 [NB * 16], zero in padded columns.
//
// Arithmetic per output (m, n), identical whatever M is and wherever the row sits (row invariance by construction):
//   x is rounded to bf16 (round to nearest even) and zero-padded to Kp;
//   acc = sum over k of x[m, k] * q[n, k] in fp32, k in increasing order, by the engine's own instruction: AMX one
//         TDPBF16PS per 32-k step (the accumulator stays in fp32: kept in a tile, or stored and reloaded exactly);
//         AVX512-BF16 one VDPBF16PS per k pair; AVX512F and portable two FMAs per pair (bit-identical to each other);
//   y = acc * s[n], or fma(acc, s[n], bias[n]) with a bias; rounded once to x's dtype.
// Row and column blocking decide only which outputs are computed side by side, never how one output is summed.
// Engines differ from each other in the last bits (the bf16 dot-product instructions round their own way).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"

namespace {

constexpr int64_t BN = 16;       // columns per block
constexpr int64_t GROUP = 4;     // blocks per column group: N is padded to GROUP * BN, the unit of parallel work
constexpr int64_t KALIGN = 32;   // K is padded to a multiple of this (one AMX step of bf16 pairs)
constexpr int64_t MR_MAX = 8;    // rows computed side by side (register blocking) by the AVX-512 engines
constexpr int64_t AMX_MR = 16;   // rows per AMX tile (x is zero-padded to whole chunks of this when M > 16)

struct Problem {
  int64_t M, N, NB, Kp, J;  // J = Kp / 2 pair rows per block
  const uint16_t* xb;       // [Mx, Kp] bf16 bits: x rounded, zero-padded (Mx = M, or M rounded up to 16 for AMX)
  const float* xf;          // [M, Kp] the same values as fp32 (AVX512F and portable engines), else null
  const int8_t* w;          // [NB, J, 32]
  const float* s;           // [NB * 16]
  const float* bias;        // [N] or null
  void* y;                  // [M, N] fp32 or bf16
  bool y_bf16;

  const int8_t* pair(int64_t b, int64_t j) const { return w + (b * J + j) * 32; }
};

// ------------------------------------------------------------------------------------------------ portable engine

inline void store_one(const Problem& p, int64_t m, int64_t n, float acc) {
  const float v = p.bias ? std::fma(acc, p.s[n], p.bias[n]) : acc * p.s[n];
  if (p.y_bf16)
    static_cast<uint16_t*>(p.y)[m * p.N + n] = bf16_round(v);
  else
    static_cast<float*>(p.y)[m * p.N + n] = v;
}

void block_portable(const Problem& p, int64_t b) {
  const int64_t n0 = b * BN, nc = std::min<int64_t>(BN, p.N - n0);
  for (int64_t m = 0; m < p.M; ++m) {
    const float* x = p.xf + m * p.Kp;
    for (int64_t c = 0; c < nc; ++c) {
      float acc = 0.f;
      for (int64_t j = 0; j < p.J; ++j) {
        const int8_t* q = p.pair(b, j) + 2 * c;
        acc = std::fma(x[2 * j], static_cast<float>(q[0]), acc);
        acc = std::fma(x[2 * j + 1], static_cast<float>(q[1]), acc);
      }
      store_one(p, m, n0 + c, acc);
    }
  }
}

#if defined(TS_AVX512)
// ------------------------------------------------------------------------------------------------ AVX-512 engines

// 16 columns of row m: acc * s (+ bias), rounded once to y's dtype; columns >= N are dropped.
inline void store16(const Problem& p, int64_t m, int64_t b, __m512 acc) {
  const int64_t n0 = b * BN, n = std::min<int64_t>(BN, p.N - n0);
  if (n <= 0) return;
  const __mmask16 mask = n == BN ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
  const __m512 s = _mm512_loadu_ps(p.s + n0);  // padded to whole blocks
  const __m512 v = p.bias ? _mm512_fmadd_ps(acc, s, _mm512_maskz_loadu_ps(mask, p.bias + n0)) : _mm512_mul_ps(acc, s);
  if (p.y_bf16)
    _mm512_mask_cvtepi32_storeu_epi16(static_cast<uint16_t*>(p.y) + m * p.N + n0, mask, bf16_round16(v));
  else
    _mm512_mask_storeu_ps(static_cast<float*>(p.y) + m * p.N + n0, mask, v);
}

#if defined(__AVX512BF16__)
// One pair row (32 int8) -> 32 bf16 words in the same order: bytes 0-15 and 16-31 to fp32 (exact), then both halves
// to bf16 (exact: |q| <= 128 has at most 8 significant bits).
using WPair = __m512i;
inline WPair decode_pair(const int8_t* q) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))));
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // words 0-15 from lo, 16-31 from hi
}
inline __m512 dot2(__m512 acc, WPair w, XPair x) { return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x); }
#else
// One pair row -> the 16 columns' codes for row k (even bytes) and row k + 1 (odd bytes) as fp32.
struct WPair {
  __m512 w0, w1;
};
inline WPair decode_pair(const int8_t* q) {
  const __m512i v = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));  // word 2c + e
  return {_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 16)), _mm512_cvtepi32_ps(_mm512_srai_epi32(v, 16))};
}
inline __m512 dot2(__m512 acc, WPair w, XPair x) { return _mm512_fmadd_ps(x.x1, w.w1, _mm512_fmadd_ps(x.x0, w.w0, acc)); }
#endif

// MR rows x NR blocks, the whole K, accumulators in registers (MR * NR <= 16).
template <int MR, int NR>
void tile_avx512(const Problem& p, int64_t m0, int64_t b0) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k2 = 0; k2 < p.J; ++k2) {
    WPair w[NR];
    for (int j = 0; j < NR; ++j) w[j] = decode_pair(p.pair(b0 + j, k2));
    for (int r = 0; r < MR; ++r) {
      const XPair x = x_pair(p, m0 + r, 2 * k2);
      for (int j = 0; j < NR; ++j) acc[r][j] = dot2(acc[r][j], w[j], x);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) store16(p, m0 + r, b0 + j, acc[r][j]);
}

using TileFn = void (*)(const Problem&, int64_t, int64_t);

// Blocks side by side for a chunk of mr rows: enough independent accumulator chains to hide the dot-product latency
// at M = 1, at most 16 accumulators.
constexpr int nr_for(int64_t mr) { return mr <= 2 ? 8 : mr <= 4 ? 4 : 2; }

// Every (mr, nr) blocks_avx512 asks for: nr = nr_for(min(M, MR_MAX)) with the last row chunk's mr <= that, or 1.
TileFn pick_tile(int64_t mr, int nr) {
#define TS_TILE(MR, NR) \
  if (mr == MR && nr == NR) return tile_avx512<MR, NR>;
  TS_TILE(1, 8) TS_TILE(2, 8)
  TS_TILE(1, 4) TS_TILE(2, 4) TS_TILE(3, 4) TS_TILE(4, 4)
  TS_TILE(1, 2) TS_TILE(2, 2) TS_TILE(3, 2) TS_TILE(4, 2) TS_TILE(5, 2) TS_TILE(6, 2) TS_TILE(7, 2) TS_TILE(8, 2)
  TS_TILE(1, 1) TS_TILE(2, 1) TS_TILE(3, 1) TS_TILE(4, 1) TS_TILE(5, 1) TS_TILE(6, 1) TS_TILE(7, 1) TS_TILE(8, 1)
#undef TS_TILE
  TORCH_CHECK(false, "no AVX-512 tile for ", mr, " rows x ", nr, " blocks");
  return nullptr;
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
// Tiles: C0..C3 = tmm0..3 (up to 16 rows x 16 fp32: one block each), A = tmm4 (16 rows' 32 bf16 of x), B = tmm5..7
// (one decoded 32-k step of a block: 16 pair rows of 16 columns). A column group of 4 blocks is decoded AMX_KC steps
// at a time into a 16 KB buffer (in L1), then multiplied with every 16-row chunk of x. With M <= 16 (one chunk,
// tiles configured for M rows) C stays in the tiles for the whole K; with more rows x is zero-padded to 16-row chunks
// and each chunk's C is stored to memory and reloaded between steps (exact fp32 copies: the sums do not change).
// TDPBF16PS computes each row of C from the same row of A only, so rows stay independent whatever M is.

constexpr int64_t AMX_KC = 4;  // 32-k steps decoded at a time: GROUP * AMX_KC * 1 KB = 16 KB (8: 32 KB was no faster)

void configure_tiles(int64_t rows) {
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = static_cast<uint8_t>(rows), cfg.colsb[t] = 64;  // C: rows x 16 fp32
  cfg.rows[4] = static_cast<uint8_t>(rows), cfg.colsb[4] = 64;                              // A: rows x 32 bf16
  for (int t = 5; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;                          // B: 16 pair rows
  _tile_loadconfig(&cfg);
}

// Decode 32-k step `step` of block b into a B tile image: 16 pair rows of 32 bf16 words.
inline void decode_b(const Problem& p, int64_t b, int64_t step, uint8_t* buf) {
  for (int i = 0; i < 16; ++i) _mm512_store_si512(buf + i * 64, decode_pair(p.pair(b, step * 16 + i)));
}

inline void zero_c() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}
inline void load_c(const float* c) {  // c: [GROUP][16 rows][16]
  _tile_loadd(0, c, 64);
  _tile_loadd(1, c + 256, 64);
  _tile_loadd(2, c + 512, 64);
  _tile_loadd(3, c + 768, 64);
}
inline void store_c(float* c) {
  _tile_stored(0, c, 64);
  _tile_stored(1, c + 256, 64);
  _tile_stored(2, c + 512, 64);
  _tile_stored(3, c + 768, 64);
}

// Column groups [g_begin, g_end), all rows. bbuf: [AMX_KC][GROUP][1024] bytes, cacc: [chunks][GROUP][16][16] fp32.
void groups_amx(const Problem& p, int64_t g_begin, int64_t g_end, uint8_t* bbuf, float* cacc) {
  const int64_t rows = std::min<int64_t>(p.M, AMX_MR), chunks = (p.M + AMX_MR - 1) / AMX_MR;
  const int64_t steps = p.Kp / 32, nk = (steps + AMX_KC - 1) / AMX_KC, kc = (steps + nk - 1) / nk;  // even chunks
  const bool keep = chunks == 1;  // C stays in the tiles for the whole K
  const int64_t xstride = p.Kp * 2;
  configure_tiles(rows);
  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t b0 = g * GROUP;
    if (keep) zero_c();
    for (int64_t s0 = 0; s0 < steps; s0 += kc) {
      const int64_t ns = std::min<int64_t>(kc, steps - s0);
      for (int64_t c = 0; c < ns; ++c)
        for (int j = 0; j < GROUP; ++j) decode_b(p, b0 + j, s0 + c, bbuf + (c * GROUP + j) * 1024);
      for (int64_t mc = 0; mc < chunks; ++mc) {
        float* cm = cacc + mc * GROUP * 256;
        if (!keep) s0 == 0 ? zero_c() : load_c(cm);
        const uint16_t* xa = p.xb + mc * AMX_MR * p.Kp + s0 * 32;
        for (int64_t c = 0; c < ns; ++c) {
          const uint8_t* bb = bbuf + c * GROUP * 1024;
          _tile_loadd(4, xa + c * 32, xstride);
          _tile_loadd(5, bb, 64);
          _tile_dpbf16ps(0, 4, 5);
          _tile_loadd(6, bb + 1024, 64);
          _tile_dpbf16ps(1, 4, 6);
          _tile_loadd(7, bb + 2048, 64);
          _tile_dpbf16ps(2, 4, 7);
          _tile_loadd(5, bb + 3072, 64);
          _tile_dpbf16ps(3, 4, 5);
        }
        if (!keep) store_c(cm);
      }
    }
    if (keep) store_c(cacc);
    for (int64_t mc = 0; mc < chunks; ++mc)
      for (int j = 0; j < GROUP; ++j)
        for (int64_t r = 0; r < AMX_MR && mc * AMX_MR + r < p.M; ++r)
          store16(p, mc * AMX_MR + r, b0 + j, _mm512_load_ps(cacc + (mc * GROUP + j) * 256 + r * 16));
  }
  _tile_release();
}
#endif  // TS_HAVE_AMX

// A 64-byte aligned scratch buffer of n floats.
struct Scratch {
  std::vector<float> v;
  float* p;
  explicit Scratch(size_t n) : v(n + 16) { p = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t{63}); }
};

// y = (x @ q^T) * s (+ bias). x: [M, K] fp32 or bf16; packed: [NB, Kp / 2, 32] int8; scales: [NB * 16] fp32;
// bias: [N] or None. Returns [M, N] in x's dtype.
at::Tensor int8_mm(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales, const c10::optional<at::Tensor>& bias,
                   int64_t N) {
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [M, K]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.size(2) == 32,
              "packed must be [NB, Kp / 2, 32] int8");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), NB = packed.size(0), J = packed.size(1), Kp = 2 * J;
  TORCH_CHECK(Kp == (K + KALIGN - 1) / KALIGN * KALIGN, "packed does not match K = ", K);
  TORCH_CHECK(NB % GROUP == 0 && NB * BN >= N && NB * BN - N < GROUP * BN, "packed holds ", NB, " blocks of 16 columns, N = ", N);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == NB * BN, "scales must be [NB * 16] fp32");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 64 == 0, "packed must be 64-byte aligned");
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const Engine eng = engine();

  // x rounded to bf16, zero-padded to Kp columns (and, for AMX with M > 16, to whole 16-row chunks).
  const int64_t Mx = eng == AMX && M > AMX_MR ? (M + AMX_MR - 1) / AMX_MR * AMX_MR : M;
  std::vector<uint16_t> xb(static_cast<size_t>(Mx * Kp), 0);
  std::vector<float> xf;
  const bool is_bf16 = x.scalar_type() == at::kBFloat16;
  for (int64_t m = 0; m < M; ++m) {
    if (is_bf16)
      std::memcpy(xb.data() + m * Kp, x.data_ptr<at::BFloat16>() + m * K, K * 2);
    else
      for (int64_t k = 0; k < K; ++k) xb[m * Kp + k] = bf16_round(x.data_ptr<float>()[m * K + k]);
  }
  if (eng == PORTABLE || eng == AVX512F) {
    xf.resize(static_cast<size_t>(M * Kp));
    for (int64_t i = 0; i < M * Kp; ++i) xf[i] = bf16_float(xb[i]);
  }
  std::vector<float> bias32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bias must have N = ", N, " elements");
    const at::Tensor b = bias->to(at::kFloat).contiguous();
    bias32.assign(b.data_ptr<float>(), b.data_ptr<float>() + N);
  }
  const Problem p{M, N, NB, Kp, J, xb.data(), xf.empty() ? nullptr : xf.data(), packed.data_ptr<int8_t>(), scales.data_ptr<float>(),
                  bias32.empty() ? nullptr : bias32.data(), y.data_ptr(), is_bf16};
  // Column groups per task: enough that a thread's share is worth waking it (~64k weights).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (Kp * GROUP * BN));
  at::parallel_for(0, NB / GROUP, grain, [&](int64_t g0, int64_t g1) {
    switch (eng) {
#if defined(TS_HAVE_AMX)
      case AMX: {
        alignas(64) uint8_t bbuf[AMX_KC * GROUP * 1024];
        Scratch cacc(static_cast<size_t>((M + AMX_MR - 1) / AMX_MR * GROUP * 256));
        groups_amx(p, g0, g1, bbuf, cacc.p);
        return;
      }
#endif
#if defined(TS_AVX512)
      case AVX512BF16:
      case AVX512F: blocks_avx512(p, g0 * GROUP, g1 * GROUP); return;
#endif
      default:
        for (int64_t b = g0 * GROUP; b < g1 * GROUP; ++b) block_portable(p, b);
    }
  });
  return y;
}

}  // namespace

// Added to the op namespace that cpu_int4.cpp defines (one namespace per build variant, cpu_common.h). The wrappers
// expand TS_NAMESPACE before torch's macros paste it.
#define TS_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define TS_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

TS_LIBRARY_FRAGMENT(TS_NAMESPACE, m) { m.def("int8_mm(Tensor x, Tensor packed, Tensor scales, Tensor? bias, int N) -> Tensor"); }

TS_LIBRARY_IMPL(TS_NAMESPACE, CPU, m) { m.impl("int8_mm", &int8_mm); }
