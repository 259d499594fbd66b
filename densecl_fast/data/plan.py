"""The data plan both loaders follow: which file fills each place of each batch on each rank.

Kept in one module, free of DALI and of the torch DataLoader, so that the torch and DALI loaders
cannot drift apart in what they read. The determinism contract of `densecl_fast.data` rests on it:

* Order. Epoch e's order is a permutation seeded by (seed, e). Global step t takes its slice
  [t*B*W, (t+1)*B*W) and rank r the r-th B of it (B = per-rank batch, W = world size); the tail
  that does not fill a global batch is dropped (a different tail every epoch), so every rank runs
  N // (B*W) steps and resuming at (e, start_step) just starts later in the same table.
* Substitution. A place planned for file i that cannot be read takes the first readable file of
  i's candidates: i itself, then files drawn from (seed, e, i, attempt), attempt = 1, 2, ...; after
  `MAX_ATTEMPTS` unreadable candidates the data set is deemed broken. The place keeps i's draws.
* Accounting. `skipped` counts every unreadable candidate met (substitutes that are bad too count
  again); each bad file is logged once per loader.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Callable, Iterator, List, Set, Tuple, TypeVar

import numpy as np
import torch

from .errors import DataError

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 32  # unreadable candidates in a row before a place gives up (the set is mostly bad)

T = TypeVar("T")


def mix_seed(*values: int) -> int:
    """Stable 63-bit seed from integers (Python's hash() is salted per process)."""
    data = b"".join(int(v).to_bytes(16, "little", signed=True) for v in values)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def permutation(n: int, *key: int) -> np.ndarray:
    """A permutation of range(n) seeded by `key`. torch's CPU generator rather than numpy's: it is
    the generator runs were trained with, so checkpoints taken mid-epoch resume into the same order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(*key))).numpy()


def check_layout(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"batch_size={batch_size}, rank={rank}, world_size={world_size}")


def check_count(num_samples: int, batch_size: int, world_size: int, source) -> None:
    """Before anything is read: the source must fill at least one global batch."""
    if num_samples < 1:
        raise DataError(f"no images in data.source={source!r}")
    if num_samples < batch_size * world_size:
        raise DataError(f"{num_samples} images are fewer than one global batch "
                        f"({batch_size} per rank x {world_size} ranks) of data.source={source!r}")


class FileOrder:
    """This rank's file indices of every epoch, and the substitutes of unreadable files."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, source=""):
        check_layout(batch_size, rank, world_size)
        check_count(num_samples, batch_size, world_size, source)
        self.n, self.batch, self.rank, self.world, self.seed = (int(num_samples), int(batch_size), int(rank),
                                                                int(world_size), int(seed))
        self.steps = self.n // (self.batch * self.world)

    def check_start(self, start_step: int) -> None:
        if not 0 <= start_step <= self.steps:
            raise ValueError(f"start_step={start_step} outside [0, {self.steps}]")

    def rank_indices(self, epoch: int) -> np.ndarray:
        """int64 array (steps, batch): row t holds the files of this rank's step t."""
        perm = permutation(self.n, self.seed, epoch)[: self.steps * self.batch * self.world]
        return perm.reshape(self.steps, self.world, self.batch)[:, self.rank]

    def candidates(self, epoch: int, index: int) -> Iterator[int]:
        """File `index`, then its substitutes in the order they are tried."""
        yield index
        for attempt in range(1, MAX_ATTEMPTS):
            yield mix_seed(self.seed, epoch, index, attempt) % self.n

    def first_readable(self, epoch: int, index: int, read: Callable[[int], T]) -> Tuple[T, int, List[Tuple[int, str]]]:
        """(read(j), j, [(bad file, reason), ...]) for the first candidate j that `read` does not
        raise on. `read` raises any exception for an unreadable file. After MAX_ATTEMPTS failures
        the result is (None, -1, bad): the caller raises `unreadable_error` where it is safe to."""
        bad: List[Tuple[int, str]] = []
        for j in self.candidates(epoch, index):
            try:
                return read(j), j, bad
            except Exception as e:  # any decode failure: substitute, never stop the run
                bad.append((j, reason(e)))
        return None, -1, bad


def reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def unreadable_error(bad: List[Tuple[str, str]]) -> DataError:
    """`bad`: (path, reason) of the failed candidates of one place."""
    example = f", e.g. {bad[-1][0]}: {bad[-1][1]}" if bad else ""
    return DataError(f"{MAX_ATTEMPTS} images in a row could not be read{example}; "
                     "check the data set with launch/scan_data.py")


class BadFileLog:
    """What a loader reports about unreadable files: `skipped` (every occurrence, substitutes
    included) and `files` (each logged once, as it is first met)."""

    def __init__(self):
        self.skipped = 0
        self.files: Set[str] = set()

    def note(self, path: str, why: str) -> None:
        if path not in self.files:
            self.files.add(path)
            log.warning("skipping unreadable image %s (%s); a deterministic substitute is used "
                        "(launch/scan_data.py writes a clean file list up front)", path, why)
