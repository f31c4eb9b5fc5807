// C launcher of the CUDA diffusion-step kernel: raw pointers and a stream, no torch headers (the .cu
// including this compiles with nvcc alone; diffusion_step_cuda.cpp turns tensors into this struct).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "../diffusion_step_coef.h"

namespace vlops {
namespace cuda {

enum DType { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2, DT_F64 = 3 };

struct StepLaunchArgs {
  // [B, N] tensors of one floating dtype (eps [B, M], uncond [B, Mu]); uncond, noise, out_x0 may be null.
  const void* eps;
  const void* uncond;
  const void* sample;
  const void* noise;
  void* out_prev;
  void* out_x0;
  // schedule, on the device: timesteps int64 [B] or [1]; prev_table int64 [T]; alphas_cumprod [T]
  const int64_t* timesteps;
  const int64_t* prev_table;
  const void* alphas_cumprod;
  const void* x0_scale;   // [B] or null
  const void* eps_scale;  // [B] or null
  int alphas_f64;         // alphas_cumprod is float64 (else float32); likewise the two below
  int x0_scale_f64;
  int eps_scale_f64;
  int64_t B, N, M, Mu, T;
  int ts_broadcast;       // timesteps has one entry
  int dtype;              // DType
  int philox;             // draw the noise from the seed (noise needed and not given)
  uint32_t key0, key1;    // (seed & 0xffffffff, seed >> 32)
  vlops::ds::Config cfg;
};

// Launches the step on `stream` (one kernel, no host synchronisation). Returns the launch error.
cudaError_t diffusion_step_launch(const StepLaunchArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace vlops
