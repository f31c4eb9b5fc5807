// The fused ViT / CLIP patch stem on the CPU: patch_embed_fwd_cpu and patch_embed_bwd_cpu, the kernel
// contracts of vlops/ops/patch_embed.py (patch unfold + projection GEMM + bias + optional patch LayerNorm +
// position embedding + optional LayerNorm, written straight into rows R0.. of the token buffer; and its
// backward).
//
// Schedule. The B * Gh * Gw patch rows are cut into tiles of at most BM rows (BM = 256 in fp32 and the
// 16-bit types, 128 in fp64; VLOPS_PATCH_EMBED_BM overrides it, for tuning and tests). Images of at
// least BM / 2 patches are cut into ceil(N / BM) near-equal chunks each (more when there are fewer
// tiles than threads), so a tile never straddles two images; smaller images are grouped whole, k
// images per tile. The threads of one at::parallel_for take tiles from a shared counter; per tile:
//   1. gather: the tile's patches are packed from `images`, read in place with its strides, into a
//      per-thread [rows, K] buffer, column k = (c * P + ph) * P + pw (conv_weight.reshape(D, -1)).
//      The loop runs over (c, ph) outside and the patches of one grid row inside, so an image row is
//      read front to back; a run of P pixels is one memcpy when the W stride is 1 (NCHW and slices),
//      a strided loop otherwise (channels_last, any other layout). Pixels past H or W are zeros.
//      16-bit images are gathered raw, then converted to fp32 by one vectorised ATen copy_.
//   2. GEMM: tile[rows, D] = packed @ weight^T by at::mm_out (BLAS, single-threaded inside the
//      parallel region; 16-bit weights are converted to an fp32 copy once per call, [D, K] is small).
//      When the compute dtype is the output dtype and the tile's output rows are contiguous (one
//      image, or R0 == 0), the GEMM writes into `out` itself and the epilogue runs there in place;
//      otherwise into a per-thread [BM, D] tile, copied out per image afterwards (16-bit: rounded to
//      nearest even by ATen's vectorised float -> half / bfloat16 conversion).
//   3. epilogue, per row, on the fp32 (fp64) values while they are in cache: + bias (the pre-norm row
//      x0, also stored to x0_out when given), LayerNorm 1 (if use_pn), + pos[n], LayerNorm 2 (if
//      use_ln). Explicit 16-wide SIMD (GCC vector extensions) compiled for AVX-512, AVX2 and a portable
//      baseline, picked at run time like the other CPU kernels (vlops._C.set_cpu_isa / VLOPS_CPU_ISA);
//      fp64 is scalar code.
// Backward (patch_embed_bwd_cpu): the same tiles, dealt round-robin to one slot per thread (slot s takes
// tiles s, s + nslots, ...: deterministic at a fixed thread count). Per tile: gather (1.), recompute
// x0 = p W^T (2.; only when a LayerNorm is on: x0 feeds only their statistics; not at all when the
// forward's rows x0 are passed in, which are then read in place of the GEMM tile), copy the tile's grad
// rows (rows R0.. only) into a per-slot [BM, D] buffer in the compute
// dtype, then per row (bwd_rows, vectorised and ISA-dispatched like the epilogue): recompute the LayerNorm
// statistics and x-hats, LayerNorm 2 backward, d_pos[n] += g, LayerNorm 1 backward, d_bias += g, giving
// g0 in place; then d_weight_slot += g0^T p (addmm_) and, if need_images, dp = g0 W (into the packed
// buffer) scattered to the contiguous d_images (patches do not overlap; padding pixels are dropped).
// Per-slot partials (d_weight [D, K], d_pos [N, D], five [D] rows) are added in slot order at the end
// (slot 0 accumulates into the outputs).
// Memory beyond inputs and output (and x0_out / x0, the caller's): per thread a [BM, K] packed buffer, a
// [BM, D] tile (and a raw [BM, K] 16-bit buffer for 16-bit images), plus the fp32 weight copy for 16-bit
// inputs: no [B * Gh * Gw, K] unfold buffer ever exists. Rows 0 .. R0 - 1 of every image are left unwritten.
//
// Numerics: fp32 accumulation for fp32 / fp16 / bf16 inputs (products of 16-bit operands are exact in
// fp32), fp64 for fp64. LayerNorm statistics in the compute dtype (fp32 / fp64), two-pass: the mean,
// then the biased variance of the centred values (never E[x^2] - mean^2), each a sum over 16 lanes
// (one lane in fp64) reduced pairwise; rstd = 1 / sqrt(var + eps) is formed in double and rounded
// once; y = (x - mean) * rstd * w + b. The order of the adds is the contract's: (x + bias) + pos.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "diffusion_step_check.h"  // VLOPS_CHECK
#include "isa_dispatch.h"
#include "vec16.h"  // 16-lane vector helpers (silences -Wpsabi: no vector crosses a call boundary)

namespace vlops {
namespace cpu {

namespace {

using namespace vec16;  // csrc/cpu/vec16.h: vf, F32 / F64, splat, vload, vstore, hsum, ...

// ------------------------------------------------------------------------------------------------
// Epilogue: rows of the GEMM tile, in place
// ------------------------------------------------------------------------------------------------
template <class S>
struct Epi {
  S* x;             // tile row 0
  int64_t ld;       // tile row stride
  int64_t rows;
  int64_t n0;       // patch index (within its image) of tile row 0
  int64_t N;        // patches per image
  int64_t D;
  const S* bias;    // [D]; zeros when absent
  const S* pos;     // [N, D]; zeros [D] with pos_ld 0 when absent
  int64_t pos_ld;
  const S* pn_w;    // [D]; ones / zeros when absent
  const S* pn_b;
  const S* ln_w;
  const S* ln_b;
  const S* zeros;   // [D] zeros
  S* x0;            // x0 rows (row stride D) matching tile row 0: receives x + bias; null when not asked for
  double pn_eps, ln_eps;
  bool use_pn, use_ln;
};

// x = (src + a1) + a2 (src may be x); and x0 = src + a1 when x0 is not null; returns sum x
template <class Tr>
CVINL typename Tr::S add2_sum(typename Tr::S* x, const typename Tr::S* src, const typename Tr::S* a1,
                              const typename Tr::S* a2, typename Tr::S* x0, int64_t D) {
  using S = typename Tr::S;
  using V = typename Tr::V;
  constexpr int W = Tr::W;
  const int64_t Dv = D / W * W;
  V acc = splat((S)0);
  S tail = 0;
  if (x0) {
    for (int64_t j = 0; j < Dv; j += W) {
      const V u = vload(src + j) + vload(a1 + j);
      vstore(x0 + j, u);
      const V v = u + vload(a2 + j);
      vstore(x + j, v);
      acc += v;
    }
    for (int64_t j = Dv; j < D; ++j) {
      const S u = src[j] + a1[j];
      x0[j] = u;
      const S v = u + a2[j];
      x[j] = v;
      tail += v;
    }
  } else {
    for (int64_t j = 0; j < Dv; j += W) {
      const V v = (vload(src + j) + vload(a1 + j)) + vload(a2 + j);
      vstore(x + j, v);
      acc += v;
    }
    for (int64_t j = Dv; j < D; ++j) {
      const S v = (src[j] + a1[j]) + a2[j];
      x[j] = v;
      tail += v;
    }
  }
  return hsum(acc) + tail;
}

// sum (x - mean)^2
template <class Tr>
CVINL typename Tr::S sq_dev(const typename Tr::S* x, typename Tr::S mean, int64_t D) {
  using S = typename Tr::S;
  using V = typename Tr::V;
  constexpr int W = Tr::W;
  const int64_t Dv = D / W * W;
  V acc = splat((S)0);
  for (int64_t j = 0; j < Dv; j += W) {
    const V d = vload(x + j) - mean;
    acc += d * d;
  }
  S tail = 0;
  for (int64_t j = Dv; j < D; ++j) {
    const S d = x[j] - mean;
    tail += d * d;
  }
  return hsum(acc) + tail;
}

// x = (x - mean) * rstd * w + b + add; returns sum x
template <class Tr>
CVINL typename Tr::S norm_add_sum(typename Tr::S* x, typename Tr::S mean, typename Tr::S rstd,
                                  const typename Tr::S* w, const typename Tr::S* b, const typename Tr::S* add,
                                  int64_t D) {
  using S = typename Tr::S;
  using V = typename Tr::V;
  constexpr int W = Tr::W;
  const int64_t Dv = D / W * W;
  V acc = splat((S)0);
  for (int64_t j = 0; j < Dv; j += W) {
    const V v = ((vload(x + j) - mean) * rstd * vload(w + j) + vload(b + j)) + vload(add + j);
    vstore(x + j, v);
    acc += v;
  }
  S tail = 0;
  for (int64_t j = Dv; j < D; ++j) {
    const S v = ((x[j] - mean) * rstd * w[j] + b[j]) + add[j];
    x[j] = v;
    tail += v;
  }
  return hsum(acc) + tail;
}

template <class S>
CVINL S inv_std(S var_sum, int64_t D, double eps) {
  return (S)(1.0 / std::sqrt((double)var_sum / (double)D + eps));
}

template <class Tr>
CVINL void epi_body(const Epi<typename Tr::S>& a) {
  using S = typename Tr::S;
  const int64_t D = a.D;
  int64_t n = a.n0;
  for (int64_t i = 0; i < a.rows; ++i) {
    S* x = a.x + i * a.ld;
    S* x0 = a.x0 ? a.x0 + i * D : nullptr;  // the pre-norm row x + bias, kept for the backward
    const S* p = a.pos + n * a.pos_ld;
    n = (n + 1 == a.N) ? 0 : n + 1;
    S sum;
    if (a.use_pn) {  // (x + bias), LayerNorm 1, + pos
      sum = add2_sum<Tr>(x, x, a.bias, a.zeros, x0, D);
      const S mean = (S)((double)sum / (double)D);
      const S rstd = inv_std<S>(sq_dev<Tr>(x, mean, D), D, a.pn_eps);
      sum = norm_add_sum<Tr>(x, mean, rstd, a.pn_w, a.pn_b, p, D);
    } else {  // (x + bias) + pos
      sum = add2_sum<Tr>(x, x, a.bias, p, x0, D);
    }
    if (a.use_ln) {  // LayerNorm 2
      const S mean = (S)((double)sum / (double)D);
      const S rstd = inv_std<S>(sq_dev<Tr>(x, mean, D), D, a.ln_eps);
      norm_add_sum<Tr>(x, mean, rstd, a.ln_w, a.ln_b, a.zeros, D);
    }
  }
}

// Per-ISA entry points of the fp32 epilogue (csrc/cpu/isa_dispatch.h).
VLOPS_ISA_ENTRY(epi_f32, void, (const Epi<float>& a), epi_body<F32>(a))

void epilogue(int isa, const Epi<float>& a) { VLOPS_ISA_DISPATCH(isa, epi_f32, a); }
void epilogue(int, const Epi<double>& a) { epi_body<F64>(a); }

// ------------------------------------------------------------------------------------------------
// Backward rows: recompute the epilogue's LayerNorm statistics, then the LayerNorm backward(s), in place
// ------------------------------------------------------------------------------------------------
template <class S>
struct BwdRows {
  Epi<S> f;         // the forward's epilogue arguments (x: the GEMM tile p W^T, without bias, or scratch
                    // rows when x0 is given)
  const S* x0;      // the forward's saved pre-norm rows p W^T + bias (row stride D) for tile row 0, read only;
                    // null: x holds the recomputed p W^T
  S* g;             // [rows, D] (row stride D): the grad rows in, g0 (the GEMM's gradient) out
  S* y;             // [D] scratch (the input of LayerNorm 2 when use_pn)
  S* d_small;       // [5, D] partials: d_bias, d_pn_weight, d_pn_bias, d_ln_weight, d_ln_bias
  S* d_pos;         // [N, D] partial, or null
};

// x = xhat = (x - mean) * rstd; y = (xhat * w + b) + add; returns sum y (the forward's norm_add_sum order)
template <class Tr>
CVINL typename Tr::S norm_split_sum(typename Tr::S* x, typename Tr::S* y, typename Tr::S mean, typename Tr::S rstd,
                                    const typename Tr::S* w, const typename Tr::S* b, const typename Tr::S* add,
                                    int64_t D) {
  using S = typename Tr::S;
  using V = typename Tr::V;
  constexpr int W = Tr::W;
  const int64_t Dv = D / W * W;
  V acc = splat((S)0);
  for (int64_t j = 0; j < Dv; j += W) {
    const V h = (vload(x + j) - mean) * rstd;
    const V v = (h * vload(w + j) + vload(b + j)) + vload(add + j);
    vstore(x + j, h);
    vstore(y + j, v);
    acc += v;
  }
  S tail = 0;
  for (int64_t j = Dv; j < D; ++j) {
    const S h = (x[j] - mean) * rstd;
    const S v = (h * w[j] + b[j]) + add[j];
    x[j] = h;
    y[j] = v;
    tail += v;
  }
  return hsum(acc) + tail;
}

// x = (x - mean) * rstd
template <class Tr>
CVINL void normalize(typename Tr::S* x, typename Tr::S mean, typename Tr::S rstd, int64_t D) {
  constexpr int W = Tr::W;
  const int64_t Dv = D / W * W;
  for (int64_t j = 0; j < Dv; j += W) vstore(x + j, (vload(x + j) - mean) * rstd);
  for (int64_t j = Dv; j < D; ++j) x[j] = (x[j] - mean) * rstd;
}

// LayerNorm backward of one row, g in place: dw += g * xh, db += g;
// g = rstd (gx - mean(gx) - xh mean(gx xh)), gx = g * w
template <class Tr>
CVINL void ln_bwd_row(typename Tr::S* g, const typename Tr::S* xh, typename Tr::S rstd, const typename Tr::S* w,
                      typename Tr::S* dw, typename Tr::S* db, int64_t D) {
  using S = typename Tr::S;
  using V = typename Tr::V;
  constexpr int W = Tr::W;
  const int64_t Dv = D / W * W;
  V a1 = splat((S)0), a2 = splat((S)0);
  for (int64_t j = 0; j < Dv; j += W) {
    const V gv = vload(g + j), hv = vload(xh + j);
    vstore(dw + j, vload(dw + j) + gv * hv);
    vstore(db + j, vload(db + j) + gv);
    const V gx = gv * vload(w + j);
    a1 += gx;
    a2 += gx * hv;
  }
  S t1 = 0, t2 = 0;
  for (int64_t j = Dv; j < D; ++j) {
    const S gv = g[j], hv = xh[j];
    dw[j] += gv * hv;
    db[j] += gv;
    const S gx = gv * w[j];
    t1 += gx;
    t2 += gx * hv;
  }
  const S c1 = (S)((double)(hsum(a1) + t1) / (double)D), c2 = (S)((double)(hsum(a2) + t2) / (double)D);
  for (int64_t j = 0; j < Dv; j += W) {
    const V gx = vload(g + j) * vload(w + j);
    vstore(g + j, rstd * ((gx - c1) - vload(xh + j) * c2));
  }
  for (int64_t j = Dv; j < D; ++j) g[j] = rstd * ((g[j] * w[j] - c1) - xh[j] * c2);
}

// acc += v
template <class Tr>
CVINL void acc_row(typename Tr::S* acc, const typename Tr::S* v, int64_t D) {
  constexpr int W = Tr::W;
  const int64_t Dv = D / W * W;
  for (int64_t j = 0; j < Dv; j += W) vstore(acc + j, vload(acc + j) + vload(v + j));
  for (int64_t j = Dv; j < D; ++j) acc[j] += v[j];
}

template <class Tr>
CVINL void bwd_body(const BwdRows<typename Tr::S>& a) {
  using S = typename Tr::S;
  const Epi<S>& f = a.f;
  const int64_t D = f.D;
  S* const d_bias = a.d_small;
  S* const d_pn_w = a.d_small + D;
  S* const d_pn_b = a.d_small + 2 * D;
  S* const d_ln_w = a.d_small + 3 * D;
  S* const d_ln_b = a.d_small + 4 * D;
  // saved rows already hold the bias: (x0 + 0) is x0 exactly, so both paths round as the forward did
  const S* bias = a.x0 ? f.zeros : f.bias;
  int64_t n = f.n0;
  for (int64_t i = 0; i < f.rows; ++i) {
    S* x = f.x + i * f.ld;
    const S* src = a.x0 ? a.x0 + i * D : x;
    S* g = a.g + i * D;
    const int64_t ni = n;
    n = (n + 1 == f.N) ? 0 : n + 1;
    const S* p = f.pos + ni * f.pos_ld;
    // recompute: x1 = xhat1 (use_pn) or (x0 + bias) + pos; x2 = xhat2 (use_ln), stored in the input of LN 2
    // (with neither LayerNorm on, x0 is not needed and not computed: g passes through unchanged)
    S sum = 0, rstd1 = 0;
    S* x2 = x;
    if (f.use_pn) {
      sum = add2_sum<Tr>(x, src, bias, f.zeros, nullptr, D);
      const S mean = (S)((double)sum / (double)D);
      rstd1 = inv_std<S>(sq_dev<Tr>(x, mean, D), D, f.pn_eps);
      sum = norm_split_sum<Tr>(x, a.y, mean, rstd1, f.pn_w, f.pn_b, p, D);
      x2 = a.y;
    } else if (f.use_ln) {
      sum = add2_sum<Tr>(x, src, bias, p, nullptr, D);
    }
    if (f.use_ln) {
      const S mean = (S)((double)sum / (double)D);
      const S rstd2 = inv_std<S>(sq_dev<Tr>(x2, mean, D), D, f.ln_eps);
      normalize<Tr>(x2, mean, rstd2, D);
      ln_bwd_row<Tr>(g, x2, rstd2, f.ln_w, d_ln_w, d_ln_b, D);
    }
    if (a.d_pos) acc_row<Tr>(a.d_pos + ni * D, g, D);
    if (f.use_pn) ln_bwd_row<Tr>(g, x, rstd1, f.pn_w, d_pn_w, d_pn_b, D);
    acc_row<Tr>(d_bias, g, D);
  }
}

VLOPS_ISA_ENTRY(bwd_f32, void, (const BwdRows<float>& a), bwd_body<F32>(a))

void bwd_rows(int isa, const BwdRows<float>& a) { VLOPS_ISA_DISPATCH(isa, bwd_f32, a); }
void bwd_rows(int, const BwdRows<double>& a) { bwd_body<F64>(a); }

// ------------------------------------------------------------------------------------------------
// Gather: patches of flat rows r0 .. r0 + rows - 1 into dst [rows, K] (row stride K)
// ------------------------------------------------------------------------------------------------
struct Geom {
  int64_t C, H, W, P, Gw, N;
  int64_t sB, sC, sH, sW;  // image strides, in elements
};

// n pixels from s (stride sw) to d (contiguous); constant-size copies for the common patch sizes.
template <class E>
CVINL void copy_px(E* d, const E* s, int64_t n, int64_t sw) {
  if (sw == 1) {
    switch (n) {
      case 16: std::memcpy(d, s, 16 * sizeof(E)); return;
      case 14: std::memcpy(d, s, 14 * sizeof(E)); return;
      case 8: std::memcpy(d, s, 8 * sizeof(E)); return;
      case 32: std::memcpy(d, s, 32 * sizeof(E)); return;
      default: std::memcpy(d, s, (size_t)n * sizeof(E)); return;
    }
  }
  for (int64_t q = 0; q < n; ++q) d[q] = s[q * sw];
}

template <class E>
void gather(E* dst, const E* img, const Geom& g, int64_t r0, int64_t rows) {
  const int64_t P = g.P, K = g.C * P * P;
  int64_t i = 0;
  while (i < rows) {
    // a run of consecutive patches of one grid row of one image
    const int64_t r = r0 + i;
    const int64_t b = r / g.N, n = r % g.N, gh = n / g.Gw, gw = n % g.Gw;
    const int64_t run = std::min(rows - i, g.Gw - gw);
    const E* ib = img + b * g.sB;
    for (int64_t c = 0; c < g.C; ++c) {
      for (int64_t ph = 0; ph < P; ++ph) {
        E* d0 = dst + i * K + (c * P + ph) * P;
        const int64_t y = gh * P + ph;
        if (y >= g.H) {  // bottom padding
          for (int64_t t = 0; t < run; ++t) std::memset(d0 + t * K, 0, (size_t)P * sizeof(E));
          continue;
        }
        const E* s0 = ib + c * g.sC + y * g.sH;
        for (int64_t t = 0; t < run; ++t) {
          const int64_t x0 = (gw + t) * P;
          const int64_t valid = std::min(P, g.W - x0);
          copy_px(d0 + t * K, s0 + x0 * g.sW, valid, g.sW);
          if (valid < P) std::memset(d0 + t * K + valid, 0, (size_t)(P - valid) * sizeof(E));  // right padding
        }
      }
    }
    i += run;
  }
}

// The gather's inverse for the image gradient: rows r0 .. r0 + rows - 1 of src [rows, K] (row stride K)
// written to dst, a contiguous [B, C, H, W] (patches do not overlap: every pixel is written once; the
// padding pixels are dropped).
template <class S>
void scatter(S* dst, const S* src, const Geom& g, int64_t r0, int64_t rows) {
  const int64_t P = g.P, K = g.C * P * P;
  const int64_t sC = g.H * g.W, sB = g.C * sC;
  int64_t i = 0;
  while (i < rows) {
    const int64_t r = r0 + i;
    const int64_t b = r / g.N, n = r % g.N, gh = n / g.Gw, gw = n % g.Gw;
    const int64_t run = std::min(rows - i, g.Gw - gw);
    S* ib = dst + b * sB;
    for (int64_t c = 0; c < g.C; ++c) {
      for (int64_t ph = 0; ph < P; ++ph) {
        const int64_t y = gh * P + ph;
        if (y >= g.H) break;  // bottom padding
        const S* s0 = src + i * K + (c * P + ph) * P;
        S* d0 = ib + c * sC + y * g.W;
        for (int64_t t = 0; t < run; ++t) {
          const int64_t x0 = (gw + t) * P;
          copy_px(d0 + x0, s0 + t * K, std::min(P, g.W - x0), 1);
        }
      }
    }
    i += run;
  }
}

// ------------------------------------------------------------------------------------------------
// Schedule
// ------------------------------------------------------------------------------------------------
struct Tile {
  int64_t r0, rows;
};

int64_t block_rows(at::ScalarType dt) {
  int64_t bm = dt == at::kDouble ? 128 : 256;
  if (const char* env = std::getenv("VLOPS_PATCH_EMBED_BM")) {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    if (end != env && v >= 1) bm = std::min<long long>(v, 1 << 16);
  }
  return bm;
}

// Tiles of at most BM rows that never straddle an image unless they hold whole images.
std::vector<Tile> plan_tiles(int64_t B, int64_t N, int64_t BM, int64_t nthreads) {
  std::vector<Tile> tiles;
  if (2 * N >= BM) {
    int64_t c = (N + BM - 1) / BM;  // chunks per image
    // few tiles: make their count a multiple of the thread count, so no thread idles at the end
    while (B * c < 8 * nthreads && (B * c) % nthreads != 0 && c < N) ++c;
    tiles.reserve(B * c);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < c; ++j) {
        const int64_t n0 = j * N / c, n1 = (j + 1) * N / c;
        if (n1 > n0) tiles.push_back({b * N + n0, n1 - n0});
      }
  } else {
    const int64_t k = std::max<int64_t>(1, std::min(BM / N, (B + nthreads - 1) / nthreads));  // images per tile
    tiles.reserve((B + k - 1) / k);
    for (int64_t b0 = 0; b0 < B; b0 += k) tiles.push_back({b0 * N, std::min(k, B - b0) * N});
  }
  return tiles;
}

template <class S>
struct Scratch {
  at::Tensor packed;  // [BM, K] compute dtype
  at::Tensor raw;     // [BM, K] image dtype (16-bit images only)
  at::Tensor tile;    // [BM, D] compute dtype
};

// The tiles of a call (shared by the forward and the backward).
struct Plan {
  std::vector<Tile> tiles;
  int64_t max_rows = 0, ntiles = 0, nthreads = 0;
};

Plan make_plan(int64_t B, int64_t N, at::ScalarType cdt) {
  Plan pl;
  const int64_t max_threads = std::max(1, at::get_num_threads());
  pl.tiles = plan_tiles(B, N, block_rows(cdt), max_threads);
  for (const Tile& t : pl.tiles) pl.max_rows = std::max(pl.max_rows, t.rows);
  pl.ntiles = (int64_t)pl.tiles.size();
  pl.nthreads = std::min(pl.ntiles, max_threads);
  return pl;
}

// Step 1 of a tile: its patches [rows, K] in the compute dtype, in the scratch's packed buffer
// (allocated on first use; 16-bit images gathered raw, then converted by one vectorised copy_).
template <class S, class E>
at::Tensor pack_tile(Scratch<S>& sc, const E* img, const Geom& g, const Tile& t, int64_t max_rows,
                     at::ScalarType image_dtype) {
  constexpr bool kSame = std::is_same<S, E>::value;
  const auto cdt = std::is_same<S, double>::value ? at::kDouble : at::kFloat;
  const int64_t K = g.C * g.P * g.P;
  if (!sc.packed.defined()) {
    sc.packed = at::empty({max_rows, K}, at::TensorOptions().dtype(cdt));
    if (!kSame) sc.raw = at::empty({max_rows, K}, at::TensorOptions().dtype(image_dtype));
  }
  at::Tensor packed = sc.packed.narrow(0, 0, t.rows);
  if (kSame) {
    gather<E>(reinterpret_cast<E*>(packed.data_ptr()), img, g, t.r0, t.rows);
  } else {
    at::Tensor raw = sc.raw.narrow(0, 0, t.rows);
    gather<E>(reinterpret_cast<E*>(raw.data_ptr()), img, g, t.r0, t.rows);
    packed.copy_(raw);
  }
  return packed;
}

// S: compute type (float / double); E: the images' element storage (S itself, or uint16_t for 16-bit).
template <class S, class E>
void patch_embed_impl(const at::Tensor& images, const at::Tensor& w, const Epi<S>& base, const Geom& g, int64_t B,
                      int64_t R0, at::Tensor& out, S* x0) {
  constexpr bool kSame = std::is_same<S, E>::value;
  const int64_t N = g.N, D = w.size(0);
  const auto cdt = std::is_same<S, double>::value ? at::kDouble : at::kFloat;
  const int isa = current_isa();
  const Plan pl = make_plan(B, N, cdt);
  const std::vector<Tile>& tiles = pl.tiles;
  const int64_t max_rows = pl.max_rows, ntiles = pl.ntiles, nthreads = pl.nthreads;
  const int64_t max_threads = std::max(1, at::get_num_threads());

  const at::Tensor wt = w.t();  // [K, D] view: the GEMM reads weight^T (a contiguous copy measured no faster)
  at::Tensor out2d = out.view({B * (R0 + N), D});
  const E* img = reinterpret_cast<const E*>(images.data_ptr());
  std::vector<Scratch<S>> pool(max_threads);
  std::atomic<int64_t> next{0};

  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    const int tid = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(tid >= 0 && tid < (int)pool.size());
    Scratch<S>& sc = pool[tid];
    for (int64_t t = next.fetch_add(1); t < ntiles; t = next.fetch_add(1)) {
      const int64_t r0 = tiles[t].r0, rows = tiles[t].rows;
      at::Tensor packed = pack_tile<S, E>(sc, img, g, tiles[t], max_rows, images.scalar_type());
      const int64_t b0 = r0 / N, b1 = (r0 + rows - 1) / N;
      const bool direct = kSame && (R0 == 0 || b0 == b1);
      at::Tensor dst;
      if (direct) {
        dst = out2d.narrow(0, b0 * (R0 + N) + R0 + r0 % N, rows);
      } else {
        if (!sc.tile.defined()) sc.tile = at::empty({max_rows, D}, at::TensorOptions().dtype(cdt));
        dst = sc.tile.narrow(0, 0, rows);
      }
      at::mm_out(dst, packed, wt);
      Epi<S> e = base;
      e.x = dst.data_ptr<S>();
      e.ld = D;
      e.rows = rows;
      e.n0 = r0 % N;
      e.x0 = x0 ? x0 + r0 * D : nullptr;
      epilogue(isa, e);
      if (!direct) {  // per image: rows R0 + n .. of image b (16-bit: rounded to nearest even here)
        for (int64_t i = 0; i < rows;) {
          const int64_t r = r0 + i, b = r / N, n = r % N;
          const int64_t len = std::min(rows - i, N - n);
          out2d.narrow(0, b * (R0 + N) + R0 + n, len).copy_(dst.narrow(0, i, len));
          i += len;
        }
      }
    }
  });
}

// Backward: per slot (one per thread, tiles dealt round-robin: slot s takes tiles s, s + nslots, ..., so
// the partial sums are the same on every run at a given thread count) the tile's patches are gathered,
// x0 = p W^T recomputed (only when a LayerNorm is on and the forward's rows x0 are not given), the grad
// rows copied in (fp32 / fp64), the LayerNorm backward(s) run row-wise (bwd_rows) giving g0, then
// d_weight_slot += g0^T p and, if asked, dp = g0 W scattered to d_images.
// Slot 0 accumulates into the outputs themselves; the other slots' partials are added to them in slot
// order at the end.
template <class S, class E>
void patch_embed_bwd_impl(const at::Tensor& images, const at::Tensor& w, const Epi<S>& base, const Geom& g,
                          int64_t B, int64_t R0, const at::Tensor& grad, at::Tensor& d_weight, at::Tensor& d_small,
                          at::Tensor& d_pos, at::Tensor& d_images, const S* x0) {
  const int64_t N = g.N, D = w.size(0), K = w.size(1);
  const auto cdt = std::is_same<S, double>::value ? at::kDouble : at::kFloat;
  const auto opts = at::TensorOptions().dtype(cdt);
  const int isa = current_isa();
  const Plan pl = make_plan(B, N, cdt);
  const int64_t ntiles = pl.ntiles, nslots = pl.nthreads, max_rows = pl.max_rows;
  const bool need_pos = d_pos.defined(), need_images = d_images.defined();

  const at::Tensor wt = w.t();
  const at::Tensor grad2d = grad.view({B * (R0 + N), D});
  const E* img = reinterpret_cast<const E*>(images.data_ptr());
  S* dimg = need_images ? d_images.data_ptr<S>() : nullptr;
  std::vector<Scratch<S>> pool(nslots);
  std::vector<at::Tensor> dW(nslots), dS(nslots), dP(nslots);
  dW[0] = d_weight;
  dS[0] = d_small;
  if (need_pos) dP[0] = d_pos;

  at::parallel_for(0, nslots, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      Scratch<S>& sc = pool[s];
      if (s > 0) {
        dW[s] = at::zeros({D, K}, opts);
        dS[s] = at::zeros({5, D}, opts);
        if (need_pos) dP[s] = at::zeros({N, D}, opts);
      }
      sc.tile = at::empty({max_rows, D}, opts);
      const at::Tensor gbuf = at::empty({max_rows, D}, opts);
      std::vector<S> ybuf(D);
      for (int64_t t = s; t < ntiles; t += nslots) {
        const Tile& tl = pl.tiles[t];
        const int64_t r0 = tl.r0, rows = tl.rows;
        at::Tensor packed = pack_tile<S, E>(sc, img, g, tl, max_rows, images.scalar_type());
        at::Tensor x = sc.tile.narrow(0, 0, rows);
        const bool norm = base.use_pn || base.use_ln;  // x0 only feeds the LayerNorm statistics
        if (norm && !x0) at::mm_out(x, packed, wt);
        at::Tensor gr = gbuf.narrow(0, 0, rows);
        for (int64_t i = 0; i < rows;) {  // grad rows R0 + n .. of image b, in the compute dtype
          const int64_t r = r0 + i, b = r / N, n = r % N;
          const int64_t len = std::min(rows - i, N - n);
          gr.narrow(0, i, len).copy_(grad2d.narrow(0, b * (R0 + N) + R0 + n, len));
          i += len;
        }
        BwdRows<S> a;
        a.f = base;
        a.f.x = x.data_ptr<S>();
        a.f.ld = D;
        a.f.rows = rows;
        a.f.n0 = r0 % N;
        a.x0 = (norm && x0) ? x0 + r0 * D : nullptr;
        a.g = gr.data_ptr<S>();
        a.y = ybuf.data();
        a.d_small = dS[s].data_ptr<S>();
        a.d_pos = need_pos ? dP[s].data_ptr<S>() : nullptr;
        bwd_rows(isa, a);
        dW[s].addmm_(gr.t(), packed);
        if (need_images) {
          at::mm_out(packed, gr, w);  // dp = g0 W, over the patches (no longer needed)
          scatter<S>(dimg, packed.data_ptr<S>(), g, r0, rows);
        }
      }
    }
  });
  for (int64_t s = 1; s < nslots; ++s) {  // fixed order
    d_weight.add_(dW[s]);
    d_small.add_(dS[s]);
    if (need_pos) d_pos.add_(dP[s]);
  }
}

// ------------------------------------------------------------------------------------------------
// Argument checks
// ------------------------------------------------------------------------------------------------
inline const char* dtname(const at::Tensor& t) { return c10::toString(t.scalar_type()); }

void check_param(const char* fn, const c10::optional<at::Tensor>& t, const char* nm, at::ScalarType cdt, int64_t rows,
                 int64_t D, bool matrix) {
  if (!t.has_value() || !t->defined()) return;
  VLOPS_CHECK(t->device().is_cpu(), fn, nm, " must be a CPU tensor, got one on ", t->device());
  VLOPS_CHECK(t->scalar_type() == cdt, fn, nm, " must be ", c10::toString(cdt),
              " (the compute dtype of these images), got ", dtname(*t));
  if (matrix) {
    VLOPS_CHECK(t->dim() == 2 && t->size(0) == rows && t->size(1) == D, fn, nm, " must be [Gh * Gw, D] = [", rows,
                ", ", D, "], got shape ", t->sizes());
  } else {
    VLOPS_CHECK(t->dim() == 1 && t->size(0) == D, fn, nm, " must be [D] = [", D, "], got shape ", t->sizes());
  }
  VLOPS_CHECK(t->is_contiguous(), fn, nm, " must be contiguous");
}

void check_eps(const char* fn, double eps, const char* nm, const char* flag) {
  VLOPS_CHECK(std::isfinite(eps) && eps >= 0.0, fn, nm, " must be a finite number >= 0 when ", flag,
              " is set, got ", eps);
}

struct Dims {
  int64_t B, C, H, W, P, K, D, Gh, Gw, N;
  at::ScalarType dt, cdt;
};

// The forward's arguments (shared by both launchers); fn prefixes the messages.
Dims check_args(const char* fn, const at::Tensor& images, const at::Tensor& weight,
                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& pos,
                const c10::optional<at::Tensor>& pn_weight, const c10::optional<at::Tensor>& pn_bias, double pn_eps,
                bool use_pn, const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                double ln_eps, bool use_ln, int64_t patch_size, int64_t prefix_tokens) {
  VLOPS_CHECK(images.defined(), fn, "images is undefined");
  VLOPS_CHECK(images.device().is_cpu(), fn, "images must be a CPU tensor, got one on ", images.device());
  const auto dt = images.scalar_type();
  VLOPS_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, fn,
              "images must be float32, float16, bfloat16 or float64, got ", dtname(images));
  VLOPS_CHECK(images.dim() == 4, fn, "images must be 4-D [B, C, H, W], got shape ", images.sizes());
  VLOPS_CHECK(patch_size >= 1, fn, "patch_size must be >= 1, got ", patch_size);
  VLOPS_CHECK(prefix_tokens >= 0, fn, "prefix_tokens must be >= 0, got ", prefix_tokens);
  Dims d;
  d.B = images.size(0), d.C = images.size(1), d.H = images.size(2), d.W = images.size(3), d.P = patch_size;
  d.K = d.C * d.P * d.P;
  d.dt = dt;

  VLOPS_CHECK(weight.defined(), fn, "weight is undefined");
  VLOPS_CHECK(weight.device().is_cpu(), fn, "weight must be a CPU tensor, got one on ", weight.device());
  VLOPS_CHECK(weight.scalar_type() == dt, fn, "weight has dtype ", dtname(weight), " but images has dtype ",
              dtname(images), "; they must match");
  VLOPS_CHECK(weight.dim() == 2 && weight.size(1) == d.K, fn, "weight must be [D, C * P * P] = [D, ", d.K, "] (C = ",
              d.C, ", P = ", d.P, "), got shape ", weight.sizes());
  VLOPS_CHECK(weight.is_contiguous(), fn, "weight must be contiguous");
  d.D = weight.size(0);
  d.Gh = (d.H + d.P - 1) / d.P, d.Gw = (d.W + d.P - 1) / d.P, d.N = d.Gh * d.Gw;

  d.cdt = dt == at::kDouble ? at::kDouble : at::kFloat;
  check_param(fn, bias, "bias", d.cdt, 0, d.D, false);
  check_param(fn, pos, "pos", d.cdt, d.N, d.D, true);
  check_param(fn, pn_weight, "pn_weight", d.cdt, 0, d.D, false);
  check_param(fn, pn_bias, "pn_bias", d.cdt, 0, d.D, false);
  check_param(fn, ln_weight, "ln_weight", d.cdt, 0, d.D, false);
  check_param(fn, ln_bias, "ln_bias", d.cdt, 0, d.D, false);
  if (use_pn) check_eps(fn, pn_eps, "pn_eps", "use_pn");
  if (use_ln) check_eps(fn, ln_eps, "ln_eps", "use_ln");
  return d;
}

// x0_out / x0: absent, or a contiguous [B * Gh * Gw, D] CPU tensor in the compute dtype; returns it detached
// (or an undefined tensor)
at::Tensor check_x0(const char* fn, const c10::optional<at::Tensor>& t, const char* nm, const Dims& d) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  VLOPS_CHECK(t->device().is_cpu(), fn, nm, " must be a CPU tensor, got one on ", t->device());
  VLOPS_CHECK(t->scalar_type() == d.cdt, fn, nm, " must be ", c10::toString(d.cdt),
              " (the compute dtype of these images), got ", dtname(*t));
  VLOPS_CHECK(t->dim() == 2 && t->size(0) == d.B * d.N && t->size(1) == d.D, fn, nm,
              " must be [B * Gh * Gw, D] = [", d.B * d.N, ", ", d.D, "], got shape ", t->sizes());
  VLOPS_CHECK(t->is_contiguous(), fn, nm, " must be contiguous");
  return t->detach();
}

// the tensor, detached (the GEMMs run on worker threads, below autograd), or an empty tensor
inline at::Tensor opt(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->detach() : at::Tensor();
}

template <class S>
inline const S* ptr_or(const at::Tensor& t, const std::vector<S>& fallback) {
  return t.defined() ? t.data_ptr<S>() : fallback.data();
}

// The epilogue's arguments (ones / zeros standing in for absent parameters); not copyable (e points
// into the vectors).
template <class S>
struct EpiArgs {
  std::vector<S> zeros, ones;
  Epi<S> e{};
  EpiArgs(const EpiArgs&) = delete;
  EpiArgs(int64_t N, int64_t D, const at::Tensor& bias, const at::Tensor& pos, const at::Tensor& pn_w,
          const at::Tensor& pn_b, double pn_eps, bool use_pn, const at::Tensor& ln_w, const at::Tensor& ln_b,
          double ln_eps, bool use_ln)
      : zeros(D, (S)0), ones(D, (S)1) {
    e.N = N;
    e.D = D;
    e.bias = ptr_or<S>(bias, zeros);
    e.pos = ptr_or<S>(pos, zeros);
    e.pos_ld = pos.defined() ? D : 0;
    e.pn_w = ptr_or<S>(pn_w, ones);
    e.pn_b = ptr_or<S>(pn_b, zeros);
    e.ln_w = ptr_or<S>(ln_w, ones);
    e.ln_b = ptr_or<S>(ln_b, zeros);
    e.zeros = zeros.data();
    e.pn_eps = pn_eps;
    e.ln_eps = ln_eps;
    e.use_pn = use_pn;
    e.use_ln = use_ln;
  }
};

}  // namespace

// ------------------------------------------------------------------------------------------------
// Launchers (bound in csrc/bindings.cpp)
// ------------------------------------------------------------------------------------------------
at::Tensor patch_embed_fwd_cpu(const at::Tensor& images, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& pos,
                               const c10::optional<at::Tensor>& pn_weight, const c10::optional<at::Tensor>& pn_bias,
                               double pn_eps, bool use_pn,
                               const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                               double ln_eps, bool use_ln, int64_t patch_size, int64_t prefix_tokens,
                               const c10::optional<at::Tensor>& x0_out) {
  constexpr const char* fn = "vlops patch_embed_fwd_cpu: ";
  const Dims d = check_args(fn, images, weight, bias, pos, pn_weight, pn_bias, pn_eps, use_pn, ln_weight, ln_bias,
                            ln_eps, use_ln, patch_size, prefix_tokens);
  const at::Tensor x0 = check_x0(fn, x0_out, "x0_out", d);
  const int64_t B = d.B, N = d.N, D = d.D;
  at::Tensor out = at::empty({B, prefix_tokens + N, D}, images.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || N == 0 || D == 0) return out;

  const at::Tensor img = images.detach();
  Geom g{d.C, d.H, d.W, d.P, d.Gw, N, img.stride(0), img.stride(1), img.stride(2), img.stride(3)};
  const at::Tensor b_ = opt(bias), p_ = opt(pos), pw = opt(pn_weight), pb = opt(pn_bias), lw = opt(ln_weight),
                   lb = opt(ln_bias);
  if (d.dt == at::kDouble) {
    const EpiArgs<double> ea(N, D, b_, p_, pw, pb, pn_eps, use_pn, lw, lb, ln_eps, use_ln);
    patch_embed_impl<double, double>(img, weight.detach(), ea.e, g, B, prefix_tokens, out,
                                     x0.defined() ? x0.data_ptr<double>() : nullptr);
  } else {
    const EpiArgs<float> ea(N, D, b_, p_, pw, pb, pn_eps, use_pn, lw, lb, ln_eps, use_ln);
    float* x0p = x0.defined() ? x0.data_ptr<float>() : nullptr;
    if (d.dt == at::kFloat) {
      patch_embed_impl<float, float>(img, weight.detach(), ea.e, g, B, prefix_tokens, out, x0p);
    } else {  // 16-bit: an fp32 copy of the weight, made once
      const at::Tensor w32 = weight.detach().to(at::kFloat).contiguous();
      patch_embed_impl<float, uint16_t>(img, w32, ea.e, g, B, prefix_tokens, out, x0p);
    }
  }
  return out;
}

std::tuple<c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
           c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>>
patch_embed_bwd_cpu(const at::Tensor& grad, const at::Tensor& images, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& pos,
                    const c10::optional<at::Tensor>& pn_weight, const c10::optional<at::Tensor>& pn_bias,
                    double pn_eps, bool use_pn, const c10::optional<at::Tensor>& ln_weight,
                    const c10::optional<at::Tensor>& ln_bias, double ln_eps, bool use_ln, int64_t patch_size,
                    int64_t prefix_tokens, bool need_images, const c10::optional<at::Tensor>& x0) {
  constexpr const char* fn = "vlops patch_embed_bwd_cpu: ";
  const Dims d = check_args(fn, images, weight, bias, pos, pn_weight, pn_bias, pn_eps, use_pn, ln_weight, ln_bias,
                            ln_eps, use_ln, patch_size, prefix_tokens);
  const at::Tensor x0_ = check_x0(fn, x0, "x0", d);
  const int64_t B = d.B, N = d.N, D = d.D, R0 = prefix_tokens;
  VLOPS_CHECK(grad.defined(), fn, "grad is undefined");
  VLOPS_CHECK(grad.device().is_cpu(), fn, "grad must be a CPU tensor, got one on ", grad.device());
  VLOPS_CHECK(grad.scalar_type() == d.dt || grad.scalar_type() == at::kFloat, fn, "grad must be ",
              c10::toString(d.dt), " (the dtype of images) or float32, got ", dtname(grad));
  VLOPS_CHECK(grad.dim() == 3 && grad.size(0) == B && grad.size(1) == R0 + N && grad.size(2) == D, fn,
              "grad must be [B, prefix_tokens + Gh * Gw, D] = [", B, ", ", R0 + N, ", ", D, "], got shape ",
              grad.sizes());
  VLOPS_CHECK(grad.is_contiguous(), fn, "grad must be contiguous");

  const auto opts = at::TensorOptions().dtype(d.cdt);
  const bool has_bias = bias.has_value() && bias->defined(), has_pos = pos.has_value() && pos->defined();
  at::Tensor d_weight = at::zeros({D, d.K}, opts);
  at::Tensor d_small = at::zeros({5, D}, opts);  // d_bias, d_pn_weight, d_pn_bias, d_ln_weight, d_ln_bias
  at::Tensor d_pos = has_pos ? at::zeros({N, D}, opts) : at::Tensor();
  at::Tensor d_images;
  if (need_images) {  // every pixel is written by exactly one patch, unless there is nothing to compute
    const bool empty = B == 0 || N == 0 || D == 0;
    d_images = empty ? at::zeros({B, d.C, d.H, d.W}, opts) : at::empty({B, d.C, d.H, d.W}, opts);
  }
  if (B > 0 && N > 0 && D > 0) {
    const at::Tensor img = images.detach(), gr = grad.detach();
    Geom g{d.C, d.H, d.W, d.P, d.Gw, N, img.stride(0), img.stride(1), img.stride(2), img.stride(3)};
    const at::Tensor b_ = opt(bias), p_ = opt(pos), pw = opt(pn_weight), pb = opt(pn_bias), lw = opt(ln_weight),
                     lb = opt(ln_bias);
    if (d.dt == at::kDouble) {
      const EpiArgs<double> ea(N, D, b_, p_, pw, pb, pn_eps, use_pn, lw, lb, ln_eps, use_ln);
      patch_embed_bwd_impl<double, double>(img, weight.detach(), ea.e, g, B, R0, gr, d_weight, d_small, d_pos,
                                           d_images, x0_.defined() ? x0_.data_ptr<double>() : nullptr);
    } else {
      const EpiArgs<float> ea(N, D, b_, p_, pw, pb, pn_eps, use_pn, lw, lb, ln_eps, use_ln);
      const float* x0p = x0_.defined() ? x0_.data_ptr<float>() : nullptr;
      if (d.dt == at::kFloat) {
        patch_embed_bwd_impl<float, float>(img, weight.detach(), ea.e, g, B, R0, gr, d_weight, d_small, d_pos,
                                           d_images, x0p);
      } else {
        const at::Tensor w32 = weight.detach().to(at::kFloat).contiguous();
        patch_embed_bwd_impl<float, uint16_t>(img, w32, ea.e, g, B, R0, gr, d_weight, d_small, d_pos, d_images,
                                              x0p);
      }
    }
  }
  auto some = [](bool on, const at::Tensor& t) { return on ? c10::optional<at::Tensor>(t) : c10::nullopt; };
  auto row = [&](int64_t i) { return d_small.select(0, i).clone(); };
  const bool has_pnw = pn_weight.has_value() && pn_weight->defined(), has_pnb = pn_bias.has_value() && pn_bias->defined();
  const bool has_lnw = ln_weight.has_value() && ln_weight->defined(), has_lnb = ln_bias.has_value() && ln_bias->defined();
  return std::make_tuple(some(need_images, d_images), c10::optional<at::Tensor>(d_weight),
                         some(has_bias, has_bias ? row(0) : at::Tensor()), some(has_pos, d_pos),
                         some(use_pn && has_pnw, use_pn && has_pnw ? row(1) : at::Tensor()),
                         some(use_pn && has_pnb, use_pn && has_pnb ? row(2) : at::Tensor()),
                         some(use_ln && has_lnw, use_ln && has_lnw ? row(3) : at::Tensor()),
                         some(use_ln && has_lnb, use_ln && has_lnb ? row(4) : at::Tensor()));
}

}  // namespace cpu
}  // namespace vlops
