// Tensor side of the CUDA diffusion step: checks the arguments, turns tensors into raw pointers, and
// launches on the current stream of the tensors' device (csrc/cuda/diffusion_step.cu).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "../diffusion_step_check.h"
#include "diffusion_step_launch.h"

namespace vlops {
namespace cuda {

void diffusion_step_cuda(VLOPS_DIFFUSION_STEP_PARAMS) {
  const ds::StepShapes s = ds::check_step_args(VLOPS_DIFFUSION_STEP_ARGS, c10::DeviceType::CUDA);
  if (s.B == 0 || s.N == 0) return;
  const c10::cuda::CUDAGuard guard(sample.device());

  StepLaunchArgs a{};
  a.eps = eps.data_ptr();
  a.uncond = uncond.has_value() ? uncond->data_ptr() : nullptr;
  a.sample = sample.data_ptr();
  a.noise = noise.has_value() ? noise->data_ptr() : nullptr;
  a.out_prev = out_prev.data_ptr();
  a.out_x0 = out_x0.has_value() ? out_x0->data_ptr() : nullptr;
  a.timesteps = timesteps.data_ptr<int64_t>();
  a.prev_table = prev_table.data_ptr<int64_t>();
  a.alphas_cumprod = alphas_cumprod.data_ptr();
  a.alphas_f64 = alphas_cumprod.scalar_type() == at::kDouble;
  a.x0_scale = x0_scale.has_value() ? x0_scale->data_ptr() : nullptr;
  a.x0_scale_f64 = x0_scale.has_value() && x0_scale->scalar_type() == at::kDouble;
  a.eps_scale = eps_scale.has_value() ? eps_scale->data_ptr() : nullptr;
  a.eps_scale_f64 = eps_scale.has_value() && eps_scale->scalar_type() == at::kDouble;
  a.B = s.B;
  a.N = s.N;
  a.M = s.M;
  a.Mu = s.Mu;
  a.T = s.T;
  a.ts_broadcast = s.ts_broadcast;
  switch (sample.scalar_type()) {
    case at::kFloat: a.dtype = DT_F32; break;
    case at::kHalf: a.dtype = DT_F16; break;
    case at::kBFloat16: a.dtype = DT_BF16; break;
    default: a.dtype = DT_F64; break;
  }
  a.philox = s.philox;
  a.key0 = (uint32_t)((uint64_t)seed & 0xFFFFFFFFu);
  a.key1 = (uint32_t)((uint64_t)seed >> 32);
  a.cfg = s.cfg;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(sample.device().index()).stream();
  const cudaError_t err = diffusion_step_launch(a, stream);
  VLOPS_CHECK(err == cudaSuccess, "vlops diffusion_step_cuda: kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace vlops
