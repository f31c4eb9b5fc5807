// vlops._C: the compiled kernels, bound with pybind11. Each launcher takes the positional arguments of
// its op's kernel contract (vlops/ops/<op>.py) and writes into the output tensors it is given.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
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
// contrastive losses (csrc/cpu/contrastive.cpp; contract: vlops/ops/contrastive.py)
std::tuple<at::Tensor, at::Tensor> contrastive_lse_cpu(const at::Tensor& a, const at::Tensor& b,
                                                       const at::Tensor& scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_bwd_cpu(const at::Tensor& a, const at::Tensor& b,
                                                            const at::Tensor& scale, const at::Tensor& row_lse,
                                                            const at::Tensor& col_lse, double coef_row,
                                                            double coef_col, const at::Tensor& row_center,
                                                            const at::Tensor& col_center);
at::Tensor siglip_fwd_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& bias,
                          bool negative_only);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_bwd_cpu(const at::Tensor& a, const at::Tensor& b,
                                                                          const at::Tensor& scale,
                                                                          const at::Tensor& bias, bool negative_only);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_fwd_bwd_cpu(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& bias, bool negative_only);
// patch stem (csrc/cpu/patch_embed.cpp; contract: vlops/ops/patch_embed.py)
at::Tensor patch_embed_fwd_cpu(const at::Tensor& images, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& pos,
                               const c10::optional<at::Tensor>& pn_weight, const c10::optional<at::Tensor>& pn_bias,
                               double pn_eps, bool use_pn,
                               const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                               double ln_eps, bool use_ln, int64_t patch_size, int64_t prefix_tokens,
                               const c10::optional<at::Tensor>& x0_out);
std::tuple<c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
           c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>>
patch_embed_bwd_cpu(const at::Tensor& grad, const at::Tensor& images, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& pos,
                    const c10::optional<at::Tensor>& pn_weight, const c10::optional<at::Tensor>& pn_bias,
                    double pn_eps, bool use_pn, const c10::optional<at::Tensor>& ln_weight,
                    const c10::optional<at::Tensor>& ln_bias, double ln_eps, bool use_ln, int64_t patch_size,
                    int64_t prefix_tokens, bool need_images, const c10::optional<at::Tensor>& x0);
// ViLBERT co-attention (csrc/cpu/coattention.cpp; contract: vlops/ops/coattention.py)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> co_attention_fwd_cpu(
    const at::Tensor& tq, const at::Tensor& tk, const at::Tensor& tv, const at::Tensor& iq, const at::Tensor& ik,
    const at::Tensor& iv, const at::Tensor& t_len, const at::Tensor& i_len, const c10::optional<at::Tensor>& t_mask,
    const c10::optional<at::Tensor>& i_mask, double scale, int64_t mask_mode, double dropout_p, int64_t seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> co_attention_bwd_cpu(
    const at::Tensor& t_dout, const at::Tensor& i_dout, const at::Tensor& tq, const at::Tensor& tk,
    const at::Tensor& tv, const at::Tensor& iq, const at::Tensor& ik, const at::Tensor& iv, const at::Tensor& t_out,
    const at::Tensor& i_out, const at::Tensor& t_lse, const at::Tensor& i_lse, const at::Tensor& t_len,
    const at::Tensor& i_len, const c10::optional<at::Tensor>& t_mask, const c10::optional<at::Tensor>& i_mask,
    double scale, int64_t mask_mode, double dropout_p, int64_t seed);
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

  // Contrastive losses; the kernel contract is the docstring of vlops.ops.contrastive.
  m.def("contrastive_lse_cpu", &vlops::cpu::contrastive_lse_cpu, py::arg("a"), py::arg("b"), py::arg("scale"),
        "contrastive_lse_cpu(a, b, scale) -> (row_lse [N], col_lse [M]): log-sum-exp of S = scale * a @ b.T along "
        "rows and columns, tiled (S is never stored).",
        py::call_guard<py::gil_scoped_release>());
  m.def("clip_bwd_cpu", &vlops::cpu::clip_bwd_cpu, py::arg("a"), py::arg("b"), py::arg("scale"), py::arg("row_lse"),
        py::arg("col_lse"), py::arg("coef_row"), py::arg("coef_col"), py::arg("row_center"), py::arg("col_center"),
        "clip_bwd_cpu(a, b, scale, row_lse, col_lse, coef_row, coef_col, row_center, col_center) -> (da, db, "
        "dscale [1]) with R = coef_row * exp(S - row_lse), C = coef_col * exp(S - col_lse), W = R + C, "
        "dscale = sum R (a.b - row_center) + C (a.b - col_center).",
        py::call_guard<py::gil_scoped_release>());
  m.def("siglip_fwd_cpu", &vlops::cpu::siglip_fwd_cpu, py::arg("a"), py::arg("b"), py::arg("scale"), py::arg("bias"),
        py::arg("negative_only"),
        "siglip_fwd_cpu(a, b, scale, bias, negative_only) -> loss_sum [1] = sum softplus(-z (S + bias)).",
        py::call_guard<py::gil_scoped_release>());
  m.def("siglip_bwd_cpu", &vlops::cpu::siglip_bwd_cpu, py::arg("a"), py::arg("b"), py::arg("scale"), py::arg("bias"),
        py::arg("negative_only"),
        "siglip_bwd_cpu(a, b, scale, bias, negative_only) -> (da, db, dscale [1], dbias [1]) with "
        "W = -z sigmoid(-z (S + bias)).",
        py::call_guard<py::gil_scoped_release>());
  m.def("siglip_fwd_bwd_cpu", &vlops::cpu::siglip_fwd_bwd_cpu, py::arg("a"), py::arg("b"), py::arg("scale"),
        py::arg("bias"), py::arg("negative_only"),
        "siglip_fwd_bwd_cpu(a, b, scale, bias, negative_only) -> (loss_sum [1], da, db, dscale [1], dbias [1]): "
        "siglip_fwd_cpu and siglip_bwd_cpu from one pass over the tiles.",
        py::call_guard<py::gil_scoped_release>());

  // Patch stem; the kernel contract is the docstring of vlops.ops.patch_embed.
  m.def("patch_embed_fwd_cpu", &vlops::cpu::patch_embed_fwd_cpu, py::arg("images"), py::arg("weight"),
        py::arg("bias"), py::arg("pos"), py::arg("pn_weight"), py::arg("pn_bias"), py::arg("pn_eps"),
        py::arg("use_pn"), py::arg("ln_weight"), py::arg("ln_bias"), py::arg("ln_eps"), py::arg("use_ln"),
        py::arg("patch_size"), py::arg("prefix_tokens"), py::arg("x0_out") = py::none(),
        "patch_embed_fwd_cpu(images, weight, bias, pos, pn_weight, pn_bias, pn_eps, use_pn, ln_weight, ln_bias, "
        "ln_eps, use_ln, patch_size, prefix_tokens, x0_out=None) -> out [B, R0 + Gh * Gw, D]: patches gathered "
        "tile by tile, projected, + bias, LayerNorm (use_pn), + pos, LayerNorm (use_ln), written to rows R0.. "
        "(rows 0 .. R0 - 1 are left unwritten); x0_out [B * Gh * Gw, D] (compute dtype), when given, receives "
        "the pre-norm rows W p + bias.",
        py::call_guard<py::gil_scoped_release>());
  m.def("patch_embed_bwd_cpu", &vlops::cpu::patch_embed_bwd_cpu, py::arg("grad"), py::arg("images"),
        py::arg("weight"), py::arg("bias"), py::arg("pos"), py::arg("pn_weight"), py::arg("pn_bias"),
        py::arg("pn_eps"), py::arg("use_pn"), py::arg("ln_weight"), py::arg("ln_bias"), py::arg("ln_eps"),
        py::arg("use_ln"), py::arg("patch_size"), py::arg("prefix_tokens"), py::arg("need_images"),
        py::arg("x0") = py::none(),
        "patch_embed_bwd_cpu(grad, images, weight, bias, pos, pn_weight, pn_bias, pn_eps, use_pn, ln_weight, "
        "ln_bias, ln_eps, use_ln, patch_size, prefix_tokens, need_images, x0=None) -> (d_images, d_weight, d_bias, "
        "d_pos, d_pn_weight, d_pn_bias, d_ln_weight, d_ln_bias), compute dtype, None where the input is absent; "
        "x0: the forward's x0_out (read only; None: the GEMM is recomputed when a LayerNorm is on).",
        py::call_guard<py::gil_scoped_release>());

  // ViLBERT co-attention; the kernel contract is the docstring of vlops.ops.coattention.
  m.def("co_attention_fwd_cpu", &vlops::cpu::co_attention_fwd_cpu, py::arg("tq"), py::arg("tk"), py::arg("tv"),
        py::arg("iq"), py::arg("ik"), py::arg("iv"), py::arg("t_len"), py::arg("i_len"), py::arg("t_mask"),
        py::arg("i_mask"), py::arg("scale"), py::arg("mask_mode"), py::arg("dropout_p"), py::arg("seed"),
        "co_attention_fwd_cpu(tq, tk, tv, iq, ik, iv, t_len, i_len, t_mask, i_mask, scale, mask_mode, dropout_p, "
        "seed) -> (t_out [B, Nt, H, d], i_out [B, Nv, H, d], t_lse [B, H, Nt], i_lse [B, H, Nv]): text queries "
        "over image keys / values (dir 0) and image queries over text keys / values (dir 1), softmax(scale q.k) "
        "over the valid keys (mode 0) or with the -10000 bias on the invalid ones (mode 1), Philox dropout; "
        "tiled per (dir, b, h, query block), no score matrix stored.",
        py::call_guard<py::gil_scoped_release>());
  m.def("co_attention_bwd_cpu", &vlops::cpu::co_attention_bwd_cpu, py::arg("t_dout"), py::arg("i_dout"),
        py::arg("tq"), py::arg("tk"), py::arg("tv"), py::arg("iq"), py::arg("ik"), py::arg("iv"), py::arg("t_out"),
        py::arg("i_out"), py::arg("t_lse"), py::arg("i_lse"), py::arg("t_len"), py::arg("i_len"),
        py::arg("t_mask"), py::arg("i_mask"), py::arg("scale"), py::arg("mask_mode"), py::arg("dropout_p"),
        py::arg("seed"),
        "co_attention_bwd_cpu(t_dout, i_dout, tq, tk, tv, iq, ik, iv, t_out, i_out, t_lse, i_lse, t_len, i_len, "
        "t_mask, i_mask, scale, mask_mode, dropout_p, seed) -> (d_tq, d_tk, d_tv, d_iq, d_ik, d_iv): P recomputed "
        "from the saved lse, D = rowsum(dout * out), dV = (P Z)^T dout, dS = P (Z dout V^T - D), dQ = scale dS K, "
        "dK = scale dS^T Q; each (dir, b, h) owns its gradients (no atomics, deterministic).",
        py::call_guard<py::gil_scoped_release>());

  // Introspection and test hooks of the CPU kernels.
  m.def("cpu_isa", &vlops::cpu::cpu_isa, "The instruction set the CPU kernels use now (generic, avx2, avx512).");
  m.def("cpu_isas_supported", &vlops::cpu::cpu_isas_supported, "The instruction sets this CPU can run.");
  m.def("set_cpu_isa", &vlops::cpu::set_cpu_isa, py::arg("name"),
        "Use instruction set `name` for the CPU kernels (for tests; VLOPS_CPU_ISA caps the default).");
  m.def("philox4x32_cpu", &vlops::cpu::philox4x32_cpu, py::arg("counters"), py::arg("key0"), py::arg("key1"),
        "Raw Philox4x32-10 through the CPU kernels' SIMD code: counters int64 [n, 4] of uint32 values -> "
        "int64 [n, 4].");
}
