"""Build of vlops: the Python package, the Triton kernels (``kernels/`` -> ``vlops.kernels``) and the
compiled extension ``vlops._C`` (``csrc/``, pybind11, built ahead of time by ninja).

    pip install --no-build-isolation -e .      # developers and CI (torch must already be installed)
    pip install --no-build-isolation .

Environment switches:

- ``VLOPS_BUILD_CUDA=auto|0|1`` (default ``auto``). ``auto`` builds the CUDA part whenever nvcc is
  found and torch is a CUDA build (a GPU is not needed), and falls back to a CPU-only extension, with
  a warning, if that build fails; ``0`` never builds it; ``1`` requires it and fails loudly.
- ``VLOPS_CUDA_ARCHS``: the CUDA targets, ``;``/``,``/space separated, e.g. ``"9.0a;8.0+PTX"`` (the
  default: sm_90a and sm_80 machine code plus compute_80 PTX). ``+PTX`` adds PTX for that target;
  ``sm_90a``, ``90a`` and ``compute_80`` (PTX only) are accepted too.
- ``VLOPS_PTXAS_VERBOSE=1``: print ptxas register / spill reports while compiling the .cu files.
- ``CUDA_HOME`` / ``CUDA_PATH``: where the CUDA toolkit is, if nvcc is not found by itself.
- ``MAX_JOBS``: parallel compile jobs (torch's ninja builder).

``vlops._C.has_cuda()`` and ``vlops._C.cuda_build_note()`` report what was built and why.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

try:
    import torch  # noqa: F401  (the extension is compiled against the installed torch)
except ImportError as _e:  # pragma: no cover
    raise SystemExit(
        "vlops needs torch at build time: install torch first, then build without isolation: "
        "`pip install --no-build-isolation -e .`") from _e

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[vlops setup] {msg}", file=sys.stderr, flush=True)


def _warn(msg: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nWARNING (vlops): {msg}\n{bar}\n", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Python packages
# --------------------------------------------------------------------------------------------------
def _python_packages() -> list[str]:
    """vlops and every sub-folder of it holding Python files (with or without __init__.py)."""
    pkgs = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "vlops")):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        rel = os.path.relpath(dirpath, ROOT)
        if rel == "vlops" or any(f.endswith(".py") for f in filenames):
            pkgs.append(rel.replace(os.sep, "."))
    if "vlops.kernels" in pkgs:
        raise SystemExit("vlops/kernels/ must not exist: the Triton kernels live in kernels/ (installed as vlops.kernels)")
    return pkgs + ["vlops.kernels"]


# --------------------------------------------------------------------------------------------------
# CUDA detection
# --------------------------------------------------------------------------------------------------
_MODE = os.environ.get("VLOPS_BUILD_CUDA", "auto").strip().lower() or "auto"
if _MODE not in ("auto", "0", "1"):
    raise SystemExit(f"VLOPS_BUILD_CUDA must be auto, 0 or 1, got {_MODE!r}")


def _version_key(path: str):
    return [int(x) for x in re.findall(r"\d+", os.path.basename(path))]


def _find_cuda_home() -> str | None:
    """A CUDA toolkit with bin/nvcc and include/cuda_runtime_api.h."""
    cands = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands += [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), os.path.dirname(os.path.dirname(nvcc))]
    cands.append("/usr/local/cuda")
    cands += sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True)
    cands += ["/opt/cuda", "/usr"]
    for home in cands:
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
                os.path.join(home, "include", "cuda_runtime_api.h")):
            return os.path.abspath(home)
    return None


def _nvcc_version(home: str) -> tuple[int, int] | None:
    try:
        out = subprocess.check_output([os.path.join(home, "bin", "nvcc"), "--version"], text=True,
                                      stderr=subprocess.STDOUT, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _parse_archs(spec: str) -> tuple[list[str], str]:
    """``"9.0a;8.0+PTX"`` -> (nvcc -gencode flags, description)."""
    flags, sass, ptx = [], [], []
    for tok in re.split(r"[;,\s]+", spec.strip()):
        if not tok:
            continue
        t = tok.lower()
        want_ptx = t.endswith("+ptx")
        t = t[:-4] if want_ptx else t
        ptx_only = t.startswith("compute_")
        t = re.sub(r"^(sm_|compute_)", "", t)
        m = re.fullmatch(r"(\d+)\.?(\d)([af]?)", t)
        if not m:
            raise SystemExit(f"VLOPS_CUDA_ARCHS: cannot parse {tok!r} (use e.g. '9.0a;8.0+PTX')")
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        if not ptx_only:
            flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
            sass.append(f"sm_{num}")
        if want_ptx or ptx_only:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
            ptx.append(f"compute_{num}")
    if not flags:
        raise SystemExit(f"VLOPS_CUDA_ARCHS={spec!r} names no target")
    desc = ", ".join(sass) if sass else "no machine code"
    if ptx:
        desc += " + PTX " + ", ".join(ptx)
    return flags, desc


def _cuda_plan():
    """(build_cuda, cuda_home, note). In mode 1 every reason not to build is an error."""
    import torch

    if _MODE == "0":
        return False, None, "VLOPS_BUILD_CUDA=0"
    reason = None
    home = None
    if getattr(torch.version, "hip", None):
        reason = f"torch {torch.__version__} is a ROCm build (vlops has no HIP kernels)"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    else:
        home = _find_cuda_home()
        if home is None:
            reason = "nvcc not found (put nvcc on PATH or set CUDA_HOME)"
        else:
            ver = _nvcc_version(home)
            tmaj = int(torch.version.cuda.split(".")[0])
            if ver is None:
                reason = f"cannot run {home}/bin/nvcc --version"
            elif ver[0] != tmaj:
                reason = (f"nvcc {ver[0]}.{ver[1]} ({home}) does not match the CUDA {torch.version.cuda} "
                          f"torch was built with")
    if reason is not None:
        if _MODE == "1":
            raise SystemExit(f"VLOPS_BUILD_CUDA=1 but the CUDA part cannot be built: {reason}")
        return False, None, reason
    return True, home, f"nvcc {ver[0]}.{ver[1]}"


def _c_string_define(name: str, text: str) -> str:
    """-DNAME="text", with only characters that survive every shell/ninja/nvcc layer."""
    clean = re.sub(r"[^A-Za-z0-9 _.,:;=()/+\-]", "_", text)[:400]
    return f'-D{name}="{clean}"'


# --------------------------------------------------------------------------------------------------
# The extension
# --------------------------------------------------------------------------------------------------
CPU_SOURCES = ["csrc/bindings.cpp", "csrc/cpu/diffusion_step.cpp", "csrc/cpu/contrastive.cpp",
               "csrc/cpu/patch_embed.cpp", "csrc/cpu/coattention.cpp"]
CUDA_SOURCES = ["csrc/cuda/diffusion_step_cuda.cpp", "csrc/cuda/diffusion_step.cu"]
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-fno-math-errno"]
NVCC_FLAGS = ["-O3", "-lineinfo", "-std=c++17", "-Xptxas=--warn-on-spills", "--threads=2"]


def _depends() -> list[str]:
    return sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True)
                  + glob.glob(os.path.join("csrc", "**", "*.cuh"), recursive=True))


def _cpu_extension(note: str):
    from torch.utils.cpp_extension import CppExtension

    return CppExtension(
        name="vlops._C",
        sources=list(CPU_SOURCES),
        include_dirs=[os.path.join(ROOT, "csrc")],
        depends=_depends(),
        extra_compile_args={"cxx": CXX_FLAGS + [_c_string_define("VLOPS_CUDA_NOTE", note)]},
        extra_link_args=["-fopenmp"],
    )


def _cuda_extension(note: str, gencode: list[str]):
    from torch.utils.cpp_extension import CUDAExtension

    nvcc = NVCC_FLAGS + gencode + ["-DVLOPS_WITH_CUDA"]
    if os.environ.get("VLOPS_PTXAS_VERBOSE", "0") == "1":
        nvcc.append("-Xptxas=-v")
    return CUDAExtension(
        name="vlops._C",
        sources=list(CPU_SOURCES) + list(CUDA_SOURCES),
        include_dirs=[os.path.join(ROOT, "csrc")],
        depends=_depends(),
        extra_compile_args={
            "cxx": CXX_FLAGS + ["-DVLOPS_WITH_CUDA", _c_string_define("VLOPS_CUDA_NOTE", note)],
            "nvcc": nvcc,
        },
        extra_link_args=["-fopenmp"],
    )


def _extensions_and_cmdclass():
    build_cuda, home, nvcc_desc = _cuda_plan()
    if build_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME once, when it is imported.
        os.environ["CUDA_HOME"] = home
        if "torch.utils.cpp_extension" in sys.modules:
            sys.modules["torch.utils.cpp_extension"].CUDA_HOME = home
    from torch.utils.cpp_extension import BuildExtension

    if build_cuda:
        gencode, arch_desc = _parse_archs(os.environ.get("VLOPS_CUDA_ARCHS", "9.0a;8.0+PTX"))
        ext = _cuda_extension(f"built for {arch_desc} with {nvcc_desc}", gencode)
        _log(f"building vlops._C with its CUDA part ({arch_desc}, {nvcc_desc} at {home})")
    else:
        ext = _cpu_extension(nvcc_desc)
        if _MODE == "auto":
            _warn(f"vlops._C is built without its CUDA part: {nvcc_desc}")
        else:
            _log(f"building vlops._C without its CUDA part ({nvcc_desc})")

    class VlopsBuildExt(BuildExtension):
        """torch's ninja builder, plus the fallback to a CPU-only build when the optional CUDA part fails."""

        def build_extensions(self):
            # Python's own CFLAGS carry -g: debug info only slows the build and bloats the .so.
            self.compiler.compiler_so = [f for f in self.compiler.compiler_so if f != "-g"]
            saved = {k: getattr(self.compiler, k) for k in ("compile", "_compile") if hasattr(self.compiler, k)}
            if not (build_cuda and _MODE == "auto"):
                super().build_extensions()
                return
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001 - any failure of the optional part
                msg = str(e).strip().splitlines()
                why = msg[-1] if msg else type(e).__name__
                _warn("the optional CUDA part of vlops._C failed to build, so vlops._C is built for the CPU "
                      f"only (the cuda backend will be unavailable). Reason: {type(e).__name__}: {why}. "
                      "Set VLOPS_BUILD_CUDA=1 to make this an error, or VLOPS_BUILD_CUDA=0 to skip it.")
                for k, v in saved.items():
                    setattr(self.compiler, k, v)
                cpu = _cpu_extension(f"CUDA build failed ({type(e).__name__}: {why}); see the build log")
                for ext in self.extensions:  # in place: setuptools keeps private state on the object
                    if ext.name == cpu.name:
                        for attr in ("sources", "include_dirs", "library_dirs", "libraries", "runtime_library_dirs",
                                     "define_macros", "undef_macros", "extra_compile_args", "extra_link_args",
                                     "depends", "language"):
                            setattr(ext, attr, getattr(cpu, attr))
                super().build_extensions()

    return [ext], {"build_ext": VlopsBuildExt}


_ext_modules, _cmdclass = _extensions_and_cmdclass()

setup(
    packages=_python_packages(),
    package_dir={"vlops": "vlops", "vlops.kernels": "kernels"},
    ext_modules=_ext_modules,
    cmdclass=_cmdclass,
    zip_safe=False,
)
