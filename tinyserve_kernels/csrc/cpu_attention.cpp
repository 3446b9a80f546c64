// CPU attention for decode: each of M rows (one new token of one sequence) attends over its own first len[m] cached
// positions. Built with cpu_int4.cpp into one library (tinyserve_kernels/cpu_native.py).
//
// Why: torch's CPU SDPA (flash attention) takes ~390 us per layer for 16 rows x 128 positions of SmolLM2 in a decode
// step (a third of the step; BENCHMARKS.md, "Decode attention"), for ~5 MFLOP: its blocking is made for long query
// blocks, and it reads the cold cache and computes one after the other. Here a decode query block is R rows (the query
// heads sharing one key/value head), so one task is one (row, kv head): it streams that head's keys and values once,
// prefetching ahead, with the R queries in registers.
//
// Arithmetic, per (row m, kv head h), all fp32, the same order whatever M, L or the thread count (so a row's result
// depends on nothing else in the batch; the padded length L is never read past len[m]):
//   s[r][l] = (q[r] . k[l]) * scale              D / 16 16-lane FMAs in order, then the 16 lanes summed (a fixed tree)
//   p[r][l] = exp(s[r][l] - max_l s[r][l])       exp: range reduction to [-ln2/2, ln2/2], a degree-6 polynomial and
//                                                 VSCALEFPS (max error ~2 ulp); p = 0 where it underflows
//   out[r]  = (sum_l p[r][l] * v[l]) / sum_l p[r][l]   sums in order of l
// The AVX-512 engines (AMX, AVX512-BF16, AVX512F builds) run this code; the portable build runs the same steps in
// scalar code (its sums are in another order, so its last bits differ).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace {

constexpr int64_t D_MAX = 256;  // head dims up to this, in steps of 16 (attention_fits, ops.h)
// Key / value rows fetched ahead of their use: the first keys before the score loop, the first values during its last
// rows. 16 with both head starts was 9-11% faster than 8 without them on cold caches (1 thread, 16 x 3 heads, D 64,
// L 128 and 512); 16 alone 2-6%, 32 no better than 16, 4 2-11% slower.
constexpr int64_t PREFETCH_ROWS = 16;

template <typename T>
inline float to_float(T v) {
  if constexpr (std::is_same_v<T, uint16_t>)
    return bf16_float(v);
  else
    return v;
}

#if defined(TS_AVX512)
// 16 values of a row (bf16 bits or fp32) as fp32.
inline __m512 load16f(const uint16_t* p) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16)); }
inline __m512 load16f(const float* p) { return _mm512_loadu_ps(p); }

// One row of D values into L1.
template <typename T>
inline void prefetch_row(const T* row, int64_t D) {
  for (int64_t b = 0; b < D * int64_t(sizeof(T)); b += 64) _mm_prefetch(reinterpret_cast<const char*>(row) + b, _MM_HINT_T0);
}

// One (row, kv head): q [R, D] fp32 (scaled), k / v rows at k + l * ks, out [R, D] fp32. CT: D / 16 when known at
// compile time (the accumulators then stay in registers), 0 for any D.
template <typename T, int R, int CT>
void head_avx512(const float* q, const T* k, const T* v, int64_t ks, int64_t vs, int64_t n, int64_t D, float* s, float* out) {
  const int64_t C = CT ? CT : D / 16;
  // Scores.
  for (int64_t l = 0; l < std::min(PREFETCH_ROWS, n); ++l) prefetch_row(k + l * ks, D);
  for (int64_t l = 0; l < n; ++l) {
    if (l + PREFETCH_ROWS < n)
      prefetch_row(k + (l + PREFETCH_ROWS) * ks, D);
    else if (l + PREFETCH_ROWS - n < n)  // the keys are all on their way: start on the values
      prefetch_row(v + (l + PREFETCH_ROWS - n) * vs, D);
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      const __m512 kc = load16f(k + l * ks + 16 * c);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(q + r * D + 16 * c), kc, acc[r]);
    }
    for (int r = 0; r < R; ++r) s[r * n + l] = _mm512_reduce_add_ps(acc[r]);
  }
  float m[R], inv[R];
  for (int r = 0; r < R; ++r) {
    __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t l = 0;
    for (; l + 16 <= n; l += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + r * n + l));
    m[r] = _mm512_reduce_max_ps(mv);
    for (; l < n; ++l) m[r] = std::max(m[r], s[r * n + l]);
  }
  // Probabilities (unnormalized) and their sums, 16 positions at a time; the tail masked.
  for (int r = 0; r < R; ++r) {
    __m512 sum = _mm512_setzero_ps();
    const __m512 mr = _mm512_set1_ps(m[r]);
    for (int64_t l = 0; l < n; l += 16) {
      const __mmask16 mask = n - l >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - l)) - 1);
      const __m512 p = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + r * n + l), mr));
      _mm512_mask_storeu_ps(s + r * n + l, mask, p);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, p));
    }
    inv[r] = 1.f / _mm512_reduce_add_ps(sum);
  }
  // out[r] = sum_l p[r][l] v[l], D / 16 accumulators per query.
  __m512 acc[R][D_MAX / 16];
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t l = 0; l < n; ++l) {
    if (l + PREFETCH_ROWS < n) prefetch_row(v + (l + PREFETCH_ROWS) * vs, D);
    __m512 p[R];
    for (int r = 0; r < R; ++r) p[r] = _mm512_set1_ps(s[r * n + l]);
    for (int64_t c = 0; c < C; ++c) {
      const __m512 vc = load16f(v + l * vs + 16 * c);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm512_fmadd_ps(p[r], vc, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) _mm512_storeu_ps(out + r * D + 16 * c, _mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv[r])));
}
#endif

// The same steps in scalar code (the portable build).
template <typename T>
void head_portable(const float* q, const T* k, const T* v, int64_t ks, int64_t vs, int64_t n, int64_t R, int64_t D, float* s, float* out) {
  for (int64_t r = 0; r < R; ++r) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t l = 0; l < n; ++l) {
      float acc = 0.f;
      for (int64_t d = 0; d < D; ++d) acc = std::fma(q[r * D + d], to_float(k[l * ks + d]), acc);
      s[r * n + l] = acc;
      m = std::max(m, acc);
    }
    float sum = 0.f;
    for (int64_t l = 0; l < n; ++l) sum += (s[r * n + l] = std::exp(s[r * n + l] - m));
    for (int64_t d = 0; d < D; ++d) out[r * D + d] = 0.f;
    for (int64_t l = 0; l < n; ++l)
      for (int64_t d = 0; d < D; ++d) out[r * D + d] = std::fma(s[r * n + l], to_float(v[l * vs + d]), out[r * D + d]);
    for (int64_t d = 0; d < D; ++d) out[r * D + d] /= sum;
  }
}

#if defined(TS_AVX512)
template <typename T, int CT>
void run_head_c(const float* q, const T* k, const T* v, int64_t ks, int64_t vs, int64_t n, int64_t R, int64_t D, float* s, float* out) {
  switch (R) {
    case 1: return head_avx512<T, 1, CT>(q, k, v, ks, vs, n, D, s, out);
    case 2: return head_avx512<T, 2, CT>(q, k, v, ks, vs, n, D, s, out);
    case 3: return head_avx512<T, 3, CT>(q, k, v, ks, vs, n, D, s, out);
    case 4: return head_avx512<T, 4, CT>(q, k, v, ks, vs, n, D, s, out);
    case 5: return head_avx512<T, 5, CT>(q, k, v, ks, vs, n, D, s, out);
    case 6: return head_avx512<T, 6, CT>(q, k, v, ks, vs, n, D, s, out);
    case 7: return head_avx512<T, 7, CT>(q, k, v, ks, vs, n, D, s, out);
    default: return head_avx512<T, 8, CT>(q, k, v, ks, vs, n, D, s, out);
  }
}
#endif

template <typename T>
void run_head(const float* q, const T* k, const T* v, int64_t ks, int64_t vs, int64_t n, int64_t R, int64_t D, float* s, float* out) {
#if defined(TS_AVX512)
  switch (D) {  // the head dims of the families here: 64 (SmolLM2, Qwen2-0.5B) and 128 (Llama, most Qwen2)
    case 64: return run_head_c<T, 4>(q, k, v, ks, vs, n, R, D, s, out);
    case 128: return run_head_c<T, 8>(q, k, v, ks, vs, n, R, D, s, out);
    default: return run_head_c<T, 0>(q, k, v, ks, vs, n, R, D, s, out);
  }
#else
  head_portable(q, k, v, ks, vs, n, R, D, s, out);
#endif
}

}  // namespace

void TS_NAMESPACE::decode_attention_into(const AttentionArgs& a) {
  const int64_t H = a.H, R = a.R, D = a.D, RD = R * D;
  at::parallel_for(0, a.M * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> s(static_cast<size_t>(R * a.L)), qt(static_cast<size_t>(RD)), ot(static_cast<size_t>(RD));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m = t / H, h = t % H, n = a.lens[m], slot = a.rows ? a.rows[m] : m;
      const int64_t ko = slot * a.ks[0] + h * a.ks[1], vo = slot * a.vs[0] + h * a.vs[1];
      if (a.bf16) {
        const auto* q = static_cast<const uint16_t*>(a.q) + t * RD;
        for (int64_t i = 0; i < RD; ++i) qt[i] = bf16_float(q[i]) * a.scale;
        run_head(qt.data(), static_cast<const uint16_t*>(a.k) + ko, static_cast<const uint16_t*>(a.v) + vo, a.ks[2], a.vs[2], n, R, D,
                 s.data(), ot.data());
        auto* o = static_cast<uint16_t*>(a.out) + t * RD;
        for (int64_t i = 0; i < RD; ++i) o[i] = bf16_round(ot[i]);
      } else {
        const auto* q = static_cast<const float*>(a.q) + t * RD;
        for (int64_t i = 0; i < RD; ++i) qt[i] = q[i] * a.scale;
        run_head(qt.data(), static_cast<const float*>(a.k) + ko, static_cast<const float*>(a.v) + vo, a.ks[2], a.vs[2], n, R, D,
                 s.data(), static_cast<float*>(a.out) + t * RD);
      }
    }
  });
}

// q [M, Hkv, R, D] (contiguous), k and v [M, Hkv, L, D] (any strides but unit stride along D), lengths [M] int64
// (row m attends to positions 0..lengths[m]-1, 1 <= lengths[m] <= L). fp32 or bf16, all alike. Returns q's shape and
// dtype. scale multiplies q . k (1 / sqrt(D) for the models here).
at::Tensor TS_NAMESPACE::decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
                                          double scale) {
  TORCH_CHECK(q_in.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D [M, Hkv, R or L, D]");
  TORCH_CHECK(q_in.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "q, k, v must share a dtype");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat || q_in.scalar_type() == at::kBFloat16, "q, k, v must be float32 or bfloat16");
  const int64_t M = q_in.size(0), H = q_in.size(1), R = q_in.size(2), D = q_in.size(3), L = k.size(2);
  TORCH_CHECK(k.size(0) == M && k.size(1) == H && k.size(3) == D && v.sizes() == k.sizes(), "k and v must be [M, Hkv, L, D] matching q");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k and v must have unit stride along D");
  TORCH_CHECK(attention_fits(R, D), "decode_attention takes 1..8 query heads per kv head and D a multiple of 16 up to 256");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1 && lengths.size(0) == M, "lengths must be [M] int64");
  const at::Tensor len = lengths.contiguous();
  const int64_t* lens = len.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) TORCH_CHECK(lens[m] >= 1 && lens[m] <= L, "lengths must be in 1..L = ", L, ", got ", lens[m]);
  const at::Tensor q = q_in.contiguous();
  at::Tensor out = at::empty({M, H, R, D}, q.options());
  decode_attention_into({q.data_ptr(), out.data_ptr(), k.data_ptr(), v.data_ptr(), {k.stride(0), k.stride(1), k.stride(2)},
                         {v.stride(0), v.stride(1), v.stride(2)}, nullptr, lens, M, H, R, D, L, static_cast<float>(scale),
                         q.scalar_type() == at::kBFloat16});
  return out;
}

#define TS_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define TS_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

TS_LIBRARY_FRAGMENT(TS_NAMESPACE, m) { m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor lengths, float scale) -> Tensor"); }

TS_LIBRARY_IMPL(TS_NAMESPACE, CPU, m) { m.impl("decode_attention", &TS_NAMESPACE::decode_attention); }
