"""The throughput probe: a short timed run of the pretraining CLI in a child process with the run's exact
settings, kept to its share of a time budget; its measurements make the plan, and a probe that did not
finish is one line saying why."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import time

from .errors import RunFailed, Stopped, UsageError
from ..recipe import RECIPE_EPOCHS
from .plan import fmt_duration, plan_for_budget, parse_budget
from ..metrics import read_metrics, read_metrics_so_far
from .runs import child_env, load_cfg, pretrain_command, run_cfg_overrides

PROBE_WARMUP = 3                   # first steps of the probe not timed (allocator, workers, compile)
PROBE_SHARE = 0.25                 # of a time budget, the most the throughput probe(s) may take
MIN_TIME_BUDGET = 60.0             # seconds: less cannot hold a probe in its share and an epoch after it


def probe(args, t_start: float) -> dict:
    """A short timed run with the run's exact settings; -> the plan (also printed)."""
    from ..checkpoint import (checkpoint_kind, checkpoint_step, list_checkpoints, load_checkpoint, read_checkpoint_meta,
                              remove_path)
    budget = parse_budget(args.budget)
    runs = (2 if args.baseline else 1) * args.seeds
    base = load_cfg(args, run_cfg_overrides(args, os.path.join(args.out, "probe")))
    # A time budget bounds the probe(s): past their share the plan could not keep to the budget anyway.
    deadline = t_start + PROBE_SHARE * budget["seconds"] if budget["kind"] == "time" else None

    def timed(nproc: int, name: str, extra=()) -> dict:
        d = os.path.join(args.out, name)
        shutil.rmtree(d, ignore_errors=True)  # an interrupted probe is simply redone
        n = PROBE_WARMUP + args.probe_steps
        ov = run_cfg_overrides(args, d, [f"optim.max_steps={n}", "train.log_every=1", "train.tensorboard=false",
                                         "train.progress=false", f"train.ckpt_every_epochs={RECIPE_EPOCHS}",
                                         "train.keep_last=1", *extra])
        batch = base.optim.batch_size  # global batch: what img_per_s in metrics.jsonl counts
        for e in extra:
            if e.startswith("optim.batch_size="):
                batch = int(e.split("=", 1)[1])
        print(f"plan: timing {n} steps ({PROBE_WARMUP} warm-up) on {nproc} process(es) into {d} ...", flush=True)
        # A child process: one the out-of-memory killer ends is reported here, in one line. Its lines
        # (the trainer's banner, "max_steps at step N ... continue with --resume auto") would read as
        # advice about the reproduction: they go to the probe's log.
        log_path = os.path.join(args.out, f"{name}.log")
        env = child_env()
        if args.nproc > 1:  # torchrun sets OMP_NUM_THREADS=1 for the ranks only when it starts several: match it
            env.setdefault("OMP_NUM_THREADS", "1")
        t0 = time.time()
        rc, wall, stopped_by = run_child(probe_command(args, ov, nproc), env, log_path, deadline)
        if stopped_by and rc != 0:  # a signal before the trainer's handler (or torchrun's own exit status)
            raise Stopped(f"the throughput probe was stopped by {stopped_by} before it finished")
        if rc != 0:
            raise probe_failure(rc, wall, log_path, step_records_so_far(d), n=n, batch=batch, cfg=base,
                                budget=budget, t_probe=t0, t_start=t_start, runs=runs,
                                second_probe=nproc > 1)
        recs = read_metrics(d)
        ckpts = list_checkpoints(d)
        if not ckpts:
            raise UsageError(f"the throughput probe in {d} wrote no checkpoint")
        got = checkpoint_step(ckpts[-1])
        if got < n:  # SIGTERM/SIGINT: the trainer checkpointed and returned early; do not plan on it
            raise Stopped(f"the throughput probe was stopped at step {got} of {n}")
        timed_recs = [r for r in recs if r["step"] > PROBE_WARMUP]
        if not timed_recs:
            raise UsageError(f"the throughput probe in {d} logged no timed step (is the data set smaller than "
                             f"{n} batches in total?)")
        step_s = statistics.median(batch / r["img_per_s"] for r in timed_recs)
        steps_total = sum(batch / r["img_per_s"] for r in recs)
        # a file checkpoint whole (unverified: the probe's own, just written); a folder's meta.pt holds the same
        last = ckpts[-1]
        meta = load_checkpoint(last, verify=False) if checkpoint_kind(last) == "pt" else read_checkpoint_meta(last)
        info = {"step_s": step_s, "startup_s": max(0.0, wall - steps_total), "wall_s": wall, "batch": batch,
                "steps_per_epoch": int(meta["steps_per_epoch"]), "num_images": int(meta.get("num_samples") or 0),
                "timed_steps": len(timed_recs)}
        del meta
        for p in ckpts:  # full model + queues: not needed any more
            remove_path(p)
        return info

    main = timed(args.nproc, "probe")
    single_ips = None
    if args.nproc > 1:  # the scaling: one process at the per-process batch
        per = base.optim.batch_size // args.nproc
        one = timed(1, "probe_1proc", [f"optim.batch_size={per}"])
        single_ips = per / one["step_s"]
    device = "cuda" if _cuda_used(base) else "cpu"
    num_images = main["num_images"] or main["steps_per_epoch"] * base.optim.batch_size
    plan = plan_for_budget(budget, step_s=main["step_s"], steps_per_epoch=main["steps_per_epoch"],
                           num_images=num_images, global_batch=base.optim.batch_size, startup_s=main["startup_s"],
                           runs=runs, spent_s=time.time() - t_start, nproc=args.nproc, device=device,
                           single_ips=single_ips)
    plan["probe"] = main
    plan["seeds"] = args.seeds
    plan["config"] = {"preset": args.config, "arch": base.model.arch, "image_size": base.data.image_size,
                      "precision": base.train.precision, "compile": base.train.compile, "kernels": base.train.kernels,
                      "backend": base.data.backend, "batch_size": base.optim.batch_size,
                      "lr_per_256": base.optim.lr, "loss_lambda": base.model.loss_lambda}
    return plan


def probe_command(args, overrides: list[str], nproc: int) -> list[str]:
    """The probe's child: the pretraining CLI as the pretraining runs start it (in this process's
    interpreter when the reproduction runs one process; torchrun when it runs several, also for the
    one-process scaling probe: the same launcher and environment as the ranks, so the measured
    efficiency compares like with like)."""
    return pretrain_command(args.config, overrides, None if args.nproc == 1 else nproc)


def run_child(cmd: list[str], env: dict, log_path: str,
              deadline: float | None) -> tuple[int | None, float, str | None]:
    """Run `cmd` (stdout and stderr into `log_path`; SIGTERM/SIGINT to this process passed on) ->
    (exit status, negative for a signal, None when `deadline` came first and its whole process group
    was killed; seconds; the name of the signal passed on, if one was)."""
    t0 = time.time()
    passed = []

    def pass_on(signum, _frame):
        passed.append(signal.Signals(signum).name)
        proc.send_signal(signum)

    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        # its own process group, so that a probe past its deadline goes with every process it started
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        old = {s: signal.signal(s, pass_on) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while True:
                left = None if deadline is None else deadline - time.time()
                if left is not None and left <= 0 and not passed:
                    _kill_group(proc)
                    return None, time.time() - t0, None
                try:
                    rc = proc.wait(timeout=None if left is None or passed else max(0.01, min(left, 1.0)))
                    return rc, time.time() - t0, (passed[0] if passed else None)
                except subprocess.TimeoutExpired:
                    pass
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _kill_group(proc) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def step_records_so_far(run_dir: str) -> list[dict]:
    """The timed step records of a run that was killed (its metrics.jsonl's last line may be cut off)."""
    return [r for r in read_metrics_so_far(run_dir)
            if isinstance(r.get("img_per_s"), (int, float)) and r["img_per_s"] > 0]


def _last_error_line(log_path: str) -> str | None:
    with contextlib.suppress(OSError), open(log_path, errors="replace") as f:
        lines = [line.strip() for line in f if line.startswith("error: ")]
        return lines[-1][len("error: "):] if lines else None
    return None


def probe_failure(rc: int | None, wall: float, log_path: str, recs: list[dict], *, n: int, batch: int, cfg,
                  budget: dict, t_probe: float, t_start: float, runs: int, second_probe: bool) -> Exception:
    """The one-line error of a probe that did not finish: past its share of the budget (rc None), killed
    by a signal, refused its input (exit status 2) or failed."""
    done = f"{len(recs)} of {n} steps done" if recs else "before its first step"
    if rc is None:
        share = PROBE_SHARE * budget["seconds"]
        if not recs:  # nothing measured: only a lower bound
            low = (time.time() - t_start) / PROBE_SHARE
            return UsageError(
                f"--budget {budget['text']}: the throughput probe had not finished one step after "
                f"{fmt_duration(wall)}, its {PROBE_SHARE:.0%} share of the budget ({fmt_duration(share)}); the budget "
                f"must be well over ~{fmt_duration(low)} (try ~{fmt_duration(2 * low)}), or give one in epochs "
                f"(e.g. 1ep: the plan then says how long an epoch takes)")
        step_s = statistics.median(batch / r["img_per_s"] for r in recs)
        startup = max(0.0, wall - sum(batch / r["img_per_s"] for r in recs))
        probe_s = (t_probe - t_start) + wall + (n - len(recs)) * step_s
        if second_probe:  # the one-process scaling probe comes after this one
            probe_s += startup + n * step_s
        last = recs[-1]
        spe = last["step"] / last["epoch"] if last.get("epoch") else None  # "epoch" is step / steps per epoch
        epoch_s = spe * step_s if spe else 0.0
        need = max(probe_s / PROBE_SHARE, probe_s + runs * (startup + epoch_s))
        return UsageError(
            f"--budget {budget['text']}: the throughput probe would take ~{fmt_duration(probe_s)} ({done} in "
            f"{fmt_duration(wall)}, ~{step_s:.2f} s/step), more than its {PROBE_SHARE:.0%} share of the budget "
            f"({fmt_duration(share)}); give at least ~{fmt_duration(need * 1.1)}, fewer --probe-steps, or a "
            f"budget in epochs (e.g. 1ep)")
    sig = -rc if rc < 0 else _signal_in_log(log_path) if rc != 2 else None
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown"
        if sig == signal.SIGKILL:
            gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
            fix = "lower optim.batch_size (the lr follows it; model.queue_len must stay a multiple of it)"
            fix += ", fewer data.num_workers" if cfg.data.num_workers else ""
            fix += "" if _cuda_used(cfg) else " or run on a GPU"
            return UsageError(
                f"the throughput probe was killed by signal 9 (SIGKILL) after {fmt_duration(wall)}, {done}: almost "
                f"always the out-of-memory killer (a batch of {batch} {cfg.model.arch} images at {cfg.data.image_size} "
                f"px on a machine with {gib:.0f} GiB); {fix}; its log: {log_path}")
        return UsageError(f"the throughput probe died of signal {sig} ({name}) after {fmt_duration(wall)}, {done}; "
                          f"its log: {log_path}")
    line = _last_error_line(log_path)
    if rc == 2:
        return UsageError(line or f"the throughput probe refused its input (exit status 2); its log: {log_path}")
    return RunFailed(f"the throughput probe failed (exit status {rc}){': ' + line if line else ''}; "
                     f"its log: {log_path}")


def _signal_in_log(log_path: str) -> int | None:
    """The signal that ended a rank, from torchrun's failure summary ("exitcode  : -9")."""
    with contextlib.suppress(OSError), open(log_path, errors="replace") as f:
        m = re.findall(r"exitcode\s*:\s*-(\d+)", f.read())
        return int(m[0]) if m else None
    return None


def _cuda_used(cfg) -> bool:
    import torch
    return torch.cuda.is_available() and cfg.train.device != "cpu"
