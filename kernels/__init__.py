"""Loss kernels of DenseCL: fused Triton implementations and their plain-PyTorch references.

`dense_positive_logits` and `queue_infonce` are what the model calls. For now they are the
references; the Triton kernels plug in behind these names (issue: fused Triton kernels).
"""
from .reference import dense_positive_logits_ref, queue_infonce_ref

dense_positive_logits = dense_positive_logits_ref
queue_infonce = queue_infonce_ref

__all__ = ["dense_positive_logits", "queue_infonce", "dense_positive_logits_ref", "queue_infonce_ref"]
