"""Online kNN monitor: "is my run learning?" answered during pretraining (solo-learn logs the same).

    monitor = KnnMonitor.build(cfg, device, dist_info)       # None when train.knn_data is empty
    if monitor and monitor.due(step, steps_per_epoch):
        rec.update(monitor.run(model))                        # every rank calls it; rank 0 measures

Every `train.knn_every_epochs` epochs and/or `train.knn_every_steps` steps, the query encoder's
trunk is copied into a separate eval-mode ResNet (the training model is never switched to eval,
so its BN state, mode and wrapping are untouched) and scored by the eval tool's weighted kNN
(eval/knn.py: cosine, k = `train.knn_k`, T = 0.07) on pooled C5 (eval/features.py): the first
`knn_max_bank` images of the labelled data's training split are the bank, the first `knn_max_val`
of its evaluation split are classified. The images are decoded, resized and center-cropped once,
at `knn_image_size`, and kept in memory (rank 0 only), so an evaluation is two forward passes over a
few thousand small images. It runs inside `torch.random.fork_rng`, so the run's RNG streams (and
hence its data order, augmentations and losses) are the same with the monitor on or off.

Distributed runs: every rank lists the data (the same checks fail the same way everywhere); rank 0
alone loads the images and measures; sharded parameters (FSDP's DTensors) are gathered by every
rank, then the others wait at a barrier.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import torch
import torchvision.transforms as T

from .data import DataError
from .data.sources import parse_builtin
from .distributed import all_reduce_max, barrier
from .eval import features, knn
from .eval.datasets import EvalSplit, load_eval_data

FEATURE = "pool5"


def trunk_state(model) -> dict:
    """The query trunk's tensors as plain full tensors. Collective for sharded (DTensor) parameters:
    every rank must call it."""
    out = {}
    for k, v in model.encoder_q.backbone.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k.replace("_orig_mod.", "")] = v.detach()
    return out


def _in_memory(split: EvalSplit, image_size: int) -> EvalSplit:
    """`split` with its images decoded, resized and center-cropped once (what eval_transform would do
    first; doing it again at the same size leaves them unchanged)."""
    prep = T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                      T.CenterCrop(image_size)])
    images = [prep(split.load(i)) for i in range(len(split))]
    return EvalSplit(split.name, split.keys, images.__getitem__, split.classes, split.labels)


def check_val(data: str, val: str) -> None:
    """`train.knn_val` is honoured or refused, never ignored: the generated sets (built-in,
    mosaics) and Fashion-MNIST bring their own evaluation split, an image folder needs a folder, a list needs a list."""
    val, data = str(val).strip(), str(data).strip()
    if not val:
        return
    try:
        own = parse_builtin(data) is not None
    except DataError:
        return  # a malformed spelling: load_eval_data names it
    if own:
        raise DataError(f"train.knn_val={val!r} cannot be used with train.knn_data={data!r}, which has its own "
                        f"evaluation split (the built-in set's last images, the test split of Fashion-MNIST, "
                        f"or of the mosaics); clear train.knn_val")
    dp, vp = (os.path.abspath(os.path.expanduser(x)) for x in (data, val))
    if os.path.isdir(dp) and not os.path.isdir(vp):
        raise DataError(f"train.knn_val={val!r}: no such folder (train.knn_data is an image folder, so the "
                        f"evaluation split is one too)")
    if os.path.isfile(dp) and not os.path.isfile(vp):
        raise DataError(f"train.knn_val={val!r}: no such file (train.knn_data is a file list, so the evaluation "
                        f"split is one too)")


class KnnMonitor:
    def __init__(self, bank: EvalSplit, val: EvalSplit, *, arch: str, image_size: int, k: int, every_epochs: int,
                 every_steps: int, device: torch.device, is_main: bool, batch_size: int = 128):
        self.bank, self.val, self.arch, self.image_size, self.k = bank, val, arch, image_size, k
        self.every_epochs, self.every_steps = every_epochs, every_steps
        self.device, self.is_main, self.batch_size = device, is_main, batch_size
        self.trunk = None
        self.last: Optional[float] = None

    @classmethod
    def build(cls, cfg, device: torch.device, dist_info) -> Optional["KnnMonitor"]:
        t, d = cfg.train, cfg.data
        if not str(t.knn_data).strip():
            return None
        check_val(t.knn_data, t.knn_val)
        try:
            bank, val = load_eval_data(t.knn_data, task="cls", val=t.knn_val, max_train=t.knn_max_bank,
                                       max_val=t.knn_max_val, synthetic_images=d.synthetic_images,
                                       synthetic_resolution=d.synthetic_resolution, data_cache_dir=d.cache_dir)
        except DataError as e:
            raise DataError(f"train.knn_data={t.knn_data!r}: {e}") from None
        if not len(bank) or not len(val):
            raise DataError(f"train.knn_data={t.knn_data!r}: empty {'bank' if not len(bank) else 'evaluation'} split")
        size = t.knn_image_size or d.image_size
        problem = None
        if dist_info.is_main:
            try:
                bank, val = _in_memory(bank, size), _in_memory(val, size)
            except Exception as e:  # PIL raises many types for a bad file; any of them stops the run
                problem = DataError(f"train.knn_data={t.knn_data!r}: cannot read an image: {type(e).__name__}: {e}")
        if dist_info.enabled and all_reduce_max(problem is not None, device) and problem is None:
            problem = DataError(f"train.knn_data={t.knn_data!r}: rank 0 cannot read the images (see its error)")
        if problem is not None:
            raise problem
        return cls(bank, val, arch=cfg.model.arch, image_size=size, k=t.knn_k, every_epochs=t.knn_every_epochs,
                   every_steps=t.knn_every_steps, device=device, is_main=dist_info.is_main)

    def due(self, step: int, steps_per_epoch: int) -> bool:
        by_steps = bool(self.every_steps) and step % self.every_steps == 0
        by_epochs = (bool(self.every_epochs) and step % steps_per_epoch == 0
                     and (step // steps_per_epoch) % self.every_epochs == 0)
        return by_steps or by_epochs

    def run(self, model) -> dict:
        """{"knn_top1", "knn_seconds"} on rank 0, {} elsewhere. Every rank must call it."""
        state = trunk_state(model)
        res = {}
        if self.is_main:
            t0 = time.perf_counter()
            cuda = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):  # the trunk's init and the DataLoader draw from it
                if self.trunk is None:
                    from .model import ResNetTrunk
                    self.trunk = ResNetTrunk(self.arch).to(self.device)
                self.trunk.load_state_dict(state)
                kw = dict(image_size=self.image_size, device=self.device, batch_size=self.batch_size, workers=0,
                          progress=False)
                fb = features.extract(self.trunk, self.bank, [FEATURE], **kw)[FEATURE]
                fv = features.extract(self.trunk, self.val, [FEATURE], **kw)[FEATURE]
            acc = knn.knn_accuracy(fb, self.bank.labels, fv, self.val.labels, [self.k], len(self.bank.classes))[self.k]
            self.last = acc
            res = {"knn_top1": acc, "knn_seconds": time.perf_counter() - t0}
        del state
        barrier()
        return res

    def postfix(self) -> dict:
        """For the progress bar: the latest accuracy, once there is one."""
        return {} if self.last is None else {"knn": f"{self.last:.1f}"}
