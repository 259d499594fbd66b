"""The DenseCL training loop, readable top to bottom (after nanoGPT's train.py).

    summary = train(load_config("smoke"))

Order of business: processes, device and engine -> data (fails early on bad data) -> model,
engine set-up (torch.compile and DDP/FSDP/DeepSpeed applied in place, optimizer) -> resume -> the
loop (lr, λ, step, log, checkpoint, signals).
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from . import kernels

from . import checkpoint as ckpt_io
from .config import Config, ConfigError, check_environment, config_to_dict, to_yaml
from .data import DataError, build_loader, resolve_backend
from .distributed import all_reduce_max, cleanup, init_distributed
from .engines import Engine, build_engine
from .engines.compiling import CompileCache, CompilePlan
from .model import DenseCL
from .monitor import KnnMonitor
from .weights import WeightsError, load_into_model, read_weights


class NonFiniteLossError(RuntimeError):
    pass


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr: float) -> float:
    """Linear warm-up, then cosine from base_lr to min_lr over the remaining steps (per iteration)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision


def cudnn_benchmark_for(t_cfg, device: torch.device) -> bool:
    """cuDNN autotuning: on for CUDA training unless turned off or train.deterministic (the autotuner
    may pick a different algorithm per run). The trainer's shapes are fixed (every batch is full, one
    crop size), so each convolution is tuned once, on the first step."""
    return device.type == "cuda" and bool(t_cfg.cudnn_benchmark) and not t_cfg.deterministic


def train_step(model, engine: Engine, im_q, im_k, lr: float, lam: float) -> dict:
    """One optimisation step; the trainer and perf/ both run exactly this, under every engine."""
    with engine.autocast():
        out = model(im_q, im_k, loss_lambda=lam)
    engine.step(out["loss"], lr)
    return out


def check_compatible(saved: Config, cfg: Config, path: str) -> None:
    """The parts of the config that shape tensors must match; the rest may change on resume."""
    keys = ["arch", "hid_dim", "out_dim", "queue_len"]
    diff = [f"model.{k}: checkpoint {getattr(saved.model, k)} vs now {getattr(cfg.model, k)}"
            for k in keys if getattr(saved.model, k) != getattr(cfg.model, k)]
    if diff:
        raise ckpt_io.CheckpointError(f"checkpoint {path} is incompatible with this config: " + "; ".join(diff))


class MetricsLog:
    """metrics.jsonl (always) and TensorBoard (optional) in the run directory; rank 0 only."""

    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.f = open(os.path.join(out_dir, "metrics.jsonl"), "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))

    def write(self, rec: dict):
        if not self.enabled:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])

    def close(self):
        if self.f:
            self.f.close()
        if self.tb:
            self.tb.close()


def train(cfg: Config) -> dict:
    """Run (or continue) the pretraining of `cfg`; returns a summary. The run directory's lock is
    held until it returns or raises."""
    held: list = []
    try:
        return _train(cfg, held)
    finally:
        for lock in held:
            lock.release()
        cleanup()


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _train(cfg: Config, held: list) -> dict:
    t_cfg, o_cfg = cfg.train, cfg.optim
    # Machine- and launch-dependent checks (CUDA, precision, kernels, batch per process vs BN groups)
    # come first: a bad value is a one-line error before any process group, data or model.
    check_environment(cfg, world_size=max(1, int(os.environ.get("WORLD_SIZE", "1") or 1)))
    dist_info, device = init_distributed(t_cfg.device)
    main = dist_info.is_main
    say = (lambda *a: print(*a, flush=True)) if main else (lambda *a: None)
    precision = resolve_precision(t_cfg.precision, device)
    engine = build_engine(cfg, dist_info, device, precision)  # engine problems: one line, before anything else
    say(f"engine {engine.describe()}")

    # ---- run directory and resume point: checked, locked and read before any data or model ----
    resume_path = ckpt_io.resolve_resume(t_cfg.resume, t_cfg.out_dir)
    ck = None
    if resume_path:
        ckpt_io.check_kind(resume_path, engine.ckpt_kind, f"train.engine={engine.name}")
        ck = ckpt_io.read_checkpoint_meta(resume_path)  # structure and checksum
        check_compatible(ckpt_io.saved_config(ck, resume_path), cfg, resume_path)
        engine.check_resume(resume_path, ck)
    problem = None
    if main:
        try:
            lock, removed = ckpt_io.prepare_run_dir(t_cfg.out_dir, resume_path)
            held.append(lock)
            if removed:
                say(f"removed {len(removed)} temp file(s) of interrupted checkpoint writes in "
                    f"{ckpt_io.checkpoint_dir(t_cfg.out_dir)}")
        except (ConfigError, ckpt_io.CheckpointError) as e:
            problem = e
    if dist_info.enabled and all_reduce_max(problem is not None, device) and problem is None:
        problem = ConfigError(f"train.out_dir={t_cfg.out_dir}: rank 0 cannot use the run directory (see its error)")
    if problem is not None:
        raise problem
    if o_cfg.batch_size % dist_info.world_size:
        raise ValueError(f"optim.batch_size={o_cfg.batch_size} is not divisible by {dist_info.world_size} processes")
    per_rank_batch = o_cfg.batch_size // dist_info.world_size
    if t_cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark_for(t_cfg, device)
    kernels.set_backend(t_cfg.kernels)

    if t_cfg.init_from and not resume_path:  # an unreadable or odd file: one line before the data set is listed
        try:  # (read again into the model below; how it fits the model's widths is checked there)
            read_weights(t_cfg.init_from, cfg.model.arch)
        except WeightsError as e:
            raise ckpt_io.CheckpointError(f"train.init_from: {e}") from e

    # ---- data: every data problem is reported before a model is built --------------------------
    loader = build_loader(cfg.data, batch_size=per_rank_batch, rank=dist_info.rank,
                          world_size=dist_info.world_size, device=device, seed=t_cfg.seed,
                          channels_last=t_cfg.channels_last,
                          dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
                          if device.type == "cuda" else torch.float32)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise DataError(f"the data set is smaller than one global batch of {o_cfg.batch_size} images")
    total_steps = o_cfg.epochs * steps_per_epoch
    monitor = KnnMonitor.build(cfg, device, dist_info)  # train.knn_data: checked here, with the data

    # ---- model and optimizer (same seed on every rank: identical initial weights and queues) ----
    torch.manual_seed(t_cfg.seed)
    model = DenseCL(cfg.model)
    # Rank 0's key-shuffle stream draws the cross-rank permutation (model.bn=shuffle); the others
    # draw their own permutations with model.bn=group.
    model.shuffle_seed = t_cfg.seed * 1000 + dist_info.rank
    if dist_info.enabled and cfg.model.bn == "sync":  # a departure from the recipe (global-batch BN)
        model.encoder_q = nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_q)
        model.encoder_k = nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_k)
    if t_cfg.init_from and not resume_path:  # weights only: a new run (step 0, fresh optimizer)
        try:  # before the engine shards or wraps anything: plain tensors, every rank the same
            report = load_into_model(model, t_cfg.init_from)
        except WeightsError as e:
            raise ckpt_io.CheckpointError(f"train.init_from: {e}") from e
        say(f"initialised from {report}")
    model.to(device)
    if t_cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    base_lr = o_cfg.lr * o_cfg.batch_size / 256  # linear scaling with the global batch
    # In place: torch.compile (per block), then the engine's DDP/FSDP/DeepSpeed wrapping; builds the optimizer.
    plan = CompilePlan.from_config(t_cfg)
    engine.setup(model, o_cfg, base_lr, compile=plan)
    compile_cache = None
    if plan is not None and t_cfg.compile_cache:  # warm start: the artifacts of an earlier run of this key
        compile_cache = CompileCache.for_run(cfg, device, precision, per_rank_batch, plan,
                                             kernels.active_backend(device), ckpt_io.checkpoint_dir(t_cfg.out_dir),
                                             main, warn if main else (lambda m: None))
        if compile_cache.load() is not None:
            say(f"compile cache: loaded {compile_cache.loaded_from}")
    model.train()
    warmup_steps = int(o_cfg.warmup_epochs * steps_per_epoch)

    # ---- resume ------------------------------------------------------------------------------------
    step, skipped_before = 0, 0
    if resume_path:
        check_resume_point(ck, resume_path, steps_per_epoch, total_steps, getattr(loader, "num_samples", None),
                           dist_info.world_size, o_cfg.batch_size, warn if main else (lambda m: None))
        engine.load(resume_path, ck)  # model (both encoders, queues, pointer), optimizer, scaler
        try:
            # Every rank's own RNG states when the run had as many ranks (checkpoints before "rngs":
            # rank 0's for all).
            rngs = ck.get("rngs")
            own = rngs[dist_info.rank] if isinstance(rngs, list) and len(rngs) == dist_info.world_size else ck["rng"]
            ckpt_io.set_rng_state(own)
            model.shuffle_generator(device).set_state(ck["shuffle_rng"][dist_info.rank % len(ck["shuffle_rng"])])
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError, ZeroDivisionError) as e:
            raise ckpt_io.CheckpointError(f"checkpoint {resume_path} has a malformed RNG "
                                          f"state: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        step, skipped_before = ck["step"], ck.get("data_skipped", 0)
        say(f"resumed from {resume_path} at step {step} (epoch {step // steps_per_epoch}, "
            f"step {step % steps_per_epoch} of {steps_per_epoch})")
    else:
        if t_cfg.resume == "auto":
            say(f"--resume auto: no checkpoint in {ckpt_io.checkpoint_dir(t_cfg.out_dir)}, starting fresh")
        torch.manual_seed(t_cfg.seed + dist_info.rank)

    # ---- run directory (checked and locked at the start) ---------------------------------------------
    if main:
        with open(os.path.join(t_cfg.out_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
    log = MetricsLog(t_cfg.out_dir, main, t_cfg.tensorboard)
    backend = resolve_backend(cfg.data, device)
    say(f"DenseCL {cfg.model.arch} | {cfg.name} | engine {engine.name} | device {device} x{dist_info.world_size} | "
        f"{precision} | bn {cfg.model.bn if dist_info.enabled else 'group'} | "
        f"data {backend} | kernels {kernels.active_backend(device)} | "
        f"compile {f'{plan.scope} ({plan.mode})' if plan else False} | "
        f"batch {o_cfg.batch_size} | lr {base_lr:g} | {steps_per_epoch} steps/epoch, {total_steps} total")

    def save(reason: str) -> str | None:
        skipped = skipped_before + loader.skipped
        rngs = gather_objects(ckpt_io.rng_state())
        extra = {"step": step, "epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
                 "rng": rngs[0], "rngs": rngs, "shuffle_rng": gather_shuffle_states(model, device),
                 "config": config_to_dict(cfg), "data_skipped": skipped, "reason": reason,
                 "steps_per_epoch": steps_per_epoch, "world_size": dist_info.world_size,
                 "batch_size": o_cfg.batch_size, "num_samples": getattr(loader, "num_samples", None),
                 "engine": engine.name}
        return engine.save(t_cfg.out_dir, step, extra, t_cfg.keep_last)

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    pbar = tqdm(total=total_steps, initial=step, disable=not (main and t_cfg.progress), unit="step",
                dynamic_ncols=True, desc="pretrain")
    status, window, t_window, last_path = "finished", [], time.perf_counter(), None
    try:
        while step < total_steps:
            epoch, start = divmod(step, steps_per_epoch)
            loader.set_epoch(epoch, start_step=start)
            for im_q, im_k in loader:
                lr = lr_at(step, total_steps, base_lr, warmup_steps, o_cfg.min_lr)
                lam = 0.0 if step < cfg.model.dense_warmup_iters else cfg.model.loss_lambda
                out = train_step(model, engine, im_q, im_k, lr, lam)
                step += 1
                if compile_cache is not None and not compile_cache.saved:  # the first step compiled everything
                    compile_cache.save()
                # Losses stay on the device until the log step: no host sync on every iteration.
                window.append(torch.stack([out["loss"].detach(), out["loss_single"].detach(),
                                           out["loss_dense"].detach()]).float())

                boundary = step % steps_per_epoch == 0
                want_ckpt = ((boundary and (step // steps_per_epoch) % t_cfg.ckpt_every_epochs == 0)
                             or (t_cfg.ckpt_every_steps and step % t_cfg.ckpt_every_steps == 0)
                             or step == total_steps)
                hit_max = bool(o_cfg.max_steps) and step >= o_cfg.max_steps
                knn_now = monitor is not None and monitor.due(step, steps_per_epoch)  # same on every rank
                log_now = step % t_cfg.log_every == 0 or want_ckpt or hit_max or knn_now
                stopping = stop["signal"] is not None
                if dist_info.enabled and log_now:  # agree on stopping at syncs that happen anyway
                    stopping = all_reduce_max(stopping, device)
                elif dist_info.enabled:
                    stopping = False
                if log_now or stopping:
                    losses = torch.stack(window)
                    if not torch.isfinite(losses).all():
                        bad = step - len(window) + int((~torch.isfinite(losses).all(1)).nonzero()[0]) + 1
                        last = ckpt_io.list_checkpoints(t_cfg.out_dir)
                        bad_lr = lr_at(bad - 1, total_steps, base_lr, warmup_steps, o_cfg.min_lr)
                        raise NonFiniteLossError(
                            f"loss became non-finite at step {bad} (lr {bad_lr:g}); stopping. The last good "
                            f"checkpoint is {last[-1] if last else 'none (no checkpoint was written yet)'}. "
                            f"Try a lower optim.lr, precision=fp32, or a longer optim.warmup_epochs.")
                    mean = losses.mean(0).tolist()
                    dt = time.perf_counter() - t_window
                    ips = len(window) * o_cfg.batch_size / max(dt, 1e-9)
                    rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": mean[0],
                           "loss_single": mean[1], "loss_dense": mean[2], "lr": lr, "lambda": lam,
                           "img_per_s": ips, "data_skipped": skipped_before + loader.skipped}
                    if knn_now:  # after img_per_s's clock: the monitor's time is not the step's
                        rec.update(monitor.run(model))
                    log.write(rec)
                    pbar.set_postfix(loss=f"{mean[0]:.4f}", lr=f"{lr:.3g}", img_s=f"{ips:.0f}",
                                     **(monitor.postfix() if monitor else {}), refresh=False)
                    window, t_window = [], time.perf_counter()
                pbar.update(1)
                if want_ckpt or hit_max or stopping:
                    last_path = save("signal" if stopping else "max_steps" if hit_max else "periodic")
                if stopping:
                    # A rank may stop because another rank got the signal: name what this one knows.
                    status = (f"stopped by {signal.Signals(stop['signal']).name}" if stop["signal"] is not None
                              else "stopped by a signal to another rank")
                    break
                if hit_max:
                    status = "max_steps"
                    break
            if status != "finished":
                break
    finally:
        pbar.close()
        log.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        cleanup()

    skipped = skipped_before + loader.skipped
    if skipped:
        say(f"{skipped} unreadable image(s) were skipped (see the warnings above; metrics.jsonl 'data_skipped')")
    if status != "finished":
        say(f"{status} at step {step}; checkpoint {last_path}; continue with --resume auto")
    return {"status": status, "step": step, "total_steps": total_steps, "checkpoint": last_path,
            "out_dir": t_cfg.out_dir, "data_skipped": skipped}


def check_resume_point(ck: dict, path: str, steps_per_epoch: int, total_steps: int, num_samples,
                       world_size: int, batch_size: int, warn) -> None:
    """A checkpoint's step means (epoch, step in epoch) only for the steps per epoch it was written
    with: a different count (data set size, global batch) is an error, not a silent reinterpretation."""
    step = ck["step"]
    saved_spe = ck.get("steps_per_epoch")
    if saved_spe is None and ck.get("epoch"):  # written before steps_per_epoch was stored
        saved_spe = (step - ck.get("step_in_epoch", 0)) // ck["epoch"]
    if saved_spe is not None and saved_spe != steps_per_epoch:
        raise ckpt_io.CheckpointError(
            f"checkpoint {path} was written with {saved_spe} steps per epoch (at epoch {step // saved_spe}, "
            f"step {step % saved_spe} of {saved_spe}); this data set and optim.batch_size={batch_size} give "
            f"{steps_per_epoch}, so its position cannot be continued. Resume with the same data set and batch, "
            f"or start a new run in another train.out_dir")
    if step > total_steps:
        raise ckpt_io.CheckpointError(
            f"checkpoint {path} is at step {step}, past the end of this run ({total_steps} steps); "
            f"raise optim.epochs, or start a new run in another train.out_dir")
    saved_n = ck.get("num_samples")
    if saved_n is not None and num_samples is not None and saved_n != num_samples:
        warn(f"checkpoint {path} was written with {saved_n} images, the data set now has {num_samples}: same "
             f"steps per epoch, but the order of the rest of the epoch differs from the interrupted run")
    saved_world = ck.get("world_size", len(ck["shuffle_rng"]))
    if saved_world != world_size:
        warn(f"checkpoint {path} was written by {saved_world} process(es), resuming on {world_size}: the "
             f"data shards and key-shuffle streams differ, so the run continues correctly but does not "
             f"reproduce the uninterrupted one")


def gather_objects(obj) -> list:
    """`obj` of every rank, in rank order (one process: [obj])."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_shuffle_states(model: DenseCL, device: torch.device) -> list:
    """The key-shuffle RNG state of every rank (each rank shuffles with its own stream)."""
    return gather_objects(model.shuffle_generator(device).get_state())
