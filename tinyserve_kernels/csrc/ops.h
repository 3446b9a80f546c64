// The ops of this extension, declared once for cpu_int4.cpp, cpu_int8.cpp and cpu_attention.cpp (which define and
// register them with torch.ops) and bindings.cpp (which binds them to Python directly). They live in a C++ namespace
// named after the build variant, the same name as their torch.ops namespace, so variants loaded into one process
// side by side (the tests load several) never bind to each other's symbols; everything else in the files has
// internal linkage.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

// Set by the build (tinyserve_kernels/cpu_native.py), one per variant.
#ifndef TS_NAMESPACE
#define TS_NAMESPACE tinyserve_cpu
#endif

namespace TS_NAMESPACE {

// y [M, N] = x [M, K] @ W + bias, W the INT4 weight packed as cpu_int4.cpp describes, in groups of G rows.
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias, int64_t N, int64_t G);

// y [M, N] = (x [M, K] @ q^T) * scales + bias, q the int8 weight packed as cpu_int8.cpp describes.
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const c10::optional<at::Tensor>& bias,
                   int64_t N);

// Decode attention: out [M, Hkv, R, D] for q [M, Hkv, R, D] over k, v [M, Hkv, L, D], row m over positions
// 0..lengths[m]-1 (cpu_attention.cpp).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths, double scale);

// The same kernels on raw buffers, for the decode step below (shapes checked by the caller).
// int4_mm: x [M, K] and y [M, N] fp32, or bf16 bits when bf16; packed [NB, NG, R]; bias fp32 [N] or null.
void int4_mm_into(const void* x, bool bf16, int64_t M, int64_t K, const uint8_t* packed, int64_t NB, int64_t NG, int64_t R,
                  const float* bias, int64_t N, int64_t G, void* y);
void check_int4_packed(const at::Tensor& packed, int64_t K, int64_t N, int64_t G);  // raises unless packed is [NB, NG, R] for K, N, G

inline bool attention_fits(int64_t R, int64_t D) { return R >= 1 && R <= 8 && D % 16 == 0 && D <= 256; }

// decode_attention on raw buffers. Row m's keys for kv head h, position l are at k + slot * ks[0] + h * ks[1] + l * ks[2]
// (elements; v likewise), slot = rows ? rows[m] : m, so rows can read a cache's slots without gathering them.
struct AttentionArgs {
  const void* q;                 // [M, H, R, D] contiguous
  void* out;                     // [M, H, R, D] contiguous
  const void* k;
  const void* v;
  int64_t ks[3], vs[3];          // strides of slot, head and position
  const int64_t* rows;           // [M] or null
  const int64_t* lens;           // [M], each in 1..L
  int64_t M, H, R, D, L;         // H kv heads, R query heads per kv head (attention_fits)
  float scale;
  bool bf16;                     // all buffers bf16 bits, else fp32
};
void decode_attention_into(const AttentionArgs& a);

// The Llama-style decoder stack (tinyserve/model.py, forward) in one call per step (cpu_decode.cpp): bf16
// activations, INT4 linears in this library's layout, keys and values written into the cache in place. Both return
// the final norm's output (the lm_head stays in Python).
class Decoder {
 public:
  // layers: per layer [attn_norm [H], qkv, o, mlp_norm [H], gate_up, down] (the linears packed for int4_mm with group
  // size G); biases: per layer the four linears' biases, each [N] or None; dense: per layer the four linears' bf16
  // copies for prompts (tinyserve_kernels/cpu.py, hold_dense: oneDNN-packed [N, K] or plain [K, N]) or None, used for prompts of
  // more than native_max_rows tokens (the backend's NATIVE_MAX_ROWS). cos, sin [P, D] bf16
  // (model.rope_tables); k_cache, v_cache [layers, slots, Hkv, S, D] bf16. Positions go up to min(P, S) - 1.
  Decoder(at::Tensor embed, std::vector<std::vector<at::Tensor>> layers, std::vector<std::vector<std::optional<at::Tensor>>> biases,
          std::vector<std::vector<std::optional<at::Tensor>>> dense, at::Tensor norm, at::Tensor cos, at::Tensor sin, at::Tensor k_cache,
          at::Tensor v_cache, int64_t num_heads, int64_t num_kv_heads, int64_t intermediate_size, int64_t group_size,
          int64_t native_max_rows, double eps);
  // M rows: tokens, slots, positions [M] int64, each (slot, position) at most once; row m attends to positions
  // 0..positions[m] of its slot, including those this step's other rows write. One token of each of M sequences is a
  // decode step; a slot's rows at consecutive positions are a prompt chunk (or tokens to verify) computed row for row
  // as decode computes each token alone. Returns [M, H].
  at::Tensor decode(const at::Tensor& tokens, const at::Tensor& slots, const at::Tensor& positions) const;
  // T tokens [T] int64 of one sequence at positions start..start + T - 1 of `slot` (positions before start already
  // cached). Returns the last position's [H].
  at::Tensor prefill(const at::Tensor& tokens, int64_t slot, int64_t start) const;

 private:
  struct Linear {
    at::Tensor packed;
    at::Tensor bias, bias16;  // fp32 and bf16 [N] (the INT4 kernel adds the first, a dense GEMM's output the second), or undefined
    at::Tensor dense;         // or undefined
    int64_t K = 0, N = 0;
  };
  struct Layer {
    at::Tensor attn_norm, mlp_norm;
    Linear qkv, o, gate_up, down;
  };
  void linear(const Linear& l, const uint16_t* x, int64_t M, uint16_t* y) const;  // the INT4 kernel
  at::Tensor linear(const Linear& l, const at::Tensor& x) const;                    // x [M, K] bf16: INT4 kernel or dense copy by M

  at::Tensor embed_, norm_, cos_, sin_, k_, v_;
  std::vector<Layer> layers_;
  int64_t H_, Hq_, Hkv_, D_, I_, G_, native_max_rows_;
  float eps_;
};

}  // namespace TS_NAMESPACE
