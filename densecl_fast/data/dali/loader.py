"""The two-view loader protocol of `densecl_fast.data` on the DALI graph, over a folder or shard feed.

No DALI iterator: the loader feeds the graph one batch per call of ``fn.external_source`` and counts
the batches it delivers, so an epoch is exactly `len(loader)` steps on every rank (it raises if
DALI ends early) -- the PARTIAL/FILL last-batch pitfalls of DALI's iterators do not arise.

Bad files never stop a run: when DALI fails on a batch, the loader finds the culprit(s) (each
sample of the batch decoded alone, plus DALI's "sample #i" hint), the feed marks them bad and
remakes the batch with substitutes, the pipeline is rebuilt and the batch re-run. A failure with
no identifiable culprit is retried once, then raised.
"""
from __future__ import annotations

import logging
import re
from collections import deque
from typing import Deque, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from ...config import validate_dali
from ..errors import DataError
from ..plan import BadFileLog, check_layout
from ..transforms import Augmentation
from .feeds import Batch, open_feed
from .graph import DecodeCheck, build_two_view_pipeline, first_error_line, gpu_output_to_torch
from .params import draw_view_params, graph_inputs

log = logging.getLogger(__name__)


class _Feeder:
    """The external_source callable: one batch per call, StopIteration at the end of the epoch."""

    def __init__(self, make):
        self.make = make
        self.todo: Deque[Union[int, Batch]] = deque()    # steps to make, or batches to remake
        self.inflight: Deque[Batch] = deque()
        self.error: Optional[BaseException] = None       # raised by `make`: not a DALI failure

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


class DaliTwoViewLoader:
    """Options come from the `data.dali` config section (`config.DaliConfig`)."""

    def __init__(self, data_cfg, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 device: torch.device = torch.device("cpu"), seed: int = 0, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32):
        check_layout(batch_size, rank, world_size)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype={dtype}: use torch.float32, float16 or bfloat16")
        validate_dali(data_cfg.dali)
        self.cfg, self.opts = data_cfg, data_cfg.dali
        self.aug = Augmentation.of(data_cfg)
        self.seed = int(seed)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device}: the DALI loader serves cpu or cuda")
        self.channels_last = bool(channels_last)
        self.dtype = dtype
        decoder = self.opts.decoder
        if decoder == "auto":
            decoder = "mixed" if self.device.type == "cuda" else "cpu"
        if decoder == "mixed" and self.device.type != "cuda":
            raise ValueError("data.dali.decoder=mixed needs a CUDA device")
        self.decoder = decoder
        self.threads = max(1, int(data_cfg.num_workers))
        self.bad = BadFileLog()
        self.feed = open_feed(data_cfg, dict(batch_size=batch_size, rank=rank, world_size=world_size, seed=seed),
                              self.bad, self.threads)
        self.batch, self.steps = int(batch_size), self.feed.order.steps

        self._epoch, self._start_step = 0, 0
        self._feeder = _Feeder(self._make_batch)
        self._pipe = None
        self._check = DecodeCheck()
        self._cur_epoch = 0
        self._iterating = False
        self._retried: Optional[Tuple[int, int]] = None
        self._hold = None
        self._last: Optional[Batch] = None

    # ---- protocol ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.steps

    @property
    def num_samples(self) -> int:
        return self.feed.num_samples

    @property
    def skipped(self) -> int:
        return self.bad.skipped

    @property
    def bad_files(self):
        return self.bad.files

    @property
    def last_sources(self) -> List[str]:
        """What filled the last delivered batch (file paths, or the shard reader's source info),
        substitutes included: for tests and debugging."""
        return list(self._last.sources) if self._last is not None else []

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.feed.order.check_start(start_step)
        self._epoch, self._start_step = int(epoch), int(start_step)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self._iterating:
            raise RuntimeError("DaliTwoViewLoader: one iteration at a time")
        self._iterating = True
        epoch, start = self._epoch, self._start_step
        pipe, delivered, clean = None, start, False
        try:
            self._cur_epoch = epoch
            self._feeder.todo = deque(range(start, self.steps))
            self._feeder.inflight.clear()
            self.feed.begin_epoch(epoch, start)
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
                self.bad.skipped += batch.skipped
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

    # ---- batches -------------------------------------------------------------------------------
    def _make_batch(self, item: Union[int, Batch]) -> Batch:
        # A Batch comes back after some of its samples were marked bad: the feed substitutes them.
        batch = self.feed.make(item) if isinstance(item, int) else self.feed.remake(item)
        views = []
        for view in (0, 1):
            draws = draw_view_params(self.seed, self._cur_epoch, batch.keys, view, augmentation=self.aug)
            views += graph_inputs(draws, batch.hw[:, 0], batch.hw[:, 1], self.cfg.min_scale, self.cfg.image_size)
        batch.feed = tuple([batch.first] + views)
        return batch

    # ---- the DALI pipeline -----------------------------------------------------------------------
    def _pipeline(self):
        if self._pipe is None:
            o = self.opts
            decoder_options = dict(hw_decoder_load=float(o.hw_decoder_load),
                                   device_memory_padding=int(o.device_memory_padding),
                                   host_memory_padding=int(o.host_memory_padding))
            if o.preallocate_width_hint and o.preallocate_height_hint:
                decoder_options.update(preallocate_width_hint=int(o.preallocate_width_hint),
                                       preallocate_height_hint=int(o.preallocate_height_hint))
            self._pipe = build_two_view_pipeline(
                self._feeder, batch_size=self.batch, num_threads=self.threads,
                device_id=self.device.index if self.device.type == "cuda" else None,
                read_files=self.feed.read_files, image_size=self.cfg.image_size,
                out_dtype="float32" if self.dtype == torch.float32 else "float16",
                layout="HWC" if self.channels_last else "CHW", decoder=self.decoder,
                decoder_options=decoder_options, prefetch_queue_depth=o.prefetch,
                hue=None if o.hue == "auto" else o.hue)
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
                x = gpu_output_to_torch(t, self.device)
            if self.channels_last:
                x = x.permute(0, 3, 1, 2)          # NHWC memory = channels-last NCHW, no copy
            if x.dtype != self.dtype:
                x = x.to(self.dtype)               # fp16 -> bf16 on the device; strides preserved
            views.append(x)
        self._hold = outs                          # DALI's buffers stay referenced one step longer
        return views[0], views[1]

    # ---- failures ---------------------------------------------------------------------------------
    def _find_bad(self, batch: Batch, error: Exception) -> List[Tuple[int, str]]:
        bad = []
        for pos in range(self.batch):
            try:
                why = self._check(self.feed.sample_bytes(batch, pos))
            except OSError as e:
                why = f"{type(e).__name__}: {e}"
            if why:
                bad.append((pos, why))
        if not bad:
            m = re.search(r"sample #(\d+)", str(error))
            if m and int(m.group(1)) < self.batch:
                bad.append((int(m.group(1)), f"DALI: {first_error_line(error)}"))
        return bad

    def _recover(self, error: Exception, epoch: int):
        if not self._feeder.inflight:
            raise error
        batch = self._feeder.inflight[0]
        bad = self._find_bad(batch, error)
        if bad:
            for pos, why in bad:
                self.feed.mark_bad(batch, pos, why)
        else:
            if self._retried == (epoch, batch.step):
                raise DataError(f"DALI failed twice on step {batch.step} of epoch {epoch} and no file of the "
                                f"batch is unreadable on its own: {first_error_line(error)}") from error
            self._retried = (epoch, batch.step)
            log.warning("DALI failed on step %d of epoch %d without an unreadable file (%s); rebuilding the "
                        "pipeline and retrying once", batch.step, epoch, first_error_line(error))
        pending = list(self._feeder.inflight) + list(self._feeder.todo)
        self._discard()
        self._feeder.inflight.clear()
        self._feeder.todo = deque(pending)
        return self._pipeline()

    def close(self) -> None:
        self._discard()
        self.feed.close()
