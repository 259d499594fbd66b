"""Two-view loader on torchvision + a torch DataLoader (the portable backend).

The order, rank sharding and substitution of unreadable files are `plan.FileOrder`'s (shared with
the DALI loader). Every sample's augmentation is seeded by (seed, epoch, planned index) inside
`__getitem__`, so results are the same for any num_workers. Workers report bad files inside the
batch; the main process counts and logs them (`plan.BadFileLog`).
"""
from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import signal
import weakref
from typing import Iterator, List, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .plan import BadFileLog, FileOrder, mix_seed, unreadable_error
from .sources import PathTable, draft_side, list_images, load_rgb
from .transforms import Augmentation, TwoViewTransform


class TwoViewDataset(Dataset):
    """dataset[(epoch, index)] -> (view_q, view_k, file read, [(bad path, reason), ...])."""

    def __init__(self, paths: Sequence[str], order: FileOrder, image_size: int, min_scale: float,
                 augmentation: Augmentation = Augmentation()):
        self.paths = PathTable(paths)
        self.order = order
        self.transform = TwoViewTransform(image_size, min_scale, augmentation)
        self.seed = order.seed
        self.min_side = draft_side(image_size, min_scale)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        img, source, bad = self.order.first_readable(epoch, index, lambda j: load_rgb(self.paths[j], self.min_side))
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


def ignore_stop_signals(stopping, _worker_id: int) -> None:
    """DataLoader worker start-up: leave SIGTERM and SIGINT to the training process. A scheduler
    (SLURM, Kubernetes, torchrun's agent) signals the whole process group; a worker that died of
    it first would crash the trainer mid-step. The trainer finishes its step, checkpoints and
    shuts the workers down; they also exit on their own when the trainer dies.

    `stopping` (an Event the loader sets in close()) turns SIGTERM back on for the shutdown: the
    DataLoader ends a worker that did not leave on its own with SIGTERM, and one that ignored it
    would be joined for ever at interpreter exit."""
    signal.signal(signal.SIGTERM, functools.partial(_on_sigterm, stopping))
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _on_sigterm(stopping, _signum, _frame) -> None:
    if stopping.is_set():
        os._exit(0)  # 0: the DataLoader's SIGCHLD check must not report a shutdown as a worker failure


class ShardedEpochSampler(Sampler):
    """Yields this rank's (epoch, index) keys of the file order for one epoch, from `start_step` on."""

    def __init__(self, order: FileOrder):
        self.order = order
        self.steps = order.steps
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.order.check_start(start_step)
        self.epoch, self.start_step = int(epoch), int(start_step)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for i in self.order.rank_indices(self.epoch)[self.start_step:].reshape(-1).tolist():
            yield (self.epoch, i)

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.order.batch


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
        self.order = FileOrder(len(paths), batch_size, rank, world_size, seed, data_cfg.source)
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.dataset = TwoViewDataset(paths, self.order, data_cfg.image_size, data_cfg.min_scale, augmentation)
        self.sampler = ShardedEpochSampler(self.order)
        workers = int(data_cfg.num_workers)
        context = _mp_context() if workers > 0 else None
        self._stopping = (context or multiprocessing).Event() if workers > 0 else None
        self._loader = DataLoader(
            self.dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True,
            collate_fn=collate_two_views, num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            multiprocessing_context=context,
            worker_init_fn=functools.partial(ignore_stop_signals, self._stopping) if workers > 0 else None,
        )
        self.bad = BadFileLog()
        self._last: List[int] = []
        if workers > 0:
            _open_loaders.add(self)
            _register_exit_guard()

    def __len__(self) -> int:
        return self.order.steps

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

    def close(self) -> None:
        """Shut the worker processes down (idempotent; a later iteration starts new ones). The
        trainer calls it on every way out; an interpreter exit calls it for loaders left open."""
        it = getattr(self._loader, "_iterator", None)  # persistent workers live in the kept iterator
        self._loader._iterator = None
        if it is None or not hasattr(it, "_workers"):
            return
        self._stopping.set()
        try:
            it._shutdown_workers()  # the DataLoader's own shutdown: a None to each worker, then SIGTERM
        finally:
            for w in it._workers:   # the last resort for a worker stuck where no signal handler runs
                if w.is_alive():
                    w.kill()
                    w.join(timeout=5)
            self._stopping.clear()


# Loaders with worker processes not closed yet. At interpreter exit multiprocessing's own hook
# SIGTERMs its daemon children and joins them: a worker that ignores SIGTERM would block the exit
# for ever (a crashed run that never ends and holds its GPUs). This guard, registered after that
# hook (atexit runs last-in first-out) and after torch's, which turns the DataLoader's shutdown
# into a no-op, closes them first.
_open_loaders: "weakref.WeakSet[TorchTwoViewLoader]" = weakref.WeakSet()
_guard_registered = False


def _register_exit_guard() -> None:
    global _guard_registered
    if not _guard_registered:
        import multiprocessing.util  # noqa: F401  (its atexit hook must be registered before ours)
        import torch.utils.data._utils  # noqa: F401  (and torch's)
        atexit.register(_close_open_loaders)
        _guard_registered = True


def _close_open_loaders() -> None:
    for loader in list(_open_loaders):
        try:
            loader.close()
        except Exception:  # one loader's failure must not leave the others' workers behind
            pass
