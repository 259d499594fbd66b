"""What the DALI loader feeds its graph, per batch: from an image folder (or file list) or from
webdataset shards. Both feeds have one interface, so the loader holds no source-specific branches.

A feed makes a `Batch` for a step (`make`), makes it again once some of its samples were found
unreadable (`mark_bad`, then `remake`), and hands out a sample's bytes for the decode check. Host
side only: the shard feed runs DALI's reader, but the graph is the loader's.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from ..errors import DataError
from ..headers import file_hw, image_hw
from ..plan import BadFileLog, FileOrder, mix_seed, permutation, unreadable_error
from ..sources import PathTable, list_images
from .graph import build_shard_reader
from .shards import expand_shards, looks_like_shards, wds_index

HEADER_THREADS = 8   # header parsing is mostly I/O: threads overlap it


@dataclass
class Batch:
    step: int
    keys: np.ndarray          # what the draws are keyed by: planned file indices / epoch positions
    first: List[np.ndarray]   # the graph's first input per place: a file name's bytes / an encoded sample
    hw: np.ndarray            # (B, 2) image size of what fills each place
    sources: List[str]        # what fills each place: file path / shard source info
    skipped: int              # unreadable samples met filling it (counted when it is delivered)
    state: dict = field(default_factory=dict)   # the feed's own: what `remake` and `mark_bad` need
    feed: Optional[tuple] = None                 # the graph inputs, set by the loader


class _Unreadable(Exception):
    pass


class FolderFeed:
    """Files of an image folder, .txt list or the built-in set, in `plan.FileOrder`'s order and with
    its substitutes. The graph reads the files itself (``fn.io.file.read``); the feed parses their
    headers first, for the crop windows and to catch most bad files before the decoder does."""

    read_files = True

    def __init__(self, data_cfg, order_args: dict, bad: BadFileLog, threads: int):
        paths = list_images(data_cfg)
        self.order = FileOrder(len(paths), source=data_cfg.source, **order_args)
        self.paths = PathTable(paths)
        self.bad = bad
        self.threads = threads
        self._hw = np.full((len(paths), 2), -1, dtype=np.int32)   # -1: not parsed yet
        self._unreadable: Dict[int, str] = {}
        self._pool: Optional[ThreadPoolExecutor] = None
        self._epoch, self._rows = 0, None

    @property
    def num_samples(self) -> int:
        return self.order.n

    def begin_epoch(self, epoch: int, start: int) -> None:
        self._epoch, self._rows = epoch, self.order.rank_indices(epoch)

    def _header(self, index: int):
        try:
            hw = file_hw(self.paths[index])
        except OSError as e:
            return f"{type(e).__name__}: {e}"
        return hw if hw is not None else "not a readable image header"

    def _parse(self, files) -> None:
        """Headers of the files not parsed yet, in threads when there are many."""
        todo = sorted({int(f) for f in files if self._hw[f, 0] < 0 and f not in self._unreadable})
        if len(todo) > 8:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=min(HEADER_THREADS, self.threads))
            results = list(self._pool.map(self._header, todo))
        else:
            results = [self._header(f) for f in todo]
        for f, r in zip(todo, results):
            if isinstance(r, str):
                self._unreadable[f] = r
            else:
                self._hw[f] = r

    def _usable(self, index: int) -> int:
        self._parse([index])
        if index in self._unreadable:
            # Logged where it is met, in place order, as the torch loader does.
            self.bad.note(self.paths[index], self._unreadable[index])
            raise _Unreadable(self._unreadable[index])
        return index

    def make(self, step: int) -> Batch:
        keys = self._rows[step]
        self._parse(keys)
        files, skipped = [], 0
        for i in keys:
            _, j, bad = self.order.first_readable(self._epoch, int(i), self._usable)
            if j < 0:
                raise unreadable_error([(self.paths[b], self._unreadable.get(b, why)) for b, why in bad])
            files.append(j)
            skipped += len(bad)
        return Batch(step, keys, [np.frombuffer(self.paths.raw(f), dtype=np.uint8) for f in files],
                     self._hw[files].astype(np.int64), [self.paths[f] for f in files], skipped,
                     state={"files": files})

    def remake(self, batch: Batch) -> Batch:
        return self.make(batch.step)

    def sample_bytes(self, batch: Batch, pos: int) -> bytes:
        with open(self.paths[batch.state["files"][pos]], "rb") as f:
            return f.read()

    def mark_bad(self, batch: Batch, pos: int, why: str) -> None:
        index = batch.state["files"][pos]
        self._unreadable[index] = why
        self.bad.note(self.paths[index], why)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


class ShardFeed:
    """Samples of webdataset tar shards through DALI's webdataset reader (a small CPU pipeline of
    its own: the host needs each sample's bytes for its image size).

    DALI splits the shard list contiguously by rank and shuffles in a buffer of
    `data.dali.shuffle_buffer` samples; the reader is rebuilt every epoch with the tar order
    permuted by (seed, epoch) and a reader seed from (seed, epoch, rank), so each rank reads other
    tars every epoch. Unlike a folder: the shuffle is local, the order depends on the world size,
    resuming at start_step re-reads (without decoding) the batches skipped, and an unreadable
    sample is replaced by another sample of the same batch (there is no random access)."""

    read_files = False

    def __init__(self, data_cfg, order_args: dict, bad: BadFileLog, threads: int):
        self.shards = expand_shards(data_cfg.source)
        idx = [wds_index(p, data_cfg.cache_dir) for p in self.shards]
        self.index_paths = [i for i, _ in idx]
        self.order = FileOrder(sum(n for _, n in idx), source=data_cfg.source, **order_args)
        self.bad = bad
        self.threads = threads
        self.shuffle_buffer = int(data_cfg.dali.shuffle_buffer)
        self._reader = None

    @property
    def num_samples(self) -> int:
        return self.order.n

    def begin_epoch(self, epoch: int, start: int) -> None:
        p = self.order
        self._reader = None
        order = permutation(len(self.shards), p.seed, epoch, 1).tolist()
        self._reader = build_shard_reader(
            [self.shards[i] for i in order], [self.index_paths[i] for i in order],
            batch_size=p.batch, num_threads=min(self.threads, 4), shard_id=p.rank, num_shards=p.world,
            seed=mix_reader_seed(p.seed, epoch, p.rank), shuffle_buffer=self.shuffle_buffer)
        for _ in range(start):       # resume: re-read (no decoding) the batches already trained on
            self._reader.run()

    def make(self, step: int) -> Batch:
        p = self.order
        enc, info = self._reader.run()
        encoded = [np.array(enc[i]) for i in range(p.batch)]
        names = [bytes(np.array(info[i])).decode("utf-8", "replace") for i in range(p.batch)]
        hw = [image_hw(e.tobytes()) for e in encoded]
        for name, h in zip(names, hw):
            if h is None:
                self.bad.note(name, "not a readable image header")
        base = (step * p.world + p.rank) * p.batch
        keys = np.arange(base, base + p.batch, dtype=np.int64)
        return self._fill(Batch(step, keys, [], np.zeros((0, 2)), [], 0,
                                state={"encoded": encoded, "names": names, "hw": hw}))

    def _fill(self, batch: Batch) -> Batch:
        s = batch.state
        good = [i for i, (name, h) in enumerate(zip(s["names"], s["hw"])) if h is not None and name not in self.bad.files]
        if not good:
            raise DataError(f"a whole batch of webdataset samples is unreadable, e.g. {s['names'][0]}")
        use = [i if i in good else good[(i + 1) % len(good)] for i in range(len(s["names"]))]
        s["use"] = use
        batch.first = [s["encoded"][u] for u in use]
        batch.hw = np.array([s["hw"][u] for u in use], dtype=np.int64)
        batch.sources = [s["names"][u] for u in use]
        batch.skipped = sum(int(u != i) for i, u in enumerate(use))
        return batch

    def remake(self, batch: Batch) -> Batch:
        return self._fill(batch)

    def sample_bytes(self, batch: Batch, pos: int) -> bytes:
        return batch.first[pos].tobytes()

    def mark_bad(self, batch: Batch, pos: int, why: str) -> None:
        self.bad.note(batch.sources[pos], why)

    def close(self) -> None:
        self._reader = None


def mix_reader_seed(seed: int, epoch: int, rank: int) -> int:
    return mix_seed(seed, epoch, rank) & 0x7FFFFFFF   # DALI takes a non-negative int32 seed


def open_feed(data_cfg, order_args: dict, bad: BadFileLog, threads: int):
    kind = ShardFeed if looks_like_shards(data_cfg.source) else FolderFeed
    return kind(data_cfg, order_args, bad, threads)
