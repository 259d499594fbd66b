"""The DenseCL training loop, readable top to bottom (after nanoGPT's train.py).

    summary = train(load_config("smoke"))

Order of business: processes, device and engine -> data (fails early on bad data) -> model,
engine set-up (torch.compile and DDP/FSDP/DeepSpeed applied in place, optimizer) -> resume -> the
loop (lr, λ, step, log, checkpoint, signals). Beside it: the run directory's lock and resume point
(run_dir.py), metrics.jsonl (metrics.py), the step itself (engines.train_step), checkpoint files
(checkpoint/).
"""
from __future__ import annotations

import math
import os
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from tqdm import tqdm

from . import kernels

from . import checkpoint
from .config import Config, ConfigError, check_environment, config_to_dict, scaled_lr, to_yaml
from .data import DataError, build_loader, resolve_backend
from .distributed import DistInfo, all_reduce_max, cleanup, gather_objects, init_distributed
from .engines import Engine, build_engine, train_step
from .engines.compiling import CompileCache, CompileSettings
from .metrics import MetricsLog, warn
from .model import DenseCL
from .monitor import KnnMonitor
from .run_dir import check_resume_point, lock_run_dir, read_resume_point
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


def train(cfg: Config) -> dict:
    """Run (or continue) the pretraining of `cfg`; returns a summary. The run directory's lock is
    held, and the loader's worker processes live, until it returns or raises: whatever fails, the
    workers are shut down before it raises (a worker left running blocks the interpreter's exit)."""
    held = ExitStack()  # closed last-in first-out: the workers end before the lock is released
    try:
        return _train(cfg, held)
    finally:
        try:
            held.close()
        finally:
            cleanup()


def _train(cfg: Config, held: ExitStack) -> dict:
    t_cfg = cfg.train
    # Machine- and launch-dependent checks (CUDA, precision, kernels, batch per process vs BN groups)
    # come first: a bad value is a one-line error before any process group, data or model.
    world_size = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    check_environment(cfg, world_size=world_size)
    dist_info, device = init_distributed(t_cfg.device)
    say = (lambda *a: print(*a, flush=True)) if dist_info.is_main else (lambda *a: None)
    precision = resolve_precision(t_cfg.precision, device)
    engine = build_engine(cfg, dist_info, device, precision)  # engine problems: one line, before anything else
    say(f"engine {engine.describe()}")

    # ---- run directory and resume point: checked, locked and read before any data or model ----
    resume_path, meta = read_resume_point(cfg, engine)
    held.enter_context(lock_run_dir(t_cfg.out_dir, resume_path, dist_info, device, say))
    per_rank_batch = per_rank_batch_size(cfg.optim.batch_size, dist_info.world_size)
    apply_global_settings(t_cfg, device)
    init_from = None if resume_path else t_cfg.init_from  # a resumed run takes its weights from the checkpoint
    if init_from:
        check_init_from(init_from, cfg.model.arch)

    # ---- data: every data problem is reported before a model is built --------------------------
    loader, steps_per_epoch = build_data(cfg, dist_info, device, precision, per_rank_batch)
    held.callback(loader.close)
    monitor = KnnMonitor.build(cfg, device, dist_info)  # train.knn_data: checked here, with the data

    # ---- model, engine set-up (compile, wrapping, optimizer) --------------------------------------
    model = build_model(cfg, dist_info, device, init_from, say)
    base_lr = scaled_lr(cfg.optim)
    compile_settings, compile_cache = set_up_engine(cfg, engine, model, device, precision, per_rank_batch, base_lr,
                                        dist_info.is_main, say)
    model.train()
    run = Run(cfg=cfg, dist_info=dist_info, device=device, precision=precision, engine=engine, loader=loader,
              model=model, monitor=monitor, compile_settings=compile_settings, compile_cache=compile_cache,
              steps_per_epoch=steps_per_epoch, total_steps=cfg.optim.epochs * steps_per_epoch, base_lr=base_lr,
              warmup_steps=int(cfg.optim.warmup_epochs * steps_per_epoch))

    # ---- resume ------------------------------------------------------------------------------------
    if resume_path:
        resume(run, meta, resume_path, say)
    else:
        if t_cfg.resume == "auto":
            say(f"--resume auto: no checkpoint in {checkpoint.checkpoint_dir(t_cfg.out_dir)}, starting fresh")
        # From here on every rank draws its own random numbers (the model was initialised identically).
        torch.manual_seed(t_cfg.seed + dist_info.rank)

    # ---- run directory (checked and locked at the start) ---------------------------------------------
    if dist_info.is_main:
        with open(os.path.join(t_cfg.out_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
    log = MetricsLog(t_cfg.out_dir, dist_info.is_main, t_cfg.tensorboard)
    say(run.describe())
    stale = stale_key_share(cfg.model.queue_len, cfg.optim.batch_size, run.steps_per_epoch)
    if stale > 0.1 and dist_info.is_main:
        warn(f"model.queue_len={cfg.model.queue_len} is {cfg.model.queue_len / (cfg.optim.batch_size * run.steps_per_epoch):.0%} "
             f"of an epoch's {cfg.optim.batch_size * run.steps_per_epoch} images: ~{stale:.0%} of the images meet their "
             f"own key from the previous epoch in the queue, as a negative (a false negative that grows as the "
             f"encoder learns; the loss can rise). Keep K under ~40% of the images per epoch")

    status, last_path = run_loop(run, log)

    skipped = run.skipped()
    if skipped:
        say(f"{skipped} unreadable image(s) were skipped (see the warnings above; metrics.jsonl 'data_skipped')")
    if status != "finished":
        say(f"{status} at step {run.step}; checkpoint {last_path}; continue with --resume auto")
    return {"status": status, "step": run.step, "total_steps": run.total_steps, "checkpoint": last_path,
            "out_dir": t_cfg.out_dir, "data_skipped": skipped}


# ---- checks ---------------------------------------------------------------------

def per_rank_batch_size(batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        raise ValueError(f"optim.batch_size={batch_size} is not divisible by {world_size} processes")
    return batch_size // world_size


def apply_global_settings(t_cfg, device: torch.device) -> None:
    """Process-wide switches the run's config sets: deterministic algorithms, cuDNN autotuning and
    the kernel backend (torch and kernels keep them in module state)."""
    if t_cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark_for(t_cfg, device)
    kernels.set_backend(t_cfg.kernels)


def check_init_from(path: str, arch: str) -> None:
    """An unreadable or odd train.init_from file: one line before the data set is listed. The file is
    read again into the model by build_model, which checks how it fits the model's widths."""
    try:
        read_weights(path, arch)
    except WeightsError as e:
        raise checkpoint.CheckpointError(f"train.init_from: {e}") from e


# ---- data and model -------------------------------------------------------------------------------

def build_data(cfg: Config, dist_info: DistInfo, device: torch.device, precision: str,
               per_rank_batch: int) -> tuple[Any, int]:
    """This rank's loader and the steps per epoch; raises DataError for any data problem."""
    loader = build_loader(cfg.data, batch_size=per_rank_batch, rank=dist_info.rank,
                          world_size=dist_info.world_size, device=device, seed=cfg.train.seed,
                          channels_last=cfg.train.channels_last,
                          dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
                          if device.type == "cuda" else torch.float32)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise DataError(f"the data set is smaller than one global batch of {cfg.optim.batch_size} images")
    return loader, steps_per_epoch


def build_model(cfg: Config, dist_info: DistInfo, device: torch.device, init_from: str | None, say) -> DenseCL:
    """The model on `device`, initialised from train.seed (the same on every rank: identical initial
    weights and queues) or from `init_from`'s weights (a new run: step 0, fresh optimizer)."""
    torch.manual_seed(cfg.train.seed)
    model = DenseCL(cfg.model)
    # Rank 0's key-shuffle stream draws the cross-rank permutation (model.bn=shuffle); the others
    # draw their own permutations with model.bn=group.
    model.shuffle_seed = cfg.train.seed * 1000 + dist_info.rank
    if dist_info.enabled and cfg.model.bn == "sync":  # a departure from the recipe (global-batch BN)
        model.encoder_q = nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_q)
        model.encoder_k = nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_k)
    if init_from:
        try:  # before the engine shards or wraps anything: plain tensors, every rank the same
            report = load_into_model(model, init_from)
        except WeightsError as e:
            raise checkpoint.CheckpointError(f"train.init_from: {e}") from e
        say(f"initialised from {report}")
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def set_up_engine(cfg: Config, engine: Engine, model: DenseCL, device: torch.device, precision: str,
                  per_rank_batch: int, base_lr: float, main: bool,
                  say) -> tuple[CompileSettings | None, CompileCache | None]:
    """In place: torch.compile (per block), then the engine's DDP/FSDP/DeepSpeed wrapping; builds the
    optimizer. Returns the compile settings (None: eager) and the compile cache (None: none kept)."""
    t_cfg = cfg.train
    compile_settings = CompileSettings.from_config(t_cfg)
    engine.setup(model, cfg.optim, base_lr, compile=compile_settings)
    compile_cache = None
    if compile_settings is not None and t_cfg.compile_cache:  # warm start: the artifacts of an earlier run of this key
        compile_cache = CompileCache.for_run(cfg, device, precision, per_rank_batch, compile_settings,
                                             kernels.active_backend(device), checkpoint.checkpoint_dir(t_cfg.out_dir),
                                             main, warn if main else (lambda m: None))
        if compile_cache.load() is not None:
            say(f"compile cache: loaded {compile_cache.loaded_from}")
    return compile_settings, compile_cache


@dataclass
class Run:
    """What the loop works with, once set up; `step` and `skipped_before` are where it stands."""
    cfg: Config
    dist_info: DistInfo
    device: torch.device
    precision: str
    engine: Engine
    loader: Any
    model: DenseCL
    monitor: KnnMonitor | None
    compile_settings: CompileSettings | None
    compile_cache: CompileCache | None
    steps_per_epoch: int
    total_steps: int
    base_lr: float
    warmup_steps: int
    step: int = 0
    skipped_before: int = 0  # images skipped before the checkpoint this run resumed from

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.base_lr, self.warmup_steps, self.cfg.optim.min_lr)

    def loss_lambda(self, step: int) -> float:
        return 0.0 if step < self.cfg.model.dense_warmup_iters else self.cfg.model.loss_lambda

    def skipped(self) -> int:
        return self.skipped_before + self.loader.skipped

    def describe(self) -> str:
        """The run's one-line banner."""
        cfg, dist_info, compiled, device = self.cfg, self.dist_info, self.compile_settings, self.device
        return (f"DenseCL {cfg.model.arch} | {cfg.name} | engine {self.engine.name} | device {device} "
                f"x{dist_info.world_size} | {self.precision} | bn {cfg.model.bn if dist_info.enabled else 'group'} | "
                f"data {resolve_backend(cfg.data, device)} | kernels {kernels.active_backend(device)} | "
                f"compile {f'{compiled.scope} ({compiled.mode})' if compiled else False} | "
                f"batch {cfg.optim.batch_size} | lr {self.base_lr:g} | {self.steps_per_epoch} steps/epoch, "
                f"{self.total_steps} total")


def stale_key_share(queue_len: int, global_batch: int, steps_per_epoch: int) -> float:
    """Expected share of an epoch's images whose own key from the previous epoch is still in the queue
    when they come again. The queue holds the last q = K / B batches; an image's previous key is
    S + p - p' batches old (S batches per epoch; p, p' its uniform positions in the two epochs), so the
    share is P(p' - p > S - q): (q / S)^2 / 2 up to q = S, 1 - (2 - q / S)^2 / 2 up to q = 2S, then 1."""
    if steps_per_epoch <= 0 or global_batch <= 0:
        return 0.0
    r = queue_len / global_batch / steps_per_epoch
    return r * r / 2 if r <= 1 else 1 - (2 - r) ** 2 / 2 if r < 2 else 1.0


# ---- resume ---------------------------------------------------------------------------------------

def resume(run: Run, meta: dict, path: str, say) -> None:
    """Load checkpoint `path` (metadata `meta`, read at the start) into the set-up model and engine and
    continue its RNG streams; sets run.step and run.skipped_before."""
    dist_info = run.dist_info
    check_resume_point(meta, path, run.steps_per_epoch, run.total_steps, getattr(run.loader, "num_samples", None),
                       dist_info.world_size, run.cfg.optim.batch_size, warn if dist_info.is_main else (lambda m: None))
    run.engine.load(path, meta)  # model (both encoders, queues, pointer), optimizer, scaler
    try:
        # Every rank's own RNG states when the run had as many ranks, else rank 0's for all.
        rngs = meta["rngs"]
        own = rngs[dist_info.rank] if len(rngs) == dist_info.world_size else rngs[0]
        checkpoint.set_rng_state(own)
        run.model.shuffle_generator(run.device).set_state(meta["shuffle_rng"][dist_info.rank % len(meta["shuffle_rng"])])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError, ZeroDivisionError) as e:
        raise checkpoint.CheckpointError(f"checkpoint {path} has a malformed RNG state: "
                                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    run.step, run.skipped_before = meta["step"], meta.get("data_skipped", 0)
    spe = run.steps_per_epoch
    say(f"resumed from {path} at step {run.step} (epoch {run.step // spe}, step {run.step % spe} of {spe})")



# ---- the loop -------------------------------------------------------------------------------------

def run_loop(run: Run, log: MetricsLog) -> tuple[str, str | None]:
    """Train from run.step to the end (or max_steps, or a signal); returns (status, last checkpoint)."""
    t_cfg = run.cfg.train
    main = run.dist_info.is_main
    stop = StopFlag()
    pbar = tqdm(total=run.total_steps, initial=run.step, disable=not (main and t_cfg.progress), unit="step",
                dynamic_ncols=True, desc="pretrain")
    status, window, last_path = "finished", LossWindow(), None
    try:
        while run.step < run.total_steps:
            epoch, start = divmod(run.step, run.steps_per_epoch)
            run.loader.set_epoch(epoch, start_step=start)
            for im_q, im_k in run.loader:
                lr, lam = run.lr(run.step), run.loss_lambda(run.step)
                out = train_step(run.model, run.engine, im_q, im_k, lr, lam)
                run.step += 1
                if run.compile_cache is not None and not run.compile_cache.saved:  # the first step compiled everything
                    run.compile_cache.save()
                window.add(out)

                due = what_is_due(run)
                stopping = agree_to_stop(stop.signum is not None, due.log, run.dist_info, run.device)
                if due.log or stopping:
                    rec = window.record(run, lr, lam)
                    if due.knn:  # after img_per_s's clock: the monitor's time is not the step's
                        rec.update(run.monitor.run(run.model))
                    log.write(rec)
                    pbar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.3g}", img_s=f"{rec['img_per_s']:.0f}",
                                     **(run.monitor.postfix() if run.monitor else {}), refresh=False)
                    window.reset()
                pbar.update(1)
                if due.checkpoint or due.max_steps or stopping:
                    last_path = save_checkpoint(run, "signal" if stopping else "max_steps" if due.max_steps
                                                else "periodic")
                if stopping:
                    # A rank may stop because another rank got the signal: name what this one knows.
                    status = (f"stopped by {signal.Signals(stop.signum).name}" if stop.signum is not None
                              else "stopped by a signal to another rank")
                    break
                if due.max_steps:
                    status = "max_steps"
                    break
            if status != "finished":
                break
    finally:
        pbar.close()
        log.close()
        stop.restore()
        cleanup()
    return status, last_path


class StopFlag:
    """SIGTERM and SIGINT only note the signal (installed on construction, until restore()): the loop
    stops at the end of a step, with a checkpoint, instead of dying mid-step."""

    def __init__(self):
        self.signum = None
        self.old_handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(self, signum, _frame):
        self.signum = signum

    def restore(self):
        for s, h in self.old_handlers.items():
            signal.signal(s, h)


class Due(NamedTuple):
    """What the step just taken ends with."""
    checkpoint: bool
    max_steps: bool
    knn: bool
    log: bool


def what_is_due(run: Run) -> Due:
    step, spe, t_cfg = run.step, run.steps_per_epoch, run.cfg.train
    boundary = step % spe == 0
    want_ckpt = ((boundary and (step // spe) % t_cfg.ckpt_every_epochs == 0)
                 or (t_cfg.ckpt_every_steps and step % t_cfg.ckpt_every_steps == 0)
                 or step == run.total_steps)
    hit_max = bool(run.cfg.optim.max_steps) and step >= run.cfg.optim.max_steps
    knn_now = run.monitor is not None and run.monitor.due(step, spe)  # same on every rank
    log_now = step % t_cfg.log_every == 0 or want_ckpt or hit_max or knn_now
    return Due(checkpoint=bool(want_ckpt), max_steps=hit_max, knn=knn_now, log=bool(log_now))


def agree_to_stop(signalled: bool, at_sync: bool, dist_info: DistInfo, device: torch.device) -> bool:
    """All ranks stop at the same step (they checkpoint together). A distributed run agrees on
    stopping only at syncs that happen anyway (log steps); between them it goes on."""
    if not dist_info.enabled:
        return signalled
    return all_reduce_max(signalled, device) if at_sync else False


class LossWindow:
    """The losses of the steps since the last log line."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.losses, self.t0 = [], time.perf_counter()

    def add(self, out: dict):
        # Losses stay on the device until the log step: no host sync on every iteration.
        self.losses.append(torch.stack([out["loss"].detach(), out["loss_single"].detach(),
                                        out["loss_dense"].detach()]).float())

    def record(self, run: Run, lr: float, lam: float) -> dict:
        """The metrics record for the window ending at run.step; raises NonFiniteLossError if any
        of its losses is not finite."""
        step, o_cfg = run.step, run.cfg.optim
        losses = torch.stack(self.losses)
        if not torch.isfinite(losses).all():
            bad = step - len(self.losses) + int((~torch.isfinite(losses).all(1)).nonzero()[0]) + 1
            last = checkpoint.list_checkpoints(run.cfg.train.out_dir)
            raise NonFiniteLossError(
                f"loss became non-finite at step {bad} (lr {run.lr(bad - 1):g}); stopping. The last good "
                f"checkpoint is {last[-1] if last else 'none (no checkpoint was written yet)'}. "
                f"Try a lower optim.lr, precision=fp32, or a longer optim.warmup_epochs.")
        mean = losses.mean(0).tolist()
        dt = time.perf_counter() - self.t0
        ips = len(self.losses) * o_cfg.batch_size / max(dt, 1e-9)
        return {"step": step, "epoch": round(step / run.steps_per_epoch, 4), "loss": mean[0],
                "loss_single": mean[1], "loss_dense": mean[2], "lr": lr, "lambda": lam,
                "img_per_s": ips, "data_skipped": run.skipped()}


def save_checkpoint(run: Run, reason: str) -> str | None:
    """A checkpoint at run.step (every rank takes part: RNG states are gathered); its path on rank 0."""
    step, spe = run.step, run.steps_per_epoch
    rngs = gather_objects(checkpoint.rng_state())
    extra = {"step": step, "epoch": step // spe, "step_in_epoch": step % spe,
             "rngs": rngs, "shuffle_rng": gather_shuffle_states(run.model, run.device),
             "config": config_to_dict(run.cfg), "data_skipped": run.skipped(), "reason": reason,
             "steps_per_epoch": spe, "world_size": run.dist_info.world_size,
             "batch_size": run.cfg.optim.batch_size, "num_samples": getattr(run.loader, "num_samples", None),
             "engine": run.engine.name}
    return run.engine.save(run.cfg.train.out_dir, step, extra, run.cfg.train.keep_last)


def gather_shuffle_states(model: DenseCL, device: torch.device) -> list:
    """The key-shuffle RNG state of every rank (each rank shuffles with its own stream)."""
    return gather_objects(model.shuffle_generator(device).get_state())
