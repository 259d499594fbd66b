"""Backend choice for the fused kernels (loss pieces, grouped BN): Triton or plain PyTorch.

    auto       Triton for CUDA tensors it supports, the reference otherwise (CPU, fp64, ...)
    triton     always Triton; raises where it cannot run (CPU without TRITON_INTERPRET=1,
               unsupported shapes or dtypes) instead of silently measuring the wrong thing
    reference  always the reference

The choice comes from kernels.set_backend() (the trainer calls it with cfg.train.kernels) and
from the environment variable DENSECL_KERNELS, which wins when set so that a run can be
switched without editing its config. The decision is a module global read at call time, so
torch.compile guards on it and recompiles if it changes.
"""
import os
import warnings

import torch

from .reference import (
    dense_positive_logits_ref,
    group_batch_norm_backward_ref,
    group_batch_norm_backward_aten,
    group_batch_norm_ref,
    group_batch_norm_aten,
    queue_infonce_ref,
)

ENV_VAR = "DENSECL_KERNELS"
BACKENDS = ("auto", "triton", "reference")

try:
    from . import dense_match_triton as _dm
    from . import group_bn_triton as _gb
    from . import queue_infonce_triton as _qi
    from ._common import can_run_on as _can_run_on
    HAS_TRITON = True
    _TRITON_IMPORT_ERROR = None
except ImportError as e:  # no Triton on this platform: the references still work
    _dm = _gb = _qi = None
    HAS_TRITON = False
    _TRITON_IMPORT_ERROR = e

_configured = "auto"
_backend = "auto"


def _validate(name, where):
    value = str(name).strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{where}={name!r}: use one of {', '.join(BACKENDS)}")
    return value


def _env_backend():
    raw = os.environ.get(ENV_VAR, "").strip()
    return _validate(raw, ENV_VAR) if raw else None


def set_backend(name: str) -> str:
    """Select auto | triton | reference. Returns the backend in effect, which is the
    DENSECL_KERNELS environment variable instead when that is set."""
    global _configured, _backend
    _configured = _validate(name, "kernels backend")
    env = _env_backend()
    if env is not None and env != _configured:
        warnings.warn(f"{ENV_VAR}={env} overrides kernels backend {_configured!r}", stacklevel=2)
    _backend = env or _configured
    return _backend


def get_backend() -> str:
    """The backend setting in effect (auto | triton | reference)."""
    return _backend


def triton_unavailable(device) -> str:
    """Empty when the Triton kernels can run on `device`; otherwise why not, as a clause for errors."""
    if not HAS_TRITON:
        return f"Triton is not importable ({_TRITON_IMPORT_ERROR})"
    if not _can_run_on(device):
        return (f"Triton kernels need CUDA tensors (got {device}); on CPU they run only through the "
                "interpreter, with TRITON_INTERPRET=1 set before kernels is imported")
    return ""


def active_backend(device) -> str:
    """'triton' or 'reference': what would run for supported inputs on `device` (for logging).
    Raises RuntimeError when the backend is forced to triton and cannot run there."""
    device = torch.device(device)
    if _backend == "reference":
        return "reference"
    if _backend == "auto":
        return "triton" if HAS_TRITON and device.type == "cuda" else "reference"
    why = triton_unavailable(device)
    if why:
        raise RuntimeError(f"kernels backend 'triton': {why}")
    return "triton"


def _use_triton(device, supported: bool, op: str) -> bool:
    if _backend == "reference":
        return False
    if _backend == "auto":
        return HAS_TRITON and device.type == "cuda" and supported
    why = triton_unavailable(device)
    if why:
        raise RuntimeError(f"{op}: kernels backend 'triton': {why}")
    if not supported:
        raise ValueError(f"{op}: kernels backend 'triton' does not support these inputs "
                         "(see kernels/{queue_infonce,dense_match,group_bn}_triton.py: supports())")
    return True


def queue_infonce(q, l_pos, queue, temperature):
    """Mean over rows of logsumexp([l_pos, q @ queue] / T) - l_pos / T (see queue_infonce_ref)."""
    if _use_triton(q.device, HAS_TRITON and _qi.supports(q, l_pos, queue), "queue_infonce"):
        return _qi.queue_infonce_triton(q, l_pos, queue, temperature)
    return queue_infonce_ref(q, l_pos, queue, temperature)


def dense_positive_logits(q_b, k_b, q_grid, k_grid):
    """(l_pos_dense N x S^2, index N x S^2) (see dense_positive_logits_ref)."""
    if _use_triton(q_b.device, HAS_TRITON and _dm.supports(q_b, k_b, q_grid, k_grid), "dense_positive_logits"):
        return _dm.dense_positive_logits_triton(q_b, k_b, q_grid, k_grid)
    return dense_positive_logits_ref(q_b, k_b, q_grid, k_grid)


def group_batch_norm_forward(x, weight, bias, groups, eps, relu):
    """What the densecl::group_batch_norm op runs (see kernels/group_bn.py): the Triton kernels;
    else, on CUDA, one native (cuDNN) batch norm per group, the implementation the op replaced (the
    PyTorch formulation over a 5-D view ran the eager bf16 step at half its speed on an H200,
    perf/RESULTS.md 2026-12-04); elsewhere (CPU) ATen's batch norm per group written into one output."""
    if _use_triton(x.device, HAS_TRITON and _gb.supports(x, weight, bias, groups), "group_batch_norm"):
        return _gb.forward(x, weight, bias, groups, eps, relu)
    if x.device.type == "cuda":
        return group_batch_norm_ref(x, weight, bias, groups, eps, relu)
    return group_batch_norm_aten(x, weight, bias, groups, eps, relu)


def group_batch_norm_backward(dy, x, y, mean, invstd, weight, groups, relu):
    """The backward op's implementation, chosen by the forward's rules (both implementations save
    the same statistics, so either backward goes with either forward)."""
    if _use_triton(x.device, HAS_TRITON and _gb.supports(x, weight, weight, groups), "group_batch_norm"):
        return _gb.backward(dy, x, y, mean, invstd, weight, groups, relu)
    if x.device.type == "cuda":
        return group_batch_norm_backward_ref(dy, x, y, mean, invstd, weight, groups, relu)
    return group_batch_norm_backward_aten(dy, x, y, mean, invstd, weight, groups, relu)


_backend = _env_backend() or _configured
