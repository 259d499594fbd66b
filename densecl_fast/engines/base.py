"""The engine interface, and the single-file checkpoint format shared by the single and DDP engines.

Problem: the step body (autocast, backward, optimizer) and the checkpoint format differ between
plain PyTorch, DDP, FSDP2 and DeepSpeed, and the trainer and perf/ must run the same step.
Fix: an Engine owns the optimizer (and grad scaler), applies its wrapping in place (the model's
module tree and state_dict keys never change), and exposes autocast(), step(loss, lr), save and
load. `train_step` (below), which the trainer and perf/ run, is engine-agnostic.
Guarantee: the momentum encoder and both queues stay outside anything an engine wraps: no
gradients there, no find_unused_parameters.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from .. import checkpoint
from ..config import ConfigError
from ..distributed import barrier
from .. import stages
from .compiling import CompileSettings, compile_encoders


def autocast_for(precision: str, device: torch.device):
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return nullcontext()


def make_optimizer(model, optim_cfg, device: torch.device, base_lr: float) -> torch.optim.SGD:
    """SGD over the query encoder only (the key encoder follows by momentum); one fused update."""
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(model.encoder_q.parameters(), lr=base_lr, momentum=optim_cfg.momentum,
                           weight_decay=optim_cfg.weight_decay, **kw)


def train_step(model, engine: Engine, im_q, im_k, lr: float, lam: float) -> dict:
    """One optimisation step; the trainer and perf/ both run exactly this, under every engine."""
    with engine.autocast():
        out = model(im_q, im_k, loss_lambda=lam)
    engine.step(out["loss"], lr)
    return out


class Engine:
    """One process, no wrapper (also the base of the others). Checkpoints: one file ckpt_<step>.pt."""

    name = "single"
    ckpt_kind = "pt"  # the checkpoint format this engine writes and reads (checkpoint.KINDS)

    def __init__(self, device: torch.device, precision: str, dist_info=None, cfg=None):
        self.device, self.precision, self.dist, self.cfg = device, precision, dist_info, cfg
        self.model = self.optimizer = self.scaler = None

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def describe(self) -> str:
        """The engine as the first line of a run names it."""
        return self.name

    # ---- set-up ------------------------------------------------------------------------------------
    def setup(self, model, optim_cfg, base_lr: float, compile=None) -> None:
        """Compile (in place, before any wrapping, as torchtitan does), wrap, build the optimizer.
        `compile`: a compiling.CompileSettings, True (the default settings: per block) or None/False."""
        self.model = model
        settings = CompileSettings.of(compile)
        if settings is not None:
            compile_encoders(model, settings)
        self.wrap(model)
        self.optimizer = make_optimizer(model, optim_cfg, self.device, base_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def wrap(self, model) -> None:
        pass

    # ---- the step ----------------------------------------------------------------------------------
    def autocast(self):
        return autocast_for(self.precision, self.device)

    def step(self, loss: torch.Tensor, lr: float) -> None:
        """zero_grad, backward (through the grad scaler), optimizer step at learning rate `lr`."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        with stages.stage("backward"):
            self.scaler.scale(loss).backward()
        with stages.stage("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()

    # ---- checkpoints -------------------------------------------------------------------------------
    def check_resume(self, path: str, meta: dict) -> None:
        """Called with a checkpoint's meta before any data or model: engine-specific refusals."""

    def save(self, out_dir: str, step: int, extra: dict, keep_last: int) -> str | None:
        """Rank 0 writes one checksummed file atomically (the model is identical on every rank)."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), **extra}
        path = checkpoint.save_checkpoint(state, out_dir, step, keep_last) if self.is_main else None
        barrier()
        return path

    def save_folder(self, out_dir: str, step: int, keep_last: int, write) -> str | None:
        """A checkpoint folder written by every rank (FSDP's DCP shards, DeepSpeed's files): `write(tmp)`
        fills a temp folder on each rank and returns the folder to publish; rank 0 renames it to its
        final name only after every rank is done, then prunes old checkpoints."""
        tmp = checkpoint.temp_dir_for(out_dir, step, self.ckpt_kind)
        final = checkpoint.final_dir_for(out_dir, step, self.ckpt_kind)
        if self.is_main and os.path.exists(tmp):
            checkpoint.remove_path(tmp)
        barrier()
        try:
            done = write(tmp)
        except (OSError, RuntimeError) as e:
            raise checkpoint.CheckpointWriteError(f"cannot write checkpoint {final}: {checkpoint.io_error_text(e)}; "
                                                  f"continue from the last good one with --resume auto") from e
        barrier()  # every rank's files are on disk before the folder gets its final name
        if self.is_main:
            checkpoint.commit_dir(done, final)
            if done != tmp:
                checkpoint.remove_path(tmp)
            checkpoint.prune(out_dir, keep_last, final)
        barrier()
        return final if self.is_main else None

    def load(self, path: str, meta: dict | None = None) -> dict:
        """Load model, optimizer and scaler from `path` (`meta`: the file already read); returns it."""
        saved = meta if meta is not None else checkpoint.load_checkpoint(path)
        try:
            self.model.load_state_dict(saved["model"])
        except RuntimeError as e:
            raise checkpoint.CheckpointError(f"checkpoint {path} does not fit the model: "
                                             f"{str(e).splitlines()[0]}") from e
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scaler.load_state_dict(saved["scaler"])
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
            raise checkpoint.CheckpointError(f"checkpoint {path} has a malformed optimizer or scaler state: "
                                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        return saved


def reject_unsupported(engine: str, precision: str, cfg, why_no_compile: str) -> None:
    """What the sharding engines refuse: fp16 (bf16 needs no loss scaling) and train.compile."""
    if precision == "fp16":
        raise ConfigError(f"train.precision=fp16 is not supported with train.engine={engine}; use bf16 "
                          f"(no loss scaling needed)")
    if cfg is not None and cfg.train.compile:
        raise ConfigError(f"train.compile=true is not supported with train.engine={engine} ({why_no_compile}); "
                          "use train.engine=ddp to compile")
