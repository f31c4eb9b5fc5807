// Argument checks of the fused diffusion step, shared by the CPU and CUDA launchers.
// The kernel contract is the docstring of vlops/ops/diffusion.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

#include "diffusion_step_coef.h"

// The launchers' parameter list: the kernel contract of vlops/ops/diffusion.py, shared by the
// definitions in cpu/ and cuda/, their declarations in bindings.cpp, and check_step_args.
#define VLOPS_DIFFUSION_STEP_PARAMS                                                                          \
  const at::Tensor &eps, const std::optional<at::Tensor> &uncond, const at::Tensor &sample,                   \
      const std::optional<at::Tensor> &noise, const at::Tensor &timesteps, const at::Tensor &prev_table,      \
      const at::Tensor &alphas_cumprod, const std::optional<at::Tensor> &x0_scale,                            \
      const std::optional<at::Tensor> &eps_scale, const at::Tensor &out_prev,                                 \
      const std::optional<at::Tensor> &out_x0, int64_t mode, double guidance_scale, int64_t prediction_type,  \
      int64_t variance_type, bool clip_sample, double clip_range, double eta, bool use_clipped,               \
      double final_alpha, int64_t seed
#define VLOPS_DIFFUSION_STEP_ARGS                                                                     \
  eps, uncond, sample, noise, timesteps, prev_table, alphas_cumprod, x0_scale, eps_scale, out_prev, out_x0, \
      mode, guidance_scale, prediction_type, variance_type, clip_sample, clip_range, eta, use_clipped,    \
      final_alpha, seed

namespace vlops {
namespace ds {

// Error messages are assembled here with std::string only: c10::str's std::ostringstream, instantiated
// in this extension, crashed (SIGSEGV in ostream::_M_insert<long>) when built with GCC 13 against
// torch 2.11 on the GPU machine. A single std::string argument makes TORCH_CHECK skip the stream.
inline void msg_append(std::string& s, const char* v) { s += v; }
inline void msg_append(std::string& s, const std::string& v) { s += v; }
template <class I, typename std::enable_if<std::is_integral<I>::value, int>::type = 0>
inline void msg_append(std::string& s, I v) {
  s += std::to_string(v);
}
inline void msg_append(std::string& s, double v) { s += std::to_string(v); }
inline void msg_append(std::string& s, c10::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += "]";
}
inline void msg_append(std::string& s, const c10::Device& d) { s += d.str(); }
template <class... A>
inline std::string msg(const A&... a) {
  std::string s;
  (msg_append(s, a), ...);
  return s;
}

// TORCH_CHECK with the message built by msg(...): raises RuntimeError (c10::Error) in Python.
#define VLOPS_CHECK(cond, ...) TORCH_CHECK((cond), ::vlops::ds::msg(__VA_ARGS__))

struct StepShapes {
  int64_t B = 0, N = 0;  // sample [B, N]
  int64_t M = 0;         // eps row length (N or 2N)
  int64_t Mu = 0;        // uncond row length (N or 2N), 0 without guidance
  int64_t T = 0;         // schedule length
  bool ts_broadcast = false;  // timesteps has one entry for every sample
  bool philox = false;        // noise is needed and not given: drawn in-kernel from the seed
  Config cfg{};
};

inline const char* dtype_name(const at::Tensor& t) { return c10::toString(t.scalar_type()); }

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& sample,
                              c10::DeviceType want) {
  VLOPS_CHECK(t.device().type() == want, "vlops diffusion_step: ", name, " must be a ",
              c10::DeviceTypeName(want, true), " tensor, got one on ", t.device());
  VLOPS_CHECK(t.device() == sample.device(), "vlops diffusion_step: ", name, " is on ", t.device(),
              " but sample is on ", sample.device());
}

inline void check_float_2d(const at::Tensor& t, const char* name, const at::Tensor& sample, int64_t rows,
                           int64_t cols_a, int64_t cols_b, c10::DeviceType want) {
  check_same_device(t, name, sample, want);
  VLOPS_CHECK(t.scalar_type() == sample.scalar_type(), "vlops diffusion_step: ", name, " has dtype ",
              dtype_name(t), " but sample has dtype ", dtype_name(sample), "; they must match");
  VLOPS_CHECK(t.dim() == 2 && t.size(0) == rows && (t.size(1) == cols_a || t.size(1) == cols_b),
              "vlops diffusion_step: ", name, " must have shape [", rows, ", ", cols_a,
              (cols_a == cols_b ? "" : " or "), (cols_a == cols_b ? std::string() : std::to_string(cols_b)),
              "], got ", t.sizes());
  VLOPS_CHECK(t.is_contiguous(), "vlops diffusion_step: ", name, " must be contiguous");
}

inline void check_per_sample(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& sample,
                             int64_t B, c10::DeviceType want) {
  if (!t.has_value()) return;
  check_same_device(*t, name, sample, want);
  VLOPS_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, "vlops diffusion_step: ", name,
              " must be float32 (or float64), got ", dtype_name(*t));
  VLOPS_CHECK(t->dim() == 1 && t->size(0) == B, "vlops diffusion_step: ", name, " must have shape [", B,
              "], got ", t->sizes());
  VLOPS_CHECK(t->is_contiguous(), "vlops diffusion_step: ", name, " must be contiguous");
}

// Checks every argument (shapes, dtypes, devices, contiguity, enum ranges); returns the sizes.
inline StepShapes check_step_args(VLOPS_DIFFUSION_STEP_PARAMS, c10::DeviceType want) {
  StepShapes s;
  VLOPS_CHECK(sample.device().type() == want, "vlops diffusion_step: sample must be a ",
              c10::DeviceTypeName(want, true), " tensor, got one on ", sample.device());
  const auto dt = sample.scalar_type();
  VLOPS_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              "vlops diffusion_step: sample must be float32, float16, bfloat16 or float64, got ", dtype_name(sample));
  VLOPS_CHECK(sample.dim() == 2, "vlops diffusion_step: sample must be 2-D [B, N], got shape ", sample.sizes());
  VLOPS_CHECK(sample.is_contiguous(), "vlops diffusion_step: sample must be contiguous");
  s.B = sample.size(0);
  s.N = sample.size(1);
  const int64_t B = s.B, N = s.N;

  VLOPS_CHECK(mode == MODE_DDPM || mode == MODE_DDIM, "vlops diffusion_step: mode must be 0 (DDPM) or 1 (DDIM), got ",
              mode);
  VLOPS_CHECK(prediction_type >= 0 && prediction_type <= 2,
              "vlops diffusion_step: prediction_type must be 0 (epsilon), 1 (sample) or 2 (v_prediction), got ",
              prediction_type);
  VLOPS_CHECK(variance_type >= 0 && variance_type <= 4,
              "vlops diffusion_step: variance_type must be in [0, 4], got ", variance_type);
  VLOPS_CHECK(seed >= 0, "vlops diffusion_step: seed must be in [0, 2**63), got ", seed);

  check_float_2d(eps, "eps", sample, B, N, 2 * N, want);
  s.M = eps.size(1);
  if (mode == MODE_DDPM && (variance_type == VAR_LEARNED || variance_type == VAR_LEARNED_RANGE)) {
    VLOPS_CHECK(s.M == 2 * N, "vlops diffusion_step: variance_type ", variance_type,
                " (learned) needs eps with the variance channels, shape [", B, ", ", 2 * N, "], got ", eps.sizes());
  }
  if (uncond.has_value()) {
    check_float_2d(*uncond, "uncond", sample, B, N, 2 * N, want);
    s.Mu = uncond->size(1);
  }
  if (noise.has_value()) check_float_2d(*noise, "noise", sample, B, N, N, want);
  check_float_2d(out_prev, "out_prev", sample, B, N, N, want);
  if (out_x0.has_value()) check_float_2d(*out_x0, "out_x0", sample, B, N, N, want);

  check_same_device(timesteps, "timesteps", sample, want);
  VLOPS_CHECK(timesteps.scalar_type() == at::kLong, "vlops diffusion_step: timesteps must be int64, got ",
              dtype_name(timesteps));
  VLOPS_CHECK(timesteps.dim() == 1 && (timesteps.size(0) == B || timesteps.size(0) == 1),
              "vlops diffusion_step: timesteps must have shape [", B, "] or [1], got ", timesteps.sizes());
  VLOPS_CHECK(timesteps.is_contiguous(), "vlops diffusion_step: timesteps must be contiguous");
  s.ts_broadcast = timesteps.size(0) == 1;

  check_same_device(alphas_cumprod, "alphas_cumprod", sample, want);
  VLOPS_CHECK(alphas_cumprod.scalar_type() == at::kFloat || alphas_cumprod.scalar_type() == at::kDouble,
              "vlops diffusion_step: alphas_cumprod must be float32 (or float64), got ", dtype_name(alphas_cumprod));
  VLOPS_CHECK(alphas_cumprod.dim() == 1 && alphas_cumprod.size(0) >= 1,
              "vlops diffusion_step: alphas_cumprod must have shape [T], T >= 1, got ", alphas_cumprod.sizes());
  VLOPS_CHECK(alphas_cumprod.is_contiguous(), "vlops diffusion_step: alphas_cumprod must be contiguous");
  s.T = alphas_cumprod.size(0);
  check_same_device(prev_table, "prev_table", sample, want);
  VLOPS_CHECK(prev_table.scalar_type() == at::kLong, "vlops diffusion_step: prev_table must be int64, got ",
              dtype_name(prev_table));
  VLOPS_CHECK(prev_table.dim() == 1 && prev_table.size(0) == s.T,
              "vlops diffusion_step: prev_table must have shape [T] = [", s.T, "] like alphas_cumprod, got ",
              prev_table.sizes());
  VLOPS_CHECK(prev_table.is_contiguous(), "vlops diffusion_step: prev_table must be contiguous");

  check_per_sample(x0_scale, "x0_scale", sample, B, want);
  check_per_sample(eps_scale, "eps_scale", sample, B, want);

  Config& c = s.cfg;
  c.mode = (int)mode;
  c.prediction_type = (int)prediction_type;
  c.variance_type = (int)variance_type;
  c.guided = uncond.has_value();
  c.clip_sample = clip_sample;
  c.use_clipped = use_clipped;
  c.has_x0_scale = x0_scale.has_value();
  c.has_eps_scale = eps_scale.has_value();
  c.guidance_scale = guidance_scale;
  c.clip_range = clip_range;
  c.eta = eta;
  c.final_alpha = final_alpha;
  const bool needs_noise = mode == MODE_DDPM || eta > 0.0;
  s.philox = needs_noise && !noise.has_value();
  return s;
}

}  // namespace ds
}  // namespace vlops
