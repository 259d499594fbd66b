"""DeepSpeed behind the engine interface (`deepspeed.initialize`, ZeRO 0/1/2).

Trainable module: the query encoder only. The momentum encoder and both queues stay outside the
DeepSpeed engine (no gradients, nothing unused to find); checkpoints carry them as client state.
The wrapping is in place: the query encoder's forward is routed through the DeepSpeed engine's
forward (its autocast, forward and backward hooks), so the model holds no wrapper and its
state_dict keys do not change.

Config: the JSON of `deepspeed.config`, else ds_configs/ds_zero<deepspeed.zero_stage or 1>.json beside
this file (package data, so an installed wheel has them too);
`deepspeed.zero_stage` overrides the JSON's stage. Batch sizes, optimizer and precision come from
our config: the JSON may leave them out or say "auto"; a JSON that states other values, has an
optimizer/scheduler section, or enables DeepSpeed's fp16/bf16 modes is a one-line error (its bf16
mode casts parameters but not the BatchNorm running statistics and fails on this model:
"expected scalar type BFloat16 but found Float"). train.precision=bf16 becomes DeepSpeed's
`torch_autocast` (autocast, fp32 master parameters). The client optimizer is our SGD
(`zero_allow_untested_optimizer`). Gradient reduction: ZeRO 1/2 reduce in buckets during backward
(`overlap_comm`); ZeRO 0 all-reduces after backward.

Checkpoints: `ckpt_<step>.ds/`, DeepSpeed's save_checkpoint (module, optimizer shards of every rank,
our client state) plus meta.pt, written under a temp folder and renamed by rank 0.
"""
from __future__ import annotations

import json
import os
import warnings

import torch

from .. import checkpoint
from ..config import ConfigError
from ..distributed import ensure_process_group
from .. import stages
from .base import Engine, make_optimizer, reject_unsupported

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_configs")
CLIENT_KEY = "densecl_outside_engine"  # client-state entry: the DenseCL tensors outside the engine
MODEL_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's file of the module's (the query encoder's) weights


def default_config_path(stage: int) -> str:
    return os.path.join(CONFIG_DIR, f"ds_zero{stage}.json")


def resolve_ds_config(cfg, world_size: int, precision: str) -> dict:
    """The DeepSpeed config dict for this run, checked against ours; ConfigError names the key."""
    section = cfg.deepspeed
    path = section.config or default_config_path(section.zero_stage if section.zero_stage is not None else 1)
    key = f"deepspeed.config={path}" if section.config else f"deepspeed.zero_stage ({path})"
    try:
        with open(path) as f:
            d = json.load(f)
    except OSError as e:
        raise ConfigError(f"{key}: cannot read it: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{key}: the JSON must be an object")
    zo = d.get("zero_optimization", {})
    if not isinstance(zo, dict):
        raise ConfigError(f"{key}: zero_optimization must be an object")
    stage = section.zero_stage if section.zero_stage is not None else zo.get("stage", 0)
    if stage not in (0, 1, 2) or isinstance(stage, bool):
        raise ConfigError(f"{key}: zero_optimization.stage={stage!r}: use 0, 1 or 2 (ZeRO-3 shards the "
                          f"parameters, which the momentum encoder's update does not support)")
    batch = cfg.optim.batch_size
    ours = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": batch // world_size,
            "gradient_accumulation_steps": 1}
    for k, v in ours.items():
        if k in d and d[k] != "auto" and d[k] != v:
            raise ConfigError(f"{key}: {k}={d[k]!r} contradicts optim.batch_size={batch} on {world_size} "
                              f"process(es) ({k} would be {v}); remove it or set it to \"auto\"")
    for k in ("optimizer", "scheduler"):
        if k in d:
            raise ConfigError(f"{key}: has a '{k}' section; the optimizer (SGD) and its schedule come from "
                              f"optim.* (lr, momentum, weight_decay, warmup_epochs): remove it")
    for k in ("fp16", "bf16"):
        if isinstance(d.get(k), dict) and d[k].get("enabled") not in (None, False, "auto"):
            raise ConfigError(f"{key}: {k}.enabled is set; DeepSpeed's {k} mode casts the parameters but not "
                              f"the BatchNorm statistics and fails on this model: remove it and use "
                              f"train.precision=bf16 (DeepSpeed's torch_autocast)")
    ta = d.get("torch_autocast", {})
    if isinstance(ta, dict) and ta.get("enabled") and precision != "bf16":
        raise ConfigError(f"{key}: torch_autocast.enabled contradicts train.precision={precision}; "
                          f"set train.precision=bf16 or remove torch_autocast")
    d = {**d, **ours, "zero_optimization": {**zo, "stage": stage}}
    d.setdefault("zero_allow_untested_optimizer", True)
    d.setdefault("steps_per_print", 10 ** 9)
    # DeepSpeed clips the gradient norm at 1.0 unless told otherwise; the recipe does not clip.
    d.setdefault("gradient_clipping", 0.0)
    if precision == "bf16":
        d["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    else:
        d.pop("torch_autocast", None)
    return d


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    ckpt_kind = "ds"

    def __init__(self, device, precision, dist_info=None, cfg=None):
        super().__init__(device, precision, dist_info, cfg)
        reject_unsupported("deepspeed", precision, cfg, "the query encoder runs through DeepSpeed's forward")
        world = dist_info.world_size if dist_info else 1
        self.ds_config = resolve_ds_config(cfg, world, precision)
        self.ds = None

    def describe(self) -> str:
        world = self.dist.world_size if self.dist else 1
        return (f"deepspeed (ZeRO-{self.ds_config['zero_optimization']['stage']}, {world} "
                f"rank{'s' if world > 1 else ''}, {self.device.type}, {self.precision})")

    def setup(self, model, optim_cfg, base_lr: float, compile=None) -> None:
        import logging
        import deepspeed
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)  # its INFO lines on every rank would drown our summary
        ensure_process_group(self.device)
        self.model = model
        # DeepSpeed flattens and broadcasts parameters as contiguous buffers: channels-last weights
        # go back to the default layout (the input batch may still be channels-last).
        model.to(memory_format=torch.contiguous_format)
        self.optimizer = make_optimizer(model, optim_cfg, self.device, base_lr)
        enc = model.encoder_q
        self.ds, _, _, _ = deepspeed.initialize(model=enc, optimizer=self.optimizer, config=self.ds_config,
                                                dist_init_required=False)
        # Route the query encoder's calls through DeepSpeed's forward, which calls the module again:
        # the second (inner) call runs the encoder's own forward.
        ds, own_forward, inside = self.ds, type(enc).forward, [False]

        def forward(*args, **kwargs):
            if inside[0]:
                return own_forward(enc, *args, **kwargs)
            inside[0] = True
            try:
                return ds(*args, **kwargs)
            finally:
                inside[0] = False
        enc.forward = forward
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)  # unused: DeepSpeed scales

    def step(self, loss: torch.Tensor, lr: float) -> None:
        for group in self.optimizer.param_groups:  # the client SGD: ZeRO steps through its groups
            group["lr"] = lr
        with stages.stage("backward"):
            self.ds.backward(loss)
        with stages.stage("optimizer"):
            self.ds.step()  # zeroes the gradients after the update

    # ---- checkpoints: DeepSpeed's own, our state as client state ---------------------------------
    def check_resume(self, path: str, meta: dict) -> None:
        """ZeRO optimizer states are saved per rank, and DeepSpeed reloads them on as many ranks."""
        world = self.dist.world_size if self.dist else 1
        saved = meta.get("world_size", len(meta["shuffle_rng"]))
        if saved != world:
            raise checkpoint.CheckpointError(
                f"checkpoint {path} was written by {saved} DeepSpeed rank(s), this run has {world}; resume it "
                f"on {saved} (DeepSpeed checkpoints hold per-rank optimizer shards)")

    def _outside_state(self) -> dict:
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith("encoder_q.")}

    def save(self, out_dir: str, step: int, extra: dict, keep_last: int) -> str | None:
        client = {**extra, CLIENT_KEY: self._outside_state()}

        def write(tmp):
            tag = os.path.basename(checkpoint.final_dir_for(out_dir, step, self.ckpt_kind))
            if self.ds.save_checkpoint(tmp, tag=tag, client_state=client, save_latest=False) is False:
                raise RuntimeError("deepspeed save_checkpoint returned False")
            if self.is_main:
                checkpoint.write_meta(os.path.join(tmp, tag), extra)
            return os.path.join(tmp, tag)  # DeepSpeed writes into <tmp>/<tag>/
        return self.save_folder(out_dir, step, keep_last, write)

    def load(self, path: str, meta: dict | None = None) -> dict:
        meta = meta if meta is not None else checkpoint.read_checkpoint_meta(path)
        self.check_resume(path, meta)
        path = os.path.normpath(path)
        try:
            loaded, client = self.ds.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path),
                                                     load_optimizer_states=True, load_lr_scheduler_states=False)
        except Exception as e:
            first = str(e).strip().splitlines()
            raise checkpoint.CheckpointError(f"checkpoint {path} cannot be loaded by DeepSpeed: "
                                             f"{type(e).__name__}: {first[0] if first else ''}") from e
        if loaded is None or not isinstance(client, dict) or CLIENT_KEY not in client:
            raise checkpoint.CheckpointError(f"checkpoint {path} is not a complete densecl_fast DeepSpeed checkpoint")
        missing, unexpected = self.model.load_state_dict(client[CLIENT_KEY], strict=False)
        missing = [k for k in missing if not k.startswith("encoder_q.")]
        if missing or unexpected:
            raise checkpoint.CheckpointError(f"checkpoint {path} does not fit the model: missing "
                                             f"{missing[:3]}, unexpected {unexpected[:3]}")
        return meta


def read_model_state(path: str) -> dict:
    """The DenseCL state dict of the ckpt_<step>.ds folder `path`, on the CPU, without DeepSpeed or a
    process group: the query encoder from DeepSpeed's module file, the rest from our client state."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ms = torch.load(os.path.join(path, MODEL_FILE), map_location="cpu", weights_only=True)
    state = {f"encoder_q.{k}": v for k, v in ms["module"].items()}
    state.update(ms[CLIENT_KEY])
    return state
