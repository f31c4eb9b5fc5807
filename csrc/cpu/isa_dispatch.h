// Run-time instruction-set dispatch of the CPU kernels' fp32 bodies (csrc/cpu/contrastive.cpp,
// csrc/cpu/patch_embed.cpp): VLOPS_ISA_ENTRY(NAME, RET, ARGS, CALL) defines NAME_generic, and on x86 with
// GCC NAME_avx2 / NAME_avx512, each a function whose body CALL (an always-inlined template) is compiled
// for that instruction set; VLOPS_ISA_DISPATCH(isa, NAME, args...) calls the one for current_isa(), the
// set vlops._C.set_cpu_isa / VLOPS_CPU_ISA chose (csrc/cpu/diffusion_step.cpp owns that choice).
#pragma once

#include <string>

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define VLOPS_ISA_X86 1
#define VLOPS_ISA_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c")))
#define VLOPS_ISA_AVX2 __attribute__((target("avx2,fma,f16c")))
#define VLOPS_ISA_ENTRY_X86(NAME, RET, ARGS, CALL)              \
  VLOPS_ISA_AVX2 RET NAME##_avx2 ARGS { return CALL; }         \
  VLOPS_ISA_AVX512 RET NAME##_avx512 ARGS { return CALL; }
#define VLOPS_ISA_DISPATCH(isa, NAME, ...)                                              \
  ((isa) == ::vlops::cpu::ISA_AVX512 ? NAME##_avx512(__VA_ARGS__)                       \
   : (isa) == ::vlops::cpu::ISA_AVX2 ? NAME##_avx2(__VA_ARGS__) : NAME##_generic(__VA_ARGS__))
#else
#define VLOPS_ISA_X86 0
#define VLOPS_ISA_ENTRY_X86(NAME, RET, ARGS, CALL)
#define VLOPS_ISA_DISPATCH(isa, NAME, ...) NAME##_generic(__VA_ARGS__)
#endif

#define VLOPS_ISA_ENTRY(NAME, RET, ARGS, CALL) \
  RET NAME##_generic ARGS { return CALL; }     \
  VLOPS_ISA_ENTRY_X86(NAME, RET, ARGS, CALL)

namespace vlops {
namespace cpu {

std::string cpu_isa();  // csrc/cpu/diffusion_step.cpp: the instruction set the CPU kernels use now

enum Isa { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

inline int current_isa() {
#if VLOPS_ISA_X86
  const std::string s = cpu_isa();
  if (s == "avx512") return ISA_AVX512;
  if (s == "avx2") return ISA_AVX2;
#endif
  return ISA_GENERIC;
}

}  // namespace cpu
}  // namespace vlops
