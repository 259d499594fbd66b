"""Compile the Triton kernels ahead of time for a GPU architecture, on a machine without one.

    python -m densecl_fast.kernels.aot                  # markdown table for sm_90 and sm_80 (perf/AOT_SM90.md)
    python -m densecl_fast.kernels.aot --json           # the same rows as JSON (tests/test_kernels_aot.py)
    python -m densecl_fast.kernels.aot --arch 90        # one architecture

Every kernel the model runs is compiled with every autotune config it may pick, at the
production shapes (DenseCL R50: D = 128, C = 2048, S^2 = 49) and for each input dtype, through
Triton's own argument specialisation, so the code is what a launch would build. ptxas (shipped
in the Triton wheel) reports registers and spills; Triton reports the shared memory. A row is
`ok` when nothing spills and the shared memory fits the architecture's per-block limit; a config
that does not fit is what an autotuner drops at launch, or a spill is what slows a kernel
several-fold, so both fail tests/test_kernels_aot.py.

Needs TRITON_INTERPRET unset: the interpreter replaces the kernels by numpy functions.
Uses Triton internals (JITFunction's binder and _pack_args, as a launch does); written for
Triton 3.6-3.8.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

# Dynamic shared memory a block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SMEM_LIMIT = {90: 232448, 80: 166912}
PRODUCT_D, PRODUCT_C, PRODUCT_S2 = 128, 2048, 49


def _unwrap(kernel):
    """Autotuner / Heuristics wrappers -> the JITFunction."""
    while not hasattr(kernel, "params"):
        kernel = kernel.fn
    return kernel


def _compile(kernel, args: list, constexprs: dict, num_warps: int, num_stages: int, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = _unwrap(kernel)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = dict(constexprs, num_warps=num_warps, num_stages=num_stages)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, consts, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(jit, signature, consts, attrs), target=target, options=options.__dict__)


def _ptxas_usage(compiled, arch: int) -> dict:
    """Registers and spill bytes from `ptxas -v` on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path if get_ptxas.__code__.co_argcount else get_ptxas().path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src, "-o",
                              os.path.join(d, "k.o")], capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    stores = int(re.search(r"(\d+) bytes spill stores", out).group(1))
    loads = int(re.search(r"(\d+) bytes spill loads", out).group(1))
    return {"registers": regs, "spill_stores": stores, "spill_loads": loads}


def _cases(arch: int):
    """(kernel name, dtype name, config text, kernel, args, constexprs, warps, stages) for the
    tile tables of `arch`'s family."""
    from . import dense_match_triton as dm
    from . import queue_infonce_triton as qi
    from ._common import arch_family_of, dot_precision, grad_dot_precision, width_of

    family = arch_family_of(arch // 10)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    M, K, D = 12544, 65536, PRODUCT_D
    f32 = torch.empty(1, dtype=torch.float32)
    for name, dt in dtypes.items():
        q, queue = torch.empty(1, dtype=dt), torch.empty(1, dtype=dt)
        bm, tiles = qi.TILES[family, width_of(dt)]
        for bn, warps, stages in tiles:
            for with_grad in (True, False):
                args = [q, queue, f32, f32, f32, M, K, D, K // 4, D, 1, K, 1, 7.2]
                const = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=D, EVEN_K=True, EVEN_D=True, UPCAST=False,
                             DOT_PREC=dot_precision(dt), GRAD_DOT_PREC=grad_dot_precision(dt), INTERPRET=False,
                             WITH_GRAD=with_grad)
                yield ("queue_infonce fwd" + ("" if with_grad else " (no grad)"), name,
                       f"BLOCK_M={bm} BLOCK_N={bn} warps={warps} stages={stages}",
                       qi._fwd_kernel, args, const, warps, stages)
    block = max(8, min(64, 8192 // D))
    for with_grad in (True, False):
        args = [f32, f32, f32, f32, f32, f32, f32, M, D, 4, 1, 5.0, 1e-5]
        yield ("queue_infonce combine" + ("" if with_grad else " (no grad)"), "fp32", f"BLOCK={block}",
               qi._combine_kernel, args, dict(BLOCK=block, BLOCK_D=D, WITH_GRAD=with_grad), 4, 1)
    C, S2 = PRODUCT_C, PRODUCT_S2
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        feat, grid = torch.empty(1, dtype=dt), torch.empty(1, dtype=torch.float32)
        for bq, bc, warps, stages in dm.TILES[family, width_of(dt)]:
            args = [feat, feat, grid, grid, grid, torch.empty(1, dtype=torch.int64), C, S2, D,
                    C * S2, 1, C, C * S2, 1, C, D * S2, S2, 1, D * S2, S2, 1]
            const = dict(BLOCK_Q=bq, BLOCK_K=64, BLOCK_C=bc, BLOCK_D=64, UPCAST=False,
                         DOT_PREC=dot_precision(dt), INTERPRET=False)
            yield ("dense matching", name, f"BLOCK_Q={bq} BLOCK_C={bc} warps={warps} stages={stages}",
                   dm._dense_match_kernel, args, const, warps, stages)


def table(archs=(90, 80)) -> list[dict]:
    rows = []
    for arch in archs:
        for kname, dname, cfg, kernel, args, const, warps, stages in _cases(arch):
            row = {"arch": f"sm_{arch}", "kernel": kname, "dtype": dname, "config": cfg}
            try:
                compiled = _compile(kernel, args, const, warps, stages, arch)
                row.update(_ptxas_usage(compiled, arch), shared=compiled.metadata.shared)
                row["ok"] = (row["spill_stores"] == 0 and row["spill_loads"] == 0
                             and row["shared"] <= SMEM_LIMIT[arch])
            except Exception as e:  # noqa: BLE001 (a config that cannot be built is a finding)
                row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300], ok=False)
            rows.append(row)
    return rows


def markdown(rows) -> str:
    out = ["| arch | kernel | dtype | config | registers | spill stores / loads (B) | shared memory (KiB) | ok |",
           "|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['arch']} | {r['kernel']} | {r['dtype']} | {r['config']} | – | – | – | "
                       f"no: {r['error']} |")
            continue
        limit = SMEM_LIMIT[int(r["arch"][3:])]
        out.append(f"| {r['arch']} | {r['kernel']} | {r['dtype']} | {r['config']} | {r['registers']} | "
                   f"{r['spill_stores']} / {r['spill_loads']} | {r['shared'] / 1024:.1f} of {limit // 1024} | "
                   f"{'yes' if r['ok'] else '**no**'} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, action="append", choices=sorted(SMEM_LIMIT),
                   help="compute capability x10 (repeatable; default: 90 and 80)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    a = p.parse_args(argv)
    from ._common import INTERPRET
    if INTERPRET:
        print("densecl_fast.kernels.aot: TRITON_INTERPRET is set; unset it (the interpreter replaces the kernels)",
              file=sys.stderr)
        return 2
    import triton
    rows = table(tuple(a.arch or (90, 80)))
    if a.json:
        print(json.dumps({"triton": triton.__version__, "rows": rows}))
    else:
        print(f"Triton {triton.__version__}; production shapes D = {PRODUCT_D}, C = {PRODUCT_C}, "
              f"S^2 = {PRODUCT_S2}\n")
        print(markdown(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
