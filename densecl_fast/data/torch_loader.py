"""Two-view loader on torchvision + a torch DataLoader (the portable backend).

Determinism: the epoch's order is a permutation seeded by (seed, epoch); every sample's
augmentation is seeded by (seed, epoch, index) inside `__getitem__`. Nothing depends on which
worker process loads what, so results are the same for any num_workers, and a run resumed at
(epoch, start_step) sees exactly the batches it would have seen.

Sharding: global step t of an epoch takes the permutation's slice [t*B*W, (t+1)*B*W) and rank r
the r-th B of it (B = per-rank batch, W = world size); the tail that does not fill a global batch
is dropped, so every rank has len(dataset) // (B*W) steps.

Bad files: a file that fails to decode is replaced by another sample drawn from (seed, epoch,
index, attempt), so the batch keeps its size. Workers report the failures inside the batch; the
main process counts them (`skipped`, every occurrence) and warns once per file.
"""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import signal
from typing import Iterator, List, Sequence, Set, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import DataError
from .sources import draft_side, list_images, load_rgb
from .transforms import TwoViewTransform

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 32  # consecutive unreadable files before a sample gives up (the set is mostly bad)


def mix_seed(*values: int) -> int:
    """Stable 63-bit seed from integers (Python's hash() is salted per process)."""
    data = b"".join(int(v).to_bytes(16, "little", signed=True) for v in values)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class PathTable:
    """Paths packed in one bytes buffer: a Python list of a million str would be copied page by
    page into every forked worker as reference counts are touched; numpy buffers are not."""

    def __init__(self, paths: Sequence[str]):
        # os.fsencode: file names that are not UTF-8 (a Latin-1 name, say) come from os.walk as
        # surrogate escapes and go back to the very same bytes.
        encoded = [os.fsencode(p) for p in paths]
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i > 0 else 0
        return os.fsdecode(self._blob[start:int(self._ends[i])].tobytes())


class TwoViewDataset(Dataset):
    """dataset[(epoch, index)] -> (view_q, view_k, [(bad path, reason), ...])."""

    def __init__(self, paths: Sequence[str], image_size: int, min_scale: float, seed: int):
        self.paths = PathTable(paths)
        self.transform = TwoViewTransform(image_size, min_scale)
        self.seed = int(seed)
        self.min_side = draft_side(image_size, min_scale)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        bad: List[Tuple[str, str]] = []
        source = index
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                source = mix_seed(self.seed, epoch, index, attempt) % len(self.paths)
            path = self.paths[source]
            try:
                img = load_rgb(path, self.min_side)
            except Exception as e:  # any decode failure: replace the sample, never stop the run
                bad.append((path, f"{type(e).__name__}: {e}"))
                continue
            # The views depend on (seed, epoch, index) only: not on the worker, nor on which
            # file stood in for a bad one.
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only: torch.manual_seed would also reseed (and, being outside
                # fork_rng's devices, change) the CUDA generators of a num_workers=0 training process.
                torch.default_generator.manual_seed(mix_seed(self.seed, epoch, index))
                q, k = self.transform(img)
            return q, k, bad
        # Not raised here: in a worker process it would reach the user wrapped in a worker traceback.
        return None, None, bad


def unreadable_error(bad: List[Tuple[str, str]]) -> DataError:
    return DataError(f"{MAX_ATTEMPTS} images in a row could not be read, e.g. {bad[-1][0]}: {bad[-1][1]}; "
                     "check the data set with launch/scan_data.py")


def collate_two_views(items):
    bad = [b for it in items for b in it[2]]
    if any(it[0] is None for it in items):
        return None, None, bad
    q = torch.stack([it[0] for it in items])
    k = torch.stack([it[1] for it in items])
    return q, k, bad


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker start-up: leave SIGTERM and SIGINT to the training process. A scheduler
    (SLURM, Kubernetes, torchrun's agent) signals the whole process group; a worker that died of
    it first would crash the trainer mid-step. The trainer finishes its step, checkpoints and
    shuts the workers down; they also exit on their own when the trainer dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ShardedEpochSampler(Sampler):
    """Yields this rank's (epoch, index) keys for one epoch, from `start_step` on."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.n, self.batch, self.rank, self.world, self.seed = num_samples, batch_size, rank, world_size, seed
        self.steps = num_samples // (batch_size * world_size)
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= self.steps:
            raise ValueError(f"start_step={start_step} outside [0, {self.steps}]")
        self.epoch, self.start_step = int(epoch), int(start_step)

    def rank_indices(self) -> torch.Tensor:
        """This rank's indices for the whole epoch, steps x batch."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=g)[: self.steps * self.batch * self.world]
        return perm.view(self.steps, self.world, self.batch)[:, self.rank]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for i in self.rank_indices()[self.start_step:].reshape(-1).tolist():
            yield (self.epoch, i)

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.batch


def _mp_context():
    # fork starts workers in milliseconds and shares the path table copy-on-write; the workers
    # never touch CUDA, so forking a CUDA parent is safe. Elsewhere use the platform default.
    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


class TorchTwoViewLoader:
    """The two-view loader protocol of `densecl_fast.data` on a torch DataLoader."""

    def __init__(self, data_cfg, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 device: torch.device = torch.device("cpu"), seed: int = 0, channels_last: bool = False):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        paths = list_images(data_cfg)
        if len(paths) < batch_size * world_size:
            raise DataError(f"{len(paths)} images are fewer than one global batch "
                            f"({batch_size} per rank x {world_size} ranks) of data.source={data_cfg.source!r}")
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.dataset = TwoViewDataset(paths, data_cfg.image_size, data_cfg.min_scale, seed)
        self.sampler = ShardedEpochSampler(len(paths), batch_size, rank, world_size, seed)
        workers = int(data_cfg.num_workers)
        self._loader = DataLoader(
            self.dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True,
            collate_fn=collate_two_views, num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            multiprocessing_context=_mp_context() if workers > 0 else None,
            worker_init_fn=ignore_stop_signals if workers > 0 else None,
        )
        self.skipped = 0
        self.bad_files: Set[str] = set()

    def __len__(self) -> int:
        return self.sampler.steps

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_step)

    def _note_bad(self, bad: List[Tuple[str, str]]) -> None:
        self.skipped += len(bad)
        for path, reason in bad:
            if path not in self.bad_files:
                self.bad_files.add(path)
                log.warning("skipping unreadable image %s (%s); a deterministic substitute is used", path, reason)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for q, k, bad in self._loader:
            if bad:
                self._note_bad(bad)
            if q is None:
                raise unreadable_error(bad)
            yield (q.to(self.device, non_blocking=True, memory_format=fmt),
                   k.to(self.device, non_blocking=True, memory_format=fmt))
