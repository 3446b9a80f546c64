// The ops of this extension, declared once for cpu_int4.cpp, cpu_int8.cpp and cpu_attention.cpp (which define and
// register them with torch.ops) and bindings.cpp (which binds them to Python directly). They live in a C++ namespace
// named after the build variant, the same name as their torch.ops namespace, so variants loaded into one process
// side by side (the tests load several) never bind to each other's symbols; everything else in the files has
// internal linkage.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

// Set by the build (kernels/cpu_native.py), one per variant.
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

}  // namespace TS_NAMESPACE
