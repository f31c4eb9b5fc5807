// The CPU diffusion-step kernel body, written once with GCC/Clang vector extensions and compiled once
// per instruction set: diffusion_step.cpp includes this file inside a namespace (generic, avx2,
// avx512) between `#pragma GCC push_options` / `#pragma GCC target(...)` / `pop_options`.
//
// Before including: VLOPS_WB (vector width in bytes: 16, 32 or 64) and VLOPS_ISA (0 generic, 1 AVX2,
// 2 AVX-512), and every header this file uses (it includes none itself). It defines `run` (the
// blocks of one step) and `philox_blocks` (raw Philox4x32-10 outputs, for tests).

constexpr int WB = VLOPS_WB;
constexpr int WF = WB / 4;  // float lanes
constexpr int WD = WB / 8;  // double lanes

typedef float vf __attribute__((vector_size(WB)));
typedef double vd __attribute__((vector_size(WB)));
typedef uint32_t vu __attribute__((vector_size(WB)));
typedef int32_t vi __attribute__((vector_size(WB)));
typedef uint16_t vh __attribute__((vector_size(WB / 2)));  // WF halves
typedef float vfd __attribute__((vector_size(WB / 2)));    // WD floats

#define VINL static inline __attribute__((always_inline))

#if defined(__clang__)
#define VLOPS_SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define VLOPS_SHUF(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif

template <class V, class P>
VINL V vld(const P* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <class V, class P>
VINL void vst(P* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(V));
}
VINL vf splat(float s) { return vf{} + s; }
VINL vd splat(double s) { return vd{} + s; }
VINL vu splatu(uint32_t s) { return vu{} + s; }

// ------------------------------------------------------------------------------------------------
// Conversions (bit-exact with c10::Half / c10::BFloat16: round to nearest even, NaN kept)
// ------------------------------------------------------------------------------------------------
VINL vf half_to_float(vh h) {
  const vu w = __builtin_convertvector(h, vu) << 16;
  const vu sign = w & 0x80000000u;
  const vu two_w = w + w;
  const vf normalized = (vf)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const vf denormalized = (vf)((two_w >> 17) | (126u << 23)) - 0.5f;
  const vi is_denorm = two_w < (1u << 27);
  return (vf)(sign | (is_denorm ? (vu)denormalized : (vu)normalized));
}
VINL vh float_to_half(vf f) {
  const vu w = (vu)f;
  const vf absf = (vf)(w & 0x7FFFFFFFu);
  vf base = (absf * 0x1.0p+112f) * 0x1.0p-110f;
  const vu shl1_w = w + w;
  const vu sign = w & 0x80000000u;
  vu bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? splatu(0x71000000u) : bias;
  base = (vf)((bias >> 1) + 0x07800000u) + base;
  const vu bits = (vu)base;
  const vu nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const vu res = (sign >> 16) | (shl1_w > 0xFF000000u ? splatu(0x7E00u) : nonsign);
  return __builtin_convertvector(res, vh);
}
VINL vf bf16_to_float(vh h) { return (vf)(__builtin_convertvector(h, vu) << 16); }
VINL vh float_to_bf16(vf f) {
  const vu u = (vu)f;
  const vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return __builtin_convertvector(f != f ? splatu(0x7FC0u) : r, vh);
}

// Load / store a vector of the compute type C (float or double) from storage type S. The second
// argument only selects the compute type.
VINL vf ldc(const float* p, float) { return vld<vf>(p); }
VINL vf ldc(const c10::Half* p, float) { return half_to_float(vld<vh>(p)); }
VINL vf ldc(const c10::BFloat16* p, float) { return bf16_to_float(vld<vh>(p)); }
VINL vd ldc(const double* p, double) { return vld<vd>(p); }
VINL vd ldc(const float* p, double) { return __builtin_convertvector(vld<vfd>(p), vd); }
VINL void stc(float* p, vf v) { vst(p, v); }
VINL void stc(c10::Half* p, vf v) { vst(p, float_to_half(v)); }
VINL void stc(c10::BFloat16* p, vf v) { vst(p, float_to_bf16(v)); }
VINL void stc(double* p, vd v) { vst(p, v); }

template <class C> struct VT;
template <> struct VT<float> { typedef vf V; static constexpr int L = WF; };
template <> struct VT<double> { typedef vd V; static constexpr int L = WD; };
template <class T> struct CType { typedef float C; };
template <> struct CType<double> { typedef double C; };

// ------------------------------------------------------------------------------------------------
// Math
// ------------------------------------------------------------------------------------------------
#if VLOPS_ISA == 2
VINL vf vsqrt(vf x) { return (vf)_mm512_maskz_sqrt_ps((__mmask16)0xFFFF, (__m512)x); }
VINL vd vsqrt(vd x) { return (vd)_mm512_maskz_sqrt_pd((__mmask8)0xFF, (__m512d)x); }
#elif VLOPS_ISA == 1
VINL vf vsqrt(vf x) { return (vf)_mm256_sqrt_ps((__m256)x); }
VINL vd vsqrt(vd x) { return (vd)_mm256_sqrt_pd((__m256d)x); }
#elif defined(__SSE2__) && VLOPS_WB == 16
VINL vf vsqrt(vf x) { return (vf)_mm_sqrt_ps((__m128)x); }
VINL vd vsqrt(vd x) { return (vd)_mm_sqrt_pd((__m128d)x); }
#else
VINL vf vsqrt(vf x) {
  for (int l = 0; l < WF; ++l) x[l] = __builtin_sqrtf(x[l]);
  return x;
}
VINL vd vsqrt(vd x) {
  for (int l = 0; l < WD; ++l) x[l] = __builtin_sqrt(x[l]);
  return x;
}
#endif

// clamp that keeps NaN (like torch.clamp / maximum / minimum)
template <class V>
VINL V vclamp(V x, V lo, V hi) {
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

VINL vf vexp(vf x) { return cephes_expf<vf, vi>(x); }  // csrc/cpu/cephes_expf.h
VINL vd vexp(vd x) {
  for (int l = 0; l < WD; ++l) x[l] = __builtin_exp(x[l]);
  return x;
}

// log for positive normal floats, cephes logf (~1 ulp).
VINL vf vlog(vf x) {
  const vi xi = (vi)x;
  vi e = ((xi >> 23) & 0xFF) - 126;
  vf m = (vf)((xi & 0x007FFFFF) | 0x3F000000);  // [0.5, 1)
  const vi small = m < 0.707106781186547524f;
  e = e + small;  // small is -1 where true
  m = small ? m + m : m;
  const vf xm = m - 1.0f;
  const vf z = xm * xm;
  vf y = splat(7.0376836292E-2f);
  y = y * xm - 1.1514610310E-1f;
  y = y * xm + 1.1676998740E-1f;
  y = y * xm - 1.2420140846E-1f;
  y = y * xm + 1.4249322787E-1f;
  y = y * xm - 1.6668057665E-1f;
  y = y * xm + 2.0000714765E-1f;
  y = y * xm - 2.4999993993E-1f;
  y = y * xm + 3.3333331174E-1f;
  y = y * xm * z;
  const vf fe = __builtin_convertvector(e, vf);
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  vf r = xm + y;
  return r + fe * 0.693359375f;
}

// sin(2 pi u), cos(2 pi u) for u in [0, 1]: the quadrant is taken from 4u exactly, and the
// polynomials (Taylor, |error| < 2e-9) are in the remainder f in [-1/2, 1/2] (angle pi/2 * f).
VINL void vsincos2pi(vf u, vf& s, vf& c) {
  const vf y = u * 4.0f;
  const vf q = (y + 12582912.0f) - 12582912.0f;  // round to nearest
  const vf f = y - q;
  const vi qi = __builtin_convertvector(q, vi);
  const vf z = f * f;
  vf sp = splat(1.6044118478735982e-4f);
  sp = sp * z - 4.6817541353186881e-3f;
  sp = sp * z + 7.9692626246167045e-2f;
  sp = sp * z - 6.4596409750624625e-1f;
  sp = sp * z + 1.5707963267948966f;
  sp = sp * f;
  vf cp = splat(-2.5202042373060605e-5f);
  cp = cp * z + 9.1926027483942658e-4f;
  cp = cp * z - 2.0863480763352961e-2f;
  cp = cp * z + 2.5366950790104801e-1f;
  cp = cp * z - 1.2337005501361698f;
  cp = cp * z + 1.0f;
  const vi odd = (qi & 1) != 0;
  const vf ss = odd ? cp : sp;
  const vf cc = odd ? sp : cp;
  s = (vf)((vu)ss ^ ((vu)(qi & 2) << 30));        // negative in quadrants 2, 3
  c = (vf)((vu)cc ^ ((vu)((qi + 1) & 2) << 30));  // negative in quadrants 1, 2
}

// ------------------------------------------------------------------------------------------------
// Philox4x32-10 on WF counters at once, and the normal stream of vlops.reference.diffusion.philox_normal
// ------------------------------------------------------------------------------------------------
typedef uint64_t vq __attribute__((vector_size(WB)));  // WF / 2 64-bit lanes
typedef uint32_t vuh __attribute__((vector_size(WB / 2)));  // WF / 2 32-bit lanes

#if defined(__SSE2__) || VLOPS_ISA > 0
// x86: the counters live in the low halves of 64-bit lanes, WF / 2 per register, so that one
// pmuludq gives the full 64-bit product (lo = the low half, hi = product >> 32). The high halves
// carry garbage that never reaches a low half: pmuludq reads only the low halves, and xor is lane-wise.
VINL vq mul_lo32(vq a, uint32_t m) {
#if VLOPS_ISA == 2
  // (maskz_ form: GCC 12 warns about the undefined pass-through of _mm512_mul_epu32)
  return (vq)_mm512_maskz_mul_epu32((__mmask8)0xFF, (__m512i)a, _mm512_set1_epi64((long long)m));
#elif VLOPS_ISA == 1
  return (vq)_mm256_mul_epu32((__m256i)a, _mm256_set1_epi64x((long long)m));
#else
  return (vq)_mm_mul_epu32((__m128i)a, _mm_set1_epi64x((long long)m));
#endif
}
#else
VINL vq mul_lo32(vq a, uint32_t m) { return (a & 0xFFFFFFFFull) * (uint64_t)m; }
#endif

// Philox4x32-10 on two independent groups of WF / 2 counters (a, b), in 64-bit lanes.
VINL void philox10_q(vq* a, vq* b, const uint32_t* ks0, const uint32_t* ks1) {
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    const uint64_t k0 = ks0[r], k1 = ks1[r];
    const vq pa0 = mul_lo32(a[0], ds::PHILOX_M0), pa1 = mul_lo32(a[2], ds::PHILOX_M1);
    const vq pb0 = mul_lo32(b[0], ds::PHILOX_M0), pb1 = mul_lo32(b[2], ds::PHILOX_M1);
    a[0] = (pa1 >> 32) ^ a[1] ^ k0;
    a[2] = (pa0 >> 32) ^ a[3] ^ k1;
    a[1] = pa1;
    a[3] = pa0;
    b[0] = (pb1 >> 32) ^ b[1] ^ k0;
    b[2] = (pb0 >> 32) ^ b[3] ^ k1;
    b[1] = pb1;
    b[3] = pb0;
  }
}

// low halves of a (lanes 0 .. WF/2 - 1) and b (lanes WF/2 .. WF - 1)
VINL vu pack_lo32(vq a, vq b) {
#if VLOPS_WB == 64
  return VLOPS_SHUF((vu)a, (vu)b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
#elif VLOPS_WB == 32
  return VLOPS_SHUF((vu)a, (vu)b, 0, 2, 4, 6, 8, 10, 12, 14);
#else
  return VLOPS_SHUF((vu)a, (vu)b, 0, 2, 4, 6);
#endif
}

// Philox4x32-10 of WF counters (c0..c3, lane l = counter l), in place.
VINL void philox10(vu& c0, vu& c1, vu& c2, vu& c3, const uint32_t* ks0, const uint32_t* ks1) {
  vu* c[4] = {&c0, &c1, &c2, &c3};
  vq a[4], b[4];
  for (int w = 0; w < 4; ++w) {
    vuh lo, hi;
    for (int l = 0; l < WF / 2; ++l) {
      lo[l] = (*c[w])[l];
      hi[l] = (*c[w])[l + WF / 2];
    }
    a[w] = __builtin_convertvector(lo, vq);
    b[w] = __builtin_convertvector(hi, vq);
  }
  philox10_q(a, b, ks0, ks1);
  for (int w = 0; w < 4; ++w) *c[w] = pack_lo32(a[w], b[w]);
}

VINL void key_schedule(uint32_t k0, uint32_t k1, uint32_t* ks0, uint32_t* ks1) {
  for (int r = 0; r < 10; ++r) {
    ks0[r] = k0 + (uint32_t)r * ds::PHILOX_W0;
    ks1[r] = k1 + (uint32_t)r * ds::PHILOX_W1;
  }
}

// uint32 -> (0, 1): (x >> 8) * 2**-24 + 2**-25, as vlops.reference.diffusion.uint32_to_uniform
VINL vf uniform01(vu x) {
  return __builtin_convertvector((vi)(x >> 8), vf) * 5.9604644775390625e-08f + 2.98023223876953125e-08f;
}

// The 4 * WF normals of counters q0 .. q0 + WF - 1 in element order: o[v][l] = normal 4 q0 + WF v + l
// (element 4 q + k is word k of counter q).
VINL void philox_normals_vec(uint64_t q0, const uint32_t* ks0, const uint32_t* ks1, vf* o) {
  vq lane;
  for (int l = 0; l < WF / 2; ++l) lane[l] = (uint64_t)l;
  // counters q = q0 + l: low word in the low half, high word (q >> 32) as the second word
  const vq qa = q0 + lane, qb = qa + (uint64_t)(WF / 2);
  vq a[4] = {qa, qa >> 32, vq{}, vq{}};
  vq b[4] = {qb, qb >> 32, vq{}, vq{}};
  philox10_q(a, b, ks0, ks1);
  const vu c0 = pack_lo32(a[0], b[0]), c1 = pack_lo32(a[1], b[1]);
  const vu c2 = pack_lo32(a[2], b[2]), c3 = pack_lo32(a[3], b[3]);
  const vf u0 = uniform01(c0), u1 = uniform01(c1), u2 = uniform01(c2), u3 = uniform01(c3);
  const vf r0 = vsqrt(vlog(u0) * -2.0f);
  const vf r1 = vsqrt(vlog(u2) * -2.0f);
  vf s1, co1, s3, co3;
  vsincos2pi(u1, s1, co1);
  vsincos2pi(u3, s3, co3);
  const vf n0 = r0 * co1, n1 = r0 * s1, n2 = r1 * co3, n3 = r1 * s3;
  // 4 x WF transpose: element 4 l + k = n_k[l]
#if VLOPS_WB == 64
  const vf t0 = VLOPS_SHUF(n0, n1, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const vf t1 = VLOPS_SHUF(n0, n1, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const vf t2 = VLOPS_SHUF(n2, n3, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const vf t3 = VLOPS_SHUF(n2, n3, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  o[0] = VLOPS_SHUF(t0, t2, 0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23);
  o[1] = VLOPS_SHUF(t0, t2, 8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31);
  o[2] = VLOPS_SHUF(t1, t3, 0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23);
  o[3] = VLOPS_SHUF(t1, t3, 8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31);
#elif VLOPS_WB == 32
  const vf t0 = VLOPS_SHUF(n0, n1, 0, 8, 1, 9, 2, 10, 3, 11);
  const vf t1 = VLOPS_SHUF(n0, n1, 4, 12, 5, 13, 6, 14, 7, 15);
  const vf t2 = VLOPS_SHUF(n2, n3, 0, 8, 1, 9, 2, 10, 3, 11);
  const vf t3 = VLOPS_SHUF(n2, n3, 4, 12, 5, 13, 6, 14, 7, 15);
  o[0] = VLOPS_SHUF(t0, t2, 0, 1, 8, 9, 2, 3, 10, 11);
  o[1] = VLOPS_SHUF(t0, t2, 4, 5, 12, 13, 6, 7, 14, 15);
  o[2] = VLOPS_SHUF(t1, t3, 0, 1, 8, 9, 2, 3, 10, 11);
  o[3] = VLOPS_SHUF(t1, t3, 4, 5, 12, 13, 6, 7, 14, 15);
#elif VLOPS_WB == 16
  const vf t0 = VLOPS_SHUF(n0, n1, 0, 4, 1, 5);
  const vf t1 = VLOPS_SHUF(n0, n1, 2, 6, 3, 7);
  const vf t2 = VLOPS_SHUF(n2, n3, 0, 4, 1, 5);
  const vf t3 = VLOPS_SHUF(n2, n3, 2, 6, 3, 7);
  o[0] = VLOPS_SHUF(t0, t2, 0, 1, 4, 5);
  o[1] = VLOPS_SHUF(t0, t2, 2, 3, 6, 7);
  o[2] = VLOPS_SHUF(t1, t3, 0, 1, 4, 5);
  o[3] = VLOPS_SHUF(t1, t3, 2, 3, 6, 7);
#else
#error "VLOPS_WB must be 16, 32 or 64"
#endif
}

// out[k] for k in [0, 4 * nq): the normals of counters q0 .. q0 + nq - 1 (element 4 q + lane);
// nq is a multiple of WF.
static void philox_normals(float* __restrict out, uint64_t q0, int64_t nq, uint32_t k0, uint32_t k1) {
  uint32_t ks0[10], ks1[10];
  key_schedule(k0, k1, ks0, ks1);
  for (int64_t j = 0; j < nq; j += WF) {
    vf o[4];
    philox_normals_vec(q0 + (uint64_t)j, ks0, ks1, o);
    for (int v = 0; v < 4; ++v) vst(out + 4 * j + v * WF, o[v]);
  }
}

// The same stream with Box-Muller in double, rounded to float: what philox_normal computes, for
// float64 tensors (where the float polynomial path's ~1e-7 would show). Scalar; nq counters.
static void philox_normals_f64(float* __restrict out, uint64_t q0, int64_t nq, uint32_t k0, uint32_t k1) {
  for (int64_t j = 0; j < nq; ++j) {
    const uint64_t q = q0 + (uint64_t)j;
    uint32_t c0 = (uint32_t)q, c1 = (uint32_t)(q >> 32), c2 = 0u, c3 = 0u;
    ds::philox4x32_10(c0, c1, c2, c3, k0, k1);
    const double u0 = (double)((float)(c0 >> 8) * 5.9604644775390625e-08f + 2.98023223876953125e-08f);
    const double u1 = (double)((float)(c1 >> 8) * 5.9604644775390625e-08f + 2.98023223876953125e-08f);
    const double u2 = (double)((float)(c2 >> 8) * 5.9604644775390625e-08f + 2.98023223876953125e-08f);
    const double u3 = (double)((float)(c3 >> 8) * 5.9604644775390625e-08f + 2.98023223876953125e-08f);
    const double r0 = __builtin_sqrt(-2.0 * __builtin_log(u0)), r1 = __builtin_sqrt(-2.0 * __builtin_log(u2));
    const double th0 = 6.283185307179586 * u1, th1 = 6.283185307179586 * u3;  // 2.0 * math.pi * u
    out[4 * j + 0] = (float)(r0 * __builtin_cos(th0));
    out[4 * j + 1] = (float)(r0 * __builtin_sin(th0));
    out[4 * j + 2] = (float)(r1 * __builtin_cos(th1));
    out[4 * j + 3] = (float)(r1 * __builtin_sin(th1));
  }
}

// Raw Philox4x32-10: n blocks, ctr/out laid out [n][4] (uint32), key (k0, k1).
static void philox_blocks(const uint32_t* ctr, uint32_t* out, int64_t n, uint32_t k0, uint32_t k1) {
  uint32_t ks0[10], ks1[10];
  key_schedule(k0, k1, ks0, ks1);
  for (int64_t j = 0; j < n; j += WF) {
    const int m = (int)((n - j) < WF ? (n - j) : WF);
    vu c[4] = {vu{}, vu{}, vu{}, vu{}};
    for (int l = 0; l < m; ++l)
      for (int w = 0; w < 4; ++w) c[w][l] = ctr[4 * (j + l) + w];
    philox10(c[0], c[1], c[2], c[3], ks0, ks1);
    for (int l = 0; l < m; ++l)
      for (int w = 0; w < 4; ++w) out[4 * (j + l) + w] = c[w][l];
  }
}

// ------------------------------------------------------------------------------------------------
// The step
// ------------------------------------------------------------------------------------------------
template <class C>
struct VCoef {
  typedef typename VT<C>::V V;
  V cx, ce, lo, hi, post, p0, px, pe, g, es;
  C std_, lb, lv;
  explicit VCoef(const ds::Coef& k, double g_) {
    cx = splat((C)k.cx);
    ce = splat((C)k.ce);
    lo = splat((C)k.lo);
    hi = splat((C)k.hi);
    post = splat((C)k.post);
    p0 = splat((C)k.p0);
    px = splat((C)k.px);
    pe = splat((C)k.pe);
    g = splat((C)g_);
    es = splat((C)k.es);
    std_ = (C)k.std_;
    lb = (C)k.lb;
    lv = (C)k.lv;
  }
};

// Streaming (non-temporal) store of one float vector: the line goes to memory without being read
// for ownership first. p must be aligned to the vector width. Other types: an ordinary store.
VINL void st_stream(float* p, vf v) {
#if VLOPS_ISA == 2
  _mm512_stream_ps(p, (__m512)v);
#elif VLOPS_ISA == 1
  _mm256_stream_ps(p, (__m256)v);
#elif defined(__SSE__) && VLOPS_WB == 16
  _mm_stream_ps(p, (__m128)v);
#else
  vst(p, v);
#endif
}
template <class T, class V>
VINL void st_stream(T* p, V v) { stc(p, v); }

template <bool NTS, class T, class V>
VINL void st_out(T* p, V v) {
  if (NTS) st_stream(p, v);
  else stc(p, v);
}

// One vector of elements, the noise term (std * n, compute type) given as a value.
template <class T, bool G, bool DDIM, bool NZ, bool NTS>
VINL void step_vec_v(const T* e, const T* u, const T* x, typename VT<typename CType<T>::C>::V ntv, T* op, T* ox,
                     const VCoef<typename CType<T>::C>& k) {
  typedef typename CType<T>::C C;
  typedef typename VT<C>::V V;
  V E = ldc(e, C());
  if (G) {
    const V U = ldc(u, C());
    E = (U + k.g * (E - U)) * k.es;
  }
  const V X = ldc(x, C());
  V X0 = k.cx * X + k.ce * E;
  X0 = vclamp(X0, k.lo, k.hi) * k.post;
  if (ox) st_out<NTS>(ox, X0);
  V P = k.p0 * X0 + k.px * X;
  if (DDIM) P = P + k.pe * E;
  if (NZ) P = P + ntv;
  st_out<NTS>(op, P);
}

// One vector of elements. nt: the noise term (std * n) in the compute type, when NZ.
template <class T, bool G, bool DDIM, bool NZ, bool NTS = false>
VINL void step_vec(const T* e, const T* u, const T* x, const typename CType<T>::C* nt, T* op, T* ox,
                   const VCoef<typename CType<T>::C>& k) {
  typedef typename VT<typename CType<T>::C>::V V;
  step_vec_v<T, G, DDIM, NZ, NTS>(e, u, x, NZ ? vld<V>(nt) : V{}, op, ox, k);
}

// NTS: streaming stores for the whole vectors (op, ox aligned to the vector width); the tail is an
// ordinary store.
template <class T, bool G, bool DDIM, bool NZ, bool NTS>
static void step_tile(const T* __restrict e, const T* __restrict u, const T* __restrict x,
                      const typename CType<T>::C* __restrict nt, T* op, T* ox, int64_t L,
                      const VCoef<typename CType<T>::C>& k) {
  typedef typename CType<T>::C C;
  constexpr int VL = VT<C>::L;
  int64_t i = 0;
  for (; i + VL <= L; i += VL)
    step_vec<T, G, DDIM, NZ, NTS>(e + i, G ? u + i : nullptr, x + i, nt + i, op + i, ox ? ox + i : nullptr, k);
  const int64_t rem = L - i;
  if (rem > 0) {  // the tail, through zero-padded copies
    T te[VL], tu[VL], tx[VL], tp[VL], t0[VL];
    __builtin_memset((void*)te, 0, sizeof(te));
    __builtin_memset((void*)tu, 0, sizeof(tu));
    __builtin_memset((void*)tx, 0, sizeof(tx));
    __builtin_memcpy((void*)te, e + i, rem * sizeof(T));
    if (G) __builtin_memcpy((void*)tu, u + i, rem * sizeof(T));
    __builtin_memcpy((void*)tx, x + i, rem * sizeof(T));
    step_vec<T, G, DDIM, NZ, false>(te, tu, tx, nt + i, tp, ox ? t0 : nullptr, k);
    __builtin_memcpy((void*)(op + i), tp, rem * sizeof(T));
    if (ox) __builtin_memcpy((void*)(ox + i), t0, rem * sizeof(T));
  }
}

// nt[i] = std_i * n_i for i < L (written up to L rounded up to the vector length). src: the noise
// (float Philox buffer or the noise tensor); var: the variance channel (learned kinds).
template <int K, class C, class S, class T>
VINL void noise_vec(C* nt, const S* src, const T* var, const VCoef<C>& k) {
  typedef typename VT<C>::V V;
  const V n = ldc(src, C());
  if (K == ds::STD_SCALAR) {
    vst(nt, n * k.std_);
  } else if (K == ds::STD_LEARNED) {
    vst(nt, vsqrt(ldc(var, C())) * n);
  } else {
    const V f = (ldc(var, C()) + (C)1) * (C)0.5;
    vst(nt, vexp((k.lv + f * (k.lb - k.lv)) * (C)0.5) * n);
  }
}

template <int K, class C, class S, class T>
static void noise_tile(C* __restrict nt, const S* __restrict src, const T* __restrict var, int64_t L,
                       const VCoef<C>& k) {
  constexpr int VL = VT<C>::L;
  int64_t i = 0;
  for (; i + VL <= L; i += VL) noise_vec<K>(nt + i, src + i, K == ds::STD_SCALAR ? var : var + i, k);
  const int64_t rem = L - i;
  if (rem > 0) {
    S ts[VL];
    T tv[VL];
    __builtin_memset((void*)ts, 0, sizeof(ts));
    __builtin_memset((void*)tv, 0, sizeof(tv));
    __builtin_memcpy((void*)ts, src + i, rem * sizeof(S));
    if (K != ds::STD_SCALAR) __builtin_memcpy((void*)tv, var + i, rem * sizeof(T));
    noise_vec<K>(nt + i, ts, tv, k);
  }
}

template <class C, class S, class T>
static void noise_dispatch(int kind, C* nt, const S* src, const T* var, int64_t L, const VCoef<C>& k) {
  switch (kind) {
    case ds::STD_SCALAR: noise_tile<ds::STD_SCALAR>(nt, src, var, L, k); break;
    case ds::STD_LEARNED: noise_tile<ds::STD_LEARNED>(nt, src, var, L, k); break;
    default: noise_tile<ds::STD_LEARNED_RANGE>(nt, src, var, L, k); break;
  }
}

template <class T, bool G, bool DDIM>
static void step_tile_nz(bool nz, bool nts, const T* e, const T* u, const T* x, const typename CType<T>::C* nt,
                         T* op, T* ox, int64_t L, const VCoef<typename CType<T>::C>& k) {
  if (nts) {
    if (nz) step_tile<T, G, DDIM, true, true>(e, u, x, nt, op, ox, L, k);
    else step_tile<T, G, DDIM, false, true>(e, u, x, nt, op, ox, L, k);
  } else {
    if (nz) step_tile<T, G, DDIM, true, false>(e, u, x, nt, op, ox, L, k);
    else step_tile<T, G, DDIM, false, false>(e, u, x, nt, op, ox, L, k);
  }
}

// The step with the Philox noise drawn in registers, for a float compute type and a scalar std:
// elements [0, L) (L a multiple of 4 * WF) whose first element has counter q0 (element 4 q + w is
// word w of counter q). The same normals as philox_normals, multiplied by std as noise_tile does.
template <class T, bool G, bool DDIM, bool NTS>
static void step_tile_philox(const T* __restrict e, const T* __restrict u, const T* __restrict x, T* op, T* ox,
                             int64_t L, uint64_t q0, const uint32_t* ks0, const uint32_t* ks1,
                             const VCoef<float>& k) {
  for (int64_t i = 0; i < L; i += 4 * WF) {
    vf n[4];
    philox_normals_vec(q0 + (uint64_t)(i >> 2), ks0, ks1, n);
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      const int64_t o = i + v * WF;
      const vf nt = n[v] * k.std_;
      step_vec_v<T, G, DDIM, true, NTS>(e + o, G ? u + o : nullptr, x + o, nt, op + o, ox ? ox + o : nullptr, k);
    }
  }
}

template <class T>
static void step_tile_philox_d(bool g, bool ddim, bool nts, const T* e, const T* u, const T* x, T* op, T* ox,
                               int64_t L, uint64_t q0, const uint32_t* ks0, const uint32_t* ks1,
                               const VCoef<float>& k) {
#define VLOPS_STP(G_, D_, N_) step_tile_philox<T, G_, D_, N_>(e, u, x, op, ox, L, q0, ks0, ks1, k)
  if (nts) {
    if (g) { if (ddim) VLOPS_STP(true, true, true); else VLOPS_STP(true, false, true); }
    else { if (ddim) VLOPS_STP(false, true, true); else VLOPS_STP(false, false, true); }
  } else {
    if (g) { if (ddim) VLOPS_STP(true, true, false); else VLOPS_STP(true, false, false); }
    else { if (ddim) VLOPS_STP(false, true, false); else VLOPS_STP(false, false, false); }
  }
#undef VLOPS_STP
}

// Elements [i0, i1) of sample b.
template <class T>
static void run_chunk(const Job& j, int64_t b, int64_t i0, int64_t i1) {
  typedef typename CType<T>::C C;
  const ds::Coef& kd = j.coef[b];
  const VCoef<C> k(kd, j.guidance_scale);
  const int64_t N = j.N;
  const T* e = static_cast<const T*>(j.eps) + b * j.M;
  const T* var = kd.std_kind != ds::STD_SCALAR ? e + N : nullptr;  // variance channels: eps is [B, 2N]
  const T* u = j.guided ? static_cast<const T*>(j.uncond) + b * j.Mu : nullptr;
  const T* x = static_cast<const T*>(j.sample) + b * N;
  const T* nz = j.noise ? static_cast<const T*>(j.noise) + b * N : nullptr;
  T* op = static_cast<T*>(j.out_prev) + b * N;
  T* ox = j.out_x0 ? static_cast<T*>(j.out_x0) + b * N : nullptr;
  const bool add_noise = kd.add_noise != 0;
  // streaming stores: float outputs aligned to the vector width (the tile offsets are multiples of it)
  const bool nts = j.stream && sizeof(T) == 4 && sizeof(C) == 4 && ((uintptr_t)op % WB) == 0 &&
                   (ox == nullptr || ((uintptr_t)ox % WB) == 0);
  // Philox noise in registers: float compute, a scalar std, and element b * N + i0 at a counter start
  const bool fused = add_noise && j.philox && sizeof(C) == 4 && kd.std_kind == ds::STD_SCALAR &&
                     (((uint64_t)(b * N + i0)) & 3u) == 0;
  uint32_t ks0[10], ks1[10];
  if (fused) key_schedule(j.key0, j.key1, ks0, ks1);
  alignas(64) float fbuf[TILE + 8 * WF];
  alignas(64) C nt[TILE + WF];
  for (int64_t t0 = i0; t0 < i1; t0 += TILE) {
    int64_t L = (i1 - t0) < TILE ? (i1 - t0) : TILE;
    const T* et = e + t0;
    const T* ut = u ? u + t0 : nullptr;
    T* oxt = ox ? ox + t0 : nullptr;
    int64_t s0 = t0;  // the first element of the tile not yet done
    if constexpr (sizeof(C) == 4) {
      if (fused) {
        const int64_t Lf = L / (4 * WF) * (4 * WF);
        if (Lf > 0)
          step_tile_philox_d<T>(j.guided, j.ddim, nts, et, ut, x + t0, op + t0, oxt, Lf, (uint64_t)(b * N + t0) >> 2,
                                ks0, ks1, k);
        s0 = t0 + Lf;
        L -= Lf;
        if (L == 0) continue;
      }
    }
    if (add_noise) {
      if (j.philox) {
        const uint64_t g0 = (uint64_t)(b * N + s0);
        const int off = (int)(g0 & 3);
        int64_t nq = (off + L + 3) >> 2;
        nq = (nq + WF - 1) / WF * WF;
        if (sizeof(C) == 8) philox_normals_f64(fbuf, g0 >> 2, nq, j.key0, j.key1);
        else philox_normals(fbuf, g0 >> 2, nq, j.key0, j.key1);
        noise_dispatch<C, float, T>(kd.std_kind, nt, fbuf + off, var ? var + s0 : nullptr, L, k);
      } else {
        noise_dispatch<C, T, T>(kd.std_kind, nt, nz + s0, var ? var + s0 : nullptr, L, k);
      }
    }
    et = e + s0;
    ut = u ? u + s0 : nullptr;
    oxt = ox ? ox + s0 : nullptr;
    // (s0 - t0 is a multiple of the vector width: the streaming stores stay aligned)
    if (j.guided) {
      if (j.ddim) step_tile_nz<T, true, true>(add_noise, nts, et, ut, x + s0, nt, op + s0, oxt, L, k);
      else step_tile_nz<T, true, false>(add_noise, nts, et, ut, x + s0, nt, op + s0, oxt, L, k);
    } else {
      if (j.ddim) step_tile_nz<T, false, true>(add_noise, nts, et, ut, x + s0, nt, op + s0, oxt, L, k);
      else step_tile_nz<T, false, false>(add_noise, nts, et, ut, x + s0, nt, op + s0, oxt, L, k);
    }
  }
}

// Blocks [blk0, blk1): block = (sample, chunk of j.chunk elements).
static void run(const Job& j, int64_t blk0, int64_t blk1) {
  const int64_t per = (j.N + j.chunk - 1) / j.chunk;
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t b = blk / per;
    const int64_t i0 = (blk % per) * j.chunk;
    const int64_t i1 = (i0 + j.chunk) < j.N ? (i0 + j.chunk) : j.N;
    switch (j.dtype) {
      case DT_F32: run_chunk<float>(j, b, i0, i1); break;
      case DT_F16: run_chunk<c10::Half>(j, b, i0, i1); break;
      case DT_BF16: run_chunk<c10::BFloat16>(j, b, i0, i1); break;
      default: run_chunk<double>(j, b, i0, i1); break;
    }
  }
#if defined(__SSE__) || VLOPS_ISA > 0
  if (j.stream) _mm_sfence();  // the streaming stores are weakly ordered: drain them before returning
#endif
}

#undef VINL
#undef VLOPS_SHUF
