"""Short-budget reproduction of the 200-epoch recipe: plan, pretrain, evaluate, report.

    python launch/reproduce.py --data /data/imagenet/train --val /data/imagenet/val --voc /data/VOCdevkit \
        --budget 8h --baseline --out runs/repro
    python launch/reproduce.py --data synthetic --config smoke --budget 3m --baseline --out runs/repro_cpu
    python launch/reproduce.py --out runs/repro --resume           # continue a stopped reproduction

Stages, each recorded in OUT/state.json when it completes (so `--resume` skips it):
  plan              a short timed run of the trainer with the exact run settings (OUT/probe/), the
                    schedule that fits the budget (the recipe with its cosine compressed to E epochs)
  pretrain:densecl  `train(cfg)` into OUT/densecl/ (resumed with train.resume=auto)
  pretrain:mocov2   with --baseline: the same model and schedule with model.loss_lambda=0 (OUT/mocov2/)
  export:RUN        torchvision / detectron2 / mmdet files of the final checkpoint (OUT/export/)
  eval:TRUNK:MODE   `python -m densecl_fast.eval` (knn; dense; svm + lowshot with --voc) of each run
                    and of the random-init trunk (OUT/eval/TRUNK/MODE.json)
  report            OUT/report.md, report.json, loss.png, throughput.png, eval.png

Only public entry points are used: `load_config`, `train`, launch/pretrain.py (the probe, in a child
process; every run under torchrun with --nproc > 1), the eval CLI, the export CLI, and the run
directories' metrics.jsonl and checkpoints.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

RECIPE_EPOCHS = 200                # the seed recipe's schedule length (what is projected)
IMAGENET_TRAIN_IMAGES = 1_281_167
ASSUMED_SCALING = 0.9              # multi-device efficiency when it was not measured (perf/ uses the same)
PROBE_WARMUP = 3                   # first steps of the probe not timed (allocator, workers, compile)
PROBE_SHARE = 0.25                 # of a time budget, the most the throughput probe(s) may take
MIN_TIME_BUDGET = 60.0             # seconds: less cannot hold a probe in its share and an epoch after it
EXPORT_FORMATS = (("torchvision", "pth"), ("detectron2", "pkl"), ("mmdet", "mm.pth"))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UsageError(ValueError):
    """Bad input: one line on stderr, exit status 2."""


class RunFailed(RuntimeError):
    """The input was fine but a run failed (non-finite loss, a failed checkpoint write): exit status 1."""


class Stopped(Exception):
    """A signal stopped a stage; the reproduction continues with --resume."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


# ---- budget and plan arithmetic (pure, tested) ---------------------------------------------------

_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_budget(text: str) -> dict:
    """'8h', '90m', '1h30m', '45s', '2d' -> {"kind": "time", "seconds": s}; '20ep' -> {"kind": "epochs", ...}."""
    s = str(text).strip().lower()
    m = re.fullmatch(r"(\d+)\s*(ep|epoch|epochs)", s)
    if m:
        n = int(m.group(1))
        if not 1 <= n <= RECIPE_EPOCHS:
            raise UsageError(f"--budget {text}: give 1 to {RECIPE_EPOCHS} epochs (the recipe's length)")
        return {"kind": "epochs", "epochs": n, "text": text}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])", s)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smhd])", "", s).strip():
        raise UsageError(f"--budget {text!r}: use a duration (8h, 90m, 1h30m, 45s) or epochs (20ep)")
    seconds = sum(float(v) * _TIME_UNITS[u] for v, u in parts)
    if not math.isfinite(seconds):  # hundreds of digits overflow a float
        raise UsageError(f"--budget {str(text)[:40]}{'...' if len(str(text)) > 40 else ''}: too large a number")
    if seconds <= 0:
        raise UsageError(f"--budget {text}: must be more than 0")
    return {"kind": "time", "seconds": seconds, "text": text}


def fmt_duration(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def make_plan(budget: dict, *, step_s: float, steps_per_epoch: int, num_images: int, global_batch: int,
              startup_s: float, runs: int, spent_s: float, nproc: int, device: str,
              single_ips: float | None = None, now: float | None = None) -> dict:
    """The schedule that fits `budget`, and the projections of the full recipe.

    step_s: measured seconds per training step (all `nproc` processes together, data included);
    startup_s: measured per-run overhead outside the steps (data listing, model build, final save);
    runs: pretraining runs sharing the budget (2 with --baseline: both get the same epochs);
    spent_s: seconds of the budget already used (the probe); single_ips: images/s of one process at
    the per-process batch, when it was measured (gives the multi-process scaling efficiency).
    """
    now = time.time() if now is None else now
    epoch_s = step_s * steps_per_epoch
    if budget["kind"] == "epochs":
        epochs, fits = budget["epochs"], None
    else:
        avail = budget["seconds"] - spent_s - runs * startup_s
        fits = int(avail // (runs * epoch_s)) if avail > 0 else 0
        if fits < 1:
            need = spent_s + runs * (startup_s + epoch_s)
            raise UsageError(
                f"--budget {budget['text']}: one epoch takes ~{fmt_duration(epoch_s)} per run ({runs} run(s), "
                f"~{fmt_duration(startup_s)} start-up each, {fmt_duration(spent_s)} already spent measuring), so "
                f"no full epoch fits; give at least ~{fmt_duration(need * 1.1)} or a budget in epochs (1ep)")
        epochs = min(fits, RECIPE_EPOCHS)
    run_s = startup_s + epochs * epoch_s
    ips = global_batch / step_s
    if nproc > 1 and single_ips:
        eff, eff_note = ips / (nproc * single_ips), f"measured: {nproc} processes vs one at the per-process batch"
        if eff > 1.05:  # superlinear scaling is a noisy probe (a shared machine, too few steps), not a fact
            eff_note += "; above 100%: a noisy measurement, rerun with more --probe-steps"
    else:
        eff, eff_note = ASSUMED_SCALING, "assumed (not measured here): give --nproc N to measure it"
    per_device = single_ips if (nproc > 1 and single_ips) else ips / nproc
    full_here = RECIPE_EPOCHS * epoch_s
    full_in1k = RECIPE_EPOCHS * IMAGENET_TRAIN_IMAGES / ips

    def on(n):  # the whole recipe over this data set on n devices of this kind
        return RECIPE_EPOCHS * num_images / (per_device * n * (eff if n > 1 else 1.0))

    return {
        "budget": budget, "epochs": epochs, "epochs_that_fit": fits, "steps_per_epoch": steps_per_epoch,
        "steps": epochs * steps_per_epoch, "runs": runs, "global_batch": global_batch, "num_images": num_images,
        "nproc": nproc, "device": device, "step_s": step_s, "images_per_s": ips, "images_per_s_per_device": per_device,
        "startup_s": startup_s, "epoch_s": epoch_s, "run_s": run_s, "pretrain_s": runs * run_s,
        "expected_finish": now + runs * run_s, "planned_at": now, "recipe_epochs": RECIPE_EPOCHS,
        "full_recipe_s_here": full_here, "full_recipe_s_in1k_here": full_in1k,
        "full_recipe_s_1_device": on(1), "full_recipe_s_8_devices": on(8),
        "scaling_efficiency": eff, "scaling_note": eff_note,
    }


def plan_lines(plan: dict) -> list[str]:
    p = plan
    fin = time.strftime("%Y-%m-%d %H:%M", time.localtime(p["expected_finish"]))
    if p.get("planned_at"):
        fin += time.strftime(" (planned %Y-%m-%d %H:%M)", time.localtime(p["planned_at"]))
    runs = "DenseCL and MoCo-v2 (λ = 0), one after the other" if p["runs"] == 2 else "DenseCL"
    return [
        f"plan: budget {p['budget']['text']} -> {p['epochs']} epoch(s) of the recipe, cosine compressed to them "
        f"({p['steps']} steps of {p['steps_per_epoch']} per epoch, global batch {p['global_batch']}); runs: {runs}",
        f"  measured: {p['images_per_s']:,.1f} images/s ({p['step_s']:.3f} s/step) on {p['nproc']} x {p['device']}, "
        f"start-up ~{fmt_duration(p['startup_s'])} per run; an epoch ~{fmt_duration(p['epoch_s'])}",
        f"  expected pretraining finish: {fin} (in {fmt_duration(p['pretrain_s'])}; evaluation comes after)",
        f"  the full {p['recipe_epochs']} epochs here: {fmt_duration(p['full_recipe_s_here'])} on this data set "
        f"({p['num_images']:,} images); ImageNet-1k at this speed: {fmt_duration(p['full_recipe_s_in1k_here'])}",
        f"  on 1 device: {fmt_duration(p['full_recipe_s_1_device'])}; on 8 such devices: "
        f"{fmt_duration(p['full_recipe_s_8_devices'])} (scaling {p['scaling_efficiency']:.0%}, {p['scaling_note']})",
    ]


# ---- state ------------------------------------------------------------------------------------------

class State:
    """OUT/state.json: the arguments, the plan, and the completed stages; written atomically."""

    def __init__(self, out: str):
        self.path = os.path.join(out, "state.json")
        self.data = {"version": 1, "args": {}, "plan": None, "stages": {}}
        if os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    self.data = json.load(f)
            except (OSError, ValueError) as e:
                raise UsageError(f"{self.path} is unreadable ({e}); move it away to start over") from None
            problem = state_problem(self.data)
            if problem:
                raise UsageError(f"{self.path} is not a reproduction's state: {problem}; repair it or move it "
                                 f"away to start over")

    def finished_any(self) -> bool:
        """Whether any stage finished: before that (a refused or stopped plan) nothing depends on the
        recorded arguments, so a corrected command may replace them."""
        return bool(self.data["stages"])

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def mark(self, stage: str, **info):
        self.data["stages"][stage] = {"finished": time.time(), **info}
        self.save()


_NUM = (int, float)
_PLAN_NUMBERS = ("epochs", "steps", "steps_per_epoch", "global_batch", "num_images", "nproc", "runs", "step_s",
                 "images_per_s", "startup_s", "epoch_s", "run_s", "pretrain_s", "expected_finish", "recipe_epochs",
                 "full_recipe_s_here", "full_recipe_s_in1k_here", "full_recipe_s_1_device",
                 "full_recipe_s_8_devices", "scaling_efficiency")
_ARG_TYPES = {"data": str, "val": str, "voc": str, "budget": str, "baseline": bool, "config": str, "nproc": int,
              "probe_steps": int, "eval_image_size": int, "eval_max_train": int, "eval_max_val": int,
              "eval_workers": int, "no_random": bool}
_STAGE_FIELDS = {"pretrain": ("checkpoint", str), "export": ("files", dict), "eval": ("json", str),
                 "report": ("files", list)}


def _kind(v) -> str:
    return "null" if v is None else {dict: "an object", list: "a list", str: "a string"}.get(type(v), type(v).__name__)


def state_problem(data) -> str | None:
    """What makes `data` (a parsed state.json) unusable, in words; None when it is usable. Checks every
    field the reproduction and its report read, so a damaged file is one line, not a traceback."""
    if not isinstance(data, dict):
        return f"it holds {_kind(data)}, not an object"
    args, stages, plan = data.get("args"), data.get("stages"), data.get("plan")
    if not isinstance(args, dict):
        return f"'args' is {_kind(args)}, not an object"
    for k, v in args.items():
        want = _ARG_TYPES.get(k)
        if want and v is not None and not (isinstance(v, want) and (want is bool or not isinstance(v, bool))):
            return f"args.{k} is {_kind(v)}"
    ov = args.get("overrides", [])
    if not isinstance(ov, list) or not all(isinstance(o, str) for o in ov):
        return "args.overrides is not a list of strings"
    if not isinstance(stages, dict):
        return f"'stages' is {_kind(stages)}, not an object"
    for name, info in stages.items():
        if not isinstance(info, dict):
            return f"stage {name!r} is {_kind(info)}, not an object"
        field = None if name.endswith(":partial") else _STAGE_FIELDS.get(name.split(":")[0])
        if field and not isinstance(info.get(field[0]), field[1]):
            return f"stage {name!r} has no {field[0]!r}"
    if "plan" in stages or plan is not None:
        if not isinstance(plan, dict):
            return f"the plan stage is marked done but 'plan' is {_kind(plan)}" if "plan" in stages \
                else f"'plan' is {_kind(plan)}"
        bad = [k for k in _PLAN_NUMBERS if not isinstance(plan.get(k), _NUM) or isinstance(plan.get(k), bool)]
        if bad:
            return f"plan.{bad[0]} is missing or not a number"
        if not isinstance(plan.get("budget"), dict) or not isinstance(plan["budget"].get("text"), str):
            return "plan.budget is not a budget"
        for k in ("config", "probe"):
            if not isinstance(plan.get(k), dict):
                return f"plan.{k} is {_kind(plan.get(k))}, not an object"
    return None


# ---- arguments ----------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python launch/reproduce.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="pretraining images: ImageNet train folder, .txt list, synthetic, fashion-mnist:ROOT")
    p.add_argument("--val", default="", help="kNN evaluation split (folder / list with labels); else the eval tool's split")
    p.add_argument("--voc", default="", help="Pascal VOC devkit: VOC07 SVM + low-shot, and the dense probe on its masks")
    p.add_argument("--budget", help="wall clock for planning + pretraining (8h, 90m, 1h30m) or epochs (20ep)")
    p.add_argument("--out", default="runs/reproduce", help="output folder (default runs/reproduce)")
    p.add_argument("--baseline", action="store_true", help="also MoCo-v2 (λ = 0) at the same budget")
    p.add_argument("--resume", action="store_true", help="continue the reproduction in --out where it stopped")
    p.add_argument("--config", default="densecl_r50_200e_in1k", help="preset or YAML (default: the seed recipe)")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) for pretraining: > 1 runs torchrun")
    p.add_argument("--probe-steps", type=int, default=10, help=f"timed steps of the throughput probe (after {PROBE_WARMUP} warm-up)")
    p.add_argument("--eval-image-size", type=int, default=0, help="eval image size (default: data.image_size)")
    p.add_argument("--eval-max-train", type=int, default=-1, help="kNN bank / probe training images (default: data.max_images)")
    p.add_argument("--eval-max-val", type=int, default=0, help="first N eval images (0 = all)")
    p.add_argument("--eval-workers", type=int, default=-1, help="eval data workers (default: data.num_workers)")
    p.add_argument("--no-random", action="store_true", help="skip the random-init trunk's evaluation")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (not optim.epochs: the budget sets it)")
    return p


RECORDED = ("data", "val", "voc", "budget", "baseline", "config", "nproc", "probe_steps", "eval_image_size",
            "eval_max_train", "eval_max_val", "eval_workers", "no_random")


def resolve_args(argv) -> tuple[argparse.Namespace, State]:
    """The arguments (with --resume: the recorded ones, updated by those given) and the state, recorded
    only after every input that can be checked without training was: a refused command leaves
    nothing behind that blocks its corrected form. A plan refused after the probe (a budget too
    small, a probe that died) leaves a state with no finished stage, which a new command into the
    same --out, or --resume with other arguments, replaces."""
    args = parser().parse_intermixed_args(argv)
    out = os.path.abspath(args.out)
    args.out = out
    state = State(out) if os.path.exists(os.path.join(out, "state.json")) else None
    replaced = []
    if args.resume:
        if state is None:
            raise UsageError(f"--resume: {out} holds no reproduction (no state.json); start one without --resume")
        rec = state.data["args"]
        defaults = parser().parse_args([])
        for k in RECORDED:  # given again: must agree (or, before any stage finished, replaces); left out: recorded
            given, recorded = getattr(args, k), rec.get(k, getattr(defaults, k))
            if given != getattr(defaults, k) and given != recorded:
                if state.finished_any():
                    raise UsageError(f"--resume: --{k.replace('_', '-')} {given} differs from the recorded "
                                     f"{recorded!r}; start a new reproduction in another --out instead")
                replaced.append(f"--{k.replace('_', '-')} {given} (recorded: {recorded!r})")
            else:
                setattr(args, k, recorded)
        # Later overrides win: e.g. `optim.max_steps=0` lifts a stop asked for before.
        args.overrides = list(rec.get("overrides", [])) + list(args.overrides)
    elif state is not None and state.finished_any():
        raise UsageError(f"--out {out} already holds a reproduction: add --resume to continue it, or choose another --out")
    check_inputs(args)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: {e.strerror or e}") from None
    if state is not None and not state.finished_any() and (replaced or not args.resume):
        what = ", ".join(replaced) if replaced else "this command's arguments"
        print(f"note: {state.path} had no finished stage (a refused or stopped plan): {what} replace the "
              f"recorded ones", flush=True)
    if state is None or not args.resume or replaced:
        state = state or State(out)
        state.data.update(args={k: getattr(args, k) for k in RECORDED} | {"overrides": list(args.overrides)},
                          plan=None, stages={})
        state.save()
    return args, state


def check_inputs(args) -> None:
    """Every check that needs no training: arguments, budget, overrides, --val/--voc, config, data source."""
    if not args.data:
        raise UsageError("--data is required (an ImageNet train folder, a .txt list, synthetic or fashion-mnist:ROOT)")
    if not args.budget:
        raise UsageError("--budget is required (e.g. 8h, 90m or 20ep)")
    budget = parse_budget(args.budget)
    if budget["kind"] == "time" and budget["seconds"] < MIN_TIME_BUDGET:
        raise UsageError(f"--budget {args.budget}: give at least {fmt_duration(MIN_TIME_BUDGET)}: the throughput "
                         f"probe (a process start, the data, the model, {PROBE_WARMUP} + --probe-steps steps) must "
                         f"fit in {PROBE_SHARE:.0%} of it and whole epochs in the rest; or a budget in epochs (1ep)")
    if args.nproc < 1 or args.probe_steps < 1:
        raise UsageError("--nproc and --probe-steps must be >= 1")
    for o in args.overrides:
        key = o.split("=", 1)[0].strip()
        if key in ("optim.epochs", "data.source", "train.out_dir", "train.resume"):
            raise UsageError(f"override {o!r}: {key} is set by the reproduction (--budget, --data, --out, --resume)")
    for v, name in ((args.val, "--val"), (args.voc, "--voc")):
        if v and not os.path.exists(v):
            raise UsageError(f"{name} {v}: no such folder or file")
    # Recorded absolute, so `--resume` works from another working directory.
    args.val, args.voc = (os.path.abspath(v) if v else v for v in (args.val, args.voc))
    from .data import DataError
    from .data.fashion_mnist import parse_source
    try:
        fmnist = parse_source(args.data)
    except DataError as e:
        raise UsageError(f"--data {args.data}: {e}") from None
    if fmnist and not os.path.isdir(fmnist[0]):
        raise UsageError(f"--data {args.data}: no such folder {fmnist[0]}")
    if args.data != "synthetic" and not fmnist and not any(c in args.data for c in "*?["):  # (DALI shard patterns)
        if not os.path.exists(os.path.expanduser(args.data)):
            raise UsageError(f"--data {args.data}: no such folder or file")
        args.data = os.path.abspath(os.path.expanduser(args.data))
    load_cfg(args, run_cfg_overrides(args, os.path.join(args.out, "probe")))  # the config, with every override


# ---- pretraining: in-process, or torchrun around launch/pretrain.py -------------------------------

def run_cfg_overrides(args, out_dir: str, extra=()) -> list[str]:
    return [f"data.source={args.data}", *args.overrides, f"train.out_dir={out_dir}", *extra]


def load_cfg(args, overrides):
    from .config import ConfigError, load_config
    try:
        return load_config(args.config, overrides)
    except ConfigError as e:
        raise UsageError(str(e)) from None


def run_training(args, overrides: list[str], nproc: int) -> dict:
    """One pretraining run; -> {"status", "step", "total_steps"} (read from the run directory for torchrun).
    In this process when the whole reproduction is one process; else under torchrun, so this process
    holds no GPU memory while the ranks train (it evaluates on the GPU afterwards). (The probes run
    through `probe_command` and `run_child`.)"""
    cfg = load_cfg(args, overrides)  # every config problem is a one-line error before anything starts
    if nproc == 1 and args.nproc == 1:
        from .checkpoint import CheckpointError, CheckpointWriteError
        from .data import DataError
        from .trainer import NonFiniteLossError, train
        try:
            return train(cfg)
        except (CheckpointWriteError, NonFiniteLossError) as e:
            raise RunFailed(f"{e} (continue with --resume once fixed)") from None
        except (DataError, CheckpointError) as e:
            raise UsageError(str(e)) from None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           os.path.join(REPO, "launch", "pretrain.py"), "--config", args.config, *overrides]
    print("  $ " + " ".join(cmd), flush=True)
    try:  # follow a redirect of sys.stdout when it is a real file
        sys.stdout.flush()
        out = sys.stdout if sys.stdout.fileno() >= 0 else None
    except (AttributeError, OSError, ValueError):
        out = None
    env = dict(os.environ)
    if nproc == 1:  # torchrun sets OMP_NUM_THREADS=1 for the ranks only when it starts several: match it
        env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen(cmd, stdout=out, env=env)
    # SIGTERM/SIGINT to this process alone are passed on: torchrun forwards them to every rank,
    # which checkpoints and exits; a signal to the whole group reaches torchrun directly anyway.
    old = {s: signal.signal(s, lambda signum, _f: proc.send_signal(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if rc == 2:
        raise UsageError(f"pretraining refused its input (launch/pretrain.py exit status 2; see the error above)")
    from .checkpoint import list_checkpoints
    ckpts = list_checkpoints(cfg.train.out_dir)
    step = int(re.search(r"ckpt_(\d+)\.pt$", ckpts[-1]).group(1)) if ckpts else 0
    return {"status": "finished" if rc == 0 else f"failed (exit status {rc})", "step": step, "total_steps": None}


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def probe(args, state: State, t_start: float) -> dict:
    """A short timed run with the run's exact settings; -> the plan (also printed)."""
    from .checkpoint import list_checkpoints, load_checkpoint
    budget = parse_budget(args.budget)
    runs = 2 if args.baseline else 1
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
        env = dict(os.environ)
        if args.nproc > 1:  # torchrun sets OMP_NUM_THREADS=1 for the ranks only when it starts several: match it
            env.setdefault("OMP_NUM_THREADS", "1")
        t0 = time.time()
        rc, wall, stopped_by = run_child(probe_command(args, ov, nproc), env, log_path, deadline)
        if stopped_by and rc != 0:  # a signal before the trainer's handler (or torchrun's own exit status)
            raise Stopped(f"the throughput probe was stopped by {stopped_by} before it finished")
        if rc != 0:
            raise probe_failure(rc, wall, log_path, read_metrics_so_far(d), n=n, batch=batch, cfg=base,
                                budget=budget, t_probe=t0, t_start=t_start, runs=runs,
                                second_probe=nproc > 1)
        recs = read_metrics(d)
        ckpts = list_checkpoints(d)
        if not ckpts:
            raise UsageError(f"the throughput probe in {d} wrote no checkpoint")
        got = int(re.search(r"ckpt_(\d+)\.pt$", ckpts[-1]).group(1))
        if got < n:  # SIGTERM/SIGINT: the trainer checkpointed and returned early; do not plan on it
            raise Stopped(f"the throughput probe was stopped at step {got} of {n}")
        timed_recs = [r for r in recs if r["step"] > PROBE_WARMUP]
        if not timed_recs:
            raise UsageError(f"the throughput probe in {d} logged no timed step (is the data set smaller than "
                             f"{n} batches in total?)")
        step_s = statistics.median(batch / r["img_per_s"] for r in timed_recs)
        steps_total = sum(batch / r["img_per_s"] for r in recs)
        ck = load_checkpoint(ckpts[-1], verify=False)
        info = {"step_s": step_s, "startup_s": max(0.0, wall - steps_total), "wall_s": wall, "batch": batch,
                "steps_per_epoch": int(ck["steps_per_epoch"]), "num_images": int(ck.get("num_samples") or 0),
                "timed_steps": len(timed_recs)}
        del ck
        for p in ckpts:  # full model + queues: not needed any more
            os.remove(p)
        return info

    main = timed(args.nproc, "probe")
    single_ips = None
    if args.nproc > 1:  # the scaling: one process at the per-process batch
        per = base.optim.batch_size // args.nproc
        one = timed(1, "probe_1proc", [f"optim.batch_size={per}"])
        single_ips = per / one["step_s"]
    device = "cuda" if _cuda_used(base) else "cpu"
    num_images = main["num_images"] or main["steps_per_epoch"] * base.optim.batch_size
    plan = make_plan(budget, step_s=main["step_s"], steps_per_epoch=main["steps_per_epoch"], num_images=num_images,
                     global_batch=base.optim.batch_size, startup_s=main["startup_s"], runs=runs,
                     spent_s=time.time() - t_start, nproc=args.nproc, device=device, single_ips=single_ips)
    plan["probe"] = main
    plan["config"] = {"preset": args.config, "arch": base.model.arch, "image_size": base.data.image_size,
                      "precision": base.train.precision, "compile": base.train.compile, "kernels": base.train.kernels,
                      "backend": base.data.backend, "batch_size": base.optim.batch_size,
                      "lr_per_256": base.optim.lr, "loss_lambda": base.model.loss_lambda}
    return plan


PRETRAIN_SCRIPT = os.path.join(REPO, "launch", "pretrain.py")


def probe_command(args, overrides: list[str], nproc: int) -> list[str]:
    """The probe's child: launch/pretrain.py as the pretraining runs start it (in this process's
    interpreter when the reproduction runs one process; torchrun when it runs several, also for the
    one-process scaling probe: the same launcher and environment as the ranks, so the measured
    efficiency compares like with like)."""
    if args.nproc == 1:
        return [sys.executable, PRETRAIN_SCRIPT, "--config", args.config, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), PRETRAIN_SCRIPT,
            "--config", args.config, *overrides]


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


def read_metrics_so_far(run_dir: str) -> list[dict]:
    """metrics.jsonl of a run that was killed: its last line may be cut off."""
    path, recs = os.path.join(run_dir, "metrics.jsonl"), []
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and isinstance(rec.get("img_per_s"), _NUM) and rec["img_per_s"] > 0:
                    recs.append(rec)
    return recs


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


# ---- evaluation and export -----------------------------------------------------------------------------

def eval_jobs(args, cfg, runs: list[str]) -> list[tuple[str, str, list[str]]]:
    """(trunk, mode, eval CLI arguments without --checkpoint/--out) of every evaluation to run."""
    size = args.eval_image_size or cfg.data.image_size
    workers = cfg.data.num_workers if args.eval_workers < 0 else args.eval_workers
    max_train = cfg.data.max_images if args.eval_max_train < 0 else args.eval_max_train
    common = ["--image-size", str(size), "--workers", str(workers), "--seed", str(cfg.train.seed),
              "--arch", cfg.model.arch, "--no-progress"]
    synth = ["--synthetic-images", str(cfg.data.synthetic_images), "--synthetic-resolution",
             str(cfg.data.synthetic_resolution), "--data-cache-dir", cfg.data.cache_dir]
    data = ["--data", args.data, *synth] + (["--val", args.val] if args.val else []) \
        + (["--root", cfg.data.root] if cfg.data.root else [])
    limits = ["--max-train", str(max_train), "--max-val", str(args.eval_max_val)]
    per_trunk = [("knn", ["knn", *data, *limits, "--k", "10,20,100,200"])]
    if args.voc:
        per_trunk += [("dense", ["dense", "--data", args.voc, "--layer", "c4"]),
                      ("svm", ["svm", "--data", args.voc, "--layers", "c5"]),
                      ("lowshot", ["lowshot", "--data", args.voc, "--layers", "c5"])]
    elif args.data == "synthetic":
        per_trunk.append(("dense", ["dense", *data, *limits, "--layer", "c4"]))
    trunks = list(runs) + ([] if args.no_random else ["random"])
    return [(t, mode, a + common) for t in trunks for mode, a in per_trunk]


def skipped_evals(args) -> dict:
    out = {}
    if not args.voc:
        out["svm"] = out["lowshot"] = "no --voc given (the VOC07 SVM and low-shot protocols need Pascal VOC 2007)"
        if args.data != "synthetic":
            out["dense"] = "no masks: the dense probe needs --voc or the built-in data set (--data synthetic)"
    out["linear"] = ("not run: the seed's ImageNet linear protocol (100 epochs through the trunk) is a separate GPU "
                     "job; the report gives its command")
    return out


def call_cli(module_main, argv: list[str], what: str) -> None:
    print(f"  $ python -m {what} " + " ".join(argv), flush=True)
    rc = module_main(argv)
    if rc != 0:
        raise UsageError(f"{what} {argv[0]} failed (exit status {rc}; its error is above)")


# ---- main ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    try:
        return _main(argv)
    except UsageError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"{e}; continue with: python launch/reproduce.py --out {os.path.abspath(_out_of(argv))} --resume",
              flush=True)
        return 0
    except KeyboardInterrupt:  # Ctrl-C outside a pretraining run (export, evaluation): that stage is redone
        print(f"\ninterrupted; continue with: python launch/reproduce.py --out {os.path.abspath(_out_of(argv))} --resume",
              file=sys.stderr, flush=True)
        return 130
    except RunFailed as e:  # a failed run (non-finite loss, a checkpoint write that failed): exit 1
        print(f"error: {e}", file=sys.stderr)
        return 1


def _out_of(argv) -> str:
    try:
        return parser().parse_known_intermixed_args(argv)[0].out
    except UsageError:
        return "OUT"


def _main(argv) -> int:
    t_start = time.time()
    args, state = resolve_args(argv)
    out = args.out
    print(f"reproduction in {out} ({'resumed' if args.resume else 'new'}): data {args.data}, budget {args.budget}, "
          f"config {args.config}{' + MoCo-v2 baseline' if args.baseline else ''}", flush=True)

    # 1. plan ----------------------------------------------------------------------------------------
    if state.done("plan"):
        plan = state.data["plan"]
        print("skip plan (done): " + plan_lines(plan)[0], flush=True)
    else:
        plan = probe(args, state, t_start)
        state.data["plan"] = plan
        state.mark("plan")
    for line in plan_lines(plan):
        print(line, flush=True)

    # 2. pretraining ------------------------------------------------------------------------------------
    runs = ["densecl"] + (["mocov2"] if args.baseline else [])
    lam0 = {"densecl": [], "mocov2": ["model.loss_lambda=0"]}
    # A short run logs often enough for a loss curve (>= ~20 points) unless train.log_every is given:
    # logging is not part of the recipe.
    log = []
    if not any(o.split("=", 1)[0].strip() == "train.log_every" for o in args.overrides):
        every = load_cfg(args, run_cfg_overrides(args, os.path.join(out, "densecl"))).train.log_every
        log = [f"train.log_every={max(1, min(every, plan['steps'] // 20))}"]
    finals = {}
    for run in runs:
        stage = f"pretrain:{run}"
        run_dir = os.path.join(out, run)
        if state.done(stage):
            finals[run] = state.data["stages"][stage]["checkpoint"]
            print(f"skip {stage} (done): {finals[run]}", flush=True)
            continue
        from .checkpoint import list_checkpoints
        resume = "auto" if list_checkpoints(run_dir) else ""
        print(f"{stage}: {plan['epochs']} epochs into {run_dir}" + (" (resuming its latest checkpoint)" if resume else ""),
              flush=True)
        ov = run_cfg_overrides(args, run_dir, [f"optim.epochs={plan['epochs']}", *lam0[run], *log]
                               + ([f"train.resume={resume}"] if resume else []))
        t0 = time.time()
        summary = run_training(args, ov, args.nproc)
        wall = time.time() - t0 + state.data["stages"].get(f"{stage}:partial", {}).get("wall_s", 0.0)
        ckpts = list_checkpoints(run_dir)
        done_step = int(re.search(r"ckpt_(\d+)\.pt$", ckpts[-1]).group(1)) if ckpts else 0
        if summary["status"] != "finished" or done_step < plan["steps"]:
            state.data["stages"][f"{stage}:partial"] = {"wall_s": wall}
            state.save()
            print(f"{stage} stopped ({summary['status']}) at step {summary.get('step', done_step)} of {plan['steps']}; "
                  f"continue with: python launch/reproduce.py --out {out} --resume", flush=True)
            return 0 if summary["status"].startswith(("stopped", "max_steps", "finished")) else 1
        finals[run] = ckpts[-1]
        state.data["stages"].pop(f"{stage}:partial", None)
        state.mark(stage, checkpoint=ckpts[-1], wall_s=wall, steps=done_step)

    # 3. export --------------------------------------------------------------------------------------------
    from .export import main as export_main
    os.makedirs(os.path.join(out, "export"), exist_ok=True)
    for run in runs:
        stage = f"export:{run}"
        if state.done(stage):
            print(f"skip {stage} (done)", flush=True)
            continue
        files = {}
        for fmt, ext in EXPORT_FORMATS:
            f = os.path.join(out, "export", f"{run}_{fmt}.{ext}")
            call_cli(export_main, [finals[run], "--format", fmt, "--out", f], "densecl_fast.export")
            files[fmt] = f
        state.mark(stage, files=files)

    # 4. evaluation ----------------------------------------------------------------------------------------
    from .eval.__main__ import main as eval_main
    cfg = load_cfg(args, run_cfg_overrides(args, os.path.join(out, "densecl")))
    for trunk, mode, a in eval_jobs(args, cfg, runs):
        stage = f"eval:{trunk}:{mode}"
        if state.done(stage):
            print(f"skip {stage} (done)", flush=True)
            continue
        print(f"{stage} ...", flush=True)
        d = os.path.join(out, "eval", trunk)
        ck = "random" if trunk == "random" else finals[trunk]
        call_cli(eval_main, [a[0], "--checkpoint", ck, "--out", d, "--cache-dir",
                             os.path.join(out, "eval", "feature_cache"), *a[1:]], "densecl_fast.eval")
        state.mark(stage, json=os.path.join(d, f"{mode}.json"))

    # 5. report ---------------------------------------------------------------------------------------------
    if state.done("report"):
        print(f"skip report (done): {os.path.join(out, 'report.md')}", flush=True)
        return 0
    from .repro_report import write_report
    paths = write_report(out, state.data, args, runs, skipped_evals(args), cfg)
    state.mark("report", files=paths)
    print("report: " + ", ".join(paths), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
