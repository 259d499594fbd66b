"""Fused kernels of DenseCL (loss pieces, grouped BN): Triton implementations and their plain-PyTorch references.
Imported as `densecl_fast.kernels` (setup.py maps this folder there; see densecl_fast/__init__.py).

`dense_positive_logits` and `queue_infonce` are what the model calls; they dispatch to the
Triton kernels (kernels/dense_match_triton.py, kernels/queue_infonce_triton.py) or to the references
(kernels/reference.py, the ground truth) according to `set_backend` / DENSECL_KERNELS
(see kernels/dispatch.py). `group_batch_norm` (kernels/group_bn.py) is one custom op whose
implementation makes the same choice between kernels/group_bn_triton.py and PyTorch.
"""
from .dispatch import (
    BACKENDS,
    ENV_VAR,
    HAS_TRITON,
    active_backend,
    dense_positive_logits,
    get_backend,
    queue_infonce,
    set_backend,
)
from .group_bn import group_batch_norm
from .reference import dense_positive_logits_ref, group_batch_norm_ref, queue_infonce_ref

__all__ = [
    "dense_positive_logits", "queue_infonce", "group_batch_norm", "dense_positive_logits_ref", "queue_infonce_ref",
    "group_batch_norm_ref",
    "set_backend", "get_backend", "active_backend", "BACKENDS", "ENV_VAR", "HAS_TRITON",
]
