"""Two-view loader on NVIDIA DALI (`data.backend=dali`, the default on GPUs when DALI is installed).

Same protocol as the torch loader (see `densecl_fast/data/__init__.py`), same data order:

Readers
  * image folder / .txt file list / "synthetic": `sources.list_images` (use the clean list that
    `launch/scan_data.py` writes to drop unreadable files before a long run). The loader computes
    each epoch's order itself -- the very permutation of the torch loader, seeded by (seed, epoch)
    -- and feeds the file *names* of each batch through ``fn.external_source``; the graph reads
    them (``fn.io.file.read``, C++ threads) and decodes each image once (``device="mixed"``).
  * webdataset tar shards (`data.source` = a glob "train-*.tar", a brace range
    "train-{0000..0146}.tar", a comma-separated list or a single .tar): ``fn.readers.webdataset``
    in a small reader pipeline whose encoded samples go into the same augmentation graph. DALI
    shards the samples of the shard list contiguously by rank and shuffles in a buffer of
    `dali_shuffle_buffer` samples; the loader rebuilds the reader every epoch with the *tar order*
    permuted by (seed, epoch) and a reader seed from (seed, epoch, rank), so each rank reads other
    tars every epoch. Differences from a folder: the shuffle is local (a buffer, not a global
    permutation), the order depends on world size, and resuming at start_step re-reads (without
    decoding) the skipped batches. Index files are made once into `data.cache_dir`.

Sharding and last batch (both readers): an epoch has N // (B * W) steps on every rank (B = per-rank
batch, W = world size). Global step t takes positions [t*B*W, (t+1)*B*W) of the epoch's
permutation and rank r the r-th B of them; the remainder (< B*W images, different every epoch) is
dropped. So all ranks run the same number of full batches, and an epoch can never be silently
short: the loader counts the batches it delivers and raises if DALI ends early (the DALI-iterator
pitfall of PARTIAL/FILL policies and uneven shards does not arise -- no DALI iterator is used).

Augmentation: every random draw is a function of (seed, epoch, file index) -- (seed, epoch,
position) for shards -- fed to the graph, so resumed runs see identical pixels (`dali_pipeline`).

Bad files never stop a run: when DALI fails on a batch, the loader finds the culprit(s) (each file
of the batch re-read and decoded alone on the CPU, plus DALI's "sample #i" hint), marks them bad,
rebuilds the pipeline and re-runs the batch with a substitute (the torch loader's rule: another
file drawn from (seed, epoch, index, attempt); for shards: another sample of the same batch). The
substitute keeps the bad sample's draws. `skipped` counts every substitution; each bad file is
logged once. A failure with no identifiable culprit is retried once, then raised.

Options beyond `DataConfig` (read with getattr, so they can become config fields later; or pass
`options={...}` to the constructor): dali_decoder (auto|mixed|cpu), dali_hw_decoder_load,
dali_device_memory_padding, dali_host_memory_padding, dali_prefetch, dali_hue (exact|linear),
dali_shuffle_buffer.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tarfile
from collections import deque
from dataclasses import dataclass, fields
from typing import Deque, Iterator, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch

from . import DataError
from .dali_pipeline import (build_check_pipeline, build_two_view_pipeline, draw_view_params, file_hw, graph_inputs,
                            image_hw)
from .plan import MAX_ATTEMPTS, mix_seed
from .sources import PathTable

log = logging.getLogger(__name__)

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


@dataclass
class DaliOptions:
    decoder: str = "auto"                    # auto (mixed on CUDA, cpu otherwise) | mixed | cpu
    hw_decoder_load: float = 0.65            # share of JPEGs sent to the hardware decoder (A100/H100)
    device_memory_padding: int = 64 << 20    # nvJPEG device buffer per thread: no regrowth up to ~20 MP
    host_memory_padding: int = 32 << 20      # nvJPEG pinned host buffers per thread (x2)
    preallocate_width_hint: int = 0          # HW decoder preallocation (0 = DALI's default)
    preallocate_height_hint: int = 0
    prefetch: int = 2                        # batches DALI prepares ahead
    hue: str = "auto"                        # auto (exact on GPU, linear on CPU) | exact (HSV, as
                                             # torchvision) | linear (fn.hue: ~10x cheaper on a CPU)
    shuffle_buffer: int = 1024               # webdataset: samples in the reader's shuffle buffer

    @classmethod
    def from_config(cls, data_cfg, overrides: Optional[dict] = None) -> "DaliOptions":
        opts = cls()
        for f in fields(cls):
            value = getattr(data_cfg, "dali_" + f.name, None)
            if value is not None:
                setattr(opts, f.name, type(getattr(opts, f.name))(value))
        for k, v in (overrides or {}).items():
            if not hasattr(opts, k):
                raise ValueError(f"unknown DALI option {k!r}; known: {[f.name for f in fields(cls)]}")
            setattr(opts, k, v)
        if opts.decoder not in ("auto", "mixed", "cpu") or opts.hue not in ("auto", "exact", "linear"):
            raise ValueError(f"dali decoder={opts.decoder!r} (auto|mixed|cpu), hue={opts.hue!r} (auto|exact|linear)")
        if not 0.0 <= float(opts.hw_decoder_load) <= 1.0:
            raise ValueError(f"dali hw_decoder_load={opts.hw_decoder_load} must be in [0, 1]")
        return opts

    def decoder_options(self) -> dict:
        d = dict(hw_decoder_load=float(self.hw_decoder_load),
                 device_memory_padding=int(self.device_memory_padding),
                 host_memory_padding=int(self.host_memory_padding))
        if self.preallocate_width_hint and self.preallocate_height_hint:
            d.update(preallocate_width_hint=int(self.preallocate_width_hint),
                     preallocate_height_hint=int(self.preallocate_height_hint))
        return d


# --------------------------------------------------------------------------------------------
# webdataset shards
# --------------------------------------------------------------------------------------------

def looks_like_shards(source: str) -> bool:
    """A shard pattern/list/.tar rather than "synthetic", an image folder or a .txt list."""
    s = str(source).strip()
    path = os.path.expanduser(s)
    if s == "synthetic" or os.path.isdir(path) or (os.path.isfile(path) and not s.lower().endswith(".tar")):
        return False
    return any(c in s for c in "*?[{,") or s.lower().endswith(".tar")


def _expand_braces(pattern: str) -> List[str]:
    """webdataset's brace ranges: "a-{000..012}.tar" (zero padded as written), "{a,b}" lists."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail, body = pattern[:m.start()], pattern[m.end():], m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.group(1), r.group(2)
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [e for item in items for e in _expand_braces(head + item + tail)]


def expand_shards(source: str) -> List[str]:
    """`data.source` -> absolute .tar paths (sorted within each glob, in the order given otherwise)."""
    out: List[str] = []
    for part in str(source).split(","):
        part = part.strip()
        if not part:
            continue
        for p in _expand_braces(os.path.expanduser(part)):
            matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
            out.extend(os.path.abspath(m) for m in matches)
    missing = [p for p in out if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} webdataset shard(s) of data.source={source!r} do not exist, e.g. {missing[0]}")
    if not out:
        raise DataError(f"data.source={source!r} matches no webdataset shards (.tar files)")
    return out


def write_wds_index(tar_path: str, index_path: str) -> int:
    """A DALI webdataset index (format v1.2, as `wds2idx` writes) listing, per sample, only its first
    image component: samples without an image are left out, so the index's count is exactly what
    the reader yields. Returns that count."""
    samples: List[Tuple[str, int, int, str]] = []
    last_base, has_image = None, False
    with tarfile.open(tar_path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            name = m.name
            slash = name.rfind("/") + 1
            dot = name.find(".", slash)
            if dot <= slash:          # no extension, or a hidden file
                continue
            base, ext = name[:dot], name[dot + 1:]
            if base != last_base:     # the components of a sample are consecutive
                last_base, has_image = base, False
            if not has_image and ext.lower() in WDS_IMAGE_EXTS:
                samples.append((ext, m.offset_data, m.size, name))
                has_image = True
    if not samples:
        raise DataError(f"webdataset shard {tar_path} holds no images ({', '.join(WDS_IMAGE_EXTS)})")
    tmp = f"{index_path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"v1.2 {len(samples)}\n")
        for ext, off, size, name in samples:
            f.write(f"{ext} {off} {size} {name}\n")
    os.replace(tmp, index_path)
    return len(samples)


def wds_index(tar_path: str, cache_dir: str) -> Tuple[str, int]:
    """Cached index of one shard (keyed by path, size and mtime) -> (index path, image samples)."""
    st = os.stat(tar_path)
    key = hashlib.sha1(f"{os.path.realpath(tar_path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
    folder = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), "wds-index")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{os.path.basename(tar_path)}.{key}.idx")
    if os.path.isfile(path):
        with open(path) as f:
            head = f.readline().split()
        if len(head) == 2 and head[0] == "v1.2":
            return path, int(head[1])
    return path, write_wds_index(tar_path, path)


def _build_wds_reader(paths, index_paths, *, batch_size, num_threads, shard_id, num_shards, seed, shuffle_buffer):
    from nvidia.dali import pipeline_def
    import nvidia.dali.fn as fn

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=None, prefetch_queue_depth=2)
    def reader():
        enc = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=[";".join(WDS_IMAGE_EXTS)],
                                    case_sensitive_extensions=False, missing_component_behavior="skip",
                                    random_shuffle=True, initial_fill=max(1, int(shuffle_buffer)), seed=seed,
                                    shard_id=shard_id, num_shards=num_shards, stick_to_shard=True,
                                    pad_last_batch=False, name="wds")
        return enc, fn.get_property(enc, key="source_info")

    p = reader()
    p.build()
    return p


# --------------------------------------------------------------------------------------------
# the loader
# --------------------------------------------------------------------------------------------

@dataclass
class _Batch:
    step: int
    keys: np.ndarray                          # draw keys: file indices (folder) / positions (shards)
    files: Optional[List[int]] = None         # folder: the files actually read (after substitution)
    encoded: Optional[List[np.ndarray]] = None  # shards: the encoded samples as read
    info: Optional[List[str]] = None          # shards: where each sample came from
    hw: Optional[List] = None                 # shards: (height, width) per sample, None = unreadable
    use: Optional[List[int]] = None           # shards: which sample of the batch fills each place
    substituted: int = 0                      # places filled by a substitute (known-bad sample)
    feed: Optional[tuple] = None              # what goes into the graph


class _Feeder:
    """The external_source callable: one batch per call, StopIteration at the end of the epoch."""

    def __init__(self, make):
        self.make = make
        self.todo: Deque[Union[int, _Batch]] = deque()
        self.inflight: Deque[_Batch] = deque()
        self.error: Optional[BaseException] = None   # raised by `make`: not a DALI failure

    def __call__(self):
        if not self.todo:
            raise StopIteration
        item = self.todo.popleft()
        try:
            batch = self.make(item)
        except Exception as e:
            self.error = e
            raise
        self.inflight.append(batch)
        return batch.feed


def _first_error_line(e: BaseException) -> str:
    """The informative line of a DALI error (what follows "encountered:"), else the first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("encountered:") and i + 1 < len(lines):
            return lines[i + 1][:200]
    for ln in lines:
        if "Critical error" not in ln:
            return ln[:200]
    return (lines[0] if lines else type(e).__name__)[:200]


class DaliTwoViewLoader:
    """The two-view loader protocol on a DALI graph (see the module docstring)."""

    def __init__(self, data_cfg, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 device: torch.device = torch.device("cpu"), seed: int = 0, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32, options: Optional[dict] = None):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype={dtype}: use torch.float32, float16 or bfloat16")
        self.cfg = data_cfg
        self.batch, self.rank, self.world, self.seed = int(batch_size), int(rank), int(world_size), int(seed)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device}: the DALI loader serves cpu or cuda")
        self.channels_last = bool(channels_last)
        self.dtype = dtype
        self.opts = DaliOptions.from_config(data_cfg, options)
        decoder = self.opts.decoder
        if decoder == "auto":
            decoder = "mixed" if self.device.type == "cuda" else "cpu"
        if decoder == "mixed" and self.device.type != "cuda":
            raise ValueError("dali decoder=mixed needs a CUDA device")
        self.decoder = decoder
        self.threads = max(1, int(data_cfg.num_workers))

        self.shards: Optional[List[str]] = None
        if looks_like_shards(data_cfg.source):
            self.shards = expand_shards(data_cfg.source)
            idx = [wds_index(p, data_cfg.cache_dir) for p in self.shards]
            self.shard_index = [i for i, _ in idx]
            self.num_samples = sum(n for _, n in idx)
            self.paths = None
        else:
            from .sources import list_images
            paths = list_images(data_cfg)
            self.paths = PathTable(paths)
            self.num_samples = len(paths)
        if self.num_samples < self.batch * self.world:
            raise DataError(f"{self.num_samples} images are fewer than one global batch "
                            f"({self.batch} per rank x {self.world} ranks) of data.source={data_cfg.source!r}")
        self.steps = self.num_samples // (self.batch * self.world)

        self.skipped = 0
        self.bad_files: Set[str] = set()
        self._bad_index: Set[int] = set()
        self._epoch, self._start_step = 0, 0
        self._feeder = _Feeder(self._make_batch)
        self._pipe = None
        self._checker = None
        self._reader = None
        self._rank_indices: Optional[np.ndarray] = None
        self._cur_epoch: Optional[int] = None
        self._iterating = False
        self._retried: Optional[Tuple[int, int]] = None
        self._hold = None
        self._pool = None
        self._last: Optional[_Batch] = None
        self._hw = np.full((self.num_samples, 2), -1, dtype=np.int32) if self.shards is None else None

    # ---- protocol ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= self.steps:
            raise ValueError(f"start_step={start_step} outside [0, {self.steps}]")
        self._epoch, self._start_step = int(epoch), int(start_step)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self._iterating:
            raise RuntimeError("DaliTwoViewLoader: one iteration at a time")
        self._iterating = True
        epoch, start = self._epoch, self._start_step
        pipe, delivered, clean = None, start, False
        try:
            self._begin_epoch(epoch, start)
            pipe = self._pipeline()
            while delivered < self.steps:
                try:
                    outs = self._run(pipe)
                except StopIteration:
                    raise DataError(f"DALI ended epoch {epoch} after {delivered} of {self.steps} steps") from None
                except Exception as e:  # a failed batch: find the bad file, rebuild, re-run it
                    if self._feeder.error is not None:      # our own batch making failed
                        err, self._feeder.error = self._feeder.error, None
                        raise err
                    pipe = self._recover(e, epoch)
                    continue
                batch = self._feeder.inflight.popleft()
                self.skipped += batch.substituted
                self._last = batch
                q, k = self._to_torch(outs)
                delivered += 1
                yield q, k
            self._end_epoch(pipe)
            clean = True
        finally:
            self._iterating = False
            if not clean:
                self._abandon()

    @property
    def last_sources(self) -> List[str]:
        """Where the images of the last delivered batch came from (file paths, or the shard
        reader's source info), substitutes included: for tests and debugging."""
        b = self._last
        if b is None:
            return []
        if self.shards is None:
            return [self.paths[f] for f in b.files]
        return [b.info[u] for u in b.use]

    # ---- epochs and batches --------------------------------------------------------------------
    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's file indices of `epoch`, steps x batch (the torch loader's permutation)."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        perm = torch.randperm(self.num_samples, generator=g)[: self.steps * self.batch * self.world]
        return perm.view(self.steps, self.world, self.batch)[:, self.rank].numpy()

    def _begin_epoch(self, epoch: int, start: int) -> None:
        self._cur_epoch = epoch
        self._feeder.todo = deque(range(start, self.steps))
        self._feeder.inflight.clear()
        if self.shards is None:
            self._rank_indices = self.epoch_indices(epoch)
            return
        self._reader = None
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1)))
        order = order.tolist()
        self._reader = _build_wds_reader(
            [self.shards[i] for i in order], [self.shard_index[i] for i in order],
            batch_size=self.batch, num_threads=min(self.threads, 4), shard_id=self.rank, num_shards=self.world,
            seed=mix_seed(self.seed, epoch, self.rank) & 0x7FFFFFFF, shuffle_buffer=self.opts.shuffle_buffer)
        for _ in range(start):       # resume: re-read (no decoding) the batches already trained on
            self._reader.run()

    def _substitute(self, epoch: int, index: int) -> int:
        if index not in self._bad_index:
            return index
        for attempt in range(1, MAX_ATTEMPTS):
            j = mix_seed(self.seed, epoch, index, attempt) % self.num_samples
            if j not in self._bad_index:
                return j
        raise DataError(f"{MAX_ATTEMPTS} images in a row could not be read; "
                        "check the data set with launch/scan_data.py")

    def _header(self, index: int):
        """(h, w) of file `index` from its header, or the reason it is unreadable."""
        try:
            hw = file_hw(self.paths[index])
        except OSError as e:
            return f"{type(e).__name__}: {e}"
        return hw if hw is not None else "not a readable image header"

    def _file_sizes(self, files: Sequence[int]) -> None:
        """Parse the headers of files not seen yet (threads: it is mostly I/O); mark the bad ones."""
        todo = sorted({f for f in files if self._hw[f, 0] < 0 and f not in self._bad_index})
        if not todo:
            return
        if len(todo) > 8:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor
                self._pool = ThreadPoolExecutor(max_workers=min(8, self.threads))
            results = list(self._pool.map(self._header, todo))
        else:
            results = [self._header(f) for f in todo]
        for f, r in zip(todo, results):
            if isinstance(r, str):
                self._bad_index.add(f)
                self._note_bad(self.paths[f], r)
            else:
                self._hw[f] = r

    def _make_batch(self, item: Union[int, _Batch]) -> _Batch:
        epoch = self._cur_epoch
        if self.shards is None:
            step = item if isinstance(item, int) else item.step   # re-made: substitutions may have changed
            keys = self._rank_indices[step]
            while True:   # substitutes of bad files may be bad too
                files = [self._substitute(epoch, int(i)) for i in keys]
                self._file_sizes(files)
                if not any(f in self._bad_index for f in files):
                    break
            batch = _Batch(step, keys, files=files, substituted=sum(int(f != i) for f, i in zip(files, keys)))
            # os.fsencode: the file name's own bytes, also when they are not UTF-8
            first = [np.frombuffer(os.fsencode(self.paths[f]), dtype=np.uint8) for f in files]
            hw = self._hw[files]
        else:
            if isinstance(item, int):
                enc, info = self._reader.run()
                base = (item * self.world + self.rank) * self.batch
                batch = _Batch(item, np.arange(base, base + self.batch, dtype=np.int64),
                               encoded=[np.array(enc[i]) for i in range(self.batch)],
                               info=[bytes(np.array(info[i])).decode("utf-8", "replace") for i in range(self.batch)])
                batch.hw = [image_hw(e.tobytes()) for e in batch.encoded]
                for name, h in zip(batch.info, batch.hw):
                    if h is None:
                        self._note_bad(name, "not a readable image header")
            else:
                batch = item
            good = [i for i, (name, h) in enumerate(zip(batch.info, batch.hw))
                    if h is not None and name not in self.bad_files]
            if not good:
                raise DataError(f"a whole batch of webdataset samples is unreadable, e.g. {batch.info[0]}")
            batch.use = [i if i in good else good[(i + 1) % len(good)] for i in range(self.batch)]
            batch.substituted = sum(int(u != i) for i, u in enumerate(batch.use))
            first = [batch.encoded[u] for u in batch.use]
            hw = np.array([batch.hw[u] for u in batch.use], dtype=np.int64)
        views = []
        for view in (0, 1):
            draws = draw_view_params(self.seed, epoch, batch.keys, view)
            views += graph_inputs(draws, hw[:, 0], hw[:, 1], self.cfg.min_scale, self.cfg.image_size)
        batch.feed = tuple([first] + views)
        return batch

    # ---- the DALI pipeline -----------------------------------------------------------------------
    def _pipeline(self):
        if self._pipe is None:
            layout = "HWC" if self.channels_last else "CHW"
            out_dtype = "float32" if self.dtype == torch.float32 else "float16"
            self._pipe = build_two_view_pipeline(
                self._feeder, batch_size=self.batch, num_threads=self.threads,
                device_id=self.device.index if self.device.type == "cuda" else None,
                input_kind="names" if self.shards is None else "encoded",
                image_size=self.cfg.image_size, out_dtype=out_dtype, layout=layout,
                decoder=self.decoder, decoder_options=self.opts.decoder_options(),
                prefetch_queue_depth=self.opts.prefetch, hue=None if self.opts.hue == "auto" else self.opts.hue)
            self._pipe.build()
        return self._pipe

    def _discard(self) -> None:
        self._pipe = None
        self._hold = None

    def _run(self, pipe):
        if self.device.type == "cuda":
            return pipe.run(torch.cuda.current_stream(self.device))
        return pipe.run()

    def _end_epoch(self, pipe) -> None:
        try:
            pipe.run()
        except StopIteration:
            pipe.reset()
            return
        self._discard()
        raise DataError("internal: the DALI pipeline produced more batches than the epoch has")

    def _abandon(self) -> None:
        """The consumer stopped mid-epoch (or an error): drop what is queued; keep the pipeline if it
        drains cleanly (at most `prefetch` batches), else rebuild it next time."""
        self._feeder.todo.clear()
        self._feeder.error = None
        pipe = self._pipe
        if pipe is None:
            return
        try:
            for _ in range(self.opts.prefetch + 2):
                pipe.run()
        except StopIteration:
            pipe.reset()
            self._feeder.inflight.clear()
            return
        except Exception:
            pass
        self._discard()
        self._feeder.inflight.clear()

    def _to_torch(self, outs) -> Tuple[torch.Tensor, torch.Tensor]:
        views = []
        for tl in outs[:2]:
            t = tl.as_tensor()
            if self.device.type == "cpu":
                x = torch.from_numpy(np.array(t))
            else:
                from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
                x = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=self.device)
                feed_ndarray(t, x, cuda_stream=torch.cuda.current_stream(self.device))
            if self.channels_last:
                x = x.permute(0, 3, 1, 2)          # NHWC memory = channels-last NCHW, no copy
            if x.dtype != self.dtype:
                x = x.to(self.dtype)               # fp16 -> bf16 on the device; strides preserved
            views.append(x)
        self._hold = outs                          # DALI's buffers stay referenced one step longer
        return views[0], views[1]

    # ---- failures ---------------------------------------------------------------------------------
    def _sample_bytes(self, batch: _Batch, pos: int) -> bytes:
        if self.shards is None:
            with open(self.paths[batch.files[pos]], "rb") as f:
                return f.read()
        return batch.encoded[batch.use[pos]].tobytes()

    def _check(self, data: bytes) -> Optional[str]:
        if not data:
            return "empty file"
        if self._checker is None:
            self._checker = build_check_pipeline()
        try:
            self._checker.run(encoded=[np.frombuffer(data, dtype=np.uint8)])
            return None
        except Exception as e:  # DALI raises RuntimeError subclasses with the decoder's message
            self._checker = None  # "no longer valid" after an error: a fresh one next time
            return f"DALI cannot decode it: {_first_error_line(e)}"

    def _find_bad(self, batch: _Batch, error: Exception) -> List[Tuple[int, str]]:
        bad = []
        for pos in range(self.batch):
            try:
                reason = self._check(self._sample_bytes(batch, pos))
            except OSError as e:
                reason = f"{type(e).__name__}: {e}"
            if reason:
                bad.append((pos, reason))
        if not bad:
            m = re.search(r"sample #(\d+)", str(error))
            if m and int(m.group(1)) < self.batch:
                bad.append((int(m.group(1)), f"DALI: {_first_error_line(error)}"))
        return bad

    def _note_bad(self, name: str, reason: str) -> None:
        if name not in self.bad_files:
            self.bad_files.add(name)
            log.warning("skipping unreadable image %s (%s); a deterministic substitute is used "
                        "(launch/scan_data.py writes a clean file list up front)", name, reason)

    def _mark_bad(self, batch: _Batch, pos: int, reason: str) -> None:
        if self.shards is None:
            index = batch.files[pos]
            self._bad_index.add(index)
            self._note_bad(self.paths[index], reason)
        else:
            self._note_bad(batch.info[batch.use[pos]], reason)

    def _recover(self, error: Exception, epoch: int):
        if not self._feeder.inflight:
            raise error
        batch = self._feeder.inflight[0]
        bad = self._find_bad(batch, error)
        if bad:
            for pos, reason in bad:
                self._mark_bad(batch, pos, reason)
        else:
            if self._retried == (epoch, batch.step):
                raise DataError(f"DALI failed twice on step {batch.step} of epoch {epoch} and no file of the "
                                f"batch is unreadable on its own: {_first_error_line(error)}") from error
            self._retried = (epoch, batch.step)
            log.warning("DALI failed on step %d of epoch %d without an unreadable file (%s); rebuilding the "
                        "pipeline and retrying once", batch.step, epoch, _first_error_line(error))
        pending = list(self._feeder.inflight) + list(self._feeder.todo)
        self._discard()
        self._feeder.inflight.clear()
        self._feeder.todo = deque(pending)
        return self._pipeline()

    def close(self) -> None:
        self._discard()
        self._reader = None
        self._checker = None
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def loader_for_folder(folder: str, *, batch_size: int, device: Union[str, torch.device] = "cuda",
                      image_size: int = 224, min_scale: float = 0.2, num_threads: int = 8, seed: int = 0,
                      dtype: torch.dtype = torch.float32, channels_last: bool = True,
                      cache_dir: str = "~/.cache/densecl_fast", **options) -> DaliTwoViewLoader:
    """A ready DALI two-view loader over an image folder (or .txt list, or shards), one rank.
    For benchmarks: `for q, k in loader` yields batches on `device`; `options` are `DaliOptions`."""
    from ..config import DataConfig

    cfg = DataConfig(source=str(folder), backend="dali", image_size=image_size, min_scale=min_scale,
                     num_workers=num_threads, cache_dir=cache_dir)
    return DaliTwoViewLoader(cfg, batch_size=batch_size, device=torch.device(device), seed=seed,
                             channels_last=channels_last, dtype=dtype, options=options)
