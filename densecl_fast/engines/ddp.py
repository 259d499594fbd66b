"""DDP behind the engine interface, applied in place.

The query encoder is replicated with torch.distributed's composable `replicate` (DDP's reducer:
bucketed all-reduce overlapped with backward) instead of a DistributedDataParallel wrapper, so
the model holds no wrapper and its state_dict keys stay the same. Only the query encoder is
replicated: the momentum encoder has no gradients, so no find_unused_parameters. Checkpoints: the
single-file format of the single engine (the model is identical on every rank).
"""
from __future__ import annotations

from .base import Engine


class DDPEngine(Engine):
    name = "ddp"

    def describe(self) -> str:
        return f"ddp ({self.dist.world_size} ranks, {self.device.type})"

    def wrap(self, model) -> None:
        from torch.distributed._composable import replicate
        kw = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
        # No buffer sync in forward: each rank keeps its own BN running statistics (rank 0's are
        # saved), as with the original's per-GPU BN. (The sync at construction copies rank 0's
        # buffers, which are identical on every rank then.) broadcast_buffers is deprecated.
        replicate(model.encoder_q, forward_sync_buffers=False, **kw)
