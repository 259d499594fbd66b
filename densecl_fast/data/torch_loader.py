"""Two-view loader on torchvision + a torch DataLoader (the portable backend).

The order, rank sharding and substitution of unreadable files are `plan.EpochPlan`'s (shared with
the DALI loader). Every sample's augmentation is seeded by (seed, epoch, planned index) inside
`__getitem__`, so results are the same for any num_workers. Workers report bad files inside the
batch; the main process counts and logs them (`plan.BadFileLog`).
"""
from __future__ import annotations

import multiprocessing
import signal
from typing import Iterator, List, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .plan import BadFileLog, EpochPlan, mix_seed, unreadable_error
from .sources import PathTable, draft_side, list_images, load_rgb
from .transforms import Augmentation, TwoViewTransform


class TwoViewDataset(Dataset):
    """dataset[(epoch, index)] -> (view_q, view_k, file read, [(bad path, reason), ...])."""

    def __init__(self, paths: Sequence[str], plan: EpochPlan, image_size: int, min_scale: float,
                 augmentation: Augmentation = Augmentation()):
        self.paths = PathTable(paths)
        self.plan = plan
        self.transform = TwoViewTransform(image_size, min_scale, augmentation)
        self.seed = plan.seed
        self.min_side = draft_side(image_size, min_scale)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        img, source, bad = self.plan.first_readable(epoch, index, lambda j: load_rgb(self.paths[j], self.min_side))
        bad = [(self.paths[j], why) for j, why in bad]
        if img is None:
            # Not raised here: in a worker process it would reach the user wrapped in a worker traceback.
            return None, None, -1, bad
        # The views depend on (seed, epoch, index) only: not on the worker, nor on which
        # file stood in for a bad one.
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also reseed (and, being outside
            # fork_rng's devices, change) the CUDA generators of a num_workers=0 training process.
            torch.default_generator.manual_seed(mix_seed(self.seed, epoch, index))
            q, k = self.transform(img)
        return q, k, source, bad


def collate_two_views(items):
    bad = [b for it in items for b in it[3]]
    sources = [it[2] for it in items]
    if any(it[0] is None for it in items):
        return None, None, sources, bad
    q = torch.stack([it[0] for it in items])
    k = torch.stack([it[1] for it in items])
    return q, k, sources, bad


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker start-up: leave SIGTERM and SIGINT to the training process. A scheduler
    (SLURM, Kubernetes, torchrun's agent) signals the whole process group; a worker that died of
    it first would crash the trainer mid-step. The trainer finishes its step, checkpoints and
    shuts the workers down; they also exit on their own when the trainer dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ShardedEpochSampler(Sampler):
    """Yields this rank's (epoch, index) keys of the plan for one epoch, from `start_step` on."""

    def __init__(self, plan: EpochPlan):
        self.plan = plan
        self.steps = plan.steps
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.plan.check_start(start_step)
        self.epoch, self.start_step = int(epoch), int(start_step)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for i in self.plan.rank_indices(self.epoch)[self.start_step:].reshape(-1).tolist():
            yield (self.epoch, i)

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.plan.batch


def _mp_context():
    # fork starts workers in milliseconds and shares the path table copy-on-write; the workers
    # never touch CUDA, so forking a CUDA parent is safe. Elsewhere use the platform default.
    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


class TorchTwoViewLoader:
    """The two-view loader protocol of `densecl_fast.data` on a torch DataLoader."""

    def __init__(self, data_cfg, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 device: torch.device = torch.device("cpu"), seed: int = 0, channels_last: bool = False):
        augmentation = Augmentation.of(data_cfg)
        paths = list_images(data_cfg)
        self.plan = EpochPlan(len(paths), batch_size, rank, world_size, seed, data_cfg.source)
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.dataset = TwoViewDataset(paths, self.plan, data_cfg.image_size, data_cfg.min_scale, augmentation)
        self.sampler = ShardedEpochSampler(self.plan)
        workers = int(data_cfg.num_workers)
        self._loader = DataLoader(
            self.dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True,
            collate_fn=collate_two_views, num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            multiprocessing_context=_mp_context() if workers > 0 else None,
            worker_init_fn=ignore_stop_signals if workers > 0 else None,
        )
        self.bad = BadFileLog()
        self._last: List[int] = []

    def __len__(self) -> int:
        return self.plan.steps

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    @property
    def skipped(self) -> int:
        return self.bad.skipped

    @property
    def bad_files(self):
        return self.bad.files

    @property
    def last_sources(self) -> List[str]:
        """The files decoded for the last delivered batch, substitutes included (tests, debugging)."""
        return [self.dataset.paths[j] for j in self._last]

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_step)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for q, k, sources, bad in self._loader:
            self.bad.skipped += len(bad)
            for path, why in bad:
                self.bad.note(path, why)
            if q is None:
                raise unreadable_error(bad)
            self._last = sources
            yield (q.to(self.device, non_blocking=True, memory_format=fmt),
                   k.to(self.device, non_blocking=True, memory_format=fmt))
