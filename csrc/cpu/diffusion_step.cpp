// The fused diffusion step on the CPU: diffusion_step_cpu(...) with the positional arguments of the
// kernel contract (vlops/ops/diffusion.py). One pass over the tensors; per-sample coefficients are
// computed once per sample (in double); at::parallel_for over (sample, chunk) blocks; the loops are
// explicit SIMD (GCC/Clang vector extensions) compiled for AVX-512, AVX2 and a portable baseline and
// picked at run time (`VLOPS_CPU_ISA=generic|avx2|avx512` caps the choice).
//
// Noise: Philox4x32-10 keyed by the seed, counter = element // 4, Box-Muller in float with the
// polynomial log / sin / cos of diffusion_step_simd.h: vlops.reference.diffusion.philox_normal up to
// float rounding (~1e-6 absolute), the uint32 stream bit-exact. For a float compute type and a scalar
// std the normals are drawn in registers inside the step loop (no noise buffer): the Philox and
// Box-Muller work then overlaps the memory traffic. Large float outputs are written with streaming
// stores (no read-for-ownership of the output lines).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#define VLOPS_X86 1
#else
#define VLOPS_X86 0
#endif

#include "cephes_expf.h"
#include "diffusion_step_check.h"
#include "diffusion_step_coef.h"

namespace vlops {
namespace cpu {

enum DType { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2, DT_F64 = 3 };

// Everything one step needs, type-erased.
struct Job {
  const void* eps;
  const void* uncond;  // nullptr: no guidance
  const void* sample;
  const void* noise;   // nullptr: none given
  void* out_prev;
  void* out_x0;        // nullptr: not written
  int64_t B, N, M, Mu; // sample [B, N]; eps [B, M]; uncond [B, Mu]
  int64_t chunk;       // elements of one sample per block
  int dtype;           // DType
  bool guided, ddim, philox;
  bool stream;         // streaming (non-temporal) stores of float outputs
  uint32_t key0, key1; // Philox key: (seed & 0xffffffff, seed >> 32)
  double guidance_scale;
  const ds::Coef* coef;  // [B]
};

constexpr int64_t TILE = 1024;  // elements per inner tile (buffers stay in L1)
constexpr int64_t kStreamBytes = (int64_t)4 << 20;  // outputs of at least this size: streaming stores

// The kernel body once per instruction set.
namespace generic {
#define VLOPS_WB 16
#define VLOPS_ISA 0
#include "diffusion_step_simd.h"
#undef VLOPS_WB
#undef VLOPS_ISA
}  // namespace generic

#if VLOPS_X86 && defined(__GNUC__) && !defined(__clang__)  // (clang: the portable variant only)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
namespace avx2 {
#define VLOPS_WB 32
#define VLOPS_ISA 1
#include "diffusion_step_simd.h"
#undef VLOPS_WB
#undef VLOPS_ISA
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c,bmi,bmi2,popcnt")
namespace avx512 {
#define VLOPS_WB 64
#define VLOPS_ISA 2
#include "diffusion_step_simd.h"
#undef VLOPS_WB
#undef VLOPS_ISA
}  // namespace avx512
#pragma GCC pop_options
#define VLOPS_HAVE_X86_ISAS 1
#else
#define VLOPS_HAVE_X86_ISAS 0
#endif

// ------------------------------------------------------------------------------------------------
// Instruction-set choice
// ------------------------------------------------------------------------------------------------
enum Isa { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static const char* const kIsaNames[] = {"generic", "avx2", "avx512"};

static int best_isa() {
#if VLOPS_HAVE_X86_ISAS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
    return ISA_AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
    return ISA_AVX2;
#endif
  return ISA_GENERIC;
}

static int isa_from_name(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kIsaNames[i]) return i;
  return -1;
}

static std::atomic<int> g_isa{-1};

static int current_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = best_isa();
    if (const char* env = std::getenv("VLOPS_CPU_ISA")) {
      const int want = isa_from_name(env);
      if (want >= 0 && want < v) v = want;  // can only lower the choice
    }
    g_isa.store(v, std::memory_order_relaxed);
  }
  return v;
}

std::string cpu_isa() { return kIsaNames[current_isa()]; }

std::vector<std::string> cpu_isas_supported() {
  std::vector<std::string> out;
  const int best = best_isa();
  for (int i = 0; i <= best; ++i) out.push_back(kIsaNames[i]);
  return out;
}

void set_cpu_isa(const std::string& name) {
  const int want = isa_from_name(name);
  VLOPS_CHECK(want >= 0, "vlops: unknown CPU instruction set '", name, "' (generic, avx2, avx512)");
  VLOPS_CHECK(want <= best_isa(), "vlops: this CPU does not support ", name, " (best: ", kIsaNames[best_isa()], ")");
  g_isa.store(want, std::memory_order_relaxed);
}

static void run_blocks(const Job& j, int64_t b0, int64_t b1, int isa) {
  switch (isa) {
#if VLOPS_HAVE_X86_ISAS
    case ISA_AVX512: avx512::run(j, b0, b1); break;
    case ISA_AVX2: avx2::run(j, b0, b1); break;
#endif
    default: generic::run(j, b0, b1); break;
  }
}

// ------------------------------------------------------------------------------------------------
// The launcher
// ------------------------------------------------------------------------------------------------
template <class A>
static double read_f(const at::Tensor& t, int64_t i) {
  return (double)t.data_ptr<A>()[i];
}
static double read_float(const at::Tensor& t, int64_t i) {
  return t.scalar_type() == at::kDouble ? read_f<double>(t, i) : read_f<float>(t, i);
}

void diffusion_step_cpu(VLOPS_DIFFUSION_STEP_PARAMS) {
  const ds::StepShapes s = ds::check_step_args(VLOPS_DIFFUSION_STEP_ARGS, c10::DeviceType::CPU);
  const int64_t B = s.B, N = s.N;
  if (B == 0 || N == 0) return;

  // Per-sample coefficients, once per sample, in double.
  std::vector<ds::Coef> coef((size_t)B);
  const int64_t* ts = timesteps.data_ptr<int64_t>();
  const int64_t* pt = prev_table.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = ts[s.ts_broadcast ? 0 : b];
    VLOPS_CHECK(t >= 0 && t < s.T, "vlops diffusion_step: timesteps[", s.ts_broadcast ? 0 : b, "] = ", t,
                " is out of range [0, ", s.T, ")");
    const int64_t p = pt[t];
    VLOPS_CHECK(p < s.T, "vlops diffusion_step: prev_table[", t, "] = ", p, " is out of range (< ", s.T, ")");
    const double ab = read_float(alphas_cumprod, t);
    const double abp = p >= 0 ? read_float(alphas_cumprod, p) : final_alpha;
    const double x0s = x0_scale.has_value() ? read_float(*x0_scale, b) : 1.0;
    const double es = eps_scale.has_value() ? read_float(*eps_scale, b) : 1.0;
    coef[(size_t)b] = ds::make_coef(s.cfg, t, ab, abp, x0s, es);
  }

  Job j;
  j.eps = eps.data_ptr();
  j.uncond = uncond.has_value() ? uncond->data_ptr() : nullptr;
  j.sample = sample.data_ptr();
  j.noise = noise.has_value() ? noise->data_ptr() : nullptr;
  j.out_prev = out_prev.data_ptr();
  j.out_x0 = out_x0.has_value() ? out_x0->data_ptr() : nullptr;
  j.B = B;
  j.N = N;
  j.M = s.M;
  j.Mu = s.Mu;
  switch (sample.scalar_type()) {
    case at::kFloat: j.dtype = DT_F32; break;
    case at::kHalf: j.dtype = DT_F16; break;
    case at::kBFloat16: j.dtype = DT_BF16; break;
    default: j.dtype = DT_F64; break;
  }
  j.guided = s.cfg.guided;
  j.ddim = s.cfg.mode == ds::MODE_DDIM;
  j.philox = s.philox;
  j.key0 = (uint32_t)((uint64_t)seed & 0xFFFFFFFFu);
  j.key1 = (uint32_t)((uint64_t)seed >> 32);
  j.guidance_scale = guidance_scale;
  j.coef = coef.data();
  // Streaming stores when the outputs are large (a few MiB: beyond what a core's L2 would keep for the
  // next reader): the lines then go to memory without the read-for-ownership of ordinary stores.
  const int64_t out_bytes = B * N * (int64_t)sample.element_size() * (out_x0.has_value() ? 2 : 1);
  j.stream = out_bytes >= kStreamBytes;

  // Blocks of up to 16 tiles of one sample; small problems run on the calling thread.
  j.chunk = 16 * TILE;
  const int64_t per = (N + j.chunk - 1) / j.chunk;
  const int64_t nblocks = B * per;
  const int64_t block_elems = N < j.chunk ? N : j.chunk;
  const int64_t grain = std::max<int64_t>(1, (int64_t)32768 / block_elems);
  const int isa = current_isa();
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) { run_blocks(j, b0, b1, isa); });
}

// Raw Philox4x32-10 through the same SIMD code (tests: known-answer vectors, bit-exactness).
// counters: int64 [n, 4] holding uint32 values; returns int64 [n, 4].
at::Tensor philox4x32_cpu(const at::Tensor& counters, int64_t key0, int64_t key1) {
  VLOPS_CHECK(counters.device().is_cpu() && counters.scalar_type() == at::kLong && counters.dim() == 2 &&
                  counters.size(1) == 4,
              "vlops philox4x32_cpu: counters must be a CPU int64 tensor [n, 4], got ", counters.sizes());
  VLOPS_CHECK(key0 >= 0 && key0 <= 0xFFFFFFFFll && key1 >= 0 && key1 <= 0xFFFFFFFFll,
              "vlops philox4x32_cpu: keys must be uint32 values");
  const at::Tensor c = counters.contiguous();
  const int64_t n = c.size(0);
  std::vector<uint32_t> in((size_t)(4 * n)), out((size_t)(4 * n));
  const int64_t* cp = c.data_ptr<int64_t>();
  for (int64_t i = 0; i < 4 * n; ++i) in[(size_t)i] = (uint32_t)cp[i];
  switch (current_isa()) {
#if VLOPS_HAVE_X86_ISAS
    case ISA_AVX512: avx512::philox_blocks(in.data(), out.data(), n, (uint32_t)key0, (uint32_t)key1); break;
    case ISA_AVX2: avx2::philox_blocks(in.data(), out.data(), n, (uint32_t)key0, (uint32_t)key1); break;
#endif
    default: generic::philox_blocks(in.data(), out.data(), n, (uint32_t)key0, (uint32_t)key1); break;
  }
  at::Tensor r = at::empty({n, 4}, c.options());
  int64_t* rp = r.data_ptr<int64_t>();
  for (int64_t i = 0; i < 4 * n; ++i) rp[i] = (int64_t)out[(size_t)i];
  return r;
}

}  // namespace cpu
}  // namespace vlops
