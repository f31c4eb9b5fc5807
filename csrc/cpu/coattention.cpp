// ViLBERT co-attention on the CPU: co_attention_fwd_cpu and co_attention_bwd_cpu, the kernel contracts of
// vlops/ops/coattention.py (two cross-attentions in one call: text queries over image keys / values, dir 0;
// image queries over text keys / values, dir 1; each with the other stream's key padding).
//
// Keys. Per (dir, b) the keys that take part are listed once before the work starts: in mode 0 ("zero")
// the valid ones only (j < len[b] and mask[b, j]), so padded or masked keys are never read, never
// multiplied and need no mask in the inner loops (lengths without a mask: keys 0 .. len[b] - 1, the fast
// path); in mode 1 ("vilbert") every key, with an additive bias row (0 or -10000 per key).
//
// Forward schedule. Work items are (dir, b, h, query block): the direction's query rows cut into
// near-equal blocks of at most BM rows (BM = 64 for d <= 256). The items are sorted by cost (rows x keys,
// largest first) and taken by the threads of one at::parallel_for from a shared counter; every item owns
// its output rows, so which thread runs it does not change the result. Per item: the query rows are
// gathered into a per-thread buffer (read through the input's strides, 16-bit converted to fp32, rows
// zero-padded to a multiple of 16 elements; the rows PF ahead are prefetched); then for each block of at
// most BN listed keys (BN = 128 for d = 128) the K and V rows are gathered the same way, S = Q K^T by a
// register-tiled kernel (RB query rows x JB keys of vector accumulators along d, their lanes summed by a
// transposing shuffle reduction), scale (+ the mode-1 bias), an online softmax (running row max and sum;
// the block's output rows rescaled when the max grows), the dropout multipliers, and O += P V (register
// tiles vectorised along d). Nothing larger than a [BM, BN] score tile exists. At the end out = O / l,
// rounded once to the output dtype, lse = m + log l.
//
// Backward schedule. Every gradient belongs to one direction: d_tq, d_ik, d_iv to dir 0 and d_iq, d_tk,
// d_tv to dir 1. Work items are (dir, b, h): the item gathers its query rows (Q, dout, and out for
// D = rowsum(dout * out)) once, then per (key block, query block) recomputes S and P = exp(S - lse),
// dP = dout V^T, then dV += (P Z)^T dout, dS = P (Z dP - D), dK += dS^T Q, dQ += dS K (Z: the dropout
// multipliers); it owns dq of its query rows and dk, dv of its keys: no atomics. When there are fewer
// (dir, b, h) pairs than 4 x threads, a pair is split instead into key chunks (items that accumulate dk,
// dv over all query rows) and query chunks (items that accumulate dq over all keys): S and dP are then
// computed twice, in exchange for the parallelism. Every accumulation runs in the same order either way
// (dk, dv over the query rows in order; dq over the listed keys in order; each score is the same sum
// whatever the tile), so the gradients are bit-identical for any thread count. Invalid keys (mode 0) get
// dk = dv = 0; rows with lse = -inf (no valid key) get dq = 0.
//
// Memory beyond inputs and outputs: per thread the [BM or M, dp] query-side rows, [BN, dp] key / value
// rows and accumulators, and [BM, BN] score tiles. Outputs of 4 MiB or more are written with streaming
// stores (fp32 / fp64).
//
// Dropout: keep_ij = uniform(x0) >= dropout_p (float32 compare, dropout_p rounded to float32; done as an
// integer threshold on x0 >> 8), x0 the first word of Philox4x32-10 with counter (j, i, b * H + h, dir)
// and key (seed & 0xffffffff, seed >> 32), one call per (query, key) pair: 8 pairs per vector on AVX-512,
// ds::philox4x32_10 (csrc/diffusion_step_coef.h) one pair at a time elsewhere. The kept weights are
// multiplied by 1 / (1 - dropout_p) (formed in double, rounded to the compute type). The forward and the
// backward draw the multipliers of each block again (no mask is stored).
//
// Numerics: fp32 compute and accumulation for fp32 / fp16 / bf16 inputs (products of 16-bit operands
// are exact in fp32), fp64 for fp64 inputs (scalar code). The fp32 kernels are explicit SIMD (GCC vector
// extensions at the native width: 16 lanes for AVX-512, 8 for AVX2, 4 for the portable baseline),
// compiled for each and picked at run time (csrc/cpu/isa_dispatch.h; vlops._C.set_cpu_isa /
// VLOPS_CPU_ISA), with FMA where the target has it. exp is cephes expf (csrc/cpu/cephes_expf.h, ~1 ulp),
// flushed to 0 below -87. Mode-1 scores are (scale * q.k) + bias, in that order. Every sum has a fixed
// order: the same result on every run. fp16 rows are converted with F16C on AVX2 / AVX-512 machines
// (c10::Half on the baseline), bf16 with c10::BFloat16; 16-bit outputs are rounded once, to nearest even.
// VLOPS_COATTENTION_TILES="BM,BN" overrides the block sizes and VLOPS_COATTENTION_BWD_SPLIT=k forces the
// split backward with k chunks per pair (tuning and tests).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "vec16.h"  // 16-lane vector helpers (first: silences -Wpsabi; no vector crosses a call boundary)
#include "cephes_expf.h"
#include "diffusion_step_check.h"  // VLOPS_CHECK; diffusion_step_coef.h: ds::philox4x32_10
#include "isa_dispatch.h"

#if VLOPS_ISA_X86
#include <emmintrin.h>  // SSE2 (the x86-64 baseline): streaming stores of the outputs
#endif

namespace vlops {
namespace cpu {

namespace {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// ------------------------------------------------------------------------------------------------
// Vector types: the kernels run on the native width of each instruction set (16 fp32 lanes for
// AVX-512, 8 for AVX2, 4 for the portable baseline; GCC lowers wider generic vectors poorly there, in
// particular the per-element broadcasts of the inner loops), fp64 on scalars. Tr::S, Tr::V, Tr::W and
// the operations below; everything is always inlined into the per-ISA entry points.
// ------------------------------------------------------------------------------------------------
using vec16::vf;  // csrc/cpu/vec16.h: 16 fp32 / int32 lanes
using vec16::vi;
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef int32_t vi4 __attribute__((vector_size(16)));

template <class V_, class I_, int W_>
struct FV {
  using S = float;
  using V = V_;
  using I = I_;
  static constexpr int W = W_;
  CVINL V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  CVINL void store(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }
  CVINL V splat(float x) { return V{} + x; }
  CVINL float hsum(V v) {  // pairwise: lane l += lane l + w, w = W / 2 .. 1 (a fixed order)
    float t[W];
    std::memcpy(t, &v, sizeof(v));
    for (int w = W / 2; w >= 1; w >>= 1)
      for (int l = 0; l < w; ++l) t[l] += t[l + w];
    return t[0];
  }
  CVINL float hmax(V v) {
    float m = v[0];
    for (int l = 1; l < W; ++l) m = v[l] > m ? v[l] : m;
    return m;
  }
  CVINL I lt(int64_t j, int64_t n) {  // lanes j + l < n
    I iota;
    for (int l = 0; l < W; ++l) iota[l] = l;
    return (iota + (int32_t)j) < (int32_t)n;
  }
  CVINL V sel(I m, V a, V b) { return m ? a : b; }
  CVINL V vmax(V a, V b) { return a > b ? a : b; }
  // exp, exactly 0 below -87 (cephes_expf clamps its argument there; -inf gives 0)
  CVINL V exp(V x) { return sel(x < -87.0f, V{}, cephes_expf<V, I>(x)); }
};
using F16L = FV<vf, vi, 16>;
using F8L = FV<vf8, vi8, 8>;
using F4L = FV<vf4, vi4, 4>;

struct D1 {
  using S = double;
  using V = double;
  static constexpr int W = 1;
  CVINL double load(const double* p) { return *p; }
  CVINL void store(double* p, double v) { *p = v; }
  CVINL double splat(double x) { return x; }
  CVINL double hsum(double v) { return v; }
  CVINL double hmax(double v) { return v; }
  CVINL bool lt(int64_t j, int64_t n) { return j < n; }
  CVINL double sel(bool m, double a, double b) { return m ? a : b; }
  CVINL double vmax(double a, double b) { return a > b ? a : b; }
  CVINL double exp(double x) { return std::exp(x); }
};

// Sums of the lanes of N vectors, each in the fixed pairwise order of Tr::hsum whatever N: "fold" steps
// add the two halves of every lane group of two vectors at once (a transposing reduction), the last
// steps run on scalars.
template <class I, int W, int G, int HALF, size_t... L>
CVINL I fold_mask(std::index_sequence<L...>) {
  // output lane o * G / 2 + l, o < 2 W / G: group o % (W / G) of x (o < W / G) or of y, lane l (+ G / 2)
  return I{(int32_t)(((int)L / (G / 2) < W / G ? 0 : W) + ((int)L / (G / 2)) % (W / G) * G + (int)L % (G / 2) +
                     HALF * (G / 2))...};
}
template <class Tr, int G>
CVINL typename Tr::V fold(typename Tr::V x, typename Tr::V y) {  // groups of G lanes -> G / 2 (x's, then y's)
  using I = typename Tr::I;
  constexpr int W = Tr::W;
  const I a = fold_mask<I, W, G, 0>(std::make_index_sequence<W>{});
  const I b = fold_mask<I, W, G, 1>(std::make_index_sequence<W>{});
  return __builtin_shuffle(x, y, a) + __builtin_shuffle(x, y, b);
}
template <class Tr, int G, int NV>
CVINL void fold_level(typename Tr::V* v) {  // NV vectors of groups of G lanes -> NV / 2 of G / 2
  if constexpr (NV > 1) {
    for (int k = 0; k < NV / 2; ++k) v[k] = fold<Tr, G>(v[2 * k], v[2 * k + 1]);
    fold_level<Tr, G / 2, NV / 2>(v);
  }
}

template <class Tr, int N>
CVINL void lane_sums(const typename Tr::V* a, typename Tr::S* out) {
  using S = typename Tr::S;
  using V = typename Tr::V;
  constexpr int W = Tr::W;
  if constexpr (W == 1) {
    for (int k = 0; k < N; ++k) out[k] = a[k];
  } else {
    constexpr int P = N <= 1 ? 1 : N <= 2 ? 2 : N <= 4 ? 4 : N <= 8 ? 8 : 16;
    static_assert(N >= 1 && N <= 16, "lane_sums: 1 to 16 vectors");
    constexpr int CH = P < W ? P : W;  // vectors folded together
    constexpr int g = W / CH;          // lanes left per vector after the folds
    for (int c0 = 0; c0 < N; c0 += CH) {
      V v[CH];
      for (int k = 0; k < CH; ++k) v[k] = c0 + k < N ? a[c0 + k] : V{};
      fold_level<Tr, W, CH>(v);
      S t[W];
      std::memcpy(t, &v[0], sizeof(t));
      for (int w = g / 2; w >= 1; w >>= 1)
        for (int k = 0; k < CH; ++k)
          for (int l = 0; l < w; ++l) t[k * g + l] += t[k * g + l + w];
      for (int k = 0; k < CH && c0 + k < N; ++k) out[c0 + k] = t[k * g];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Register-tiled products on row-major operands (rows of the per-thread buffers)
// ------------------------------------------------------------------------------------------------
template <int RB_, int CB_>
struct Tile {
  static constexpr int RB = RB_;  // rows
  static constexpr int CB = CB_;  // DOT: keys; PV: vectors of W columns
};
// per instruction set: the vector traits, DOT (C = A B^T, the scores) and PV (C += P X) tiles
struct IsaGeneric {
  using Tr = F4L;
  using DOT = Tile<2, 4>;
  using PV = Tile<4, 2>;
};
struct IsaAvx2 {
  using Tr = F8L;
  using DOT = Tile<2, 4>;
  using PV = Tile<4, 2>;
};
struct IsaAvx512 {
  using Tr = F16L;
  using DOT = Tile<4, 4>;
  using PV = Tile<4, 4>;
};
struct IsaF64 {
  using Tr = D1;
  using DOT = Tile<4, 4>;
  using PV = Tile<4, 4>;
};

// C[r, j] = sum_c A[r, c] B[j, c]   (r < R, j < NC, c < K; K a multiple of W)
template <class S>
struct DotArgs {
  S* C;
  int64_t ldc;
  const S* A;
  int64_t lda;
  const S* B;
  int64_t ldb;
  int64_t R, NC, K;
};

template <class Tr, int RB, int JB>
CVINL void dot_tile(const DotArgs<typename Tr::S>& g, int64_t r0, int64_t j0) {
  using S = typename Tr::S;
  using V = typename Tr::V;
  constexpr int W = Tr::W;
  V acc[RB * JB];
  for (int k = 0; k < RB * JB; ++k) acc[k] = Tr::splat((S)0);
  const S* a = g.A + r0 * g.lda;
  const S* b = g.B + j0 * g.ldb;
  for (int64_t c = 0; c < g.K; c += W) {
    V av[RB], bv[JB];
    for (int r = 0; r < RB; ++r) av[r] = Tr::load(a + r * g.lda + c);
    for (int j = 0; j < JB; ++j) bv[j] = Tr::load(b + j * g.ldb + c);
    for (int r = 0; r < RB; ++r)
      for (int j = 0; j < JB; ++j) acc[r * JB + j] += av[r] * bv[j];
  }
  S out[RB * JB];
  lane_sums<Tr, RB * JB>(acc, out);
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < JB; ++j) g.C[(r0 + r) * g.ldc + j0 + j] = out[r * JB + j];
}

template <class Tr, int RB, int JB>
CVINL void dot_cols(const DotArgs<typename Tr::S>& g, int64_t r0, int64_t j0) {
  for (; j0 + JB <= g.NC; j0 += JB) dot_tile<Tr, RB, JB>(g, r0, j0);
  if constexpr (JB > 1) {
    if (j0 < g.NC) dot_cols<Tr, RB, JB - 1>(g, r0, j0);
  }
}

template <class Tr, int RB, int JB>
CVINL void dot_rows(const DotArgs<typename Tr::S>& g, int64_t r0) {
  for (; r0 + RB <= g.R; r0 += RB) dot_cols<Tr, RB, JB>(g, r0, 0);
  if constexpr (RB > 1) {
    if (r0 < g.R) dot_rows<Tr, RB - 1, JB>(g, r0);
  }
}

// C[r, j] += sum_t P[r * prs + t * pts] X[t, j]   (r < R, j < NC, t < T; NC a multiple of W)
template <class S>
struct PVArgs {
  S* C;
  int64_t ldc;
  const S* P;
  int64_t prs, pts;
  const S* X;
  int64_t ldx;
  int64_t R, NC, T;
};

template <class Tr, int RB, int CB>
CVINL void pv_tile(const PVArgs<typename Tr::S>& g, int64_t r0, int64_t j0) {
  using S = typename Tr::S;
  using V = typename Tr::V;
  constexpr int W = Tr::W;
  V acc[RB][CB];
  for (int r = 0; r < RB; ++r)
    for (int cb = 0; cb < CB; ++cb) acc[r][cb] = Tr::load(g.C + (r0 + r) * g.ldc + j0 + cb * W);
  const S* p = g.P + r0 * g.prs;
  const S* x = g.X + j0;
  for (int64_t t = 0; t < g.T; ++t) {
    V xv[CB];
    for (int cb = 0; cb < CB; ++cb) xv[cb] = Tr::load(x + t * g.ldx + cb * W);
    for (int r = 0; r < RB; ++r) {
      const V pv = Tr::splat(p[r * g.prs + t * g.pts]);
      for (int cb = 0; cb < CB; ++cb) acc[r][cb] += pv * xv[cb];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int cb = 0; cb < CB; ++cb) Tr::store(g.C + (r0 + r) * g.ldc + j0 + cb * W, acc[r][cb]);
}

template <class Tr, int RB, int CB>
CVINL void pv_cols(const PVArgs<typename Tr::S>& g, int64_t r0, int64_t j0) {
  constexpr int W = Tr::W;
  for (; j0 + CB * W <= g.NC; j0 += CB * W) pv_tile<Tr, RB, CB>(g, r0, j0);
  if constexpr (CB > 1) {
    if (j0 < g.NC) pv_cols<Tr, RB, CB - 1>(g, r0, j0);
  }
}

template <class Tr, int RB, int CB>
CVINL void pv_rows(const PVArgs<typename Tr::S>& g, int64_t r0) {
  for (; r0 + RB <= g.R; r0 += RB) pv_cols<Tr, RB, CB>(g, r0, 0);
  if constexpr (RB > 1) {
    if (r0 < g.R) pv_rows<Tr, RB - 1, CB>(g, r0);
  }
}

template <class Is>
CVINL void dot(const DotArgs<typename Is::Tr::S>& g) {
  dot_rows<typename Is::Tr, Is::DOT::RB, Is::DOT::CB>(g, 0);
}
template <class Is>
CVINL void pv(const PVArgs<typename Is::Tr::S>& g) {
  pv_rows<typename Is::Tr, Is::PV::RB, Is::PV::CB>(g, 0);
}

// ------------------------------------------------------------------------------------------------
// Block bodies: one (query block, key block) pair
// ------------------------------------------------------------------------------------------------
// Operand rows (q, k, v, dout) hold dp elements (d rounded up to 16, or d in fp64; zero padding); score
// rows hold np = n rounded up to 16 elements (1 in fp64), the lanes past n masked.
template <class S>
struct FwdBlk {
  const S* q;     // [m, dp]
  const S* k;     // [n, dp]
  const S* v;     // [n, dp]
  const S* z;     // [m, np] dropout multipliers, or null
  const S* bias;  // [>= np] mode-1 key bias, or null
  S* s;           // [m, np] scratch
  S* o;           // [m, dp] running output (unnormalised)
  S* rmax;        // [m] running row max
  S* rsum;        // [m] running row sum of exp(s - rmax)
  int64_t m, n, np, dp;
  S scale;
};

template <class Is>
CVINL void fwd_block_body(const FwdBlk<typename Is::Tr::S>& a) {
  using Tr = typename Is::Tr;
  using S = typename Tr::S;
  using V = typename Tr::V;
  constexpr int W = Tr::W;
  const S ninf = -std::numeric_limits<S>::infinity();
  dot<Is>(DotArgs<S>{a.s, a.np, a.q, a.dp, a.k, a.dp, a.m, a.n, a.dp});  // q . k
  const V vscale = Tr::splat(a.scale), vninf = Tr::splat(ninf);
  for (int64_t i = 0; i < a.m; ++i) {
    S* sr = a.s + i * a.np;
    V mx = vninf;
    for (int64_t j = 0; j < a.np; j += W) {
      V x = Tr::load(sr + j) * vscale;
      if (a.bias) x = x + Tr::load(a.bias + j);
      x = Tr::sel(Tr::lt(j, a.n), x, vninf);
      Tr::store(sr + j, x);
      mx = Tr::vmax(mx, x);
    }
    const S bm = Tr::hmax(mx), mold = a.rmax[i];
    const S mnew = bm > mold ? bm : mold;
    const S alpha = mold == ninf ? (S)0 : (S)std::exp(mold - mnew);
    const S* zr = a.z ? a.z + i * a.np : nullptr;
    const V vm = Tr::splat(mnew);
    V acc = Tr::splat((S)0);
    for (int64_t j = 0; j < a.np; j += W) {
      V p = Tr::exp(Tr::load(sr + j) - vm);
      acc += p;
      if (zr) p = p * Tr::load(zr + j);
      Tr::store(sr + j, p);
    }
    a.rsum[i] = a.rsum[i] * alpha + Tr::hsum(acc);
    a.rmax[i] = mnew;
    if (alpha != (S)1) {
      S* orow = a.o + i * a.dp;
      const V va = Tr::splat(alpha);
      for (int64_t c = 0; c < a.dp; c += W) Tr::store(orow + c, Tr::load(orow + c) * va);
    }
  }
  pv<Is>(PVArgs<S>{a.o, a.dp, a.s, a.np, 1, a.v, a.dp, a.m, a.dp, a.n});  // O += P V
}

template <class S>
struct BwdBlk {
  const S* q;     // [m, dp]
  const S* dout;  // [m, dp]
  const S* D;     // [m] rowsum(dout * out)
  const S* lse;   // [m]
  const S* k;     // [n, dp]
  const S* v;     // [n, dp]
  const S* z;     // [m, np] dropout multipliers, or null
  const S* bias;  // [>= np] mode-1 key bias, or null
  S* s;           // [m, np] scratch: P Z
  S* ds;          // [m, np] scratch: dS
  S* dq;          // [m, dp] accumulator (unscaled), or null
  S* dk;          // [n, dp] accumulator (unscaled), or null
  S* dv;          // [n, dp] accumulator, or null
  int64_t m, n, np, dp;
  S scale;
};

template <class Is>
CVINL void bwd_block_body(const BwdBlk<typename Is::Tr::S>& a) {
  using Tr = typename Is::Tr;
  using S = typename Tr::S;
  using V = typename Tr::V;
  constexpr int W = Tr::W;
  const S ninf = -std::numeric_limits<S>::infinity();
  dot<Is>(DotArgs<S>{a.s, a.np, a.q, a.dp, a.k, a.dp, a.m, a.n, a.dp});      // q . k
  dot<Is>(DotArgs<S>{a.ds, a.np, a.dout, a.dp, a.v, a.dp, a.m, a.n, a.dp});  // dout . v
  const V vscale = Tr::splat(a.scale), vzero = Tr::splat((S)0);
  for (int64_t i = 0; i < a.m; ++i) {
    S* sr = a.s + i * a.np;
    S* dr = a.ds + i * a.np;
    const S l = a.lse[i];
    if (l == ninf) {  // no valid key (mode 0): p = 0
      for (int64_t j = 0; j < a.np; j += W) {
        Tr::store(sr + j, vzero);
        Tr::store(dr + j, vzero);
      }
      continue;
    }
    const V vl = Tr::splat(l), vD = Tr::splat(a.D[i]);
    const S* zr = a.z ? a.z + i * a.np : nullptr;
    for (int64_t j = 0; j < a.np; j += W) {
      V x = Tr::load(sr + j) * vscale;  // the forward's score: the same operations in the same order
      if (a.bias) x = x + Tr::load(a.bias + j);
      const auto ok = Tr::lt(j, a.n);
      const V p = Tr::sel(ok, Tr::exp(x - vl), vzero);
      V dp = Tr::load(dr + j);
      if (zr) {
        const V zz = Tr::load(zr + j);
        Tr::store(sr + j, p * zz);
        dp = dp * zz;
      } else {
        Tr::store(sr + j, p);
      }
      Tr::store(dr + j, Tr::sel(ok, p * (dp - vD), vzero));
    }
  }
  if (a.dv) pv<Is>(PVArgs<S>{a.dv, a.dp, a.s, 1, a.np, a.dout, a.dp, a.n, a.dp, a.m});  // dV += (P Z)^T dout
  if (a.dk) pv<Is>(PVArgs<S>{a.dk, a.dp, a.ds, 1, a.np, a.q, a.dp, a.n, a.dp, a.m});     // dK += dS^T Q
  if (a.dq) pv<Is>(PVArgs<S>{a.dq, a.dp, a.ds, a.np, 1, a.k, a.dp, a.m, a.dp, a.n});     // dQ += dS K
}

// out[r] = sum_c a[r, c] b[r, c] (rows of dp elements)
template <class Is>
CVINL void rowdot_body(const typename Is::Tr::S* a, const typename Is::Tr::S* b, int64_t m, int64_t dp,
                       typename Is::Tr::S* out) {
  using Tr = typename Is::Tr;
  using V = typename Tr::V;
  constexpr int W = Tr::W;
  for (int64_t r = 0; r < m; ++r) {
    V acc = Tr::splat(0);
    for (int64_t c = 0; c < dp; c += W) acc += Tr::load(a + r * dp + c) * Tr::load(b + r * dp + c);
    out[r] = Tr::hsum(acc);
  }
}

// Per-ISA entry points of the fp32 bodies (csrc/cpu/isa_dispatch.h), each with its own vector width and
// register tiles.
#define VLOPS_COATT_ENTRY(NAME, ARGS, BODY, CALLARGS)           \
  void NAME##_generic ARGS { BODY<IsaGeneric> CALLARGS; }      \
  VLOPS_COATT_ENTRY_X86(NAME, ARGS, BODY, CALLARGS)
#if VLOPS_ISA_X86
#define VLOPS_COATT_ENTRY_X86(NAME, ARGS, BODY, CALLARGS)      \
  VLOPS_ISA_AVX2 void NAME##_avx2 ARGS { BODY<IsaAvx2> CALLARGS; } \
  VLOPS_ISA_AVX512 void NAME##_avx512 ARGS { BODY<IsaAvx512> CALLARGS; }
#else
#define VLOPS_COATT_ENTRY_X86(NAME, ARGS, BODY, CALLARGS)
#endif

VLOPS_COATT_ENTRY(fwd_block_f32, (const FwdBlk<float>& a), fwd_block_body, (a))
VLOPS_COATT_ENTRY(bwd_block_f32, (const BwdBlk<float>& a), bwd_block_body, (a))
VLOPS_COATT_ENTRY(rowdot_f32, (const float* a, const float* b, int64_t m, int64_t dp, float* out), rowdot_body,
                  (a, b, m, dp, out))

void fwd_block(int isa, const FwdBlk<float>& a) { VLOPS_ISA_DISPATCH(isa, fwd_block_f32, a); }
void fwd_block(int, const FwdBlk<double>& a) { fwd_block_body<IsaF64>(a); }
void bwd_block(int isa, const BwdBlk<float>& a) { VLOPS_ISA_DISPATCH(isa, bwd_block_f32, a); }
void bwd_block(int, const BwdBlk<double>& a) { bwd_block_body<IsaF64>(a); }
void rowdot(int isa, const float* a, const float* b, int64_t m, int64_t dp, float* out) {
  VLOPS_ISA_DISPATCH(isa, rowdot_f32, a, b, m, dp, out);
}
void rowdot(int, const double* a, const double* b, int64_t m, int64_t dp, double* out) {
  rowdot_body<IsaF64>(a, b, m, dp, out);
}

// ------------------------------------------------------------------------------------------------
// Dropout multipliers: Philox4x32-10 on 8 counters at once
// ------------------------------------------------------------------------------------------------
// The same rounds as ds::philox4x32_10 (csrc/diffusion_step_coef.h), one counter per 64-bit lane (the
// 32 x 32 -> 64-bit products of a round are then plain lane multiplies).
typedef uint64_t vq8 __attribute__((vector_size(64)));

CVINL vq8 philox10_x8(vq8 c0, vq8 c1, vq8 c2, vq8 c3, uint32_t k0, uint32_t k1) {  // -> the first words
  const uint64_t lo = 0xFFFFFFFFull;
  for (int r = 0; r < 10; ++r) {
    // (the masks before the products let the compiler use 32 x 32 -> 64-bit lane multiplies)
    const vq8 p0 = (c0 & lo) * (uint64_t)ds::PHILOX_M0, p1 = (c2 & lo) * (uint64_t)ds::PHILOX_M1;
    c0 = (p1 >> 32) ^ c1 ^ (uint64_t)k0;
    c2 = (p0 >> 32) ^ c3 ^ (uint64_t)k1;
    c1 = p1;
    c3 = p0;
    k0 += ds::PHILOX_W0;
    k1 += ds::PHILOX_W1;
  }
  return c0 & lo;
}

struct DropArgs {
  void* z;        // [m, ld] float (double when dbl)
  bool dbl;
  int64_t ld, m, n;
  int64_t i0;     // query index of row 0
  const int32_t* keys;  // [n] key indices
  uint32_t bh, dir, k0, k1;
  uint32_t kmin;  // keep iff (x0 >> 8) >= kmin (the float32 compare uniform(x0) >= dropout_p, see Dropout)
  double mult;    // 1 / (1 - dropout_p)
};

// z[r, t] = keep(query i0 + r, key keys[t]) * mult (fp32); columns n .. ld - 1 zero (ld: a multiple of 16).
// Each row takes 16 keys at a time as two independent groups of 8 lanes (the rounds are a dependency
// chain: two keep the multipliers busy); the keep bits become the multipliers by lane masks.
typedef int64_t vl8 __attribute__((vector_size(64)));
typedef int32_t vi8h __attribute__((vector_size(32)));
typedef float vf8h __attribute__((vector_size(32)));

CVINL void store_keep(float* z, vl8 keep, float mult) {
  const vi8h m = __builtin_convertvector(keep, vi8h);  // -1 / 0 per lane
  int32_t bits;
  std::memcpy(&bits, &mult, sizeof(bits));
  const vf8h v = (vf8h)(m & bits);
  std::memcpy(z, &v, sizeof(v));
}
CVINL void dropout_rows(const DropArgs& a, float* z) {
  const float mult = (float)a.mult;
  const vq8 bh = vq8{} + (uint64_t)a.bh, dir = vq8{} + (uint64_t)a.dir;
  const vl8 kmin = vl8{} + (int64_t)a.kmin;
  const vl8 iota = {0, 1, 2, 3, 4, 5, 6, 7};
  for (int64_t r = 0; r < a.m; ++r) {
    float* zr = z + r * a.ld;
    const vq8 row = vq8{} + (uint64_t)(uint32_t)(a.i0 + r);
    for (int64_t t0 = 0; t0 < a.n; t0 += 16) {
      uint64_t key[16];
      for (int l = 0; l < 16; ++l) key[l] = t0 + l < a.n ? (uint32_t)a.keys[t0 + l] : 0u;
      vq8 ka, kb;
      std::memcpy(&ka, key, sizeof(ka));
      std::memcpy(&kb, key + 8, sizeof(kb));
      const vq8 xa = philox10_x8(ka, row, bh, dir, a.k0, a.k1);
      const vq8 xb = philox10_x8(kb, row, bh, dir, a.k0, a.k1);
      const vl8 in_a = (iota + t0) < a.n, in_b = (iota + (t0 + 8)) < a.n;
      store_keep(zr + t0, ((vl8)(xa >> 8) >= kmin) & in_a, mult);  // (< 2**24: a signed compare)
      store_keep(zr + t0 + 8, ((vl8)(xb >> 8) >= kmin) & in_b, mult);
    }
    for (int64_t t = round_up(a.n, 16); t < a.ld; ++t) zr[t] = 0.0f;
  }
}

// The same multipliers one pair at a time with the scalar ds::philox4x32_10: GCC lowers the 64-bit lane
// products of the vector version to long shift / add sequences without AVX-512 (no vpmullq).
template <class S>
void dropout_rows_scalar(const DropArgs& a, S* z) {
  const S mult = (S)a.mult;
  for (int64_t r = 0; r < a.m; ++r) {
    S* zr = z + r * a.ld;
    for (int64_t t = 0; t < a.n; ++t) {
      uint32_t c0 = (uint32_t)a.keys[t], c1 = (uint32_t)(a.i0 + r), c2 = a.bh, c3 = a.dir;
      ds::philox4x32_10(c0, c1, c2, c3, a.k0, a.k1);
      zr[t] = (c0 >> 8) >= a.kmin ? mult : (S)0;
    }
    for (int64_t t = a.n; t < a.ld; ++t) zr[t] = (S)0;
  }
}

#if VLOPS_ISA_X86
VLOPS_ISA_AVX512 void dropout_tile_avx512(const DropArgs& a) { dropout_rows(a, static_cast<float*>(a.z)); }
#endif

void dropout_tile(int isa, const DropArgs& a) {
#if VLOPS_ISA_X86
  if (isa == ISA_AVX512 && !a.dbl && a.ld % 16 == 0) {
    dropout_tile_avx512(a);
    return;
  }
#endif
  if (a.dbl)
    dropout_rows_scalar<double>(a, static_cast<double*>(a.z));
  else
    dropout_rows_scalar<float>(a, static_cast<float*>(a.z));
}

// ------------------------------------------------------------------------------------------------
// fp16 <-> fp32 rows with the F16C instructions (AVX2 / AVX-512 machines); the portable baseline uses
// c10::Half's conversions. Both are exact one way and round to nearest even the other.
// ------------------------------------------------------------------------------------------------
#if VLOPS_ISA_X86
typedef _Float16 vh8 __attribute__((vector_size(16)));

VLOPS_ISA_AVX2 void half_to_float_f16c(const c10::Half* s, float* o, int64_t n) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    vh8 x;
    std::memcpy(&x, s + c, sizeof(x));
    const vf8 y = __builtin_convertvector(x, vf8);
    std::memcpy(o + c, &y, sizeof(y));
  }
  for (; c < n; ++c) o[c] = static_cast<float>(s[c]);
}

VLOPS_ISA_AVX2 void float_to_half_f16c(const float* s, float mul, c10::Half* o, int64_t n) {
  int64_t c = 0;
  const vf8 m = vf8{} + mul;
  for (; c + 8 <= n; c += 8) {
    vf8 x;
    std::memcpy(&x, s + c, sizeof(x));
    const vh8 y = __builtin_convertvector(x * m, vh8);
    std::memcpy(o + c, &y, sizeof(y));
  }
  for (; c < n; ++c) o[c] = c10::Half(s[c] * mul);
}
#endif

// ------------------------------------------------------------------------------------------------
// Gathers (input dtype E -> compute type S, through the input's strides) and stores
// ------------------------------------------------------------------------------------------------
template <class S, class E>
inline S to_s(E x) {
  return static_cast<S>(static_cast<float>(x));
}
template <>
inline double to_s<double, double>(double x) {
  return x;
}

// Software prefetch of the bytes [p, p + bytes) (one row of an input), into all cache levels.
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

// dst[r, c] = src row (r0 + r) (rows[r] when rows is given), c < d; columns d .. ld - 1 zero. The rows of
// one head are H * d elements apart, each on its own page for typical shapes, where the hardware
// prefetchers stop: the rows PF ahead are prefetched, so their memory latencies overlap.
template <class S, class E>
void gather_rows(S* dst, int64_t ld, const E* src, int64_t sn, int64_t r0, const int32_t* rows, int64_t m,
                 int64_t d, int isa) {
  constexpr int64_t PF = 8;
  const int64_t bytes = d * (int64_t)sizeof(E);
  auto row = [&](int64_t r) { return src + (rows ? (int64_t)rows[r] : r0 + r) * sn; };
  for (int64_t r = 0; r < std::min(PF, m); ++r) prefetch_row(row(r), bytes);
  for (int64_t r = 0; r < m; ++r) {
    if (r + PF < m) prefetch_row(row(r + PF), bytes);
    const E* s = row(r);
    S* o = dst + r * ld;
    if constexpr (std::is_same<S, E>::value) {
      std::memcpy(o, s, sizeof(S) * d);
    } else {
#if VLOPS_ISA_X86
      if constexpr (std::is_same<E, c10::Half>::value) {
        if (isa != ISA_GENERIC) {
          half_to_float_f16c(s, o, d);
          for (int64_t c = d; c < ld; ++c) o[c] = (S)0;
          continue;
        }
      }
#endif
      for (int64_t c = 0; c < d; ++c) o[c] = to_s<S>(s[c]);
    }
    for (int64_t c = d; c < ld; ++c) o[c] = (S)0;
  }
}

// dst[c] = E(src[c] * mul), rounded once (nearest even for the 16-bit types). stream: fp32 / fp64 rows
// whose start is 16-byte aligned and length a multiple of 16 bytes go out with streaming (non-temporal)
// stores: large outputs then reach memory without first being read into the cache (the caller fences).
template <class S, class E>
inline void store_row(E* dst, const S* src, int64_t d, S mul, bool stream, int isa) {
  if constexpr (std::is_same<S, E>::value) {
#if VLOPS_ISA_X86
    if (stream && ((uintptr_t)dst & 15) == 0 && (d * (int64_t)sizeof(S)) % 16 == 0) {
      if constexpr (std::is_same<S, float>::value) {
        const __m128 m = _mm_set1_ps(mul);
        for (int64_t c = 0; c < d; c += 4) _mm_stream_ps(dst + c, _mm_mul_ps(_mm_loadu_ps(src + c), m));
      } else {
        const __m128d m = _mm_set1_pd(mul);
        for (int64_t c = 0; c < d; c += 2) _mm_stream_pd(dst + c, _mm_mul_pd(_mm_loadu_pd(src + c), m));
      }
      return;
    }
#endif
    if (mul == (S)1) {
      std::memcpy(dst, src, sizeof(S) * d);
      return;
    }
    for (int64_t c = 0; c < d; ++c) dst[c] = src[c] * mul;
  } else {
#if VLOPS_ISA_X86
    if constexpr (std::is_same<E, c10::Half>::value) {
      if (isa != ISA_GENERIC) {
        float_to_half_f16c(src, mul, dst, d);
        return;
      }
    }
#endif
    for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<E>(static_cast<float>(src[c] * mul));
  }
}

// orders this thread's streaming stores before whatever follows (the end of the parallel region)
inline void store_fence() {
#if VLOPS_ISA_X86
  _mm_sfence();
#endif
}

template <class E>
inline void zero_row(E* dst, int64_t d) {
  std::memset(static_cast<void*>(dst), 0, sizeof(E) * d);  // all-zero bits: +0 in every float type
}

// Operand rows in the compute type, gathered into a contiguous per-thread buffer (converted, zero-padded
// to dp, so the tiles need no tails). Gathered for fp32 too: the rows of one head in a [B, N, H, d] tensor
// are H * d elements apart, typically a multiple of 4 KiB (they would share a few L1 sets); each row is
// read from memory once and then from L1 by every tile that needs it.
template <class S, class E>
const S* rows_range(S* buf, const E* base, int64_t sn, int64_t r0, int64_t m, int64_t d, int64_t dp, int isa) {
  gather_rows<S, E>(buf, dp, base, sn, r0, nullptr, m, d, isa);
  return buf;
}

template <class S, class E>
const S* rows_list(S* buf, const E* base, int64_t sn, const int32_t* keys, int64_t n, int64_t d, int64_t dp,
                  int isa) {
  gather_rows<S, E>(buf, dp, base, sn, 0, keys, n, d, isa);
  return buf;
}

// ------------------------------------------------------------------------------------------------
// Keys per (b) of one direction
// ------------------------------------------------------------------------------------------------
template <class S>
struct KeySet {
  std::vector<int32_t> keys;     // the keys that take part, per b, concatenated
  std::vector<int64_t> off;      // [B + 1]
  std::vector<int32_t> invalid;  // mode 0: the others (their dk = dv = 0), per b, concatenated
  std::vector<int64_t> ioff;     // [B + 1]
  std::vector<S> bias;           // mode 1: [B, ldb] (0 valid, -10000 invalid; zero padding)
  int64_t ldb = 0;

  KeySet(const int32_t* len, const bool* mask, int64_t B, int64_t N, int64_t mode, int64_t W) {
    off.assign(B + 1, 0);
    ioff.assign(B + 1, 0);
    if (mode == 1) {
      ldb = round_up(N, W) + W;
      bias.assign(B * ldb, (S)0);
    }
    for (int64_t b = 0; b < B; ++b) {
      const int64_t L = len[b];
      for (int64_t j = 0; j < N; ++j) {
        const bool valid = j < L && (mask == nullptr || mask[b * N + j]);
        if (mode == 1) {
          keys.push_back((int32_t)j);
          if (!valid) bias[b * ldb + j] = (S)-10000.0;
        } else if (valid) {
          keys.push_back((int32_t)j);
        } else {
          invalid.push_back((int32_t)j);
        }
      }
      off[b + 1] = (int64_t)keys.size();
      ioff[b + 1] = (int64_t)invalid.size();
    }
  }
  int64_t count(int64_t b) const { return off[b + 1] - off[b]; }
  const int32_t* list(int64_t b) const { return keys.data() + off[b]; }
  const S* bias_row(int64_t b) const { return bias.empty() ? nullptr : bias.data() + b * ldb; }
};

// ------------------------------------------------------------------------------------------------
// One direction's tensors
// ------------------------------------------------------------------------------------------------
struct Strides {
  int64_t sb, sn, sh;
};
inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

template <class S, class E>
struct Side {
  const E *q, *k, *v;
  Strides qs, ks, vs;
  int64_t M, N;  // query rows, key rows
  const KeySet<S>* keys;
  uint32_t dir;
  // forward outputs ([B, M, H, d] contiguous; lse [B, H, M])
  E* out = nullptr;
  S* lse_out = nullptr;
  // backward inputs and outputs
  const E* dout = nullptr;
  Strides dos{};
  const E* o = nullptr;
  Strides os{};
  const S* lse = nullptr;
  E *dq = nullptr, *dk = nullptr, *dv = nullptr;  // dq [B, M, H, d], dk / dv [B, N, H, d] contiguous
};

// Dropout: keep_ij = uniform(x0) >= dropout_p, compared in float32 (dropout_p rounded to float32) with
// uniform(x) = (x >> 8) * 2**-24 + 2**-25 in float32 (vlops.reference.diffusion.uint32_to_uniform):
// uniform is non-decreasing in k = x >> 8, so the compare is k >= kmin for the least k that passes it.
struct Dropout {
  bool on = false;
  uint32_t kmin = 0;
  double mult = 1.0;  // 1 / (1 - dropout_p), formed in double
  uint32_t k0 = 0, k1 = 0;
};

inline float uniform_of(uint32_t k) {  // the float32 uniform of x with x >> 8 = k (the product is exact)
  return (float)k * 5.9604644775390625e-08f + 2.98023223876953125e-08f;
}

inline uint32_t keep_threshold(double dropout_p) {
  const float p = (float)dropout_p;
  uint32_t lo = 0, hi = 1u << 24;  // the least k in [lo, hi] with uniform_of(k) >= p (hi: none)
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (uniform_of(mid) >= p)
      hi = mid;
    else
      lo = mid + 1;
  }
  return lo;
}

struct Common {
  int64_t B, H, d, dp, W;
  bool stream;  // outputs of at least kStreamBytes: streaming stores
  int64_t BM, BN;
  double scale;
  Dropout drop;
  int isa;
};

template <class S>
DropArgs drop_args(const Common& c, S* z, int64_t ld, int64_t m, int64_t n, int64_t i0, const int32_t* keys,
                   int64_t bh, uint32_t dir) {
  return DropArgs{z, std::is_same<S, double>::value, ld, m, n, i0, keys, (uint32_t)bh, dir, c.drop.k0, c.drop.k1,
                  c.drop.kmin, c.drop.mult};
}

// Outputs of at least this many bytes (a few MiB: beyond what a core's L2 keeps for the next reader) are
// written with streaming stores.
constexpr int64_t kStreamBytes = (int64_t)4 << 20;

// aligned scratch, one per thread
template <class S>
struct Buf {
  S* p = nullptr;
  explicit Buf(int64_t n) {
    const size_t bytes = (size_t)round_up(std::max<int64_t>(n, 1) * (int64_t)sizeof(S), 64);
    p = static_cast<S*>(std::aligned_alloc(64, bytes));
    if (!p) throw std::bad_alloc();
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { std::free(p); }
};

// The block sizes: BM query rows, BN keys (VLOPS_COATTENTION_TILES="BM,BN" overrides them).
inline void block_sizes(int64_t dp, int64_t& BM, int64_t& BN) {
  BM = std::max<int64_t>(8, std::min<int64_t>(64, 16384 / dp));
  BN = std::max<int64_t>(16, std::min<int64_t>(256, 16384 / dp / 16 * 16));
  if (const char* e = std::getenv("VLOPS_COATTENTION_TILES")) {
    long bm = 0, bn = 0;
    if (std::sscanf(e, "%ld,%ld", &bm, &bn) == 2 && bm >= 1 && bn >= 1) {
      BM = bm;
      BN = bn;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
template <class S>
struct FwdScratch {
  Buf<S> q, k, v, s, z, o, rmax, rsum;
  FwdScratch(const Common& c)
      : q(c.BM * c.dp),
        k(c.BN * c.dp),
        v(c.BN * c.dp),
        s(c.BM * round_up(c.BN, c.W)),
        z(c.drop.on ? c.BM * round_up(c.BN, c.W) : 1),
        o(c.BM * c.dp),
        rmax(c.BM),
        rsum(c.BM) {}
};

struct FwdItem {
  int64_t dir, b, h, q0, q1, cost;
};

template <class S, class E>
void fwd_item(const Common& c, const Side<S, E>& sd, const FwdItem& it, FwdScratch<S>& w) {
  const int64_t b = it.b, h = it.h, q0 = it.q0, m = it.q1 - it.q0, d = c.d, dp = c.dp, H = c.H;
  const int64_t L = sd.keys->count(b);
  const int32_t* klist = sd.keys->list(b);
  E* out = sd.out + (b * sd.M * H + h) * d;  // row stride H * d
  S* lse = sd.lse_out + (b * H + h) * sd.M;
  if (L == 0) {  // no valid key (mode 0): out = 0, lse = -inf
    for (int64_t r = q0; r < q0 + m; ++r) {
      zero_row(out + r * H * d, d);
      lse[r] = -std::numeric_limits<S>::infinity();
    }
    return;
  }
  const S* q = rows_range<S, E>(w.q.p, sd.q + b * sd.qs.sb + h * sd.qs.sh, sd.qs.sn, q0, m, d, dp, c.isa);
  std::fill(w.o.p, w.o.p + m * dp, (S)0);
  std::fill(w.rmax.p, w.rmax.p + m, -std::numeric_limits<S>::infinity());
  std::fill(w.rsum.p, w.rsum.p + m, (S)0);
  const E* kb = sd.k + b * sd.ks.sb + h * sd.ks.sh;
  const E* vb = sd.v + b * sd.vs.sb + h * sd.vs.sh;
  const S* bias = sd.keys->bias_row(b);
  for (int64_t k0 = 0; k0 < L; k0 += c.BN) {
    const int64_t n = std::min(c.BN, L - k0), np = round_up(n, c.W);
    const int32_t* kk = klist + k0;
    const S* k = rows_list<S, E>(w.k.p, kb, sd.ks.sn, kk, n, d, dp, c.isa);
    const S* v = rows_list<S, E>(w.v.p, vb, sd.vs.sn, kk, n, d, dp, c.isa);
    if (c.drop.on) dropout_tile(c.isa, drop_args<S>(c, w.z.p, np, m, n, q0, kk, b * H + h, sd.dir));
    FwdBlk<S> a{q,     k,     v,      c.drop.on ? w.z.p : nullptr, bias ? bias + k0 : nullptr,
                w.s.p, w.o.p, w.rmax.p, w.rsum.p,                    m,
                n,     np,    dp,       (S)c.scale};
    fwd_block(c.isa, a);
  }
  for (int64_t r = 0; r < m; ++r) {
    const S l = w.rsum.p[r];
    store_row<S, E>(out + (q0 + r) * H * d, w.o.p + r * dp, d, (S)1 / l, c.stream, c.isa);
    lse[q0 + r] = w.rmax.p[r] + (S)std::log(l);
  }
}

// Runs fn(item, scratch) over the items, largest cost first, on the threads of one at::parallel_for
// taking items from a shared counter (items own their outputs: the thread does not change the result).
template <class Item, class MakeScratch, class Fn>
void run_items(std::vector<Item>& items, const MakeScratch& make, const Fn& fn) {
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
  const int64_t nitems = (int64_t)items.size();
  if (nitems == 0) return;
  const int64_t nthreads = std::min<int64_t>(nitems, std::max(1, at::get_num_threads()));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    auto scratch = make();
    for (int64_t i = next.fetch_add(1); i < nitems; i = next.fetch_add(1)) fn(items[(size_t)i], *scratch);
    store_fence();
  });
}

template <class S, class E>
void fwd_impl(const Common& c, const Side<S, E>* sides) {
  std::vector<FwdItem> items;
  for (int64_t dir = 0; dir < 2; ++dir) {
    const Side<S, E>& sd = sides[dir];
    const int64_t nqb = ceil_div(sd.M, c.BM);
    for (int64_t b = 0; b < c.B; ++b) {
      const int64_t L = sd.keys->count(b);
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t qb = 0; qb < nqb; ++qb) {
          const int64_t q0 = qb * sd.M / nqb, q1 = (qb + 1) * sd.M / nqb;
          items.push_back({dir, b, h, q0, q1, (q1 - q0) * (L + 4)});
        }
    }
  }
  run_items(
      items, [&]() { return std::make_unique<FwdScratch<S>>(c); },
      [&](const FwdItem& it, FwdScratch<S>& w) { fwd_item<S, E>(c, sides[it.dir], it, w); });
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------
template <class S>
struct BwdScratch {
  Buf<S> q, dout, dq, D, k, v, dk, dv, s, ds, z;
  BwdScratch(const Common& c, int64_t max_rows)
      : q(max_rows * c.dp),
        dout(max_rows * c.dp),
        dq(max_rows * c.dp),
        D(max_rows),
        k(c.BN * c.dp),
        v(c.BN * c.dp),
        dk(c.BN * c.dp),
        dv(c.BN * c.dp),
        s(c.BM * round_up(c.BN, c.W)),
        ds(c.BM * round_up(c.BN, c.W)),
        z(c.drop.on ? c.BM * round_up(c.BN, c.W) : 1) {}
};

struct BwdItem {
  int64_t dir, b, h;
  int64_t k0, k1;  // listed keys k0 .. k1 - 1
  int64_t q0, q1;  // query rows
  bool do_kv, do_q, zero_invalid;
  int64_t cost;
};

template <class S, class E>
void bwd_item(const Common& c, const Side<S, E>& sd, const BwdItem& it, BwdScratch<S>& w) {
  const int64_t b = it.b, h = it.h, d = c.d, dp = c.dp, H = c.H;
  const int64_t q0 = it.q0, mq = it.q1 - it.q0;
  const int32_t* klist = sd.keys->list(b);
  const S* lse = sd.lse + (b * H + h) * sd.M + q0;
  const S* bias = sd.keys->bias_row(b);
  const E* kb = sd.k + b * sd.ks.sb + h * sd.ks.sh;
  const E* vb = sd.v + b * sd.vs.sb + h * sd.vs.sh;
  const int64_t orow = H * d;  // row stride of the contiguous gradients
  E* dqo = sd.dq + (b * sd.M * H + h) * d;
  E* dko = sd.dk + (b * sd.N * H + h) * d;
  E* dvo = sd.dv + (b * sd.N * H + h) * d;

  if (it.do_kv && it.zero_invalid) {
    for (int64_t t = sd.keys->ioff[b]; t < sd.keys->ioff[b + 1]; ++t) {
      const int64_t j = sd.keys->invalid[t];
      zero_row(dko + j * orow, d);
      zero_row(dvo + j * orow, d);
    }
  }
  const S *q = nullptr, *dout = nullptr;
  if (it.k1 > it.k0) {
    // the item's query rows: Q, dout, and D = rowsum(dout * out) (out gathered into the dq buffer if needed)
    q = rows_range<S, E>(w.q.p, sd.q + b * sd.qs.sb + h * sd.qs.sh, sd.qs.sn, q0, mq, d, dp, c.isa);
    dout = rows_range<S, E>(w.dout.p, sd.dout + b * sd.dos.sb + h * sd.dos.sh, sd.dos.sn, q0, mq, d, dp, c.isa);
    const S* o = rows_range<S, E>(w.dq.p, sd.o + b * sd.os.sb + h * sd.os.sh, sd.os.sn, q0, mq, d, dp, c.isa);
    rowdot(c.isa, dout, o, mq, dp, w.D.p);
  }
  if (it.do_q) std::fill(w.dq.p, w.dq.p + mq * dp, (S)0);

  for (int64_t k0 = it.k0; k0 < it.k1; k0 += c.BN) {
    const int64_t n = std::min(c.BN, it.k1 - k0), np = round_up(n, c.W);
    const int32_t* kk = klist + k0;
    const S* k = rows_list<S, E>(w.k.p, kb, sd.ks.sn, kk, n, d, dp, c.isa);
    const S* v = rows_list<S, E>(w.v.p, vb, sd.vs.sn, kk, n, d, dp, c.isa);
    if (it.do_kv) {
      std::fill(w.dk.p, w.dk.p + n * dp, (S)0);
      std::fill(w.dv.p, w.dv.p + n * dp, (S)0);
    }
    for (int64_t r0 = 0; r0 < mq; r0 += c.BM) {
      const int64_t m = std::min(c.BM, mq - r0);
      if (c.drop.on) dropout_tile(c.isa, drop_args<S>(c, w.z.p, np, m, n, q0 + r0, kk, b * H + h, sd.dir));
      BwdBlk<S> a{q + r0 * dp,
                  dout + r0 * dp,
                  w.D.p + r0,
                  lse + r0,
                  k,
                  v,
                  c.drop.on ? w.z.p : nullptr,
                  bias ? bias + k0 : nullptr,
                  w.s.p,
                  w.ds.p,
                  it.do_q ? w.dq.p + r0 * dp : nullptr,
                  it.do_kv ? w.dk.p : nullptr,
                  it.do_kv ? w.dv.p : nullptr,
                  m,
                  n,
                  np,
                  dp,
                  (S)c.scale};
      bwd_block(c.isa, a);
    }
    if (it.do_kv) {
      for (int64_t t = 0; t < n; ++t) {
        store_row<S, E>(dko + (int64_t)kk[t] * orow, w.dk.p + t * dp, d, (S)c.scale, c.stream, c.isa);
        store_row<S, E>(dvo + (int64_t)kk[t] * orow, w.dv.p + t * dp, d, (S)1, c.stream, c.isa);
      }
    }
  }
  if (it.do_q) {
    for (int64_t r = 0; r < mq; ++r)
      store_row<S, E>(dqo + (q0 + r) * orow, w.dq.p + r * dp, d, (S)c.scale, c.stream, c.isa);
  }
}

template <class S, class E>
void bwd_impl(const Common& c, const Side<S, E>* sides) {
  const int64_t T = std::max(1, at::get_num_threads());
  const int64_t pairs = 2 * c.B * c.H;
  int64_t want = pairs >= 4 * T ? 1 : ceil_div(4 * T, pairs);
  if (const char* e = std::getenv("VLOPS_COATTENTION_BWD_SPLIT")) {
    const long v = std::atol(e);
    if (v >= 1) want = v;
  }
  std::vector<BwdItem> items;
  int64_t max_rows = 1;
  for (int64_t dir = 0; dir < 2; ++dir) {
    const Side<S, E>& sd = sides[dir];
    for (int64_t b = 0; b < c.B; ++b) {
      const int64_t L = sd.keys->count(b), M = sd.M;
      const int64_t kc = std::max<int64_t>(1, std::min(want, ceil_div(L, c.BN)));
      const int64_t qc = std::min(want, ceil_div(M, c.BM));
      const bool split = want > 1 && L > 0 && (kc > 1 || qc > 1);
      for (int64_t h = 0; h < c.H; ++h) {
        if (!split) {
          items.push_back({dir, b, h, 0, L, 0, M, true, true, true, M * (L + 4)});
          max_rows = std::max(max_rows, M);
          continue;
        }
        for (int64_t t = 0; t < kc; ++t) {  // dk, dv of a key chunk, over every query row
          const int64_t k0 = t * L / kc, k1 = (t + 1) * L / kc;
          items.push_back({dir, b, h, k0, k1, 0, M, true, false, t == 0, M * (k1 - k0 + 4)});
        }
        max_rows = std::max(max_rows, M);
        for (int64_t t = 0; t < qc; ++t) {  // dq of a query chunk, over every key
          const int64_t r0 = t * M / qc, r1 = (t + 1) * M / qc;
          items.push_back({dir, b, h, 0, L, r0, r1, false, true, false, (r1 - r0) * (L + 4)});
        }
      }
    }
  }
  run_items(
      items, [&]() { return std::make_unique<BwdScratch<S>>(c, max_rows); },
      [&](const BwdItem& it, BwdScratch<S>& w) { bwd_item<S, E>(c, sides[it.dir], it, w); });
}

// ------------------------------------------------------------------------------------------------
// Argument checks
// ------------------------------------------------------------------------------------------------
inline const char* dtname(const at::Tensor& t) { return c10::toString(t.scalar_type()); }

struct Dims {
  int64_t B, Nt, Nv, H, d;
  at::ScalarType dt;
};

void check_bnhd(const char* fn, const at::Tensor& t, const char* nm, const at::Tensor& ref, const char* ref_nm,
                int64_t B, int64_t N, int64_t H, int64_t d) {
  VLOPS_CHECK(t.defined(), fn, nm, " is undefined");
  VLOPS_CHECK(t.device().is_cpu(), fn, nm, " must be a CPU tensor, got one on ", t.device());
  VLOPS_CHECK(t.scalar_type() == ref.scalar_type(), fn, nm, " has dtype ", dtname(t), " but ", ref_nm,
              " has dtype ", dtname(ref), "; they must match");
  VLOPS_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == N && t.size(2) == H && t.size(3) == d, fn, nm,
              " must have shape [B, N, H, d] = [", B, ", ", N, ", ", H, ", ", d, "], got ", t.sizes());
  VLOPS_CHECK(t.stride(3) == 1 || t.size(3) == 1, fn, nm, " must have stride(-1) == 1 (any other strides), got "
              "strides ", t.strides());
}

void check_len_mask(const char* fn, const at::Tensor& len, const char* lnm, const c10::optional<at::Tensor>& mask,
                    const char* mnm, int64_t B, int64_t N) {
  VLOPS_CHECK(len.defined(), fn, lnm, " is undefined");
  VLOPS_CHECK(len.device().is_cpu(), fn, lnm, " must be a CPU tensor, got one on ", len.device());
  VLOPS_CHECK(len.scalar_type() == at::kInt, fn, lnm, " must be int32, got ", dtname(len));
  VLOPS_CHECK(len.dim() == 1 && len.size(0) == B, fn, lnm, " must have shape [B] = [", B, "], got ", len.sizes());
  VLOPS_CHECK(len.is_contiguous(), fn, lnm, " must be contiguous");
  const int32_t* l = len.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    VLOPS_CHECK(l[b] >= 0 && l[b] <= N, fn, lnm, " values must be in [0, ", N, "], got ", (int64_t)l[b],
                " at index ", b);
  if (!mask.has_value() || !mask->defined()) return;
  const at::Tensor& m = *mask;
  VLOPS_CHECK(m.device().is_cpu(), fn, mnm, " must be a CPU tensor, got one on ", m.device());
  VLOPS_CHECK(m.scalar_type() == at::kBool, fn, mnm, " must be bool (True = keep), got ", dtname(m));
  VLOPS_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == N, fn, mnm, " must have shape [B, N] = [", B, ", ", N,
              "], got ", m.sizes());
  VLOPS_CHECK(m.is_contiguous(), fn, mnm, " must be contiguous");
}

Dims check_fwd_args(const char* fn, const at::Tensor& tq, const at::Tensor& tk, const at::Tensor& tv,
                    const at::Tensor& iq, const at::Tensor& ik, const at::Tensor& iv, const at::Tensor& t_len,
                    const at::Tensor& i_len, const c10::optional<at::Tensor>& t_mask,
                    const c10::optional<at::Tensor>& i_mask, double scale, int64_t mask_mode, double dropout_p,
                    int64_t seed) {
  VLOPS_CHECK(tq.defined(), fn, "tq is undefined");
  VLOPS_CHECK(tq.device().is_cpu(), fn, "tq must be a CPU tensor, got one on ", tq.device());
  const auto dt = tq.scalar_type();
  VLOPS_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, fn,
              "tq must be float32, float16, bfloat16 or float64, got ", dtname(tq));
  VLOPS_CHECK(tq.dim() == 4, fn, "tq must be 4-D [B, Nt, H, d], got shape ", tq.sizes());
  VLOPS_CHECK(iq.defined() && iq.dim() == 4, fn, "iq must be 4-D [B, Nv, H, d], got ",
              iq.defined() ? iq.sizes() : c10::IntArrayRef());
  Dims s{tq.size(0), tq.size(1), iq.size(1), tq.size(2), tq.size(3), dt};
  VLOPS_CHECK(s.B >= 1 && s.Nt >= 1 && s.H >= 1 && s.d >= 1, fn,
              "tq must have B, Nt, H, d >= 1, got shape ", tq.sizes());
  VLOPS_CHECK(s.Nv >= 1, fn, "iq must have Nv >= 1, got shape ", iq.sizes());
  check_bnhd(fn, tq, "tq", tq, "tq", s.B, s.Nt, s.H, s.d);
  check_bnhd(fn, tk, "tk", tq, "tq", s.B, s.Nt, s.H, s.d);
  check_bnhd(fn, tv, "tv", tq, "tq", s.B, s.Nt, s.H, s.d);
  check_bnhd(fn, iq, "iq", tq, "tq", s.B, s.Nv, s.H, s.d);
  check_bnhd(fn, ik, "ik", tq, "tq", s.B, s.Nv, s.H, s.d);
  check_bnhd(fn, iv, "iv", tq, "tq", s.B, s.Nv, s.H, s.d);
  check_len_mask(fn, t_len, "t_len", t_mask, "t_mask", s.B, s.Nt);
  check_len_mask(fn, i_len, "i_len", i_mask, "i_mask", s.B, s.Nv);
  VLOPS_CHECK(std::isfinite(scale), fn, "scale must be finite, got ", scale);
  VLOPS_CHECK(mask_mode == 0 || mask_mode == 1, fn, "mask_mode must be 0 (zero) or 1 (vilbert), got ", mask_mode);
  VLOPS_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, fn, "dropout_p must be in [0, 1), got ", dropout_p);
  VLOPS_CHECK(seed >= 0, fn, "seed must be in [0, 2**63), got ", seed);
  return s;
}

void check_lse(const char* fn, const at::Tensor& t, const char* nm, at::ScalarType want, int64_t B, int64_t H,
               int64_t N) {
  VLOPS_CHECK(t.defined(), fn, nm, " is undefined");
  VLOPS_CHECK(t.device().is_cpu(), fn, nm, " must be a CPU tensor, got one on ", t.device());
  VLOPS_CHECK(t.scalar_type() == want, fn, nm, " must be ", c10::toString(want), ", got ", dtname(t));
  VLOPS_CHECK(t.dim() == 3 && t.size(0) == B && t.size(1) == H && t.size(2) == N, fn, nm,
              " must have shape [B, H, N] = [", B, ", ", H, ", ", N, "], got ", t.sizes());
  VLOPS_CHECK(t.is_contiguous(), fn, nm, " must be contiguous");
}

inline const bool* mask_ptr(const c10::optional<at::Tensor>& m) {
  return (m.has_value() && m->defined()) ? m->data_ptr<bool>() : nullptr;
}

Common make_common(const Dims& s, double scale, double dropout_p, int64_t seed) {
  Common c;
  c.B = s.B;
  c.H = s.H;
  c.d = s.d;
  c.W = s.dt == at::kDouble ? 1 : 16;
  c.dp = round_up(s.d, c.W);
  block_sizes(c.dp, c.BM, c.BN);
  c.scale = scale;
  c.stream = false;  // set by the launchers from their output sizes
  c.drop.on = dropout_p > 0.0;
  c.drop.kmin = keep_threshold(dropout_p);
  c.drop.mult = 1.0 / (1.0 - dropout_p);
  c.drop.k0 = (uint32_t)((uint64_t)seed & 0xFFFFFFFFu);
  c.drop.k1 = (uint32_t)((uint64_t)seed >> 32);
  c.isa = s.dt == at::kDouble ? ISA_GENERIC : current_isa();
  return c;
}

template <class S, class E>
void fill_inputs(Side<S, E>* sd, const at::Tensor& tq, const at::Tensor& tk, const at::Tensor& tv,
                 const at::Tensor& iq, const at::Tensor& ik, const at::Tensor& iv, const KeySet<S>& t_keys,
                 const KeySet<S>& i_keys) {
  // dir 0: text queries over image keys / values; dir 1: image queries over text keys / values
  const at::Tensor* qs[2] = {&tq, &iq};
  const at::Tensor* ks[2] = {&ik, &tk};
  const at::Tensor* vs[2] = {&iv, &tv};
  for (int dir = 0; dir < 2; ++dir) {
    sd[dir].q = reinterpret_cast<const E*>(qs[dir]->data_ptr());
    sd[dir].k = reinterpret_cast<const E*>(ks[dir]->data_ptr());
    sd[dir].v = reinterpret_cast<const E*>(vs[dir]->data_ptr());
    sd[dir].qs = strides_of(*qs[dir]);
    sd[dir].ks = strides_of(*ks[dir]);
    sd[dir].vs = strides_of(*vs[dir]);
    sd[dir].M = qs[dir]->size(1);
    sd[dir].N = ks[dir]->size(1);
    sd[dir].keys = dir == 0 ? &i_keys : &t_keys;
    sd[dir].dir = (uint32_t)dir;
  }
}

template <class S, class E>
void fwd_typed(const Dims& s, const Common& c, const at::Tensor& tq, const at::Tensor& tk, const at::Tensor& tv,
               const at::Tensor& iq, const at::Tensor& ik, const at::Tensor& iv, const at::Tensor& t_len,
               const at::Tensor& i_len, const c10::optional<at::Tensor>& t_mask,
               const c10::optional<at::Tensor>& i_mask, int64_t mode, at::Tensor& t_out, at::Tensor& i_out,
               at::Tensor& t_lse, at::Tensor& i_lse) {
  const KeySet<S> t_keys(t_len.data_ptr<int32_t>(), mask_ptr(t_mask), s.B, s.Nt, mode, c.W);
  const KeySet<S> i_keys(i_len.data_ptr<int32_t>(), mask_ptr(i_mask), s.B, s.Nv, mode, c.W);
  Side<S, E> sd[2];
  fill_inputs<S, E>(sd, tq, tk, tv, iq, ik, iv, t_keys, i_keys);
  sd[0].out = reinterpret_cast<E*>(t_out.data_ptr());
  sd[0].lse_out = t_lse.data_ptr<S>();
  sd[1].out = reinterpret_cast<E*>(i_out.data_ptr());
  sd[1].lse_out = i_lse.data_ptr<S>();
  fwd_impl<S, E>(c, sd);
}

template <class S, class E>
void bwd_typed(const Dims& s, const Common& c, const at::Tensor& t_dout, const at::Tensor& i_dout,
               const at::Tensor& tq, const at::Tensor& tk, const at::Tensor& tv, const at::Tensor& iq,
               const at::Tensor& ik, const at::Tensor& iv, const at::Tensor& t_out, const at::Tensor& i_out,
               const at::Tensor& t_lse, const at::Tensor& i_lse, const at::Tensor& t_len, const at::Tensor& i_len,
               const c10::optional<at::Tensor>& t_mask, const c10::optional<at::Tensor>& i_mask, int64_t mode,
               at::Tensor* grads) {
  const KeySet<S> t_keys(t_len.data_ptr<int32_t>(), mask_ptr(t_mask), s.B, s.Nt, mode, c.W);
  const KeySet<S> i_keys(i_len.data_ptr<int32_t>(), mask_ptr(i_mask), s.B, s.Nv, mode, c.W);
  Side<S, E> sd[2];
  fill_inputs<S, E>(sd, tq, tk, tv, iq, ik, iv, t_keys, i_keys);
  const at::Tensor* douts[2] = {&t_dout, &i_dout};
  const at::Tensor* outs[2] = {&t_out, &i_out};
  const at::Tensor* lses[2] = {&t_lse, &i_lse};
  // grads: d_tq, d_tk, d_tv, d_iq, d_ik, d_iv; dir 0 owns d_tq, d_ik, d_iv, dir 1 d_iq, d_tk, d_tv
  at::Tensor* dqs[2] = {&grads[0], &grads[3]};
  at::Tensor* dks[2] = {&grads[4], &grads[1]};
  at::Tensor* dvs[2] = {&grads[5], &grads[2]};
  for (int dir = 0; dir < 2; ++dir) {
    sd[dir].dout = reinterpret_cast<const E*>(douts[dir]->data_ptr());
    sd[dir].dos = strides_of(*douts[dir]);
    sd[dir].o = reinterpret_cast<const E*>(outs[dir]->data_ptr());
    sd[dir].os = strides_of(*outs[dir]);
    sd[dir].lse = lses[dir]->data_ptr<S>();
    sd[dir].dq = reinterpret_cast<E*>(dqs[dir]->data_ptr());
    sd[dir].dk = reinterpret_cast<E*>(dks[dir]->data_ptr());
    sd[dir].dv = reinterpret_cast<E*>(dvs[dir]->data_ptr());
  }
  bwd_impl<S, E>(c, sd);
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Launchers (bound in csrc/bindings.cpp)
// ------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> co_attention_fwd_cpu(
    const at::Tensor& tq, const at::Tensor& tk, const at::Tensor& tv, const at::Tensor& iq, const at::Tensor& ik,
    const at::Tensor& iv, const at::Tensor& t_len, const at::Tensor& i_len, const c10::optional<at::Tensor>& t_mask,
    const c10::optional<at::Tensor>& i_mask, double scale, int64_t mask_mode, double dropout_p, int64_t seed) {
  constexpr const char* fn = "vlops co_attention_fwd_cpu: ";
  const Dims s = check_fwd_args(fn, tq, tk, tv, iq, ik, iv, t_len, i_len, t_mask, i_mask, scale, mask_mode,
                                dropout_p, seed);
  const auto opts = tq.options().memory_format(at::MemoryFormat::Contiguous);
  const auto lse_opts = at::TensorOptions().dtype(s.dt == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor t_out = at::empty({s.B, s.Nt, s.H, s.d}, opts), i_out = at::empty({s.B, s.Nv, s.H, s.d}, opts);
  at::Tensor t_lse = at::empty({s.B, s.H, s.Nt}, lse_opts), i_lse = at::empty({s.B, s.H, s.Nv}, lse_opts);
  Common c = make_common(s, scale, dropout_p, seed);
  c.stream = (t_out.nbytes() + i_out.nbytes()) >= kStreamBytes;
  switch (s.dt) {
    case at::kDouble:
      fwd_typed<double, double>(s, c, tq, tk, tv, iq, ik, iv, t_len, i_len, t_mask, i_mask, mask_mode, t_out, i_out,
                                t_lse, i_lse);
      break;
    case at::kFloat:
      fwd_typed<float, float>(s, c, tq, tk, tv, iq, ik, iv, t_len, i_len, t_mask, i_mask, mask_mode, t_out, i_out,
                              t_lse, i_lse);
      break;
    case at::kHalf:
      fwd_typed<float, c10::Half>(s, c, tq, tk, tv, iq, ik, iv, t_len, i_len, t_mask, i_mask, mask_mode, t_out,
                                  i_out, t_lse, i_lse);
      break;
    default:
      fwd_typed<float, c10::BFloat16>(s, c, tq, tk, tv, iq, ik, iv, t_len, i_len, t_mask, i_mask, mask_mode, t_out,
                                      i_out, t_lse, i_lse);
      break;
  }
  return {t_out, i_out, t_lse, i_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> co_attention_bwd_cpu(
    const at::Tensor& t_dout, const at::Tensor& i_dout, const at::Tensor& tq, const at::Tensor& tk,
    const at::Tensor& tv, const at::Tensor& iq, const at::Tensor& ik, const at::Tensor& iv, const at::Tensor& t_out,
    const at::Tensor& i_out, const at::Tensor& t_lse, const at::Tensor& i_lse, const at::Tensor& t_len,
    const at::Tensor& i_len, const c10::optional<at::Tensor>& t_mask, const c10::optional<at::Tensor>& i_mask,
    double scale, int64_t mask_mode, double dropout_p, int64_t seed) {
  constexpr const char* fn = "vlops co_attention_bwd_cpu: ";
  const Dims s = check_fwd_args(fn, tq, tk, tv, iq, ik, iv, t_len, i_len, t_mask, i_mask, scale, mask_mode,
                                dropout_p, seed);
  check_bnhd(fn, t_dout, "t_dout", tq, "tq", s.B, s.Nt, s.H, s.d);
  check_bnhd(fn, i_dout, "i_dout", tq, "tq", s.B, s.Nv, s.H, s.d);
  check_bnhd(fn, t_out, "t_out", tq, "tq", s.B, s.Nt, s.H, s.d);
  check_bnhd(fn, i_out, "i_out", tq, "tq", s.B, s.Nv, s.H, s.d);
  const auto lse_dt = s.dt == at::kDouble ? at::kDouble : at::kFloat;
  check_lse(fn, t_lse, "t_lse", lse_dt, s.B, s.H, s.Nt);
  check_lse(fn, i_lse, "i_lse", lse_dt, s.B, s.H, s.Nv);
  const auto opts = tq.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor g[6] = {at::empty({s.B, s.Nt, s.H, s.d}, opts), at::empty({s.B, s.Nt, s.H, s.d}, opts),
                     at::empty({s.B, s.Nt, s.H, s.d}, opts), at::empty({s.B, s.Nv, s.H, s.d}, opts),
                     at::empty({s.B, s.Nv, s.H, s.d}, opts), at::empty({s.B, s.Nv, s.H, s.d}, opts)};
  Common c = make_common(s, scale, dropout_p, seed);
  c.stream = 3 * (g[0].nbytes() + g[3].nbytes()) >= kStreamBytes;
  switch (s.dt) {
    case at::kDouble:
      bwd_typed<double, double>(s, c, t_dout, i_dout, tq, tk, tv, iq, ik, iv, t_out, i_out, t_lse, i_lse, t_len,
                                i_len, t_mask, i_mask, mask_mode, g);
      break;
    case at::kFloat:
      bwd_typed<float, float>(s, c, t_dout, i_dout, tq, tk, tv, iq, ik, iv, t_out, i_out, t_lse, i_lse, t_len,
                              i_len, t_mask, i_mask, mask_mode, g);
      break;
    case at::kHalf:
      bwd_typed<float, c10::Half>(s, c, t_dout, i_dout, tq, tk, tv, iq, ik, iv, t_out, i_out, t_lse, i_lse, t_len,
                                  i_len, t_mask, i_mask, mask_mode, g);
      break;
    default:
      bwd_typed<float, c10::BFloat16>(s, c, t_dout, i_dout, tq, tk, tv, iq, ik, iv, t_out, i_out, t_lse, i_lse,
                                      t_len, i_len, t_mask, i_mask, mask_mode, g);
      break;
  }
  return {g[0], g[1], g[2], g[3], g[4], g[5]};
}

}  // namespace cpu
}  // namespace vlops
