// Contrastive losses on the CPU: the four kernels of the contract in vlops/ops/contrastive.py
// (contrastive_lse_cpu, clip_bwd_cpu, siglip_fwd_cpu, siglip_bwd_cpu, siglip_fwd_bwd_cpu). The N x M logits
// never exist.
//
// Schedule. Rows are split into G groups and columns into G groups (G = min(16, min(N, M) / 256),
// at least 1, more with over 16 threads: results are bit-identical run to run and for any thread
// count <= 16). The G x G group pairs run in G rounds, a "Latin
// square": in round k, task t owns row group t and column group (t + k) mod G, so within a round no
// two tasks touch the same rows or the same columns. That lets one pass update the row state (row
// LSE, dA) and the column state (column LSE, dB) without atomics, locks or per-thread copies of the
// M-sized (or M x D) accumulators; rounds are separate at::parallel_for calls (the barrier).
//
// A task walks its block in tiles of BR x BC (256 x 512 in fp32): S_raw = A_i B_j^T by at::mm_out
// (BLAS, single-threaded inside the parallel region) into a per-thread tile buffer; an elementwise
// pass (explicit 16-wide SIMD compiled for AVX-512, AVX2 and a portable baseline, picked at run time
// like the diffusion kernels: vlops._C.set_cpu_isa / VLOPS_CPU_ISA) turns it into the LSE partials or
// the loss, or into W in place; the backward then does dA_i += W B_j and dB_j += W^T A_i (addmm_ on
// views of the outputs). Memory beyond inputs and outputs: O(N + M) state plus one tile per thread
// (bf16 / fp16 inputs are converted once to fp32 copies, O((N + M) D)). The backward costs three
// tile GEMMs per tile (recompute S, dA, dB); the forward one.
//
// Numerics: fp32 compute for fp32 / bf16 / fp16 inputs (fp64 for fp64, scalar code); online
// max / sum-exp with the sums kept in double across tiles; exp is cephes expf (~1 ulp, argument
// clamped to [-87, 88]); softplus(t) = max(t, 0) + log1p(exp(-|t|)); sigmoid from exp(-|t|). Per-task
// partial sums (dscale, dbias, the SigLIP loss) go in a per-task slot and are added in task order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "diffusion_step_check.h"  // VLOPS_CHECK
#include "cephes_expf.h"
#include "isa_dispatch.h"
#include "vec16.h"  // 16-lane vector helpers (silences -Wpsabi: no vector crosses a call boundary)

namespace vlops {
namespace cpu {

namespace {

using namespace vec16;  // csrc/cpu/vec16.h: vf, vi, F32 / F64, splat, vload, vstore, sel, hsum, ...

CVINL vf vexp(vf x) { return cephes_expf<vf, vi>(x); }  // csrc/cpu/cephes_expf.h
// log1p(e) for e in [0, 1]: cephes logf of u = 1 + e on [1, 2], times e / (u - 1) (exact for tiny e).
CVINL vf vlog1p01(vf e) {
  const vf u = e + 1.0f;
  const vi big = u > 1.41421356237f;
  vf x = sel(big, u * 0.5f - 1.0f, u - 1.0f);
  const vf ex = sel(big, splat(1.0f), splat(0.0f));
  const vf z = x * x;
  vf y = splat(7.0376836292E-2f);
  y = y * x - 1.1514610310E-1f;
  y = y * x + 1.1676998740E-1f;
  y = y * x - 1.2420140846E-1f;
  y = y * x + 1.4249322787E-1f;
  y = y * x - 1.6668057665E-1f;
  y = y * x + 2.0000714765E-1f;
  y = y * x - 2.4999993993E-1f;
  y = y * x + 3.3333331174E-1f;
  y = y * x * z;
  y = y + ex * -2.12194440e-4f;
  y = y - 0.5f * z;
  vf lg = x + y;
  lg = lg + ex * 0.693359375f;
  const vf um1 = u - 1.0f;
  const vi tiny = um1 == 0.0f;
  return sel(tiny, e, lg * (e / sel(tiny, splat(1.0f), um1)));
}

CVINL double vexp(double x) { return std::exp(x); }
CVINL double vlog1p01(double e) { return std::log1p(e); }

// lane index comparisons, one spelling for both
CVINL vi lane_lt(F32, int64_t j, int64_t n) { return lanes_from((int32_t)j) < (int32_t)n; }
CVINL vi lane_eq(F32, int64_t j, int64_t d) { return lanes_from((int32_t)j) == (int32_t)d; }
CVINL bool lane_lt(F64, int64_t j, int64_t n) { return j < n; }
CVINL bool lane_eq(F64, int64_t j, int64_t d) { return j == d; }

constexpr float kNegInfF = -std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------------------
// Tile bodies. x: the tile, br rows of ld (a multiple of W) elements, bc valid columns; the lanes
// past bc hold garbage and are masked. Column-indexed arrays are padded to a multiple of W.
// ------------------------------------------------------------------------------------------------
template <class Tr>
struct LseTile {
  using S = typename Tr::S;
  S* x;
  int64_t ld, br, bc;
  S scale;
  S* row_m;        // [br]: running row max (state)
  double* row_l;   // [br]: running row sum of exp(S - row_m)
  S* col_m;        // [bc]: running column max (state)
  double* col_l;   // [bc]: running column sum
  S* tmp_cmax;     // [bc padded] scratch
  S* tmp_csum;     // [bc padded] scratch
  S* tmp_rmax;     // [br] scratch
};

template <class Tr>
CVINL void lse_tile_body(const LseTile<Tr>& p) {
  using S = typename Tr::S;
  using V = typename Tr::V;
  constexpr int W = Tr::W;
  const S ninf = -std::numeric_limits<S>::infinity();
  for (int64_t j = 0; j < p.bc; j += W) vstore(p.tmp_cmax + j, splat(ninf));
  // pass 1: S = scale * x (in place), tile row and column maxima
  for (int64_t i = 0; i < p.br; ++i) {
    S* xr = p.x + i * p.ld;
    V rm = splat(ninf);
    for (int64_t j = 0; j < p.bc; j += W) {
      V s = sel(lane_lt(Tr{}, j, p.bc), vload(xr + j) * p.scale, splat(ninf));
      vstore(xr + j, s);
      rm = vmax(rm, s);
      vstore(p.tmp_cmax + j, vmax(vload(p.tmp_cmax + j), s));
    }
    p.tmp_rmax[i] = hmax(rm);
  }
  // merge the maxima into the running state, rescaling the sums
  for (int64_t i = 0; i < p.br; ++i) {
    const S t = p.tmp_rmax[i], m = p.row_m[i];
    if (t > m) {
      p.row_l[i] = (m == ninf) ? 0.0 : p.row_l[i] * std::exp((double)m - (double)t);
      p.row_m[i] = t;
    }
  }
  for (int64_t j = 0; j < p.bc; ++j) {
    const S t = p.tmp_cmax[j], m = p.col_m[j];
    if (t > m) {
      p.col_l[j] = (m == ninf) ? 0.0 : p.col_l[j] * std::exp((double)m - (double)t);
      p.col_m[j] = t;
    }
  }
  // pass 2: sums of exp(S - max) along rows and columns (the column maxima read from tmp_cmax, a
  // private copy whose padding lanes are 0: col_m past bc belongs to another task)
  for (int64_t j = 0; j < p.bc; j += W) {
    vstore(p.tmp_csum + j, splat((S)0));
    vstore(p.tmp_cmax + j, splat((S)0));
  }
  for (int64_t j = 0; j < p.bc; ++j) p.tmp_cmax[j] = p.col_m[j];
  for (int64_t i = 0; i < p.br; ++i) {
    const S* xr = p.x + i * p.ld;
    const S mi = p.row_m[i];
    if (mi == ninf) continue;  // only with -inf inputs
    V acc = splat((S)0);
    for (int64_t j = 0; j < p.bc; j += W) {
      const auto ok = lane_lt(Tr{}, j, p.bc);
      const V s = vload(xr + j);
      acc += sel(ok, vexp(s - mi), splat((S)0));
      const V cm = vload(p.tmp_cmax + j);
      vstore(p.tmp_csum + j, vload(p.tmp_csum + j) + sel(ok, vexp(s - cm), splat((S)0)));
    }
    p.row_l[i] += (double)hsum(acc);
  }
  for (int64_t j = 0; j < p.bc; ++j) p.col_l[j] += (double)p.tmp_csum[j];
}

template <class Tr>
struct ClipBwdTile {
  using S = typename Tr::S;
  S* x;
  int64_t ld, br, bc;
  S scale, coef_row, coef_col;
  const S* row_lse;  // [br]
  const S* col_lse;  // [bc padded]
  const S* row_ctr;  // [br]
  const S* col_ctr;  // [bc padded]
};

// x (raw dots) -> W = R + C in place; returns sum R (x - row_ctr) + C (x - col_ctr)
template <class Tr>
CVINL double clip_bwd_tile_body(const ClipBwdTile<Tr>& p) {
  using S = typename Tr::S;
  using V = typename Tr::V;
  constexpr int W = Tr::W;
  double total = 0.0;
  const bool use_r = p.coef_row != (S)0, use_c = p.coef_col != (S)0;
  for (int64_t i = 0; i < p.br; ++i) {
    S* xr = p.x + i * p.ld;
    const S rl = p.row_lse[i];
    const S rc = p.row_ctr[i];
    V acc = splat((S)0);
    for (int64_t j = 0; j < p.bc; j += W) {
      const auto ok = lane_lt(Tr{}, j, p.bc);
      const V x = vload(xr + j);
      const V s = x * p.scale;
      V wr = splat((S)0), wc = splat((S)0);
      if (use_r) wr = p.coef_row * vexp(s - rl);
      if (use_c) wc = p.coef_col * vexp(s - vload(p.col_lse + j));
      wr = sel(ok, wr, splat((S)0));
      wc = sel(ok, wc, splat((S)0));
      acc += sel(ok, wr * (x - rc) + wc * (x - vload(p.col_ctr + j)), splat((S)0));
      vstore(xr + j, wr + wc);
    }
    total += (double)hsum(acc);
  }
  return total;
}

template <class Tr>
struct SigTile {
  using S = typename Tr::S;
  S* x;
  int64_t ld, br, bc;
  S scale, bias;
  int64_t diag0;  // the tile column of row 0's positive (i0 - j0), or a value that never matches
};

// loss: sum softplus(sgn * L) with sgn = -z (+1 off the diagonal, -1 on it); x is left as is
template <class Tr>
CVINL double sig_fwd_tile_body(const SigTile<Tr>& p) {
  using S = typename Tr::S;
  using V = typename Tr::V;
  constexpr int W = Tr::W;
  double total = 0.0;
  for (int64_t i = 0; i < p.br; ++i) {
    const S* xr = p.x + i * p.ld;
    const int64_t jd = p.diag0 + i;  // the positive's tile column in this row (may be out of range)
    V acc = splat((S)0);
    for (int64_t j = 0; j < p.bc; j += W) {
      const V L = vload(xr + j) * p.scale + p.bias;
      V t = L;
      if (jd >= j && jd < j + W) t = sel(lane_eq(Tr{}, j, jd), -L, L);
      const V sp = vmax(t, splat((S)0)) + vlog1p01(vexp(-vabs(t)));
      acc += sel(lane_lt(Tr{}, j, p.bc), sp, splat((S)0));
    }
    total += (double)hsum(acc);
  }
  return total;
}

// x (raw dots) -> W = sgn * sigmoid(sgn * L) in place; adds sum W to *dbias and sum W x to *dscale, and
// with LOSS the loss terms softplus(sgn * L) (sig_fwd_tile's sum, from the same exp) to *loss
template <class Tr, bool LOSS>
CVINL void sig_bwd_tile_body(const SigTile<Tr>& p, double* dscale, double* dbias, double* loss) {
  using S = typename Tr::S;
  using V = typename Tr::V;
  constexpr int W = Tr::W;
  double ds = 0.0, db = 0.0, dl = 0.0;
  for (int64_t i = 0; i < p.br; ++i) {
    S* xr = p.x + i * p.ld;
    const int64_t jd = p.diag0 + i;
    V acc_s = splat((S)0), acc_b = splat((S)0), acc_l = splat((S)0);
    for (int64_t j = 0; j < p.bc; j += W) {
      const V x = vload(xr + j);
      const V L = x * p.scale + p.bias;
      V sgn = splat((S)1);
      if (jd >= j && jd < j + W) sgn = sel(lane_eq(Tr{}, j, jd), splat((S)-1), sgn);
      const V t = sgn * L;
      const V e = vexp(-vabs(t));
      const V r = (S)1 / (e + (S)1);
      const V sig = sel(t >= (S)0, r, e * r);
      const auto ok = lane_lt(Tr{}, j, p.bc);
      const V w = sel(ok, sgn * sig, splat((S)0));
      acc_b += w;
      acc_s += w * sel(ok, x, splat((S)0));
      if (LOSS) acc_l += sel(ok, vmax(t, splat((S)0)) + vlog1p01(e), splat((S)0));
      vstore(xr + j, w);
    }
    ds += (double)hsum(acc_s);
    db += (double)hsum(acc_b);
    if (LOSS) dl += (double)hsum(acc_l);
  }
  *dscale += ds;
  *dbias += db;
  if (LOSS) *loss += dl;
}

// Per-ISA entry points of the fp32 bodies (csrc/cpu/isa_dispatch.h).
VLOPS_ISA_ENTRY(lse_tile_f32, void, (const LseTile<F32>& p), lse_tile_body<F32>(p))
VLOPS_ISA_ENTRY(clip_bwd_tile_f32, double, (const ClipBwdTile<F32>& p), clip_bwd_tile_body<F32>(p))
VLOPS_ISA_ENTRY(sig_fwd_tile_f32, double, (const SigTile<F32>& p), sig_fwd_tile_body<F32>(p))
VLOPS_ISA_ENTRY(sig_bwd_tile_f32, void, (const SigTile<F32>& p, double* ds, double* db),
                (sig_bwd_tile_body<F32, false>(p, ds, db, nullptr)))
VLOPS_ISA_ENTRY(sig_fwd_bwd_tile_f32, void, (const SigTile<F32>& p, double* ds, double* db, double* dl),
                (sig_bwd_tile_body<F32, true>(p, ds, db, dl)))

CVINL void lse_tile(int isa, const LseTile<F32>& p) { VLOPS_ISA_DISPATCH(isa, lse_tile_f32, p); }
CVINL void lse_tile(int, const LseTile<F64>& p) { lse_tile_body<F64>(p); }
CVINL double clip_bwd_tile(int isa, const ClipBwdTile<F32>& p) { return VLOPS_ISA_DISPATCH(isa, clip_bwd_tile_f32, p); }
CVINL double clip_bwd_tile(int, const ClipBwdTile<F64>& p) { return clip_bwd_tile_body<F64>(p); }
CVINL double sig_fwd_tile(int isa, const SigTile<F32>& p) { return VLOPS_ISA_DISPATCH(isa, sig_fwd_tile_f32, p); }
CVINL double sig_fwd_tile(int, const SigTile<F64>& p) { return sig_fwd_tile_body<F64>(p); }
CVINL void sig_bwd_tile(int isa, const SigTile<F32>& p, double* ds, double* db) {
  VLOPS_ISA_DISPATCH(isa, sig_bwd_tile_f32, p, ds, db);
}
CVINL void sig_bwd_tile(int, const SigTile<F64>& p, double* ds, double* db) {
  sig_bwd_tile_body<F64, false>(p, ds, db, nullptr);
}
CVINL void sig_fwd_bwd_tile(int isa, const SigTile<F32>& p, double* ds, double* db, double* dl) {
  VLOPS_ISA_DISPATCH(isa, sig_fwd_bwd_tile_f32, p, ds, db, dl);
}
CVINL void sig_fwd_bwd_tile(int, const SigTile<F64>& p, double* ds, double* db, double* dl) {
  sig_bwd_tile_body<F64, true>(p, ds, db, dl);
}

// ------------------------------------------------------------------------------------------------
// Schedule
// ------------------------------------------------------------------------------------------------
template <class S>
struct Blocking {
  static constexpr int64_t BR = sizeof(S) == 4 ? 256 : 128;  // tile rows
  static constexpr int64_t BC = sizeof(S) == 4 ? 512 : 256;  // tile columns (a multiple of 16)
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Number of row (= column) groups: one per 256 rows / columns of the smaller side, at most
// max(16, threads). A function of the shape only for <= 16 threads, so results do not change with the
// thread count.
inline int64_t num_groups(int64_t N, int64_t M) {
  const int64_t want = std::max<int64_t>(16, at::get_num_threads());
  const int64_t cap = std::min(N, M) / 256;
  return std::max<int64_t>(1, std::min(want, cap));
}

// Per-thread tile buffer and scratch.
template <class S>
struct Scratch {
  at::Tensor tile;  // [BR, BC]
  std::vector<S> v1, v2, v3;
};

template <class S>
struct ScratchPool {
  std::vector<Scratch<S>> per_thread;
  ScratchPool() : per_thread(std::max(1, at::get_num_threads())) {}
  Scratch<S>& get() {
    const int t = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(t >= 0 && t < (int)per_thread.size());
    Scratch<S>& s = per_thread[t];
    if (!s.tile.defined()) {
      const auto dt = sizeof(S) == 4 ? at::kFloat : at::kDouble;
      s.tile = at::empty({Blocking<S>::BR, Blocking<S>::BC}, at::TensorOptions().dtype(dt));
      s.v1.assign(Blocking<S>::BC, S(0));
      s.v2.assign(Blocking<S>::BC, S(0));
      s.v3.assign(Blocking<S>::BR, S(0));
    }
    return s;
  }
};

// Runs fn(task, i0, br, j0, bc, first_row, first_col) over every BR x BC tile of the N x M grid, in G
// rounds of G tasks (task t of round k: row group t, column group (t + k) mod G; task id k * G + t).
// first_row / first_col: this is the first tile to visit rows i0.. / columns j0.. (round 0, first
// tile of the block), so a backward writes dA / dB there instead of adding. Within a round the
// threads take tasks from a shared counter (which thread runs a task does not change the result).
template <class S, class Fn>
void run_grid(int64_t N, int64_t M, int64_t G, const Fn& fn) {
  const int64_t BR = Blocking<S>::BR, BC = Blocking<S>::BC;
  const int64_t nthreads = std::min<int64_t>(G, std::max(1, at::get_num_threads()));
  for (int64_t k = 0; k < G; ++k) {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
      for (int64_t t = next.fetch_add(1); t < G; t = next.fetch_add(1)) {
        const int64_t c = (t + k) % G;
        const int64_t r0 = t * N / G, r1 = (t + 1) * N / G;
        const int64_t c0 = c * M / G, c1 = (c + 1) * M / G;
        for (int64_t i0 = r0; i0 < r1; i0 += BR)
          for (int64_t j0 = c0; j0 < c1; j0 += BC)
            fn(k * G + t, i0, std::min(BR, r1 - i0), j0, std::min(BC, c1 - j0), k == 0 && j0 == c0,
               k == 0 && i0 == r0);
      }
    });
  }
}

// The raw-dot tile A[i0 : i0 + br] B[j0 : j0 + bc]^T, as a [br, bc] view (row stride BC) of the tile.
inline at::Tensor dot_tile(const at::Tensor& tile, const at::Tensor& a, const at::Tensor& b, int64_t i0, int64_t br,
                           int64_t j0, int64_t bc) {
  at::Tensor out = tile.as_strided({br, bc}, {tile.size(1), 1});
  at::mm_out(out, a.narrow(0, i0, br), b.narrow(0, j0, bc).t());
  return out;
}

// dA[i0 : i0 + br] += W B[j0 : j0 + bc], dB[j0 : j0 + bc] += W^T A[i0 : i0 + br] (written, not added,
// on the first visit: the outputs start uninitialised).
inline void accumulate_grads(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, at::Tensor& da,
                             at::Tensor& db, int64_t i0, int64_t br, int64_t j0, int64_t bc, bool first_row,
                             bool first_col) {
  at::Tensor da_v = da.narrow(0, i0, br), db_v = db.narrow(0, j0, bc);
  if (first_row)
    at::mm_out(da_v, w, b.narrow(0, j0, bc));
  else
    da_v.addmm_(w, b.narrow(0, j0, bc));
  if (first_col)
    at::mm_out(db_v, w.t(), a.narrow(0, i0, br));
  else
    db_v.addmm_(w.t(), a.narrow(0, i0, br));
}

// ------------------------------------------------------------------------------------------------
// Argument checks
// ------------------------------------------------------------------------------------------------
inline const char* dtname(const at::Tensor& t) { return c10::toString(t.scalar_type()); }

void check_ab(const char* fn, const at::Tensor& a, const at::Tensor& b) {
  for (int k = 0; k < 2; ++k) {
    const at::Tensor& t = k ? b : a;
    const char* nm = k ? "b" : "a";
    VLOPS_CHECK(t.defined(), "vlops ", fn, ": ", nm, " is undefined");
    VLOPS_CHECK(t.device().is_cpu(), "vlops ", fn, ": ", nm, " must be a CPU tensor, got one on ", t.device());
    const auto dt = t.scalar_type();
    VLOPS_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, "vlops ", fn, ": ",
                nm, " must be float32, float16, bfloat16 or float64, got ", dtname(t));
    VLOPS_CHECK(t.dim() == 2, "vlops ", fn, ": ", nm, " must be 2-D, got shape ", t.sizes());
    VLOPS_CHECK(t.is_contiguous(), "vlops ", fn, ": ", nm, " must be contiguous");
  }
  VLOPS_CHECK(a.scalar_type() == b.scalar_type(), "vlops ", fn, ": a has dtype ", dtname(a), " but b has dtype ",
              dtname(b), "; they must match");
  VLOPS_CHECK(a.size(1) == b.size(1), "vlops ", fn, ": a [N, D] and b [M, D] must have the same D, got ", a.sizes(),
              " and ", b.sizes());
}

double read_scalar(const char* fn, const char* nm, const at::Tensor& t) {
  VLOPS_CHECK(t.defined(), "vlops ", fn, ": ", nm, " is undefined");
  VLOPS_CHECK(t.device().is_cpu(), "vlops ", fn, ": ", nm, " must be a CPU tensor, got one on ", t.device());
  VLOPS_CHECK(t.scalar_type() == at::kFloat, "vlops ", fn, ": ", nm, " must be float32, got ", dtname(t));
  VLOPS_CHECK(t.dim() == 1 && t.size(0) == 1, "vlops ", fn, ": ", nm, " must have shape [1], got ", t.sizes());
  return (double)t.data_ptr<float>()[0];
}

void check_lse(const char* fn, const char* nm, const at::Tensor& t, int64_t n, at::ScalarType want) {
  VLOPS_CHECK(t.defined(), "vlops ", fn, ": ", nm, " is undefined");
  VLOPS_CHECK(t.device().is_cpu(), "vlops ", fn, ": ", nm, " must be a CPU tensor, got one on ", t.device());
  VLOPS_CHECK(t.scalar_type() == want, "vlops ", fn, ": ", nm, " must be ", c10::toString(want), ", got ", dtname(t));
  VLOPS_CHECK(t.dim() == 1 && t.size(0) == n, "vlops ", fn, ": ", nm, " must have shape [", n, "], got ", t.sizes());
  VLOPS_CHECK(t.is_contiguous(), "vlops ", fn, ": ", nm, " must be contiguous");
}

inline at::ScalarType out_dtype(const at::Tensor& a) {
  return a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}
// fp32 / fp64 inputs as they are; bf16 / fp16 converted once to fp32.
// Detached: the tile GEMMs (mm_out / addmm_) run on worker threads, where the caller's autograd state
// (a custom op runs below autograd) is not in force; they must never see a tensor that requires grad.
inline at::Tensor compute_copy(const at::Tensor& t) {
  const at::Tensor d = t.detach();
  return (d.scalar_type() == at::kFloat || d.scalar_type() == at::kDouble) ? d : d.to(at::kFloat).contiguous();
}

// ------------------------------------------------------------------------------------------------
// The four kernels, templated on the compute type
// ------------------------------------------------------------------------------------------------
template <class Tr>
void lse_impl(const at::Tensor& a, const at::Tensor& b, double scale, at::Tensor& row_lse, at::Tensor& col_lse) {
  using S = typename Tr::S;
  const int64_t N = a.size(0), M = b.size(0);
  const int isa = current_isa();
  const int64_t G = num_groups(N, M);
  const S ninf = -std::numeric_limits<S>::infinity();
  std::vector<S> row_m(N, ninf), col_m(M, ninf);
  std::vector<double> row_l(N, 0.0), col_l(M, 0.0);
  ScratchPool<S> pool;
  run_grid<S>(N, M, G, [&](int64_t, int64_t i0, int64_t br, int64_t j0, int64_t bc, bool, bool) {
    Scratch<S>& sc = pool.get();
    at::Tensor x = dot_tile(sc.tile, a, b, i0, br, j0, bc);
    LseTile<Tr> p{x.data_ptr<S>(),  x.stride(0),         br,          bc,         (S)scale,
                  row_m.data() + i0, row_l.data() + i0,  col_m.data() + j0, col_l.data() + j0,
                  sc.v1.data(),     sc.v2.data(),       sc.v3.data()};
    lse_tile(isa, p);
  });
  S* rl = row_lse.data_ptr<S>();
  S* cl = col_lse.data_ptr<S>();
  for (int64_t i = 0; i < N; ++i) rl[i] = (S)((double)row_m[i] + std::log(row_l[i]));
  for (int64_t j = 0; j < M; ++j) cl[j] = (S)((double)col_m[j] + std::log(col_l[j]));
}

template <class Tr>
double clip_bwd_impl(const at::Tensor& a, const at::Tensor& b, double scale, const at::Tensor& row_lse,
                     const at::Tensor& col_lse, double coef_row, double coef_col, const at::Tensor& row_center,
                     const at::Tensor& col_center, at::Tensor& da, at::Tensor& db) {
  using S = typename Tr::S;
  const int64_t N = a.size(0), M = b.size(0);
  const int isa = current_isa();
  const int64_t G = num_groups(N, M);
  std::vector<S> cl(round_up(M, 16) + 16, (S)0);
  std::memcpy(cl.data(), col_lse.data_ptr<S>(), sizeof(S) * M);
  std::vector<S> cc(round_up(M, 16) + 16, (S)0);
  std::memcpy(cc.data(), col_center.data_ptr<S>(), sizeof(S) * M);
  const S* rl = row_lse.data_ptr<S>();
  const S* rc = row_center.data_ptr<S>();
  std::vector<double> part(G * G, 0.0);
  ScratchPool<S> pool;
  run_grid<S>(N, M, G, [&](int64_t task, int64_t i0, int64_t br, int64_t j0, int64_t bc, bool first_row, bool first_col) {
    Scratch<S>& sc = pool.get();
    at::Tensor x = dot_tile(sc.tile, a, b, i0, br, j0, bc);
    ClipBwdTile<Tr> p{x.data_ptr<S>(), x.stride(0), br, bc, (S)scale, (S)coef_row, (S)coef_col, rl + i0,
                      cl.data() + j0, rc + i0, cc.data() + j0};
    part[task] += clip_bwd_tile(isa, p);
    accumulate_grads(x, a, b, da, db, i0, br, j0, bc, first_row, first_col);
  });
  double total = 0.0;
  for (double v : part) total += v;
  return total;
}

template <class Tr>
double siglip_fwd_impl(const at::Tensor& a, const at::Tensor& b, double scale, double bias, bool negative_only) {
  using S = typename Tr::S;
  const int64_t N = a.size(0), M = b.size(0);
  const int isa = current_isa();
  const int64_t G = num_groups(N, M);
  std::vector<double> part(G * G, 0.0);
  ScratchPool<S> pool;
  run_grid<S>(N, M, G, [&](int64_t task, int64_t i0, int64_t br, int64_t j0, int64_t bc, bool, bool) {
    Scratch<S>& sc = pool.get();
    at::Tensor x = dot_tile(sc.tile, a, b, i0, br, j0, bc);
    SigTile<Tr> p{x.data_ptr<S>(), x.stride(0), br, bc, (S)scale, (S)bias,
                  negative_only ? std::numeric_limits<int64_t>::min() / 2 : i0 - j0};
    part[task] += sig_fwd_tile(isa, p);
  });
  double total = 0.0;
  for (double v : part) total += v;
  return total;
}

// {dscale, dbias, loss} sums (loss 0 unless LOSS: then the forward's loss sum from the same tiles)
template <class Tr, bool LOSS>
std::array<double, 3> siglip_bwd_impl(const at::Tensor& a, const at::Tensor& b, double scale, double bias,
                                      bool negative_only, at::Tensor& da, at::Tensor& db) {
  using S = typename Tr::S;
  const int64_t N = a.size(0), M = b.size(0);
  const int isa = current_isa();
  const int64_t G = num_groups(N, M);
  std::vector<double> ps(G * G, 0.0), pb(G * G, 0.0), pl(G * G, 0.0);
  ScratchPool<S> pool;
  run_grid<S>(N, M, G, [&](int64_t task, int64_t i0, int64_t br, int64_t j0, int64_t bc, bool first_row, bool first_col) {
    Scratch<S>& sc = pool.get();
    at::Tensor x = dot_tile(sc.tile, a, b, i0, br, j0, bc);
    SigTile<Tr> p{x.data_ptr<S>(), x.stride(0), br, bc, (S)scale, (S)bias,
                  negative_only ? std::numeric_limits<int64_t>::min() / 2 : i0 - j0};
    if (LOSS)
      sig_fwd_bwd_tile(isa, p, &ps[task], &pb[task], &pl[task]);
    else
      sig_bwd_tile(isa, p, &ps[task], &pb[task]);
    accumulate_grads(x, a, b, da, db, i0, br, j0, bc, first_row, first_col);
  });
  std::array<double, 3> t{0.0, 0.0, 0.0};
  for (int64_t k = 0; k < G * G; ++k) {
    t[0] += ps[k];
    t[1] += pb[k];
    t[2] += pl[k];
  }
  return t;
}

inline at::TensorOptions out_opts(const at::Tensor& a) { return at::TensorOptions().dtype(out_dtype(a)); }

at::Tensor scalar_out(const at::Tensor& a, double v) { return at::full({1}, v, out_opts(a)); }

}  // namespace

// ------------------------------------------------------------------------------------------------
// Launchers (bound in csrc/bindings.cpp)
// ------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> contrastive_lse_cpu(const at::Tensor& a, const at::Tensor& b,
                                                       const at::Tensor& scale) {
  const char* fn = "contrastive_lse_cpu";
  check_ab(fn, a, b);
  const double s = read_scalar(fn, "scale", scale);
  const int64_t N = a.size(0), M = b.size(0);
  at::Tensor row_lse = at::empty({N}, out_opts(a)), col_lse = at::empty({M}, out_opts(a));
  if (N == 0 || M == 0) {
    row_lse.fill_(-std::numeric_limits<double>::infinity());
    col_lse.fill_(-std::numeric_limits<double>::infinity());
    return {row_lse, col_lse};
  }
  const at::Tensor ac = compute_copy(a), bc = compute_copy(b);
  if (ac.scalar_type() == at::kDouble)
    lse_impl<F64>(ac, bc, s, row_lse, col_lse);
  else
    lse_impl<F32>(ac, bc, s, row_lse, col_lse);
  return {row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_bwd_cpu(const at::Tensor& a, const at::Tensor& b,
                                                            const at::Tensor& scale, const at::Tensor& row_lse,
                                                            const at::Tensor& col_lse, double coef_row,
                                                            double coef_col, const at::Tensor& row_center,
                                                            const at::Tensor& col_center) {
  const char* fn = "clip_bwd_cpu";
  check_ab(fn, a, b);
  const double s = read_scalar(fn, "scale", scale);
  const int64_t N = a.size(0), M = b.size(0), D = a.size(1);
  check_lse(fn, "row_lse", row_lse, N, out_dtype(a));
  check_lse(fn, "col_lse", col_lse, M, out_dtype(a));
  check_lse(fn, "row_center", row_center, N, out_dtype(a));
  check_lse(fn, "col_center", col_center, M, out_dtype(a));
  if (N == 0 || M == 0)
    return {at::zeros({N, D}, out_opts(a)), at::zeros({M, D}, out_opts(a)), scalar_out(a, 0.0)};
  at::Tensor da = at::empty({N, D}, out_opts(a)), db = at::empty({M, D}, out_opts(a));
  const at::Tensor ac = compute_copy(a), bc = compute_copy(b);
  double ds;
  if (ac.scalar_type() == at::kDouble)
    ds = clip_bwd_impl<F64>(ac, bc, s, row_lse, col_lse, coef_row, coef_col, row_center, col_center, da, db);
  else
    ds = clip_bwd_impl<F32>(ac, bc, s, row_lse, col_lse, coef_row, coef_col, row_center, col_center, da, db);
  return {da, db, scalar_out(a, ds)};
}

at::Tensor siglip_fwd_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& bias,
                          bool negative_only) {
  const char* fn = "siglip_fwd_cpu";
  check_ab(fn, a, b);
  const double s = read_scalar(fn, "scale", scale);
  const double bi = read_scalar(fn, "bias", bias);
  if (a.size(0) == 0 || b.size(0) == 0) return scalar_out(a, 0.0);
  const at::Tensor ac = compute_copy(a), bc = compute_copy(b);
  const double loss = ac.scalar_type() == at::kDouble ? siglip_fwd_impl<F64>(ac, bc, s, bi, negative_only)
                                                      : siglip_fwd_impl<F32>(ac, bc, s, bi, negative_only);
  return scalar_out(a, loss);
}

// da, db, {dscale, dbias, loss} of siglip_bwd_cpu / siglip_fwd_bwd_cpu (the loss only with LOSS)
template <bool LOSS>
std::tuple<at::Tensor, at::Tensor, std::array<double, 3>> siglip_grads(const char* fn, const at::Tensor& a,
                                                                       const at::Tensor& b, const at::Tensor& scale,
                                                                       const at::Tensor& bias, bool negative_only) {
  check_ab(fn, a, b);
  const double s = read_scalar(fn, "scale", scale);
  const double bi = read_scalar(fn, "bias", bias);
  const int64_t N = a.size(0), M = b.size(0), D = a.size(1);
  if (N == 0 || M == 0) return {at::zeros({N, D}, out_opts(a)), at::zeros({M, D}, out_opts(a)), {0.0, 0.0, 0.0}};
  at::Tensor da = at::empty({N, D}, out_opts(a)), db = at::empty({M, D}, out_opts(a));
  const at::Tensor ac = compute_copy(a), bc = compute_copy(b);
  const std::array<double, 3> r = ac.scalar_type() == at::kDouble
                                      ? siglip_bwd_impl<F64, LOSS>(ac, bc, s, bi, negative_only, da, db)
                                      : siglip_bwd_impl<F32, LOSS>(ac, bc, s, bi, negative_only, da, db);
  return {da, db, r};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_bwd_cpu(const at::Tensor& a, const at::Tensor& b,
                                                                          const at::Tensor& scale,
                                                                          const at::Tensor& bias, bool negative_only) {
  auto [da, db, r] = siglip_grads<false>("siglip_bwd_cpu", a, b, scale, bias, negative_only);
  return {da, db, scalar_out(a, r[0]), scalar_out(a, r[1])};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_fwd_bwd_cpu(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& bias, bool negative_only) {
  auto [da, db, r] = siglip_grads<true>("siglip_fwd_bwd_cpu", a, b, scale, bias, negative_only);
  return {scalar_out(a, r[2]), da, db, scalar_out(a, r[0]), scalar_out(a, r[1])};
}

}  // namespace cpu
}  // namespace vlops
