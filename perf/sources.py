"""What a variant runs with: its input (synthetic tensors or a loader) and its loss kernels."""
from __future__ import annotations

import contextlib
import warnings

import torch

from densecl_fast import kernels


class Skip(Exception):
    """A variant that cannot run here (no CUDA, no DALI, no budget): recorded as skipped."""


class SyntheticSource:
    """Two fixed image pairs already on the device: no data cost at all."""
    wraps = 0

    def __init__(self, batch, size, device, channels_last, seed, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.pairs = [tuple(torch.randn(batch, 3, size, size, generator=g).to(device, dtype, memory_format=fmt)
                            for _ in range(2)) for _ in range(2)]
        self.i = 0

    def next(self):
        self.i += 1
        return self.pairs[self.i % 2]

    def close(self):
        self.pairs = []


class LoaderSource:
    """A two-view loader read step by step across epoch boundaries (counted in `wraps`)."""

    def __init__(self, loader):
        self.loader, self.wraps = loader, 0
        loader.set_epoch(0)
        self.it = iter(loader)

    def next(self):
        try:
            return next(self.it)
        except StopIteration:
            self.wraps += 1
            self.loader.set_epoch(self.wraps)
            self.it = iter(self.loader)
            return next(self.it)

    def close(self):
        # A generator's close runs its clean-up (DALI: abandon the epoch); then the loader's own.
        for obj in (self.it, self.loader):
            getattr(obj, "close", lambda: None)()
        self.it = self.loader = None


def _set_backend(name: str) -> str:
    with warnings.catch_warnings():   # the DENSECL_KERNELS override warning: reported as a Skip instead
        warnings.simplefilter("ignore")
        return kernels.set_backend(name)


@contextlib.contextmanager
def kernels_backend(fused: bool, device: torch.device):
    """Fused (triton) or reference loss kernels for one variant; the previous backend is restored."""
    prev, want = kernels.get_backend(), ("triton" if fused else "reference")
    try:
        got = _set_backend(want)
        if got != want:
            raise Skip(f"kernels backend {want!r} requested but {got!r} is in effect (DENSECL_KERNELS is set)")
        try:
            active = kernels.active_backend(device)
        except RuntimeError as e:   # triton where it cannot run
            raise Skip(f"fused kernels: not available ({e})") from e
        yield active
    finally:
        _set_backend(prev)


def fused_kernels_status(device) -> str:
    if device.type != "cuda":
        return "not measured (CUDA only)"
    return "available" if kernels.HAS_TRITON else "not available (Triton not importable)"
