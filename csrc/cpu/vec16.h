// 16-lane fp32 vector helpers shared by the CPU kernels (csrc/cpu/contrastive.cpp, csrc/cpu/patch_embed.cpp):
// fp32 as GCC vectors of 16 lanes (one zmm, two ymm or four xmm registers depending on the target the
// calling function is compiled for: the kernels' run-time ISA dispatch compiles one copy per target), fp64
// as plain scalars with the same function names, so one templated kernel body serves both. Everything is
// always inlined into its caller; no vector crosses a call boundary (so GCC's -Wpsabi note does not apply).
#pragma once

#include <cstdint>
#include <cstring>

#pragma GCC diagnostic ignored "-Wpsabi"

#define CVINL static inline __attribute__((always_inline))

namespace vlops {
namespace cpu {
namespace vec16 {

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

struct F32 {
  using S = float;
  using V = vf;
  using Mask = vi;
  static constexpr int W = 16;
};
struct F64 {
  using S = double;
  using V = double;
  using Mask = bool;
  static constexpr int W = 1;
};

CVINL vf splat(float x) { return vf{} + x; }
CVINL vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
CVINL void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
CVINL vi lanes_from(int32_t j) {
  const vi iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return iota + j;
}
CVINL vf sel(vi m, vf a, vf b) { return m ? a : b; }
CVINL vf vmax(vf a, vf b) { return a > b ? a : b; }
CVINL vf vabs(vf a) { return a < 0.0f ? -a : a; }
CVINL float hsum(vf v) {  // fixed pairwise order: the same sum on every run and thread count
  float t[16];
  std::memcpy(t, &v, sizeof(v));
  for (int w = 8; w >= 1; w >>= 1)
    for (int l = 0; l < w; ++l) t[l] += t[l + w];
  return t[0];
}
CVINL float hmax(vf v) {
  float m = v[0];
  for (int l = 1; l < 16; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

CVINL double splat(double x) { return x; }
CVINL double vload(const double* p) { return *p; }
CVINL void vstore(double* p, double v) { *p = v; }
CVINL double sel(bool m, double a, double b) { return m ? a : b; }
CVINL double vmax(double a, double b) { return a > b ? a : b; }
CVINL double vabs(double a) { return a < 0 ? -a : a; }
CVINL double hsum(double v) { return v; }
CVINL double hmax(double v) { return v; }

}  // namespace vec16
}  // namespace cpu
}  // namespace vlops
