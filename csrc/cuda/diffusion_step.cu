// The fused diffusion step on CUDA (see vlops/ops/diffusion.py for the contract and
// vlops/reference/diffusion.py for the math). No torch headers: the launcher takes raw pointers.
//
// One launch per step and no host synchronisation: every block computes its sample's coefficients
// (in double, thread 0, through shared memory) from the device tensors timesteps / prev_table /
// alphas_cumprod. The grid is B x (blocks per sample); each thread takes packs of elements in a
// grid-stride loop over its sample: 16-byte loads / stores (float4, 8 halves, 2 x double2) when the row
// length and every pointer allow, otherwise scalar accesses over 4-element groups aligned to the
// global element index. Every group of 4 elements is one Philox4x32-10 call (element g uses counter
// g >> 2, lane g & 3), so the noise is vlops.reference.diffusion.philox_normal up to float rounding.
// Timesteps out of range make that sample's outputs NaN (no host-side check without a sync).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "diffusion_step_launch.h"

namespace vlops {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <class T> struct Traits;
template <> struct Traits<float> { typedef float C; static constexpr int EPT = 4; };
template <> struct Traits<__half> { typedef float C; static constexpr int EPT = 8; };
template <> struct Traits<__nv_bfloat16> { typedef float C; static constexpr int EPT = 8; };
template <> struct Traits<double> { typedef double C; static constexpr int EPT = 4; };

// ---- scalar loads / stores (streaming: every element is read or written once) ----
__device__ __forceinline__ float ld1(const float* p) { return __ldcs(p); }
__device__ __forceinline__ double ld1(const double* p) { return __ldcs(p); }
__device__ __forceinline__ float ld1(const __half* p) {
  return __half2float(__ushort_as_half(__ldcs(reinterpret_cast<const unsigned short*>(p))));
}
__device__ __forceinline__ float ld1(const __nv_bfloat16* p) {
  return __bfloat162float(__ushort_as_bfloat16(__ldcs(reinterpret_cast<const unsigned short*>(p))));
}
__device__ __forceinline__ void st1(float* p, float v) { __stcs(p, v); }
__device__ __forceinline__ void st1(double* p, double v) { __stcs(p, v); }
__device__ __forceinline__ void st1(__half* p, float v) {
  __stcs(reinterpret_cast<unsigned short*>(p), __half_as_ushort(__float2half_rn(v)));
}
__device__ __forceinline__ void st1(__nv_bfloat16* p, float v) {
  __stcs(reinterpret_cast<unsigned short*>(p), __bfloat16_as_ushort(__float2bfloat16_rn(v)));
}

// ---- 16-byte pack loads / stores (EPT elements) ----
__device__ __forceinline__ void ldp(const float* p, float (&v)[4]) {
  const float4 f = __ldcs(reinterpret_cast<const float4*>(p));
  v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
}
__device__ __forceinline__ void ldp(const double* p, double (&v)[4]) {
  const double2 a = __ldcs(reinterpret_cast<const double2*>(p));
  const double2 b = __ldcs(reinterpret_cast<const double2*>(p) + 1);
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}
__device__ __forceinline__ float2 h2f2(unsigned int w) {
  __half2 h;
  memcpy(&h, &w, 4);
  return __half22float2(h);
}
__device__ __forceinline__ float2 b2f2(unsigned int w) {
  __nv_bfloat162 h;
  memcpy(&h, &w, 4);
  return __bfloat1622float2(h);
}
__device__ __forceinline__ void ldp(const __half* p, float (&v)[8]) {
  const uint4 w = __ldcs(reinterpret_cast<const uint4*>(p));
  const unsigned int ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = h2f2(ws[k]);
    v[2 * k] = f.x;
    v[2 * k + 1] = f.y;
  }
}
__device__ __forceinline__ void ldp(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 w = __ldcs(reinterpret_cast<const uint4*>(p));
  const unsigned int ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = b2f2(ws[k]);
    v[2 * k] = f.x;
    v[2 * k + 1] = f.y;
  }
}
__device__ __forceinline__ void stp(float* p, const float (&v)[4]) {
  __stcs(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
}
__device__ __forceinline__ void stp(double* p, const double (&v)[4]) {
  __stcs(reinterpret_cast<double2*>(p), make_double2(v[0], v[1]));
  __stcs(reinterpret_cast<double2*>(p) + 1, make_double2(v[2], v[3]));
}
__device__ __forceinline__ unsigned int f2h2(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  unsigned int w;
  memcpy(&w, &h, 4);
  return w;
}
__device__ __forceinline__ unsigned int f2b2(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  unsigned int w;
  memcpy(&w, &h, 4);
  return w;
}
__device__ __forceinline__ void stp(__half* p, const float (&v)[8]) {
  __stcs(reinterpret_cast<uint4*>(p), make_uint4(f2h2(v[0], v[1]), f2h2(v[2], v[3]), f2h2(v[4], v[5]), f2h2(v[6], v[7])));
}
__device__ __forceinline__ void stp(__nv_bfloat16* p, const float (&v)[8]) {
  __stcs(reinterpret_cast<uint4*>(p), make_uint4(f2b2(v[0], v[1]), f2b2(v[2], v[3]), f2b2(v[4], v[5]), f2b2(v[6], v[7])));
}

// ---- the noise: four normals from one Philox4x32-10 call (counter q) ----
__device__ __forceinline__ float uniform01(uint32_t x) {
  // (x >> 8) * 2**-24 + 2**-25: the product is exact, so the sum is the reference's float32 value
  return __fadd_rn(__fmul_rn((float)(x >> 8), 5.9604644775390625e-08f), 2.98023223876953125e-08f);
}
template <class C>
__device__ __forceinline__ void philox_quad(uint32_t k0, uint32_t k1, uint64_t q, C* n) {
  uint32_t c0 = (uint32_t)q, c1 = (uint32_t)(q >> 32), c2 = 0u, c3 = 0u;
  ds::philox4x32_10(c0, c1, c2, c3, k0, k1);
  if (sizeof(C) == 8) {
    // float64 tensors: Box-Muller in double, rounded to float, as philox_normal computes it
    const double r0 = sqrt(-2.0 * log((double)uniform01(c0)));
    const double r1 = sqrt(-2.0 * log((double)uniform01(c2)));
    double s1, co1, s3, co3;
    sincospi(2.0 * (double)uniform01(c1), &s1, &co1);
    sincospi(2.0 * (double)uniform01(c3), &s3, &co3);
    n[0] = (C)(float)(r0 * co1);
    n[1] = (C)(float)(r0 * s1);
    n[2] = (C)(float)(r1 * co3);
    n[3] = (C)(float)(r1 * s3);
  } else {
    const float r0 = sqrtf(-2.0f * logf(uniform01(c0)));
    const float r1 = sqrtf(-2.0f * logf(uniform01(c2)));
    float s1, co1, s3, co3;
    sincospif(2.0f * uniform01(c1), &s1, &co1);  // sin / cos (2 pi u), exact argument
    sincospif(2.0f * uniform01(c3), &s3, &co3);
    n[0] = (C)(r0 * co1);
    n[1] = (C)(r0 * s1);
    n[2] = (C)(r1 * co3);
    n[3] = (C)(r1 * s3);
  }
}

__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// ---- per-sample coefficients ----
__device__ __forceinline__ double ld_real(const void* p, int f64, int64_t i) {
  return f64 ? static_cast<const double*>(p)[i] : (double)static_cast<const float*>(p)[i];
}

__device__ ds::Coef sample_coef(const StepLaunchArgs& a, int64_t b) {
  const int64_t t = a.timesteps[a.ts_broadcast ? 0 : b];
  const int64_t p = (t >= 0 && t < a.T) ? a.prev_table[t] : a.T;
  if (t < 0 || t >= a.T || p >= a.T) {
    ds::Coef k = {};
    const double nan = __longlong_as_double(0x7FF8000000000000ll);
    k.cx = k.ce = k.lo = k.hi = k.post = k.p0 = k.px = k.pe = k.std_ = k.lb = k.lv = k.es = nan;
    k.add_noise = 0;
    k.std_kind = ds::STD_SCALAR;
    k.valid = 0;
    return k;
  }
  const double ab = ld_real(a.alphas_cumprod, a.alphas_f64, t);
  const double abp = p >= 0 ? ld_real(a.alphas_cumprod, a.alphas_f64, p) : a.cfg.final_alpha;
  const double x0s = a.x0_scale ? ld_real(a.x0_scale, a.x0_scale_f64, b) : 1.0;
  const double es = a.eps_scale ? ld_real(a.eps_scale, a.eps_scale_f64, b) : 1.0;
  return ds::make_coef(a.cfg, t, ab, abp, x0s, es);
}

template <class C>
struct KC {
  C cx, ce, lo, hi, post, p0, px, pe, g, es, sd, lb, lv;
};

template <class C>
__device__ __forceinline__ C std_of(const KC<C>& k, int kind, C v) {
  if (kind == ds::STD_LEARNED) return sqrt(v);
  const C f = (v + C(1)) * C(0.5);
  return exp((k.lv + f * (k.lb - k.lv)) * C(0.5));
}

// One element: e, u, x, noise n (times its std s) -> prev, x0.
template <class C, bool G>
__device__ __forceinline__ void elem(const KC<C>& k, bool ddim, bool noise, C e, C u, C x, C n, C s, C& prev, C& x0) {
  if (G) e = (u + k.g * (e - u)) * k.es;
  C v = k.cx * x + k.ce * e;
  v = v < k.lo ? k.lo : v;  // clamp that keeps NaN
  v = v > k.hi ? k.hi : v;
  v = v * k.post;
  x0 = v;
  C p = k.p0 * v + k.px * x;
  if (ddim) p = p + k.pe * e;
  if (noise) p = p + s * n;
  prev = p;
}

// NS: 0 no noise, 1 noise tensor, 2 Philox from the seed. X0: out_x0 written. VEC: 16-byte packs.
template <class T, bool G, int NS, bool X0, bool VEC>
__global__ void __launch_bounds__(kThreads) step_kernel(const __grid_constant__ StepLaunchArgs a, int bps) {
  typedef typename Traits<T>::C C;
  __shared__ ds::Coef s_coef;
  const int64_t b = blockIdx.x / bps;
  const int64_t cb = blockIdx.x - b * bps;
  if (threadIdx.x == 0) s_coef = sample_coef(a, b);  // three dependent loads: overlap them with
  if (VEC) {                                          // the first pack's loads, started in L2 now
    const int64_t i = (cb * kThreads + threadIdx.x) * (int64_t)Traits<T>::EPT;
    if (i < a.N) {
      prefetch_l2(static_cast<const T*>(a.eps) + b * a.M + i);
      prefetch_l2(static_cast<const T*>(a.sample) + b * a.N + i);
      if (G) prefetch_l2(static_cast<const T*>(a.uncond) + b * a.Mu + i);
    }
  }
  __syncthreads();
  KC<C> k;
  k.cx = (C)s_coef.cx;
  k.ce = (C)s_coef.ce;
  k.lo = (C)s_coef.lo;
  k.hi = (C)s_coef.hi;
  k.post = (C)s_coef.post;
  k.p0 = (C)s_coef.p0;
  k.px = (C)s_coef.px;
  k.pe = (C)s_coef.pe;
  k.g = (C)a.cfg.guidance_scale;
  k.es = (C)s_coef.es;
  k.sd = (C)s_coef.std_;
  k.lb = (C)s_coef.lb;
  k.lv = (C)s_coef.lv;
  const bool noise = NS != 0 && s_coef.add_noise != 0;
  const int kind = s_coef.std_kind;
  const bool ddim = a.cfg.mode == ds::MODE_DDIM;

  const int64_t N = a.N;
  const T* __restrict__ e = static_cast<const T*>(a.eps) + b * a.M;
  const T* __restrict__ var = e + N;  // variance channels (learned kinds only)
  const T* __restrict__ u = G ? static_cast<const T*>(a.uncond) + b * a.Mu : nullptr;
  const T* __restrict__ x = static_cast<const T*>(a.sample) + b * N;
  const T* __restrict__ nzp = NS == 1 ? static_cast<const T*>(a.noise) + b * N : nullptr;
  T* __restrict__ op = static_cast<T*>(a.out_prev) + b * N;
  T* __restrict__ ox = X0 ? static_cast<T*>(a.out_x0) + b * N : nullptr;
  const int64_t stride = (int64_t)bps * kThreads;

  if (VEC) {
    constexpr int EPT = Traits<T>::EPT;
    const int64_t units = N / EPT;
    for (int64_t w = cb * kThreads + threadIdx.x; w < units; w += stride) {
      const int64_t i = w * EPT;
      C E[EPT], U[EPT], X[EPT], Nz[EPT], S[EPT], P[EPT], X0v[EPT];
#pragma unroll
      for (int j = 0; j < EPT; ++j) {
        U[j] = C(0);
        Nz[j] = C(0);
      }
      ldp(e + i, E);
      if (G) ldp(u + i, U);
      ldp(x + i, X);
#pragma unroll
      for (int j = 0; j < EPT; ++j) S[j] = k.sd;
      if (noise) {
        if (NS == 2) {
#pragma unroll
          for (int qd = 0; qd < EPT / 4; ++qd) philox_quad<C>(a.key0, a.key1, (uint64_t)(b * N + i) / 4 + qd, Nz + 4 * qd);
        } else {
          ldp(nzp + i, Nz);
        }
        if (kind != ds::STD_SCALAR) {
          C V[EPT];
          ldp(var + i, V);
#pragma unroll
          for (int j = 0; j < EPT; ++j) S[j] = std_of(k, kind, V[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < EPT; ++j) elem<C, G>(k, ddim, noise, E[j], U[j], X[j], Nz[j], S[j], P[j], X0v[j]);
      if (X0) stp(ox + i, X0v);
      stp(op + i, P);
    }
  } else {
    // groups of 4 elements aligned to the global index g = b * N + i (one Philox counter each)
    const int64_t g_begin = b * N;
    const int64_t q_first = g_begin >> 2;
    const int64_t units = ((g_begin + N - 1) >> 2) - q_first + 1;
    for (int64_t w = cb * kThreads + threadIdx.x; w < units; w += stride) {
      const int64_t q = q_first + w;
      C Nz[4] = {C(0), C(0), C(0), C(0)};
      if (NS == 2 && noise) philox_quad<C>(a.key0, a.key1, (uint64_t)q, Nz);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const int64_t i = 4 * q + l - g_begin;
        if (i < 0 || i >= N) continue;
        const C E = ld1(e + i);
        const C U = G ? (C)ld1(u + i) : C(0);
        const C X = ld1(x + i);
        C n = Nz[l], s = k.sd;
        if (noise) {
          if (NS == 1) n = ld1(nzp + i);
          if (kind != ds::STD_SCALAR) s = std_of(k, kind, (C)ld1(var + i));
        }
        C P, X0v;
        elem<C, G>(k, ddim, noise, E, U, X, n, s, P, X0v);
        if (X0) st1(ox + i, X0v);
        st1(op + i, P);
      }
    }
  }
}

// ---- dispatch ----
int sm_count() {
  static int cache[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  if (dev < 0 || dev >= 64) return 132;
  if (cache[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 132;
    cache[dev] = n;
  }
  return cache[dev];
}

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <class T, bool G, int NS, bool X0>
cudaError_t launch_t(const StepLaunchArgs& a, cudaStream_t stream) {
  constexpr int EPT = Traits<T>::EPT;
  const bool vec = a.N % EPT == 0 && aligned16(a.eps) && aligned16(a.uncond) && aligned16(a.sample) &&
                   aligned16(a.noise) && aligned16(a.out_prev) && aligned16(a.out_x0);
  const int64_t units = vec ? a.N / EPT : ((a.N + 6) >> 2) + 1;  // upper bound of 4-element groups
  int64_t bps = (units + kThreads - 1) / kThreads;
  const int64_t cap = (8LL * sm_count() + a.B - 1) / a.B;  // ~8 blocks per SM in all
  if (bps > cap) bps = cap;
  if (bps < 1) bps = 1;
  const int64_t grid = a.B * bps;
  if (grid > 0x7FFFFFFFLL) return cudaErrorInvalidConfiguration;
  if (vec)
    step_kernel<T, G, NS, X0, true><<<(unsigned)grid, kThreads, 0, stream>>>(a, (int)bps);
  else
    step_kernel<T, G, NS, X0, false><<<(unsigned)grid, kThreads, 0, stream>>>(a, (int)bps);
  return cudaGetLastError();
}

template <class T, bool G, int NS>
cudaError_t launch_x0(const StepLaunchArgs& a, cudaStream_t s) {
  return a.out_x0 ? launch_t<T, G, NS, true>(a, s) : launch_t<T, G, NS, false>(a, s);
}

template <class T, bool G>
cudaError_t launch_ns(const StepLaunchArgs& a, cudaStream_t s) {
  const bool needs_noise = a.cfg.mode == ds::MODE_DDPM || a.cfg.eta > 0.0;
  if (!needs_noise) return launch_x0<T, G, 0>(a, s);
  if (a.philox) return launch_x0<T, G, 2>(a, s);
  return launch_x0<T, G, 1>(a, s);
}

template <class T>
cudaError_t launch_g(const StepLaunchArgs& a, cudaStream_t s) {
  return a.uncond ? launch_ns<T, true>(a, s) : launch_ns<T, false>(a, s);
}

}  // namespace

cudaError_t diffusion_step_launch(const StepLaunchArgs& a, cudaStream_t stream) {
  if (a.B <= 0 || a.N <= 0) return cudaSuccess;
  switch (a.dtype) {
    case DT_F32: return launch_g<float>(a, stream);
    case DT_F16: return launch_g<__half>(a, stream);
    case DT_BF16: return launch_g<__nv_bfloat16>(a, stream);
    case DT_F64: return launch_g<double>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace vlops
