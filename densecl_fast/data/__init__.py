"""Two-view data for DenseCL.

Every backend returns a *two-view loader*, the seam between data and trainer:

    loader = build_loader(cfg.data, batch_size=per_rank_batch, rank=r, world_size=w,
                          device=dev, seed=cfg.train.seed, channels_last=True)
    len(loader)                  # optimizer steps per epoch, identical on every rank
    loader.set_epoch(epoch, start_step=0)   # reshuffle; start_step skips already-trained batches
    for im_q, im_k in loader:    # float tensors on `device`, N x 3 x H x W, ImageNet-normalised
        ...
    loader.skipped               # corrupt/unreadable images skipped so far (never raises)
    loader.close()               # end its workers/pipeline (the trainer does, on every way out)

The data order and every augmentation are a function of (seed, epoch, sample), so a run
resumed at (epoch, start_step) sees exactly the batches it would have seen. Both backends take
the order, the rank sharding and the substitutes of unreadable files from `plan.py`, so they
cannot drift apart.
"""
from __future__ import annotations

import importlib.util

import torch


from .errors import DataError  # noqa: F401  (re-exported: the package's public name)


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def resolve_backend(data_cfg, device: torch.device) -> str:
    if data_cfg.backend != "auto":
        return data_cfg.backend
    return "dali" if device.type == "cuda" and dali_available() else "torch"


def build_loader(data_cfg, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 device: torch.device = torch.device("cpu"), seed: int = 0, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32):
    """`dtype` is a hint: DALI emits it directly (bf16 halves the bytes); torchvision emits float32."""
    backend = resolve_backend(data_cfg, device)
    if backend == "dali":
        if not dali_available():
            raise DataError("data.backend=dali but NVIDIA DALI is not installed: pip install -e .[dali]")
        from .dali.loader import DaliTwoViewLoader
        return DaliTwoViewLoader(data_cfg, batch_size=batch_size, rank=rank, world_size=world_size,
                                 device=device, seed=seed, channels_last=channels_last, dtype=dtype)
    from .torch_loader import TorchTwoViewLoader
    return TorchTwoViewLoader(data_cfg, batch_size=batch_size, rank=rank, world_size=world_size,
                              device=device, seed=seed, channels_last=channels_last)
