// vlops._C: the compiled kernels, bound with pybind11. Each launcher takes the positional arguments of
// its op's kernel contract (vlops/ops/<op>.py) and writes into the output tensors it is given.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "diffusion_step_check.h"

#ifndef VLOPS_CUDA_NOTE
#define VLOPS_CUDA_NOTE "unknown (VLOPS_CUDA_NOTE was not defined by the build)"
#endif

namespace vlops {
namespace cpu {
void diffusion_step_cpu(VLOPS_DIFFUSION_STEP_PARAMS);
at::Tensor philox4x32_cpu(const at::Tensor& counters, int64_t key0, int64_t key1);
std::string cpu_isa();
std::vector<std::string> cpu_isas_supported();
void set_cpu_isa(const std::string& name);
}  // namespace cpu

#ifdef VLOPS_WITH_CUDA
namespace cuda {
void diffusion_step_cuda(VLOPS_DIFFUSION_STEP_PARAMS);
}  // namespace cuda
#endif
}  // namespace vlops

namespace {
constexpr const char* kStepDoc =
    "diffusion_step_{dev}(eps, uncond, sample, noise, timesteps, prev_table, alphas_cumprod, x0_scale, eps_scale, "
    "out_prev, out_x0, mode, guidance_scale, prediction_type, variance_type, clip_sample, clip_range, eta, "
    "use_clipped, final_alpha, seed) -> None\n\n"
    "The fused diffusion step; writes out_prev (and out_x0 if given). The kernel contract is the docstring of "
    "vlops.ops.diffusion.";

#define VLOPS_STEP_ARGS                                                                                       \
  py::arg("eps"), py::arg("uncond"), py::arg("sample"), py::arg("noise"), py::arg("timesteps"),               \
      py::arg("prev_table"), py::arg("alphas_cumprod"), py::arg("x0_scale"), py::arg("eps_scale"),             \
      py::arg("out_prev"), py::arg("out_x0"), py::arg("mode"), py::arg("guidance_scale"),                      \
      py::arg("prediction_type"), py::arg("variance_type"), py::arg("clip_sample"), py::arg("clip_range"),     \
      py::arg("eta"), py::arg("use_clipped"), py::arg("final_alpha"), py::arg("seed")
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vlops compiled kernels (CPU C++ and, when built with it, CUDA)";

  m.def("has_cuda", []() {
#ifdef VLOPS_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build holds the CUDA kernels.");
  m.def("cuda_build_note", []() { return std::string(VLOPS_CUDA_NOTE); },
        "How the CUDA part was built, or why it was not.");

  m.def("diffusion_step_cpu", &vlops::cpu::diffusion_step_cpu, kStepDoc, VLOPS_STEP_ARGS,
        py::call_guard<py::gil_scoped_release>());
#ifdef VLOPS_WITH_CUDA
  m.def("diffusion_step_cuda", &vlops::cuda::diffusion_step_cuda, kStepDoc, VLOPS_STEP_ARGS,
        py::call_guard<py::gil_scoped_release>());
#endif

  // Introspection and test hooks of the CPU kernels.
  m.def("cpu_isa", &vlops::cpu::cpu_isa, "The instruction set the CPU kernels use now (generic, avx2, avx512).");
  m.def("cpu_isas_supported", &vlops::cpu::cpu_isas_supported, "The instruction sets this CPU can run.");
  m.def("set_cpu_isa", &vlops::cpu::set_cpu_isa, py::arg("name"),
        "Use instruction set `name` for the CPU kernels (for tests; VLOPS_CPU_ISA caps the default).");
  m.def("philox4x32_cpu", &vlops::cpu::philox4x32_cpu, py::arg("counters"), py::arg("key0"), py::arg("key1"),
        "Raw Philox4x32-10 through the CPU kernels' SIMD code: counters int64 [n, 4] of uint32 values -> "
        "int64 [n, 4].");
}
