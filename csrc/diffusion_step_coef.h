// Per-sample coefficients and the Philox4x32-10 counter RNG of the fused diffusion step, shared by
// the CPU kernel (csrc/cpu) and the CUDA kernel (csrc/cuda). No torch headers: nvcc includes this.
//
// The element-wise math (vlops/reference/diffusion.py) is folded, once per sample and in double, into
//   x0   = clamp(cx * x + ce * e, lo, hi) * post
//   prev = p0 * x0 + px * x + pe * e + std * n        (the noise term only where add_noise)
// where e is the (guided, rescaled) model output and std is per sample (fixed_small, fixed_small_log,
// fixed_large, DDIM) or per element (learned: sqrt(v); learned_range: exp(0.5 (lv + f (lb - lv))),
// f = (v + 1) / 2, v the variance channel).
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define VLOPS_HD __host__ __device__ __forceinline__
#else
#define VLOPS_HD inline
#endif

namespace vlops {
namespace ds {

enum Mode { MODE_DDPM = 0, MODE_DDIM = 1 };
enum Prediction { PRED_EPSILON = 0, PRED_SAMPLE = 1, PRED_V = 2 };
enum Variance {
  VAR_FIXED_SMALL = 0,
  VAR_FIXED_SMALL_LOG = 1,
  VAR_FIXED_LARGE = 2,
  VAR_LEARNED = 3,
  VAR_LEARNED_RANGE = 4
};
enum StdKind { STD_SCALAR = 0, STD_LEARNED = 1, STD_LEARNED_RANGE = 2 };

// Philox4x32-10 (Salmon et al., Random123): multipliers and Weyl key increments.
constexpr uint32_t PHILOX_M0 = 0xD2511F53u;
constexpr uint32_t PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u;
constexpr uint32_t PHILOX_W1 = 0xBB67AE85u;

// The scalar arguments of the op.
struct Config {
  int mode;
  int prediction_type;
  int variance_type;
  bool guided;
  bool clip_sample;
  bool use_clipped;
  bool has_x0_scale;
  bool has_eps_scale;
  double guidance_scale;
  double clip_range;
  double eta;
  double final_alpha;
};

// Per-sample coefficients (see the top of this file).
struct Coef {
  double cx, ce;          // x0 before clamping
  double lo, hi, post;    // clamp bounds and post-scale (dynamic thresholding: -s, s, 1/s)
  double p0, px, pe;      // prev without noise
  double std_;            // per-sample std (std_kind == STD_SCALAR)
  double lb, lv;          // log(beta), log(var) for learned_range
  double es;              // guidance-rescale factor (1 when not given or not guided)
  int add_noise;          // the noise term is added for this sample
  int std_kind;           // StdKind
  int valid;              // 0: the timestep or its prev_table entry is out of range
};

VLOPS_HD double inf_d() { return __builtin_huge_val(); }

// t: the sample's timestep; ab = alphas_cumprod[t]; abp = alphas_cumprod[prev] or final_alpha;
// x0s: x0_scale[b] (if c.has_x0_scale); es: eps_scale[b] (if c.has_eps_scale).
VLOPS_HD Coef make_coef(const Config& c, int64_t t, double ab, double abp, double x0s, double es) {
  Coef k;
  const double bp = 1.0 - ab;
  const double bpp = 1.0 - abp;
  const double sab = sqrt(ab);
  const double sbp = sqrt(bp);
  k.valid = 1;
  k.es = (c.guided && c.has_eps_scale) ? es : 1.0;
  if (c.prediction_type == PRED_EPSILON) {
    k.cx = 1.0 / sab;
    k.ce = -sbp / sab;
  } else if (c.prediction_type == PRED_SAMPLE) {
    k.cx = 0.0;
    k.ce = 1.0;
  } else {
    k.cx = sab;
    k.ce = -sbp;
  }
  if (c.has_x0_scale) {
    k.lo = -x0s;
    k.hi = x0s;
    k.post = 1.0 / x0s;
  } else if (c.clip_sample) {
    k.lo = -c.clip_range;
    k.hi = c.clip_range;
    k.post = 1.0;
  } else {
    k.lo = -inf_d();
    k.hi = inf_d();
    k.post = 1.0;
  }
  k.lb = 0.0;
  k.lv = 0.0;
  k.std_kind = STD_SCALAR;
  if (c.mode == MODE_DDPM) {
    const double a = ab / abp;
    const double beta = 1.0 - a;
    k.p0 = sqrt(abp) * beta / bp;
    k.px = sqrt(a) * bpp / bp;
    k.pe = 0.0;
    double var = bpp / bp * beta;
    var = var < 1e-20 ? 1e-20 : var;  // torch.clamp(min=1e-20); NaN stays NaN
    switch (c.variance_type) {
      case VAR_FIXED_SMALL: k.std_ = sqrt(var); break;
      case VAR_FIXED_SMALL_LOG: k.std_ = exp(0.5 * log(var)); break;
      case VAR_FIXED_LARGE: k.std_ = sqrt(beta); break;
      case VAR_LEARNED: k.std_ = 0.0; k.std_kind = STD_LEARNED; break;
      default:
        k.std_ = 0.0;
        k.std_kind = STD_LEARNED_RANGE;
        k.lb = log(beta);
        k.lv = log(var);
        break;
    }
    k.add_noise = t > 0;
  } else {
    // eps = dx * x + de * e + dx0 * x0 (x0 after clamping)
    double dx, de, dx0 = 0.0;
    if (c.use_clipped) {
      dx = 1.0 / sbp;
      de = 0.0;
      dx0 = -sab / sbp;
    } else if (c.prediction_type == PRED_EPSILON) {
      dx = 0.0;
      de = 1.0;
    } else if (c.prediction_type == PRED_SAMPLE) {  // (x - sqrt(ab) x0_raw) / sqrt(bp), x0_raw = e
      dx = 1.0 / sbp;
      de = -sab / sbp;
    } else {  // sqrt(ab) e + sqrt(bp) x
      dx = sbp;
      de = sab;
    }
    const double sd = c.eta * sqrt(bpp / bp * (1.0 - ab / abp));
    const double kk = sqrt(1.0 - abp - sd * sd);
    k.p0 = sqrt(abp) + kk * dx0;
    k.px = kk * dx;
    k.pe = kk * de;
    k.std_ = sd;
    k.add_noise = c.eta > 0.0;
  }
  return k;
}

// One Philox4x32-10 block: counter (c0..c3), key (k0, k1); scalar version (CUDA kernel, tests).
VLOPS_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
#if defined(__CUDA_ARCH__)
    const uint32_t hi0 = __umulhi(c0, PHILOX_M0), lo0 = c0 * PHILOX_M0;
    const uint32_t hi1 = __umulhi(c2, PHILOX_M1), lo1 = c2 * PHILOX_M1;
#else
    const uint64_t p0 = (uint64_t)c0 * PHILOX_M0, p1 = (uint64_t)c2 * PHILOX_M1;
    const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
#endif
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += PHILOX_W0;
    k1 += PHILOX_W1;
  }
}

}  // namespace ds
}  // namespace vlops
