// The fused ViT / CLIP patch stem on the CPU: patch_embed_fwd_cpu, the kernel contract of
// vlops/ops/patch_embed.py (patch unfold + projection GEMM + bias + optional patch LayerNorm + position
// embedding + optional LayerNorm, written straight into rows R0.. of the token buffer).
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
//   3. epilogue, per row, on the fp32 (fp64) values while they are in cache: + bias, LayerNorm 1 (if
//      use_pn), + pos[n], LayerNorm 2 (if use_ln). Explicit 16-wide SIMD (GCC vector extensions)
//      compiled for AVX-512, AVX2 and a portable baseline, picked at run time like the other CPU
//      kernels (vlops._C.set_cpu_isa / VLOPS_CPU_ISA); fp64 is scalar code.
// Memory beyond inputs and output: per thread a [BM, K] packed buffer, a [BM, D] tile (and a raw
// [BM, K] 16-bit buffer for 16-bit images), plus the fp32 weight copy for 16-bit inputs: no
// [B * Gh * Gw, K] unfold buffer ever exists. Rows 0 .. R0 - 1 of every image are left unwritten.
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
#include "vec16.h"  // 16-lane vector helpers (silences -Wpsabi: no vector crosses a call boundary)

namespace vlops {
namespace cpu {

std::string cpu_isa();  // csrc/cpu/diffusion_step.cpp: the instruction set the CPU kernels use now

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
  double pn_eps, ln_eps;
  bool use_pn, use_ln;
};

// x = (x + a1) + a2; returns sum x
template <class Tr>
CVINL typename Tr::S add2_sum(typename Tr::S* x, const typename Tr::S* a1, const typename Tr::S* a2, int64_t D) {
  using S = typename Tr::S;
  using V = typename Tr::V;
  constexpr int W = Tr::W;
  const int64_t Dv = D / W * W;
  V acc = splat((S)0);
  for (int64_t j = 0; j < Dv; j += W) {
    const V v = (vload(x + j) + vload(a1 + j)) + vload(a2 + j);
    vstore(x + j, v);
    acc += v;
  }
  S tail = 0;
  for (int64_t j = Dv; j < D; ++j) {
    const S v = (x[j] + a1[j]) + a2[j];
    x[j] = v;
    tail += v;
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
    const S* p = a.pos + n * a.pos_ld;
    n = (n + 1 == a.N) ? 0 : n + 1;
    S sum;
    if (a.use_pn) {  // (x + bias), LayerNorm 1, + pos
      sum = add2_sum<Tr>(x, a.bias, a.zeros, D);
      const S mean = (S)((double)sum / (double)D);
      const S rstd = inv_std<S>(sq_dev<Tr>(x, mean, D), D, a.pn_eps);
      sum = norm_add_sum<Tr>(x, mean, rstd, a.pn_w, a.pn_b, p, D);
    } else {  // (x + bias) + pos
      sum = add2_sum<Tr>(x, a.bias, p, D);
    }
    if (a.use_ln) {  // LayerNorm 2
      const S mean = (S)((double)sum / (double)D);
      const S rstd = inv_std<S>(sq_dev<Tr>(x, mean, D), D, a.ln_eps);
      norm_add_sum<Tr>(x, mean, rstd, a.ln_w, a.ln_b, a.zeros, D);
    }
  }
}

// Per-ISA entry points of the fp32 epilogue (the body is inlined into each, compiled for its ISA).
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define VLOPS_PE_X86 1
#define VLOPS_PE_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c")))
#define VLOPS_PE_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define VLOPS_PE_X86 0
#endif

void epi_f32_generic(const Epi<float>& a) { epi_body<F32>(a); }
#if VLOPS_PE_X86
VLOPS_PE_AVX2 void epi_f32_avx2(const Epi<float>& a) { epi_body<F32>(a); }
VLOPS_PE_AVX512 void epi_f32_avx512(const Epi<float>& a) { epi_body<F32>(a); }
#endif

enum Isa { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

int current_isa() {
#if VLOPS_PE_X86
  const std::string s = cpu_isa();
  if (s == "avx512") return ISA_AVX512;
  if (s == "avx2") return ISA_AVX2;
#endif
  return ISA_GENERIC;
}

void epilogue(int isa, const Epi<float>& a) {
#if VLOPS_PE_X86
  if (isa == ISA_AVX512) return epi_f32_avx512(a);
  if (isa == ISA_AVX2) return epi_f32_avx2(a);
#else
  (void)isa;
#endif
  epi_f32_generic(a);
}
void epilogue(int, const Epi<double>& a) { epi_body<F64>(a); }

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

// S: compute type (float / double); E: the images' element storage (S itself, or uint16_t for 16-bit).
template <class S, class E>
void patch_embed_impl(const at::Tensor& images, const at::Tensor& w, const Epi<S>& base, const Geom& g, int64_t B,
                      int64_t R0, at::Tensor& out) {
  constexpr bool kSame = std::is_same<S, E>::value;
  const int64_t N = g.N, D = w.size(0), K = w.size(1);
  const auto cdt = std::is_same<S, double>::value ? at::kDouble : at::kFloat;
  const int64_t BM = block_rows(cdt);
  const int isa = current_isa();
  const int64_t max_threads = std::max(1, at::get_num_threads());
  const std::vector<Tile> tiles = plan_tiles(B, N, BM, max_threads);
  int64_t max_rows = 0;
  for (const Tile& t : tiles) max_rows = std::max(max_rows, t.rows);
  const int64_t ntiles = (int64_t)tiles.size();
  const int64_t nthreads = std::min(ntiles, max_threads);

  const at::Tensor wt = w.t();  // [K, D] view: the GEMM reads weight^T (a contiguous copy measured no faster)
  at::Tensor out2d = out.view({B * (R0 + N), D});
  const E* img = reinterpret_cast<const E*>(images.data_ptr());
  std::vector<Scratch<S>> pool(max_threads);
  std::atomic<int64_t> next{0};

  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    const int tid = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(tid >= 0 && tid < (int)pool.size());
    Scratch<S>& sc = pool[tid];
    if (!sc.packed.defined()) {
      sc.packed = at::empty({max_rows, K}, at::TensorOptions().dtype(cdt));
      if (!kSame) sc.raw = at::empty({max_rows, K}, at::TensorOptions().dtype(images.scalar_type()));
    }
    for (int64_t t = next.fetch_add(1); t < ntiles; t = next.fetch_add(1)) {
      const int64_t r0 = tiles[t].r0, rows = tiles[t].rows;
      at::Tensor packed = sc.packed.narrow(0, 0, rows);
      if (kSame) {
        gather<E>(reinterpret_cast<E*>(packed.data_ptr()), img, g, r0, rows);
      } else {
        at::Tensor raw = sc.raw.narrow(0, 0, rows);
        gather<E>(reinterpret_cast<E*>(raw.data_ptr()), img, g, r0, rows);
        packed.copy_(raw);
      }
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

// ------------------------------------------------------------------------------------------------
// Argument checks
// ------------------------------------------------------------------------------------------------
constexpr const char* kFn = "vlops patch_embed_fwd_cpu: ";

inline const char* dtname(const at::Tensor& t) { return c10::toString(t.scalar_type()); }

void check_param(const c10::optional<at::Tensor>& t, const char* nm, at::ScalarType cdt, int64_t rows, int64_t D,
                 bool matrix) {
  if (!t.has_value() || !t->defined()) return;
  VLOPS_CHECK(t->device().is_cpu(), kFn, nm, " must be a CPU tensor, got one on ", t->device());
  VLOPS_CHECK(t->scalar_type() == cdt, kFn, nm, " must be ", c10::toString(cdt),
              " (the compute dtype of these images), got ", dtname(*t));
  if (matrix) {
    VLOPS_CHECK(t->dim() == 2 && t->size(0) == rows && t->size(1) == D, kFn, nm, " must be [Gh * Gw, D] = [", rows,
                ", ", D, "], got shape ", t->sizes());
  } else {
    VLOPS_CHECK(t->dim() == 1 && t->size(0) == D, kFn, nm, " must be [D] = [", D, "], got shape ", t->sizes());
  }
  VLOPS_CHECK(t->is_contiguous(), kFn, nm, " must be contiguous");
}

void check_eps(double eps, const char* nm, const char* flag) {
  VLOPS_CHECK(std::isfinite(eps) && eps >= 0.0, kFn, nm, " must be a finite number >= 0 when ", flag,
              " is set, got ", eps);
}

// the tensor, detached (the GEMMs run on worker threads, below autograd), or an empty tensor
inline at::Tensor opt(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->detach() : at::Tensor();
}

template <class S>
inline const S* ptr_or(const at::Tensor& t, const std::vector<S>& fallback) {
  return t.defined() ? t.data_ptr<S>() : fallback.data();
}

template <class S, class E>
void run_typed(const at::Tensor& images, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& pos,
               const at::Tensor& pn_w, const at::Tensor& pn_b, double pn_eps, bool use_pn, const at::Tensor& ln_w,
               const at::Tensor& ln_b, double ln_eps, bool use_ln, const Geom& g, int64_t B, int64_t R0,
               at::Tensor& out) {
  const int64_t D = w.size(0);
  const std::vector<S> zeros(D, (S)0), ones(D, (S)1);
  Epi<S> e{};
  e.N = g.N;
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
  patch_embed_impl<S, E>(images, w, e, g, B, R0, out);
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Launcher (bound in csrc/bindings.cpp)
// ------------------------------------------------------------------------------------------------
at::Tensor patch_embed_fwd_cpu(const at::Tensor& images, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& pos,
                               const c10::optional<at::Tensor>& pn_weight, const c10::optional<at::Tensor>& pn_bias,
                               double pn_eps, bool use_pn,
                               const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                               double ln_eps, bool use_ln, int64_t patch_size, int64_t prefix_tokens) {
  VLOPS_CHECK(images.defined(), kFn, "images is undefined");
  VLOPS_CHECK(images.device().is_cpu(), kFn, "images must be a CPU tensor, got one on ", images.device());
  const auto dt = images.scalar_type();
  VLOPS_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, kFn,
              "images must be float32, float16, bfloat16 or float64, got ", dtname(images));
  VLOPS_CHECK(images.dim() == 4, kFn, "images must be 4-D [B, C, H, W], got shape ", images.sizes());
  VLOPS_CHECK(patch_size >= 1, kFn, "patch_size must be >= 1, got ", patch_size);
  VLOPS_CHECK(prefix_tokens >= 0, kFn, "prefix_tokens must be >= 0, got ", prefix_tokens);
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3), P = patch_size;
  const int64_t K = C * P * P;

  VLOPS_CHECK(weight.defined(), kFn, "weight is undefined");
  VLOPS_CHECK(weight.device().is_cpu(), kFn, "weight must be a CPU tensor, got one on ", weight.device());
  VLOPS_CHECK(weight.scalar_type() == dt, kFn, "weight has dtype ", dtname(weight), " but images has dtype ",
              dtname(images), "; they must match");
  VLOPS_CHECK(weight.dim() == 2 && weight.size(1) == K, kFn, "weight must be [D, C * P * P] = [D, ", K, "] (C = ", C,
              ", P = ", P, "), got shape ", weight.sizes());
  VLOPS_CHECK(weight.is_contiguous(), kFn, "weight must be contiguous");
  const int64_t D = weight.size(0);
  const int64_t Gh = (H + P - 1) / P, Gw = (W + P - 1) / P, N = Gh * Gw;

  const at::ScalarType cdt = dt == at::kDouble ? at::kDouble : at::kFloat;
  check_param(bias, "bias", cdt, 0, D, false);
  check_param(pos, "pos", cdt, N, D, true);
  check_param(pn_weight, "pn_weight", cdt, 0, D, false);
  check_param(pn_bias, "pn_bias", cdt, 0, D, false);
  check_param(ln_weight, "ln_weight", cdt, 0, D, false);
  check_param(ln_bias, "ln_bias", cdt, 0, D, false);
  if (use_pn) check_eps(pn_eps, "pn_eps", "use_pn");
  if (use_ln) check_eps(ln_eps, "ln_eps", "use_ln");

  at::Tensor out = at::empty({B, prefix_tokens + N, D}, images.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || N == 0 || D == 0) return out;

  const at::Tensor img = images.detach();
  Geom g{C, H, W, P, Gw, N, img.stride(0), img.stride(1), img.stride(2), img.stride(3)};
  const at::Tensor b_ = opt(bias), p_ = opt(pos), pw = opt(pn_weight), pb = opt(pn_bias), lw = opt(ln_weight),
                   lb = opt(ln_bias);
  if (dt == at::kDouble) {
    run_typed<double, double>(img, weight.detach(), b_, p_, pw, pb, pn_eps, use_pn, lw, lb, ln_eps, use_ln, g, B,
                              prefix_tokens, out);
  } else if (dt == at::kFloat) {
    run_typed<float, float>(img, weight.detach(), b_, p_, pw, pb, pn_eps, use_pn, lw, lb, ln_eps, use_ln, g, B,
                            prefix_tokens, out);
  } else {  // 16-bit: an fp32 copy of the weight, made once
    const at::Tensor w32 = weight.detach().to(at::kFloat).contiguous();
    run_typed<float, uint16_t>(img, w32, b_, p_, pw, pb, pn_eps, use_pn, lw, lb, ln_eps, use_ln, g, B, prefix_tokens,
                               out);
  }
  return out;
}

}  // namespace cpu
}  // namespace vlops
