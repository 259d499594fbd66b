"""Engines: how a DenseCL model is wrapped, stepped and checkpointed (after torchtitan).

    engine = build_engine(cfg, dist_info, device, precision)   # train.engine, checked before data
    engine.setup(model, cfg.optim, base_lr)                     # wraps/shards the model in place
    out = train_step(model, engine, im_q, im_k, lr, lam)        # engine.autocast(), engine.step()
    path = engine.save(out_dir, step, extra, keep_last);  extra = engine.load(path, meta)

single (one process), ddp (torchrun), fsdp (FSDP2 fully_shard), deepspeed (deepspeed.initialize).
`auto`: deepspeed when the deepspeed launcher started the process, ddp under torchrun (or any
launcher) with more than one rank, single otherwise. The launcher decides ranks, the config the engine.
"""
from __future__ import annotations

import importlib.util
import os

from ..checkpoint import CheckpointError, checkpoint_kind, dcp_error, dcp_exception
from ..config import Config, ConfigError
from .base import Engine, autocast_for, make_optimizer, train_step


def started_by_deepspeed() -> bool:
    """The deepspeed launcher (deepspeed.launcher.launch) sets CROSS_RANK/CROSS_SIZE/LOCAL_SIZE;
    torchrun sets TORCHELASTIC_RUN_ID instead."""
    return "CROSS_RANK" in os.environ and "LOCAL_SIZE" in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ


def resolve_engine(name: str, world_size: int) -> str:
    if name != "auto":
        return name
    if started_by_deepspeed():
        return "deepspeed"
    return "ddp" if world_size > 1 else "single"


def build_engine(cfg: Config, dist_info, device, precision: str) -> Engine:
    """The engine of `cfg.train.engine` for this launch; every problem is a one-line ConfigError."""
    name = resolve_engine(cfg.train.engine, dist_info.world_size)
    if name == "single" and dist_info.world_size > 1:
        raise ConfigError(f"train.engine=single but {dist_info.world_size} processes were started; use "
                          f"train.engine=ddp, fsdp or deepspeed (or auto) with a multi-process launcher")
    if name == "ddp" and dist_info.world_size == 1:
        name = "single"  # DDP over one rank is the single engine (same checkpoints); nothing to reduce
    if name == "single":
        from .single import SingleEngine
        return SingleEngine(device, precision, dist_info, cfg)
    if name == "ddp":
        from .ddp import DDPEngine
        return DDPEngine(device, precision, dist_info, cfg)
    if name == "fsdp":
        from .fsdp import FSDPEngine
        return FSDPEngine(device, precision, dist_info, cfg)
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("train.engine=deepspeed but DeepSpeed is not installed: pip install deepspeed "
                          "(or pip install -e .[deepspeed]), or use train.engine=ddp")
    from .deepspeed import DeepSpeedEngine
    return DeepSpeedEngine(device, precision, dist_info, cfg)


__all__ = ["Engine", "autocast_for", "build_engine", "make_optimizer", "resolve_engine",
           "started_by_deepspeed"]


def folder_model_state(path: str) -> dict:
    """The whole DenseCL state dict (both encoders, queues, pointer) of a folder checkpoint, on the
    CPU, without a process group: for export and inspection (weights.read_weights)."""
    kind = checkpoint_kind(path)
    try:
        if kind == "ds":
            from .deepspeed import read_model_state
            return read_model_state(path)
        if kind == "dcp":
            from ..checkpoint.dcp import dcp_model_state
            return dcp_model_state(path)
    except CheckpointError:
        raise
    except (Exception, dcp_exception()) as e:
        raise dcp_error(path, e, "cannot be read") from None
    raise CheckpointError(f"{path} is not a folder checkpoint of densecl_fast (ckpt_<step>.dcp or .ds)")
