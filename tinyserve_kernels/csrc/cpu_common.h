// What the CPU kernels of this extension share (cpu_int4.cpp, cpu_int8.cpp): the engine choice, bf16 rounding and
// the AMX setup. Built with them by tinyserve_kernels/cpu_native.py (one library per variant, -O3 -march=... flags).
//
// One engine is chosen at compile time from what the flags enable, best first (each op's file says what it does with it):
//   AMX         (__AMX_BF16__ and __AMX_INT8__, Intel Sapphire Rapids and later): int8 tiles;
//   AVX512-BF16 (__AVX512BF16__, e.g. AMD Zen 4, Intel Cooper Lake and later; these CPUs also have AVX512-VNNI);
//   AVX512F     (__AVX512F__ with BW and VL);
//   portable    plain C++ loops (the compiler vectorizes what it can).
// AMX also needs the kernel's permission (arch_prctl); without it that build runs the AVX512-BF16 engine instead.
// The choice is made once per process, so every call of a process computes the same way, in every op.
//
// Everything here has internal linkage (an unnamed namespace): the tests load several variants of the library into
// one process, and a shared symbol would let one variant call another's engine().
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "ops.h"  // TS_NAMESPACE, the op namespace of this build variant

// The AVX-512 engines need F, BW and VL (every AVX-512 CPU since Skylake-SP has all three).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define TS_AVX512 1
#include <immintrin.h>
#endif
#if defined(TS_AVX512) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define TS_HAVE_AMX 1
#endif


namespace {

enum Engine : int64_t { PORTABLE = 0, AVX512F = 1, AVX512BF16 = 2, AMX = 3 };

inline uint16_t bf16_round(float f) {  // round to nearest even, as torch's float -> bfloat16 conversion
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float bf16_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if defined(TS_AVX512)
// bf16_round on 16 lanes: add 0x7fff + the lowest kept bit, keep the top 16 bits (in the low half of each 32-bit
// lane); NaN becomes the quiet NaN 0x7fc0.
inline __m512i bf16_round16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
  const __m512i h = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), one))), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_mov_epi32(h, nan, _mm512_set1_epi32(0x7fc0));
}
#endif

#if defined(TS_AVX512)
// exp(x) on 16 lanes: x = n ln2 + f, |f| <= ln2 / 2, exp(f) by a degree-6 Taylor polynomial (truncation error below
// 1.7e-7 relative on that range, ~1.5 ulp), times 2^n by VSCALEFPS. x is clamped to [-104, 88] first (exp(-104) is 0
// in fp32, exp(88) still finite), which keeps n finite; NaN stays NaN.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 in two parts: exact n * hi
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), f);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif

#if defined(TS_AVX512)
// acc + the 16 lane sums of 4 products code byte * x byte, exact in int32 (codes: 64 unsigned bytes, lane l holding 4
// consecutive rows of one column; x: 4 signed bytes broadcast to every lane). dot4 takes codes up to 15 (INT4),
// dot4_u8 any byte (the int8 kernel's q + 128).
inline __m512i x4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm512_set1_epi32(v);
}
#if defined(__AVX512VNNI__)
inline __m512i dot4(__m512i acc, __m512i codes, const int8_t* x) { return _mm512_dpbusd_epi32(acc, codes, x4(x)); }
inline __m512i dot4_u8(__m512i acc, __m512i codes, const int8_t* x) { return _mm512_dpbusd_epi32(acc, codes, x4(x)); }
#else
// VPMADDUBSW adds two products into a saturating int16: exact for codes up to 15 (2 * 15 * 128 < 2^15); VPMADDWD
// with ones adds the pairs. Wider codes go through their two nibbles.
inline __m512i dot4(__m512i acc, __m512i codes, const int8_t* x) {
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(codes, x4(x)), _mm512_set1_epi16(1)));
}
inline __m512i dot4_u8(__m512i acc, __m512i codes, const int8_t* x) {
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const __m512i lo = dot4(_mm512_setzero_si512(), _mm512_and_si512(codes, nib), x);
  const __m512i hi = dot4(_mm512_setzero_si512(), _mm512_and_si512(_mm512_srli_epi16(codes, 4), nib), x);
  return _mm512_add_epi32(acc, _mm512_add_epi32(lo, _mm512_slli_epi32(hi, 4)));
}
#endif
#endif

#if defined(TS_HAVE_AMX)
struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {0};
  uint16_t colsb[16] = {0};
  uint8_t rows[16] = {0};
};

inline bool amx_permitted() {
  static const bool ok = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}
#endif

inline Engine engine() {
#if defined(TS_HAVE_AMX)
  if (amx_permitted()) return AMX;
  return AVX512BF16;
#elif defined(TS_AVX512) && defined(__AVX512BF16__)
  return AVX512BF16;
#elif defined(TS_AVX512)
  return AVX512F;
#else
  return PORTABLE;
#endif
}

// Column blocks [b_begin, b_end) for all M rows: groups of nr blocks, then of nr / 2, ... 1 for what is left (a
// one-block tile has too few independent sums to hide their latency), each for every chunk of mr_max rows, so a
// group's weights stay in cache from one row chunk to the next. tile(m0, mr, step, b) computes rows [m0, m0 + mr) of
// blocks [b, b + step).
template <class Tile>
void for_blocks(int64_t M, int64_t mr_max, int nr, int64_t b_begin, int64_t b_end, const Tile& tile) {
  const auto run = [&](int step, int64_t b) {
    for (int64_t m0 = 0; m0 < M; m0 += mr_max) tile(m0, std::min<int64_t>(mr_max, M - m0), step, b);
  };
  int64_t b = b_begin;
  for (int step = nr; step >= 1; step /= 2)
    for (; b + step <= b_end; b += step) run(step, b);
}

// x as block floating point, for the integer kernels (cpu_int4.cpp says the arithmetic): per row and group, with
// 2^e <= max |x| < 2^(e + 1), xi = round_half_even(x * 2^(bits - 1 - e)) split into a signed high and low byte
// (xi = 256 * hi + lo), xscale = 2^(e + 1 - bits), xsum = sum of xi. A group holding an inf or NaN gets xscale NaN;
// one whose largest |x| is below 2^ZERO_EXP counts as zero.
constexpr int ZERO_EXP = -100;

// From a group's largest |x| and whether all its values are finite: xscale and the factor 2^(bits - 1 - e) that
// scales x to xi; false when every xi is zero (the group contributes nothing, or NaN through xscale).
inline bool group_scale(float amax, bool finite, int bits, float& xscale, float& factor) {
  if (!finite) {
    xscale = std::numeric_limits<float>::quiet_NaN();
    return false;
  }
  if (!(amax >= std::ldexp(1.f, ZERO_EXP))) {
    xscale = 1.f;
    return false;
  }
  const int e = std::ilogb(amax);
  xscale = std::ldexp(1.f, e + 1 - bits);
  factor = std::ldexp(1.f, bits - 1 - e);
  return true;
}

// Quantize one group (n values, n <= G) of one row: hi and lo bytes of xi, returns xsum; xscale set. Multiplying by
// factor = 2^(B - 1 - e) (a normal float for amax >= 2^ZERO_EXP) is exact, and the conversion rounds half to even
// (the default rounding mode, in the vector and the scalar code alike).
#if defined(TS_AVX512)
inline __m512 load16(const float* x32, const uint16_t* x16, int64_t n) {
  const __mmask16 mask = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
  if (x32) return _mm512_maskz_loadu_ps(mask, x32);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, x16)), 16));
}

inline int32_t quantize_group(const float* x32, const uint16_t* x16, int64_t n, int bits, int8_t* hi, int8_t* lo, float& xscale) {
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512 fmax = _mm512_set1_ps(std::numeric_limits<float>::max());
  __m512 amax = _mm512_setzero_ps();
  __mmask16 bad = 0;  // lanes that saw an inf or NaN (max_ps drops a NaN operand when the other is a number)
  for (int64_t k = 0; k < n; k += 16) {
    const __m512 a = _mm512_and_ps(load16(x32 ? x32 + k : nullptr, x16 ? x16 + k : nullptr, n - k), abs_mask);
    amax = _mm512_max_ps(amax, a);
    bad |= _mm512_cmp_ps_mask(a, fmax, _CMP_NLE_UQ);
  }
  const bool finite = bad == 0;
  float f;
  if (!group_scale(_mm512_reduce_max_ps(amax), finite, bits, xscale, f)) return 0;
  const __m512 factor = _mm512_set1_ps(f);
  __m512i sum = _mm512_setzero_si512();
  for (int64_t k = 0; k < n; k += 16) {
    const int64_t c = std::min<int64_t>(16, n - k);
    const __mmask16 mask = c == 16 ? 0xFFFF : static_cast<__mmask16>((1u << c) - 1);
    const __m512i xi = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x32 ? x32 + k : nullptr, x16 ? x16 + k : nullptr, c), factor));
    const __m512i h = _mm512_srai_epi32(_mm512_add_epi32(xi, _mm512_set1_epi32(128)), 8);
    _mm512_mask_cvtepi32_storeu_epi8(hi + k, mask, h);
    _mm512_mask_cvtepi32_storeu_epi8(lo + k, mask, _mm512_sub_epi32(xi, _mm512_slli_epi32(h, 8)));
    sum = _mm512_add_epi32(sum, xi);  // lanes past n loaded 0
  }
  return _mm512_reduce_add_epi32(sum);
}
#else
inline int32_t quantize_group(const float* x32, const uint16_t* x16, int64_t n, int bits, int8_t* hi, int8_t* lo, float& xscale) {
  float a = 0.f;
  bool finite = true;
  for (int64_t k = 0; k < n; ++k) {
    const float v = x32 ? x32[k] : bf16_float(x16[k]);
    finite = finite && std::isfinite(v);
    a = std::max(a, std::fabs(v));
  }
  float factor;
  if (!group_scale(a, finite, bits, xscale, factor)) return 0;
  int32_t sum = 0;
  for (int64_t k = 0; k < n; ++k) {
    const int32_t xi = static_cast<int32_t>(std::nearbyint((x32 ? x32[k] : bf16_float(x16[k])) * factor));
    const int32_t h = (xi + 128) >> 8;
    hi[k] = static_cast<int8_t>(h);
    lo[k] = static_cast<int8_t>(xi - 256 * h);
    sum += xi;
  }
  return sum;
}
#endif

// x [M, K] (fp32 x32 or bf16 bits x16) -> xq [M, 2, Kp] (hi and lo bytes of xi, groups of G zero-padded to Gp; the
// last group may hold fewer than G values), xscale and xsum [M, NG]. Kp = NG * Gp. xq must come zeroed (the padding).
inline void prepare_x(const float* x32, const uint16_t* x16, int64_t M, int64_t K, int64_t G, int64_t Gp, int64_t NG, int bits,
                      int8_t* xq, float* xscale, int32_t* xsum) {
  const int64_t Kp = NG * Gp;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < NG; ++g) {
      const int64_t src = m * K + g * G, dst = m * 2 * Kp + g * Gp, n = std::min(G, K - g * G);
      xsum[m * NG + g] = quantize_group(x32 ? x32 + src : nullptr, x16 ? x16 + src : nullptr, n, bits, xq + dst, xq + dst + Kp,
                                        xscale[m * NG + g]);
    }
}
}  // namespace
