// What the CPU kernels of this extension share (cpu_int4.cpp, cpu_int8.cpp): the engine choice, bf16 rounding and
// the AMX setup. Built with them by kernels/cpu_native.py (one library per variant, -O3 -march=... flags).
//
// One engine is chosen at compile time from what the flags enable, best first (each op's file says what it does with it):
//   AMX         (__AMX_BF16__ and __AMX_INT8__, Intel Sapphire Rapids and later): tiles;
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

// The op namespace comes from the build (kernels/cpu_native.py): variants built with other flags (the tests build the
// portable and AVX512F engines too) can then be loaded into one process side by side.
#ifndef TS_NAMESPACE
#define TS_NAMESPACE tinyserve_cpu
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
// The (x[m, k], x[m, k + 1]) pair of one row, broadcast to every lane, as the AVX-512 engines' dot-product step reads
// it: bf16 bits for VDPBF16PS, else two fp32 vectors. P is the kernel's problem: xb / xf rows of Kp values.
#if defined(__AVX512BF16__)
using XPair = __m512i;
template <class P>
inline XPair x_pair(const P& p, int64_t m, int64_t k) {
  int32_t v;
  std::memcpy(&v, p.xb + m * p.Kp + k, 4);
  return _mm512_set1_epi32(v);
}
#else
struct XPair {
  __m512 x0, x1;
};
template <class P>
inline XPair x_pair(const P& p, int64_t m, int64_t k) {
  const float* x = p.xf + m * p.Kp + k;
  return {_mm512_set1_ps(x[0]), _mm512_set1_ps(x[1])};
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

}  // namespace
