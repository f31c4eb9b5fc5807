// exp of a float vector (any GCC vector width), cephes expf (~1 ulp), shared by the CPU kernels
// (csrc/cpu/contrastive.cpp through its 16-lane vf, csrc/cpu/diffusion_step_simd.h at every width).
// The argument is clamped to [-87, 88] (no overflow, no denormals; NaN stays NaN). Always inlined into
// the caller, so it takes the caller's instruction set.
#pragma once

namespace vlops {
namespace cpu {

template <class VF, class VI>
static inline __attribute__((always_inline)) VF cephes_expf(VF x) {
  const VF lo = VF{} - 87.0f, hi = VF{} + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  VF fx = x * 1.44269504088896341f + 12582912.0f;  // round(x / ln 2) via the 1.5 * 2**23 trick
  fx = fx - 12582912.0f;
  VF r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  const VF z = r * r;
  VF y = VF{} + 1.9875691500E-4f;
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * z + r + 1.0f;
  const VI n = __builtin_convertvector(fx, VI);
  return y * (VF)((n + 127) << 23);
}

}  // namespace cpu
}  // namespace vlops
