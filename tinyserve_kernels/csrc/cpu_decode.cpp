// The Llama-style decoder stack on CPU in one C++ call per step (the Decoder class of ops.h): decode (M sequences, one
// token each) and prefill (T tokens of one sequence). The cpu-native backend (tinyserve/backends/cpu_native.py) holds it.
//
// Why: with the linears and attention in our kernels, what is left of a small model's decode step is ~20 small ops per
// layer (norms, RoPE, cache writes, residual adds, SiLU), mostly dispatch overhead as torch calls; here they are plain
// loops, and the kernels are called on raw buffers. A prefill's GEMMs are our INT4 kernel up to native_max_rows rows,
// then the dense copy (oneDNN); its attention is torch's SDPA.
//
// The arithmetic is the reference forward's (tinyserve/model.py, forward) with bf16 activations, rounding where it does:
//   rms_norm:  n = bf16(x * r), y = bf16(n * w), r = 1 / sqrt(sum(x^2) / H + eps) in fp32 (sum: 16 partial sums
//              over the row, then added as _mm512_reduce_add_ps does)
//   RoPE:      bf16(bf16(x * cos) + roll(x, D / 2) * sin)    (sin carries rotate-half's sign, model.rope_tables)
//   SiLU gate: bf16(bf16(g / (1 + exp(-g))) * u)             (exp: cpu_common.h's exp16 on AVX-512 builds)
//   residual:  x = bf16(x + y)
// Only the order of the norm's sum of squares and the exp differ from torch's ops, so logits agree with the reference
// to bf16 rounding, not bit for bit. Every row is computed by the same code whatever else is in the batch (the
// kernels are row-invariant, the loops here work row by row), so a row's result depends only on its own inputs.

#include <ATen/Parallel.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scaled_dot_product_attention.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "cpu_common.h"

namespace {

// sum of squares of x[0..n) in fp32: 16 partial sums (lane i takes elements i, i + 16, ...), then added together
// (AVX-512 builds: _mm512_reduce_add_ps's tree; the portable build: in order).
inline float sum_squares(const uint16_t* x, int64_t n) {
#if defined(TS_AVX512)
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, x + i)), 16));
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float acc[16] = {0};
  for (int64_t i = 0; i < n; ++i) acc[i % 16] += bf16_float(x[i]) * bf16_float(x[i]);
  float s = 0.f;
  for (float a : acc) s += a;
  return s;
#endif
}

// y[m] = rms_norm(x[m]) * w for M rows of H.
void rms_norm(const uint16_t* x, const uint16_t* w, int64_t M, int64_t H, float eps, uint16_t* y) {
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* xm = x + m * H;
    const float r = 1.f / std::sqrt(sum_squares(xm, H) / static_cast<float>(H) + eps);
    for (int64_t i = 0; i < H; ++i) y[m * H + i] = bf16_round(bf16_float(bf16_round(bf16_float(xm[i]) * r)) * bf16_float(w[i]));
  }
}

// out [D] = RoPE of x [D] with one position's cos, sin [D] (all bf16 bits); roll(x, D / 2)[d] is x[d +- D / 2].
inline void rope(const uint16_t* x, const uint16_t* c, const uint16_t* s, int64_t D, uint16_t* out) {
  const int64_t h = D / 2;
  for (int64_t d = 0; d < D; ++d) {
    const float t = bf16_float(bf16_round(bf16_float(x[d]) * bf16_float(c[d])));
    const float p = bf16_float(x[d < h ? d + h : d - h]) * bf16_float(s[d]);
    out[d] = bf16_round(t + p);
  }
}

// act [M, I] = bf16(silu(g) * u) for gu [M, 2 I] = [g, u].
void silu_mul(const uint16_t* gu, int64_t M, int64_t I, uint16_t* act) {
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t *g = gu + m * 2 * I, *u = g + I;
    uint16_t* a = act + m * I;
    int64_t i = 0;
#if defined(TS_AVX512)
    for (; i + 16 <= I; i += 16) {
      const __m512 gv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + i))), 16));
      const __m512 uv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + i))), 16));
      const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
      const __m512 sv = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e));
      const __m512 sr = _mm512_castsi512_ps(_mm512_slli_epi32(bf16_round16(sv), 16));  // silu rounded to bf16
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + i), _mm512_cvtepi32_epi16(bf16_round16(_mm512_mul_ps(sr, uv))));
    }
#endif
    for (; i < I; ++i) {
      const float gf = bf16_float(g[i]);
      a[i] = bf16_round(bf16_float(bf16_round(gf / (1.f + std::exp(-gf)))) * bf16_float(u[i]));
    }
  }
}

inline void add_into(uint16_t* x, const uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = bf16_round(bf16_float(x[i]) + bf16_float(y[i]));
}

const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }
uint16_t* mut_bits(const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

constexpr int64_t PREFILL_ROW_GRAIN = 16;  // rows per task in the loops between a step's GEMMs (one task up to 16 rows)

void check_bf16(const at::Tensor& t, at::IntArrayRef shape, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.sizes() == shape, what, " must be a contiguous bf16 tensor of shape ",
              shape, ", got ", t.scalar_type(), " ", t.sizes());
}

// x [M, K] bf16 @ a dense bf16 weight held by tinyserve_kernels/cpu.py's hold_dense: prepacked for oneDNN (the op that
// dense_linear calls, through the dispatcher: it has no C++ header) or a plain [K, N] tensor.
at::Tensor dense_mm(const at::Tensor& x, const at::Tensor& w) {
  if (!w.is_mkldnn()) return at::mm(x, w);
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, w, c10::IValue(), c10::IValue(std::string("none")), c10::IValue(c10::List<std::optional<at::Scalar>>()),
                                 c10::IValue()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

}  // namespace

TS_NAMESPACE::Decoder::Decoder(at::Tensor embed, std::vector<std::vector<at::Tensor>> layers,
                               std::vector<std::vector<std::optional<at::Tensor>>> biases,
                               std::vector<std::vector<std::optional<at::Tensor>>> dense, at::Tensor norm, at::Tensor cos, at::Tensor sin,
                               at::Tensor k_cache, at::Tensor v_cache, int64_t num_heads, int64_t num_kv_heads, int64_t intermediate_size,
                               int64_t group_size, int64_t native_max_rows, double eps)
    : embed_(std::move(embed)), norm_(std::move(norm)), cos_(std::move(cos)), sin_(std::move(sin)), k_(std::move(k_cache)),
      v_(std::move(v_cache)), Hq_(num_heads), Hkv_(num_kv_heads), I_(intermediate_size), G_(group_size), native_max_rows_(native_max_rows),
      eps_(static_cast<float>(eps)) {
  TORCH_CHECK(embed_.dim() == 2, "embed must be [V, H]");
  H_ = embed_.size(1);
  TORCH_CHECK(k_.dim() == 5 && k_.size(0) == static_cast<int64_t>(layers.size()) && k_.size(2) == Hkv_, "k_cache must be [layers, slots, Hkv, S, D]");
  D_ = k_.size(4);
  TORCH_CHECK(Hq_ % Hkv_ == 0 && attention_fits(Hq_ / Hkv_, D_), "the decode attention does not take ", Hq_ / Hkv_, " query heads per kv head and D = ", D_);
  TORCH_CHECK(layers.size() == biases.size() && layers.size() == dense.size(), "one list of biases and of dense weights per layer");
  check_bf16(embed_, embed_.sizes(), "embed");
  check_bf16(norm_, {H_}, "norm");
  check_bf16(cos_, {cos_.size(0), D_}, "cos");
  check_bf16(sin_, cos_.sizes(), "sin");
  check_bf16(k_, k_.sizes(), "k_cache");
  check_bf16(v_, k_.sizes(), "v_cache");
  const int64_t QKV = (Hq_ + 2 * Hkv_) * D_;
  const int64_t KN[4][2] = {{H_, QKV}, {Hq_ * D_, H_}, {H_, 2 * I_}, {I_, H_}};  // qkv, o, gate_up, down: K, N
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& t = layers[l];
    TORCH_CHECK(t.size() == 6 && biases[l].size() == 4 && dense[l].size() == 4, "layer ", l, ": expected 6 tensors, 4 biases, 4 dense weights");
    check_bf16(t[0], {H_}, "attn_norm");
    check_bf16(t[3], {H_}, "mlp_norm");
    Linear lin[4];
    const at::Tensor* packed[4] = {&t[1], &t[2], &t[4], &t[5]};
    for (int j = 0; j < 4; ++j) {
      const int64_t K = KN[j][0], N = KN[j][1];
      check_int4_packed(*packed[j], K, N, G_);
      lin[j].packed = *packed[j];
      lin[j].K = K, lin[j].N = N;
      if (biases[l][j].has_value() && biases[l][j]->defined()) {
        TORCH_CHECK(biases[l][j]->numel() == N, "layer ", l, ": a bias must have N = ", N, " elements");
        lin[j].bias = biases[l][j]->to(at::kFloat).contiguous();
        lin[j].bias16 = biases[l][j]->to(at::kBFloat16).contiguous();
      }
      if (dense[l][j].has_value() && dense[l][j]->defined()) {
        const at::Tensor& d = *dense[l][j];
        TORCH_CHECK(d.scalar_type() == at::kBFloat16 && (d.is_mkldnn() ? d.sizes() == at::IntArrayRef{N, K} : d.sizes() == at::IntArrayRef{K, N}),
                    "layer ", l, ": a dense weight must be bf16 [K, N] (or oneDNN-packed [N, K])");
        lin[j].dense = d;
      }
    }
    layers_.push_back({t[0], t[3], lin[0], lin[1], lin[2], lin[3]});
  }
}

void TS_NAMESPACE::Decoder::linear(const Linear& l, const uint16_t* x, int64_t M, uint16_t* y) const {
  int4_mm_into(x, true, M, l.K, l.packed.data_ptr<uint8_t>(), l.packed.size(0), l.packed.size(1), l.packed.size(2),
               l.bias.defined() ? l.bias.data_ptr<float>() : nullptr, l.N, G_, y);
}

at::Tensor TS_NAMESPACE::Decoder::linear(const Linear& l, const at::Tensor& x_in) const {
  const at::Tensor x = x_in.contiguous();  // the INT4 kernel reads raw rows
  const int64_t M = x.size(0);
  if (M > native_max_rows_ && l.dense.defined()) {  // a dense GEMM beyond a few rows
    at::Tensor y = dense_mm(x, l.dense);
    return l.bias16.defined() ? y.add_(l.bias16) : y;
  }
  at::Tensor y = at::empty({M, l.N}, x.options());
  linear(l, bits(x), M, reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
  return y;
}

at::Tensor TS_NAMESPACE::Decoder::decode(const at::Tensor& tokens, const at::Tensor& slots, const at::Tensor& positions) const {
  const int64_t M = tokens.numel(), V = embed_.size(0), num_slots = k_.size(1), S = std::min(k_.size(3), cos_.size(0));
  for (const at::Tensor* t : {&tokens, &slots, &positions})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous() && t->numel() == M, "tokens, slots and positions must be [M] int64");
  TORCH_CHECK(M >= 1, "decode needs at least one row");
  const int64_t *tok = tokens.data_ptr<int64_t>(), *slot = slots.data_ptr<int64_t>(), *pos = positions.data_ptr<int64_t>();
  std::vector<int64_t> lens(static_cast<size_t>(M));
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(tok[m] >= 0 && tok[m] < V, "token ", tok[m], " is outside the vocabulary of ", V);
    TORCH_CHECK(slot[m] >= 0 && slot[m] < num_slots, "slot ", slot[m], " is outside the cache's ", num_slots, " slots");
    TORCH_CHECK(pos[m] >= 0 && pos[m] < S, "position ", pos[m], " is outside the context of ", S, " positions");
    lens[m] = pos[m] + 1;
  }
  {  // rows of one slot are positions of one sequence (a prompt chunk, or tokens to verify): each one at most once
    std::vector<std::pair<int64_t, int64_t>> at(static_cast<size_t>(M));
    for (int64_t m = 0; m < M; ++m) at[m] = {slot[m], pos[m]};
    std::sort(at.begin(), at.end());
    TORCH_CHECK(std::adjacent_find(at.begin(), at.end()) == at.end(), "each (slot, position) may appear once in a step");
  }
  const int64_t H = H_, D = D_, R = Hq_ / Hkv_, QN = Hq_ * D, KVN = Hkv_ * D, QKV = QN + 2 * KVN, I = I_;
  const int64_t L = *std::max_element(lens.begin(), lens.end());
  const auto rows = [M](const std::function<void(int64_t, int64_t)>& fn) { at::parallel_for(0, M, PREFILL_ROW_GRAIN, fn); };
  // Activations, bf16 bits, row-major per row: x the residual stream, h a norm's output, y a linear's output.
  std::vector<uint16_t> x(M * H), h(M * H), y(M * H), qkv(M * QKV), q(M * QN), att(M * QN), gu(M * 2 * I), act(M * I);
  for (int64_t m = 0; m < M; ++m) std::memcpy(&x[m * H], bits(embed_) + tok[m] * H, H * sizeof(uint16_t));
  // Cache strides (elements) of [layers, slots, Hkv, S, D]; one layer's block is k_.stride(0).
  const int64_t cs[3] = {k_.stride(1), k_.stride(2), k_.stride(3)};
  uint16_t *kc = mut_bits(k_), *vc = mut_bits(v_);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  for (size_t li = 0; li < layers_.size(); ++li) {
    const Layer& lw = layers_[li];
    uint16_t *kl = kc + li * k_.stride(0), *vl = vc + li * k_.stride(0);
    rows([&](int64_t a, int64_t b) { rms_norm(&x[a * H], bits(lw.attn_norm), b - a, H, eps_, &h[a * H]); });
    linear(lw.qkv, h.data(), M, qkv.data());
    // Every row's key and value are in the cache before any row attends: a row reads the positions up to its own.
    rows([&](int64_t a, int64_t b) {
      for (int64_t m = a; m < b; ++m) {
        const uint16_t *row = &qkv[m * QKV], *c = bits(cos_) + pos[m] * D, *s = bits(sin_) + pos[m] * D;
        for (int64_t j = 0; j < Hq_; ++j) rope(row + j * D, c, s, D, &q[m * QN + j * D]);
        const int64_t at_pos = slot[m] * cs[0] + pos[m] * cs[2];
        for (int64_t j = 0; j < Hkv_; ++j) {
          rope(row + QN + j * D, c, s, D, kl + at_pos + j * cs[1]);
          std::memcpy(vl + at_pos + j * cs[1], row + QN + KVN + j * D, D * sizeof(uint16_t));
        }
      }
    });
    decode_attention_into({q.data(), att.data(), kl, vl, {cs[0], cs[1], cs[2]}, {cs[0], cs[1], cs[2]}, slot, lens.data(), M, Hkv_, R, D, L,
                           scale, true});
    linear(lw.o, att.data(), M, y.data());
    rows([&](int64_t a, int64_t b) {
      add_into(&x[a * H], &y[a * H], (b - a) * H);
      rms_norm(&x[a * H], bits(lw.mlp_norm), b - a, H, eps_, &h[a * H]);
    });
    linear(lw.gate_up, h.data(), M, gu.data());
    rows([&](int64_t a, int64_t b) { silu_mul(&gu[a * 2 * I], b - a, I, &act[a * I]); });
    linear(lw.down, act.data(), M, y.data());
    rows([&](int64_t a, int64_t b) { add_into(&x[a * H], &y[a * H], (b - a) * H); });
  }
  at::Tensor out = at::empty({M, H}, embed_.options());
  rows([&](int64_t a, int64_t b) { rms_norm(&x[a * H], bits(norm_), b - a, H, eps_, mut_bits(out) + a * H); });
  return out;
}

at::Tensor TS_NAMESPACE::Decoder::prefill(const at::Tensor& tokens, int64_t slot, int64_t start) const {
  const int64_t T = tokens.numel(), V = embed_.size(0), S = std::min(k_.size(3), cos_.size(0));
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.dim() == 1 && tokens.is_contiguous() && T >= 1, "tokens must be [T] int64, T >= 1");
  TORCH_CHECK(slot >= 0 && slot < k_.size(1), "slot ", slot, " is outside the cache's ", k_.size(1), " slots");
  TORCH_CHECK(start >= 0 && start + T <= S, "positions ", start, "..", start + T - 1, " are outside the context of ", S, " positions");
  const int64_t* tok = tokens.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(tok[t] >= 0 && tok[t] < V, "token ", tok[t], " is outside the vocabulary of ", V);
  const int64_t H = H_, D = D_, QN = Hq_ * D, KVN = Hkv_ * D, QKV = QN + 2 * KVN, I = I_, end = start + T;
  const auto opts = embed_.options();
  // x the residual stream [T, H], h a norm's output, q the rotated queries as SDPA takes them [1, Hq, T, D].
  at::Tensor x = at::empty({T, H}, opts), h = at::empty({T, H}, opts), q = at::empty({1, Hq_, T, D}, opts), act = at::empty({T, I}, opts);
  uint16_t *xb = mut_bits(x), *hb = mut_bits(h), *qb = mut_bits(q), *ab = mut_bits(act);
  for (int64_t t = 0; t < T; ++t) std::memcpy(xb + t * H, bits(embed_) + tok[t] * H, H * sizeof(uint16_t));
  // Query t (position start + t) sees cache positions 0..start + t; from position 0 that is SDPA's causal mask.
  std::optional<at::Tensor> mask;
  if (start > 0) {
    mask = at::empty({T, end}, at::TensorOptions().dtype(at::kBool));
    bool* mb = mask->data_ptr<bool>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < end; ++j) mb[t * end + j] = j <= start + t;
  }
  const auto rows = [T](const std::function<void(int64_t, int64_t)>& fn) { at::parallel_for(0, T, PREFILL_ROW_GRAIN, fn); };
  const int64_t cs[3] = {k_.stride(1), k_.stride(2), k_.stride(3)};
  uint16_t* kc = mut_bits(k_) + slot * cs[0];
  uint16_t* vc = mut_bits(v_) + slot * cs[0];
  for (size_t li = 0; li < layers_.size(); ++li) {
    const Layer& lw = layers_[li];
    uint16_t *kl = kc + li * k_.stride(0), *vl = vc + li * k_.stride(0);
    rows([&](int64_t a, int64_t b) { rms_norm(xb + a * H, bits(lw.attn_norm), b - a, H, eps_, hb + a * H); });
    const at::Tensor qkv = linear(lw.qkv, h);  // [T, QKV]
    const uint16_t* qkvb = bits(qkv);
    rows([&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t) {
        const uint16_t *row = qkvb + t * QKV, *c = bits(cos_) + (start + t) * D, *s = bits(sin_) + (start + t) * D;
        for (int64_t j = 0; j < Hq_; ++j) rope(row + j * D, c, s, D, qb + (j * T + t) * D);
        for (int64_t j = 0; j < Hkv_; ++j) {
          rope(row + QN + j * D, c, s, D, kl + j * cs[1] + (start + t) * cs[2]);
          std::memcpy(vl + j * cs[1] + (start + t) * cs[2], row + QN + KVN + j * D, D * sizeof(uint16_t));
        }
      }
    });
    const at::Tensor k = k_[static_cast<int64_t>(li)][slot].narrow(1, 0, end).unsqueeze(0);  // [1, Hkv, end, D] views
    const at::Tensor v = v_[static_cast<int64_t>(li)][slot].narrow(1, 0, end).unsqueeze(0);
    const at::Tensor attn = at::scaled_dot_product_attention(q, k, v, mask, 0.0, start == 0, std::nullopt, Hq_ != Hkv_);  // [1, Hq, T, D]
    const at::Tensor o = linear(lw.o, attn[0].transpose(0, 1).reshape({T, QN}));
    rows([&](int64_t a, int64_t b) { add_into(xb + a * H, bits(o) + a * H, (b - a) * H); });
    rows([&](int64_t a, int64_t b) { rms_norm(xb + a * H, bits(lw.mlp_norm), b - a, H, eps_, hb + a * H); });
    const at::Tensor gu = linear(lw.gate_up, h);  // [T, 2 I]
    rows([&](int64_t a, int64_t b) { silu_mul(bits(gu) + a * 2 * I, b - a, I, ab + a * I); });
    const at::Tensor down = linear(lw.down, act);
    rows([&](int64_t a, int64_t b) { add_into(xb + a * H, bits(down) + a * H, (b - a) * H); });
  }
  at::Tensor out = at::empty({H}, opts);  // only the last position goes through the final norm (and the lm_head)
  rms_norm(xb + (T - 1) * H, bits(norm_), 1, H, eps_, mut_bits(out));
  return out;
}
