// CPU int8 weight-only linear (the lm_head): y[M, N] = (x[M, K] @ q[N, K]^T) * s[N] (+ bias), one symmetric scale per
// output row (tinyserve/backends/cpu_native.py, NativeInt8Linear).
//
// Why: torch's _weight_int8pack_mm reads the whole [N, K] weight again for every row of x, so a 16-row decode step
// pays for the lm_head 16 times, and at one row it reaches about a third of the memory bandwidth. This kernel reads
// each 64-byte piece of codes once for all rows and multiplies it as it is stored (no decode): VPDPBUSD for one row,
// AMX TDPBSUD tiles loaded straight from the packed weight for more. Built with cpu_int4.cpp into one library by
// tinyserve_kernels/cpu_native.py; the engines (AMX, AVX512-BF16 (which has VNNI), AVX512F, portable) as cpu_common.h says.
//
// Packed layout (written by tinyserve_kernels/cpu_native.py:repack_int8), uint8 [NB, Kp / 4, 64]: NB blocks of 16 output
// columns, N padded to a multiple of 64 (NB % 4 == 0: 4 blocks are the unit of parallel work), Kp = K rounded up to
// a multiple of XG = 64. Byte 4c + e of quad j of block b is q[16b + c, 4j + e] + 128: 16 columns x 4 consecutive k
// of unsigned bytes, the operand layout of VPDPBUSD, and 16 quads (one x group) are one AMX int8 B tile. Padded rows
// and columns hold code 128 (q = 0). scales: fp32 [NB * 16], zero in padded columns.
//
// Arithmetic per output (m, n), the same bits whatever M, the row's place in the batch, the thread count or the engine:
//   x becomes block floating point per group of XG = 64 k (cpu_common.h, prepare_x; 14 bits, |x - xi * xscale| <= 2^-14
//   of the group's largest |x|), each xi split into signed bytes hi and lo (xi = 256 hi + lo). Per group, in int32:
//     t = 256 * sum(hi * c) + sum(lo * c) - 128 * xsum  = sum of xi * q    (c = q + 128; exact: |t| < 2^28)
//   acc = fma(float(t), xscale, acc) over the groups in order (float(t) rounds only when |t| > 2^24);
//   y = acc * s[n], or fma(acc, s[n], bias[n]) with a bias; rounded once to x's dtype.

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

constexpr int64_t BN = 16;      // columns per block
constexpr int64_t GROUP = 4;    // blocks per column group: N is padded to GROUP * BN, the unit of parallel work
constexpr int64_t XG = 64;      // k per x group (and the K padding): one AMX int8 step, 16 quads
constexpr int XBITS = 14;       // |t| <= 64 * 127 * 2^14 + ... < 2^28: far from int32 overflow
constexpr int64_t MR_MAX = 8;   // rows computed side by side (register blocking) by the AVX-512 engines
constexpr int64_t AMX_MR = 8;   // x rows per AMX pass (2 byte rows each: 16 tile rows)
constexpr int64_t AMX_MIN_M = 2;  // one row runs the AVX-512 code of the same build (the same bits)

struct Problem {
  int64_t M, N, NB, Kp, NQ, NXG;  // NQ = Kp / 4 quads per block, NXG = Kp / XG x groups
  const int8_t* xq;     // [M, 2, Kp] hi bytes then lo bytes of xi per row
  const float* xscale;  // [M, NXG]
  const int32_t* xsum;  // [M, NXG]
  const uint8_t* w;     // [NB, NQ, 64]
  const float* s;       // [NB * 16]
  const float* bias;    // [N] or null
  void* y;              // [M, N] fp32 or bf16
  bool y_bf16;

  const uint8_t* quad(int64_t b, int64_t j) const { return w + (b * NQ + j) * 64; }
  const int8_t* hi(int64_t m) const { return xq + m * 2 * Kp; }
  const int8_t* lo(int64_t m) const { return xq + (m * 2 + 1) * Kp; }
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
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t c = 0; c < nc; ++c) {
      float acc = 0.f;
      for (int64_t g = 0; g < p.NXG; ++g) {
        int32_t dh = 0, dl = 0;
        for (int64_t j = g * XG / 4; j < (g + 1) * XG / 4; ++j)
          for (int e = 0; e < 4; ++e) {
            const int32_t code = p.quad(b, j)[4 * c + e];
            dh += code * p.hi(m)[4 * j + e];
            dl += code * p.lo(m)[4 * j + e];
          }
        const int32_t t = dh * 256 + dl - 128 * p.xsum[m * p.NXG + g];
        acc = std::fma(static_cast<float>(t), p.xscale[m * p.NXG + g], acc);
      }
      store_one(p, m, n0 + c, acc);
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

// acc + float(256 * dh + dl - 128 * xsum) * xscale: one x group of one row folded into its fp32 accumulator.
inline __m512 fold(__m512 acc, __m512i dh, __m512i dl, int32_t xsum, float xscale) {
  const __m512i t = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(dh, 8), dl), _mm512_set1_epi32(128 * xsum));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(xscale), acc);
}

// MR rows x NR blocks, the whole K; fp32 accumulators in registers, int32 sums per x group.
template <int MR, int NR>
void tile_avx512(const Problem& p, int64_t m0, int64_t b0) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.NXG; ++g) {
    __m512i dh[MR][NR], dl[MR][NR];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NR; ++j) dh[r][j] = dl[r][j] = _mm512_setzero_si512();
    for (int64_t q = g * XG / 4; q < (g + 1) * XG / 4; ++q)
      for (int j = 0; j < NR; ++j) {
        const __m512i w = _mm512_load_si512(p.quad(b0 + j, q));
        for (int r = 0; r < MR; ++r) {
          dh[r][j] = dot4_u8(dh[r][j], w, p.hi(m0 + r) + 4 * q);
          dl[r][j] = dot4_u8(dl[r][j], w, p.lo(m0 + r) + 4 * q);
        }
      }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NR; ++j)
        acc[r][j] = fold(acc[r][j], dh[r][j], dl[r][j], p.xsum[(m0 + r) * p.NXG + g], p.xscale[(m0 + r) * p.NXG + g]);
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) store16(p, m0 + r, b0 + j, acc[r][j]);
}

using TileFn = void (*)(const Problem&, int64_t, int64_t);

// Blocks side by side for a chunk of mr rows: enough independent sums to hide the dot-product latency at M = 1, at
// most 24 accumulator registers (acc + two int32 sums per row and block).
constexpr int nr_for(int64_t mr) { return mr <= 1 ? 4 : mr <= 3 ? 2 : 1; }

// Every (mr, nr) blocks_avx512 asks for: nr_for(min(M, MR_MAX)) or less, halving (for_blocks).
TileFn pick_tile(int64_t mr, int nr) {
#define TS_TILE(MR, NR) \
  if (mr == MR && nr == NR) return tile_avx512<MR, NR>;
  TS_TILE(1, 4) TS_TILE(1, 2) TS_TILE(1, 1)
  TS_TILE(2, 2) TS_TILE(3, 2) TS_TILE(2, 1) TS_TILE(3, 1)
  TS_TILE(4, 1) TS_TILE(5, 1) TS_TILE(6, 1) TS_TILE(7, 1) TS_TILE(8, 1)
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
// Tiles: C0..C3 = tmm0..3 (2 * mr rows x 16 int32, one block each: row 2r the hi sums, 2r + 1 the lo sums of x row
// m0 + r), A = tmm4 (those 2 * mr byte rows over one x group: hi and lo rows are adjacent in xq, one strided load),
// B = tmm5..7 (one x group of a block: 16 quads of 64 bytes, loaded straight from the packed weight). Each x group's
// C is stored and folded into fp32 accumulators as above.

void configure_tiles(int64_t mr) {
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = static_cast<uint8_t>(2 * mr), cfg.colsb[t] = 64;  // C: 2mr x 16 int32
  cfg.rows[4] = static_cast<uint8_t>(2 * mr), cfg.colsb[4] = XG;                              // A: 2mr x 64 bytes
  for (int t = 5; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;                           // B: 16 quads
  _tile_loadconfig(&cfg);
}

// Rows m0..m0+mr-1 (mr <= 8, tiles configured for mr) x the 4 blocks of column group cg.
void group_amx(const Problem& p, int64_t m0, int64_t mr, int64_t cg) {
  alignas(64) int32_t cbuf[GROUP][2 * AMX_MR * BN];
  alignas(64) float acc[GROUP][AMX_MR * BN];
  std::fill(&acc[0][0], &acc[0][0] + GROUP * AMX_MR * BN, 0.f);
  const int64_t b0 = cg * GROUP, bstride = p.NQ * 64;
  const uint8_t* w0 = p.quad(b0, 0);
  for (int64_t g = 0; g < p.NXG; ++g) {
    const uint8_t* wg = w0 + g * XG * 16;  // quad 16g of block b0; block b0 + j is j * bstride further
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, p.hi(m0) + g * XG, p.Kp);
    _tile_loadd(5, wg, 64);
    _tile_dpbsud(0, 4, 5);
    _tile_loadd(6, wg + bstride, 64);
    _tile_dpbsud(1, 4, 6);
    _tile_loadd(7, wg + 2 * bstride, 64);
    _tile_dpbsud(2, 4, 7);
    _tile_loadd(5, wg + 3 * bstride, 64);
    _tile_dpbsud(3, 4, 5);
    _tile_stored(0, cbuf[0], 64);
    _tile_stored(1, cbuf[1], 64);
    _tile_stored(2, cbuf[2], 64);
    _tile_stored(3, cbuf[3], 64);
    for (int j = 0; j < GROUP; ++j)
      for (int64_t r = 0; r < mr; ++r) {
        const __m512i dh = _mm512_load_si512(cbuf[j] + 2 * r * BN), dl = _mm512_load_si512(cbuf[j] + (2 * r + 1) * BN);
        _mm512_store_ps(acc[j] + r * BN, fold(_mm512_load_ps(acc[j] + r * BN), dh, dl, p.xsum[(m0 + r) * p.NXG + g], p.xscale[(m0 + r) * p.NXG + g]));
      }
  }
  for (int j = 0; j < GROUP; ++j)
    for (int64_t r = 0; r < mr; ++r) store16(p, m0 + r, b0 + j, _mm512_load_ps(acc[j] + r * BN));
}

// Column groups [g_begin, g_end): each for every chunk of 8 rows, so its codes stay in cache from chunk to chunk.
void groups_amx(const Problem& p, int64_t g_begin, int64_t g_end) {
  int64_t configured = -1;
  for (int64_t cg = g_begin; cg < g_end; ++cg)
    for (int64_t m0 = 0; m0 < p.M; m0 += AMX_MR) {
      const int64_t mr = std::min<int64_t>(AMX_MR, p.M - m0);
      if (mr != configured) configure_tiles(mr), configured = mr;
      group_amx(p, m0, mr, cg);
    }
  _tile_release();
}
#endif  // TS_HAVE_AMX

}  // namespace

// y = (x @ q^T) * s (+ bias). x: [M, K] fp32 or bf16; packed: [NB, Kp / 4, 64] uint8; scales: [NB * 16] fp32;
// bias: [N] or None. Returns [M, N] in x's dtype.
at::Tensor TS_NAMESPACE::int8_mm(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales,
                                 const c10::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [M, K]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.size(2) == 64,
              "packed must be [NB, Kp / 4, 64] uint8");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), NB = packed.size(0), NQ = packed.size(1), Kp = 4 * NQ;
  TORCH_CHECK(Kp == (K + XG - 1) / XG * XG, "packed does not match K = ", K);
  TORCH_CHECK(NB % GROUP == 0 && NB * BN >= N && NB * BN - N < GROUP * BN, "packed holds ", NB, " blocks of 16 columns, N = ", N);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == NB * BN, "scales must be [NB * 16] fp32");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 64 == 0, "packed must be 64-byte aligned");
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const Engine eng = engine();
  const int64_t NXG = Kp / XG;
  std::vector<int8_t> xq(static_cast<size_t>(M * 2 * Kp));  // zeroed: K's padding
  std::vector<float> xscale(static_cast<size_t>(M * NXG));
  std::vector<int32_t> xsum(static_cast<size_t>(M * NXG));
  const bool is_bf16 = x.scalar_type() == at::kBFloat16;
  prepare_x(is_bf16 ? nullptr : x.data_ptr<float>(), is_bf16 ? reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) : nullptr,
            M, K, XG, XG, NXG, XBITS, xq.data(), xscale.data(), xsum.data());
  std::vector<float> bias32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bias must have N = ", N, " elements");
    const at::Tensor b = bias->to(at::kFloat).contiguous();
    bias32.assign(b.data_ptr<float>(), b.data_ptr<float>() + N);
  }
  const Problem p{M, N, NB, Kp, NQ, NXG, xq.data(), xscale.data(), xsum.data(), packed.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                  bias32.empty() ? nullptr : bias32.data(), y.data_ptr(), is_bf16};
  // Column groups per task: enough that a thread's share is worth waking it (~64k weights).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (Kp * GROUP * BN));
  at::parallel_for(0, NB / GROUP, grain, [&](int64_t g0, int64_t g1) {
    switch (eng) {
#if defined(TS_HAVE_AMX)
      case AMX:
        if (M >= AMX_MIN_M) return groups_amx(p, g0, g1);
        return blocks_avx512(p, g0 * GROUP, g1 * GROUP);
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

// Added to the op namespace that cpu_int4.cpp defines (one namespace per build variant, ops.h). The wrappers
// expand TS_NAMESPACE before torch's macros paste it.
#define TS_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define TS_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

TS_LIBRARY_FRAGMENT(TS_NAMESPACE, m) { m.def("int8_mm(Tensor x, Tensor packed, Tensor scales, Tensor? bias, int N) -> Tensor"); }

TS_LIBRARY_IMPL(TS_NAMESPACE, CPU, m) { m.impl("int8_mm", &TS_NAMESPACE::int8_mm); }
