"""Bits shared by the Triton kernels: interpreter detection and dot-precision choice.

Only imported when Triton is importable (see kernels/__init__.py).
"""
import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when a kernel is decorated, so the value at import time is the
# one that decides whether the kernels in this package run through the numpy interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

# Logits are kept in base 2 inside the kernels, so that every exponential is one exp2
# instruction: s2 = s * LOG2E, and a base-2 log-sum-exp times LN2 is the natural one.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# The same numbers for @triton.jit code, which may read only constexpr globals.
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)

# Dtypes the kernels accept. tl.dot accumulates in fp32 for all three.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x.to(dtype), rounding to nearest-even as the GPU does. The interpreter (triton 3.8)
    truncates fp32 -> bf16 instead, which doubles and biases the rounding error; there the
    rounding is done by hand on the bits (add half an ulp, ties to even, drop 16 bits).
    Nested ifs with one return: older Triton rejects chained `and` and early returns."""
    if INTERPRET:
        if (dtype == tl.bfloat16) & (x.dtype == tl.float32):
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            y = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
        else:
            y = x.to(dtype)
    else:
        y = x.to(dtype)
    return y


def can_run_on(device: torch.device) -> bool:
    """Whether a Triton kernel can be launched on tensors living on `device`."""
    if device.type == "cuda":
        return True
    return INTERPRET and device.type == "cpu"


def upcast_for_interpreter(*dtypes: torch.dtype) -> bool:
    """The interpreter (triton 3.8) stores bf16 as uint16 and hands it to numpy.matmul as
    integers, so tl.dot on bf16 tiles returns garbage there. Kernels take this flag as a
    constexpr and convert bf16 tiles to fp32 right before tl.dot (values are exact in fp32,
    and the kernels round wherever the GPU path would, so numerics stay comparable)."""
    return INTERPRET and any(d == torch.bfloat16 for d in dtypes)


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision for tl.dot on tiles of `dtype` (only fp32 tiles care).

    fp32 follows torch's own setting for matmuls, so the fused and the reference paths agree on
    what "fp32" means: "highest" (torch's default) gets "tf32x3", three TF32 tensor-core
    products that recover ~fp32 accuracy (plain "ieee" falls back to FMA loops that spill
    registers badly at these tile sizes); "high"/"medium" get single-pass TF32. ROCm only
    accepts "ieee"."""
    if torch.version.hip is not None:
        return "ieee"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


def grad_dot_precision(dtype: torch.dtype) -> str:
    """input_precision for the product p @ queue^T that forms a gradient (only fp32 tiles care).

    Single-pass TF32: p <= 1 is a probability, and rounding it and the queue to TF32's 10-bit
    mantissa costs ~2^-11 relative per term, the fp16 path's accuracy (the bf16 path rounds p
    to 8 bits, like flash-attention). The three-pass "tf32x3" here makes every fp32 tile of
    the one-pass kernel spill on sm_90 (180-1,100 bytes at 255 registers, perf/AOT_SM90.md),
    while the logits, whose rounding moves every probability, keep dot_precision's choice."""
    if torch.version.hip is not None:
        return "ieee"
    return "tf32"


ARCH_FAMILIES = ("sm90", "sm80")


def arch_family_of(major: int) -> str:
    """Which tile table a GPU uses: "sm90" (Hopper and later: wgmma, 227 KiB shared memory
    per block) or "sm80" (Ampere/Ada: mma.sync with register operands, 163 KiB). Tables of
    later architectures than sm_90 are not compiled or checked here."""
    return "sm90" if major >= 9 else "sm80"


@functools.lru_cache(maxsize=None)
def arch_family(device_index: int) -> str:
    return arch_family_of(torch.cuda.get_device_capability(device_index)[0])


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device; make that the tensors' device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def tiles_to_try(tiles: list) -> list:
    """The listed tiles an autotuner times; with DENSECL_AUTOTUNE=0 only the first. The GPU test
    suite sets it (every new shape would otherwise be tuned: minutes of benchmarking for tiny
    tensors); training and perf/ leave it unset."""
    return tiles[:1] if os.environ.get("DENSECL_AUTOTUNE", "1").strip() == "0" else tiles


def width_of(dtype: torch.dtype) -> str:
    """The key of the tile tables: fp32 operand tiles are twice the bytes of 16-bit ones."""
    return "fp32" if dtype == torch.float32 else "16bit"


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def autotune_configs(gpu_configs, interpreter_config):
    """Autotuning several configs needs a GPU to time them (it fails under the interpreter
    without a driver), so the interpreter gets exactly one config, which skips benchmarking."""
    return [interpreter_config] if INTERPRET else gpu_configs


next_power_of_2 = triton.next_power_of_2
