"""Compile the Triton kernels ahead of time for a GPU architecture, on a machine without one.

    python -m perf.aot              # markdown table for sm_90 and sm_80 (perf/AOT_SM90.md)
    python -m perf.aot --json       # the same rows as JSON (tests/test_kernels_aot.py)
    python -m perf.aot --arch 90    # one architecture

Every kernel the model runs is compiled with every autotune config it may pick, at the
production shapes (DenseCL R50: D = 128, C = 2048, S^2 = 49) and for each input dtype, through
Triton's own argument specialisation, so the code is what a launch would build. The matching
kernel gets the strides of a real forward (recorded on the CPU in both model memory formats,
recorded_match_layouts); the grouped BN kernels every tile their launch plan picks for ResNet-50's
BN layers at batch 256 in groups of 32, 224 px, in both memory formats. ptxas (shipped
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


def _strides_in_order(shape, order):
    """Dense strides of `shape` with its dimensions laid out in `order` (outermost first)."""
    strides, step = [0] * len(shape), 1
    for d in reversed(order):
        strides[d] = step
        step *= shape[d]
    return strides


def recorded_match_layouts() -> dict:
    """What reaches kernels.dense_positive_logits in a real forward on the CPU, per memory format
    of the model (train.channels_last): the dimension order (outermost first) of q_b, k_b, q_grid,
    k_grid. A ResNet-18 DenseCL at 64 px (C5 2 x 2) in training mode; the order does not depend
    on the sizes, and the AOT cases lay the production shapes out in it (tables built
    on other strides than the model's hid the spills of the real ones)."""
    from densecl_fast import kernels
    from densecl_fast.config import load_config
    from densecl_fast.model import DenseCL

    cfg = load_config("smoke", ["model.hid_dim=32", "model.out_dim=16", "model.queue_len=32",
                                "model.bn_group_size=2"]).model
    seen, original = {}, kernels.dense_positive_logits
    layouts = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    try:
        for name, fmt in layouts.items():
            def record(*tensors, name=name):
                seen[name] = [tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d))) for t in tensors]
                return original(*tensors)
            kernels.dense_positive_logits = record
            torch.manual_seed(0)
            model = DenseCL(cfg).to(memory_format=fmt)
            x = \
                [torch.randn(4, 3, 64, 64).contiguous(memory_format=fmt) for _ in range(2)]
            with torch.no_grad():
                model(*x)
    finally:
        kernels.dense_positive_logits = original
    return seen


def _cases(arch: int):
    """(kernel name, dtype name, config text, kernel, args, constexprs, warps, stages) for the
    tile tables of `arch`'s family."""
    from densecl_fast.kernels import dense_match_triton as dm
    from densecl_fast.kernels import queue_infonce_triton as qi
    from densecl_fast.kernels._common import arch_family_of, dot_precision, grad_dot_precision, width_of

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
    C, S2, N = PRODUCT_C, PRODUCT_S2, 256
    for layout, orders in _match_layouts().items():
        strides = [_strides_in_order(shape, order)
                   for shape, order in zip(((N, C, S2),) * 2 + ((N, D, S2),) * 2, orders)]
        for name, dt in dtypes.items():
            # Under AMP the C5 maps come in the autocast dtype, the grids in fp32 (F.normalize's
            # norm runs in fp32 under CUDA autocast); the kernel's gather reads them as they come.
            feat, grid = torch.empty(1, dtype=dt), torch.empty(1, dtype=torch.float32)
            for bq, bc, warps, stages in dm.TILES[family, width_of(dt)]:
                args = [feat, feat, grid, grid, grid, torch.empty(1, dtype=torch.int64), C, S2, D,
                        *strides[0], *strides[1], *strides[2], *strides[3]]
                const = dict(BLOCK_Q=bq, BLOCK_K=64, BLOCK_C=bc, BLOCK_D=64, UPCAST=False,
                             DOT_PREC=dot_precision(dt), INTERPRET=False)
                yield (f"dense matching ({layout})", name,
                       f"BLOCK_Q={bq} BLOCK_C={bc} warps={warps} stages={stages}",
                       dm._dense_match_kernel, args, const, warps, stages)


# What the grouped BN kernels see in DenseCL R50's training step: batch 256 in groups of 32
# images at 224 px, SMs of an H100 (sm_90) / A100 (sm_80) for the split of a group's tiles.
BN_BATCH, BN_GROUPS, BN_IMAGE = 256, 8, 224
SM_COUNT = {90: 132, 80: 108}


def resnet50_bn_inputs() -> list:
    """(C, H, W) of the input of every BatchNorm2d of torchvision's ResNet-50 at BN_IMAGE px, in
    forward order, from a forward on the meta device (no memory, no compute)."""
    import torchvision

    net = torchvision.models.resnet50(weights=None).to("meta")
    shapes = []
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape[1:])))
    with torch.no_grad():
        net(torch.empty(2, 3, BN_IMAGE, BN_IMAGE, device="meta"))
    return shapes


def _spec_key(ints) -> tuple:
    """What Triton specialises integer arguments on (== 1, divisible by 16)."""
    return tuple((a == 1, a % 16 == 0) for a in ints)


def _group_bn_cases(arch: int):
    """The grouped BN kernels over R50's BN layers in both layouts, bf16 and fp32 activations (fp32
    weights), with and without the fused ReLU: one case per distinct tile (constexprs) and
    specialisation (== 1, divisible by 16) of the sizes and strides that form the addresses."""
    import triton.language as tl

    from densecl_fast.kernels import group_bn_triton as gb

    f32 = torch.empty(1, dtype=torch.float32)
    seen = set()

    def case(name, dname, layout, kernel, args, const, warps):
        key = (name, dname, layout, tuple(sorted((k, str(v)) for k, v in const.items())), spec)
        if key in seen:
            return None
        seen.add(key)
        cfg = " ".join(f"{k}={v}" for k, v in const.items() if k in ("BLOCK_R", "BLOCK_S", "BLOCK_C", "RELU"))
        return (f"group BN {name}" + (f" ({layout})" if layout else ""), dname,
                f"{cfg} warps={warps}; first layer C={C} H·W={H * W}", kernel, args, const, warps, 1)

    for C, H, W in resnet50_bn_inputs():
        for layout in ("channels_last", "contiguous"):
            p = gb.plan((BN_BATCH, C, H, W), layout == "channels_last", BN_GROUPS, 4 * SM_COUNT[arch])
            outer, inner, s_g, s_outer, s_inner, s_c, br, bc, nblk, tiles, ipp, splits = p
            geo = [C, inner, nblk, tiles, ipp, splits, s_g, s_outer, s_inner, s_c]
            # Loop bounds (tile counts) vary between layers but only set trip counts; the sizes
            # and strides in the addresses decide vectorisation, hence registers.
            spec = _spec_key([C, inner, s_g, s_outer, s_inner, s_c])
            for dname, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
                x = torch.empty(1, dtype=dt)
                blocks = dict(BLOCK_R=br, BLOCK_C=bc, ACC=tl.float32)
                found = [case("stats", dname, layout, gb._stats_kernel, [x, f32, f32, f32, *geo], blocks, gb.NUM_WARPS)]
                for relu in (False, True):
                    const = dict(RELU=relu, **blocks)
                    found += [
                        case("normalize", dname, layout, gb._normalize_kernel, [x, x, f32, f32, f32, f32, *geo],
                             dict(const, INTERPRET=False), gb.NUM_WARPS),
                        case("bwd reduce", dname, layout, gb._bwd_reduce_kernel, [x, x, x, f32, f32, f32, f32, *geo],
                             const, gb.NUM_WARPS),
                        case("bwd dx", dname, layout, gb._bwd_dx_kernel,
                             [x, x, x, x, f32, f32, f32, f32, f32, 1568.0, *geo], dict(const, INTERPRET=False),
                             gb.NUM_WARPS)]
                yield from (c for c in found if c is not None)
            block_s, block_cf = gb.finalize_blocks(splits)
            fin = dict(BLOCK_S=block_s, BLOCK_C=block_cf, ACC=tl.float32)
            for c in (case("finalize", "fp32", "", gb._finalize_kernel,
                           [f32] * 7 + [BN_GROUPS, splits, C, 1e-5], fin, gb.NUM_WARPS),
                      case("bwd finalize", "fp32", "", gb._bwd_finalize_kernel,
                           [f32] * 6 + [BN_GROUPS, splits, C], dict(fin, INTERPRET=False), gb.NUM_WARPS)):
                if c is not None:
                    yield c


_LAYOUTS = {}


def _match_layouts() -> dict:
    if not _LAYOUTS:
        _LAYOUTS.update(recorded_match_layouts())
    return _LAYOUTS


def table(archs=(90, 80)) -> list[dict]:
    rows = []
    for arch in archs:
        for kname, dname, cfg, kernel, args, const, warps, stages in (*_cases(arch), *_group_bn_cases(arch)):
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
    args = p.parse_args(argv)
    from densecl_fast.kernels._common import INTERPRET
    if INTERPRET:
        print("perf.aot: TRITON_INTERPRET is set; unset it (the interpreter replaces the kernels)",
              file=sys.stderr)
        return 2
    import triton
    rows = table(tuple(args.arch or (90, 80)))
    if args.json:
        print(json.dumps({"triton": triton.__version__, "rows": rows}))
    else:
        print(f"Triton {triton.__version__}; production shapes D = {PRODUCT_D}, C = {PRODUCT_C}, "
              f"S^2 = {PRODUCT_S2}\n")
        print(markdown(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
