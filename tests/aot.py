"""Ahead-of-time compilation of Triton kernels for Hopper (sm_90a) with no GPU.

Reused by every op: a kernel module in ``kernels/`` exports ``AOT_SPECS``, a list of dicts::

    {"name": str,                      # unique, used in the report
     "kernel": <@triton.jit function>,
     "signature": {arg: "*fp32" | "i32" | "fp32" | ... | "constexpr"},   # every argument
     "constexprs": {arg: value},       # the constexpr arguments
     "num_warps": int,
     "num_stages": int,                # optional (default 3)
     "divisibility_16": [arg, ...],    # optional: pointer / int arguments known divisible by 16
     "matmul": bool}                   # optional: the PTX must contain wgmma

:func:`compile_sm90` compiles one spec with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``
and :func:`report` returns registers, spills, shared memory, wgmma presence, vectorised global
accesses and the PTX. Registers and spills come from running ``ptxas -v`` on the PTX with the flags
Triton itself uses (Triton only learns them when it loads the cubin on a GPU).

Works with triton 3.6 - 3.8 (the ``ASTSource`` / ``attrs`` / ``get_ptxas`` differences are handled
below). The module must not run under ``TRITON_INTERPRET=1`` (kernels would be interpreted
functions, which cannot be compiled).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile

HOPPER_SMEM_LIMIT = 232448  # 227 KiB, the most shared memory one block can use on sm_90
CUDA_PTXAS_FALLBACK = "/usr/local/cuda-13.0/bin/ptxas"


@dataclasses.dataclass
class AotReport:
    name: str
    num_warps: int
    n_regs: int
    n_spills: int  # bytes of spill stores + spill loads
    spill_stores: int
    spill_loads: int
    shared: int  # bytes of shared memory (Triton's allocation, static + dynamic)
    ptxas_smem: int  # static smem ptxas reports
    stack: int  # bytes of stack frame
    has_wgmma: bool
    ld_global_v4: int  # number of ld.global(.nc)...v4 instructions in the PTX
    ld_global_v2: int
    ld_global_scalar: int
    st_global_v4: int
    st_global_v2: int
    st_global_scalar: int
    ptx: str = dataclasses.field(repr=False, default="")
    ptxas_log: str = dataclasses.field(repr=False, default="")

    def row(self) -> str:
        return (f"{self.name:<64} {self.num_warps:>5} {self.n_regs:>5} {self.n_spills:>6} {self.shared:>7} "
                f"{self.stack:>5} {'yes' if self.has_wgmma else 'no':>5} "
                f"{self.ld_global_v4:>3}/{self.ld_global_v2}/{self.ld_global_scalar:<4} "
                f"{self.st_global_v4:>3}/{self.st_global_v2}/{self.st_global_scalar}")

    @staticmethod
    def header() -> str:
        return (f"{'kernel specialisation':<64} {'warps':>5} {'regs':>5} {'spills':>6} {'smem':>7} "
                f"{'stack':>5} {'wgmma':>5} {'ld v4/v2/s':<12} st v4/v2/s")


def _ptxas_path(capability: int = 90) -> str:
    """The ptxas Triton would use: its bundled one (or TRITON_PTXAS_PATH), else the CUDA toolkit's."""
    env = os.environ.get("TRITON_PTXAS_PATH")
    if env and os.path.exists(env):
        return env
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            tool = get_ptxas(capability)  # triton >= 3.5 takes the capability
        except TypeError:
            tool = get_ptxas()
        path = getattr(tool, "path", tool)
        if path and os.path.exists(path):
            return path
    except Exception:  # pragma: no cover - depends on the triton build
        pass
    for cand in (shutil.which("ptxas"), CUDA_PTXAS_FALLBACK):
        if cand and os.path.exists(cand):
            return cand
    raise RuntimeError("no ptxas found: set TRITON_PTXAS_PATH")


def ensure_ptxas() -> str:
    """Make sure triton.compile finds a ptxas (sets TRITON_PTXAS_PATH to a fallback if needed)."""
    path = _ptxas_path(90)
    if "TRITON_PTXAS_PATH" not in os.environ:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        if not os.path.exists(bundled):
            os.environ["TRITON_PTXAS_PATH"] = path
    return path


def compile_sm90(spec: dict, capability: int = 90):
    """Compile one AOT spec for ``GPUTarget("cuda", capability, 32)``; returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ensure_ptxas()
    fn = spec["kernel"]
    if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError(f"{spec['name']}: kernel is not a JITFunction (is TRITON_INTERPRET set?)")
    signature = dict(spec["signature"])
    constexprs = dict(spec.get("constexprs", {}))
    missing = [a for a in fn.arg_names if a not in signature]
    if missing:
        raise ValueError(f"{spec['name']}: signature lacks {missing}")
    for k in constexprs:
        signature[k] = "constexpr"
    attrs = {}
    for name in spec.get("divisibility_16", ()):
        attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", capability, 32)
    options = {"num_warps": int(spec.get("num_warps", 4)), "num_stages": int(spec.get("num_stages", 3))}
    return triton.compile(src, target=target, options=options)


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text, flags=re.MULTILINE))


def _ptxas_extra(ptxas: str) -> list[str]:
    """Triton >= 3.7 passes --regAllocOptLevel=2 to ptxas 13.x (a ptxas bug workaround): do the same."""
    try:
        version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return []
    m = re.search(r"release (\d+)\.", version)
    return ["--regAllocOptLevel=2"] if m and int(m.group(1)) >= 13 else []


def run_ptxas(ptx: str, capability: int = 90) -> str:
    """ptxas -v on the PTX (Triton's flags); returns the log (registers, spills, smem)."""
    ptxas = _ptxas_path(capability)
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-lineinfo", "-v", *_ptxas_extra(ptxas), f"--gpu-name={arch}", src,
               "-o", os.path.join(d, "k.cubin")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"ptxas failed ({res.returncode}): {res.stderr}")
        return res.stderr + res.stdout


def report(spec: dict, capability: int = 90) -> AotReport:
    """Compile ``spec`` and measure it: registers, spills, shared memory, wgmma, vector accesses."""
    ck = compile_sm90(spec, capability)
    ptx = ck.asm["ptx"]
    log = run_ptxas(ptx, capability)
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    spill_st = int(stores.group(1)) if stores else 0
    spill_ld = int(loads.group(1)) if loads else 0
    return AotReport(
        name=spec["name"],
        num_warps=int(spec.get("num_warps", 4)),
        n_regs=int(regs.group(1)) if regs else -1,
        n_spills=spill_st + spill_ld,
        spill_stores=spill_st,
        spill_loads=spill_ld,
        shared=int(getattr(ck.metadata, "shared", 0)),
        ptxas_smem=int(smem.group(1)) if smem else 0,
        stack=int(stack.group(1)) if stack else 0,
        has_wgmma="wgmma" in ptx,
        ld_global_v4=_count(r"^\s*(?:@%p\d+\s+)?ld\.global[\w.]*\.v4\.", ptx),
        ld_global_v2=_count(r"^\s*(?:@%p\d+\s+)?ld\.global[\w.]*\.v2\.", ptx),
        ld_global_scalar=_count(r"^\s*(?:@%p\d+\s+)?ld\.global(?:\.[a-z]+)*\.[busf]\d+\s", ptx),
        st_global_v4=_count(r"^\s*(?:@%p\d+\s+)?st\.global[\w.]*\.v4\.", ptx),
        st_global_v2=_count(r"^\s*(?:@%p\d+\s+)?st\.global[\w.]*\.v2\.", ptx),
        st_global_scalar=_count(r"^\s*(?:@%p\d+\s+)?st\.global(?:\.[a-z]+)*\.[busf]\d+\s", ptx),
        ptx=ptx,
        ptxas_log=log,
    )


def check(rep: AotReport, matmul: bool = False) -> list[str]:
    """The failures of one report: spills, shared memory over the Hopper limit, missing wgmma."""
    bad = []
    if rep.n_spills > 0:
        bad.append(f"{rep.name}: {rep.spill_stores} B spill stores / {rep.spill_loads} B spill loads")
    if rep.shared > HOPPER_SMEM_LIMIT:
        bad.append(f"{rep.name}: {rep.shared} B shared memory > {HOPPER_SMEM_LIMIT}")
    if matmul and not rep.has_wgmma:
        bad.append(f"{rep.name}: matmul kernel without wgmma in its PTX")
    return bad


def check_spec(spec: dict, capability: int = 90):
    """``(report, failures)`` of one spec: :func:`report` and :func:`check` with the spec's flags (``matmul``:
    wgmma required; ``vectorized``: a 16-byte global load required); a spec that does not compile gives
    ``(None, [its error])``."""
    try:
        rep = report(spec, capability)
    except Exception as e:  # noqa: BLE001 - a compile failure is a result
        return None, [f"{spec['name']}: compile failed: {e!r}"]
    fails = check(rep, matmul=bool(spec.get("matmul", False)))
    if spec.get("vectorized") and rep.ld_global_v4 == 0:
        fails.append(f"{rep.name}: flagged vectorized but no ld.global.v4 in the PTX")
    return rep, fails
