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
                    (with --seeds N: both for train.seed, +1, ..., +N-1, into OUT/densecl_s0/, OUT/mocov2_s0/, ...)
  export:RUN        torchvision / detectron2 / mmdet files of the final checkpoint (OUT/export/)
  eval:TRUNK:MODE   `python -m densecl_fast.eval` (knn; dense; svm + lowshot with --voc) of each run
                    and of the random-init trunk (OUT/eval/TRUNK/MODE.json)
  report            OUT/report.md, report.json, loss.png, throughput.png, eval.png

Only public entry points are used: `load_config`, `train`, `python -m densecl_fast.pretrain` (the probe, in
a child process; every run under torchrun with --nproc > 1), the eval CLI, the export CLI, and the run
directories' metrics.jsonl and checkpoints.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from ..config import MAX_SEED, ConfigError
from ..usage import Parser, error_line
from .errors import RunFailed, Stopped, UsageError
from .plan import fmt_duration, parse_budget, plan_lines
from .probe import MIN_TIME_BUDGET, PROBE_SHARE, PROBE_WARMUP, probe
from .report import write_report
from .runs import (EXPORT_FORMATS, METHOD_OVERRIDES, call_cli, eval_jobs, load_cfg, method_of, pretrain_runs, run_cfg_overrides,
                   run_training, seeds_of, skipped_evals)
from .state import State


MAX_SEEDS = 100  # --seeds: each is a pretraining run per method (and a random trunk)


# ---- arguments ----------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python launch/reproduce.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="pretraining images: ImageNet train folder, .txt list, synthetic, fashion-mnist:ROOT, "
                                  "fashion-mnist-mosaics:ROOT")
    p.add_argument("--val", default="", help="kNN evaluation split (folder / list with labels); else the eval tool's split")
    p.add_argument("--voc", default="", help="Pascal VOC devkit: VOC07 SVM + low-shot, and the dense probe on its masks")
    p.add_argument("--budget", help="wall clock for planning + pretraining (8h, 90m, 1h30m) or epochs (20ep)")
    p.add_argument("--out", default="runs/reproduce", help="output folder (default runs/reproduce)")
    p.add_argument("--baseline", action="store_true", help="also MoCo-v2 (λ = 0) at the same budget")
    p.add_argument("--seeds", type=int, default=1, help=f"pretraining runs per method (1..{MAX_SEEDS}), with "
                   "train.seed, +1, ... (and as many random-init trunks); the report gives means, std and per-seed "
                   "figures")
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


RECORDED = ("data", "val", "voc", "budget", "baseline", "seeds", "config", "nproc", "probe_steps", "eval_image_size",
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
        raise UsageError("--data is required (an ImageNet train folder, a .txt list, synthetic, fashion-mnist:ROOT "
                         "or fashion-mnist-mosaics:ROOT)")
    if not args.budget:
        raise UsageError("--budget is required (e.g. 8h, 90m or 20ep)")
    budget = parse_budget(args.budget)
    if budget["kind"] == "time" and budget["seconds"] < MIN_TIME_BUDGET:
        raise UsageError(f"--budget {args.budget}: give at least {fmt_duration(MIN_TIME_BUDGET)}: the throughput "
                         f"probe (a process start, the data, the model, {PROBE_WARMUP} + --probe-steps steps) must "
                         f"fit in {PROBE_SHARE:.0%} of it and whole epochs in the rest; or a budget in epochs (1ep)")
    if args.nproc < 1 or args.probe_steps < 1:
        raise UsageError("--nproc and --probe-steps must be >= 1")
    if not 1 <= args.seeds <= MAX_SEEDS:
        raise UsageError(f"--seeds {args.seeds}: give 1..{MAX_SEEDS} (each seed is a pretraining run per method)")
    for o in args.overrides:
        key = o.split("=", 1)[0].strip()
        if key in ("optim.epochs", "data.source", "train.out_dir", "train.resume"):
            raise UsageError(f"override {o!r}: {key} is set by the reproduction (--budget, --data, --out, --resume)")
    for v, name in ((args.val, "--val"), (args.voc, "--voc")):
        if v and not os.path.exists(v):
            raise UsageError(f"{name} {v}: no such folder or file")
    # Recorded absolute, so `--resume` works from another working directory.
    args.val, args.voc = (os.path.abspath(v) if v else v for v in (args.val, args.voc))
    from ..data import DataError
    from ..data.sources import parse_builtin
    try:
        builtin = parse_builtin(args.data)
    except DataError as e:
        raise UsageError(f"--data {args.data}: {e}") from None
    kind, spec = builtin if builtin is not None else (None, None)
    root = spec[0] if kind == "fashion-mnist" else spec.root if kind == "mosaics" else None
    if root and not os.path.isdir(root):
        raise UsageError(f"--data {args.data}: no such folder {root}")
    if args.data != "synthetic" and not root and not any(c in args.data for c in "*?["):  # (DALI shard patterns)
        if not os.path.exists(os.path.expanduser(args.data)):
            raise UsageError(f"--data {args.data}: no such folder or file")
        args.data = os.path.abspath(os.path.expanduser(args.data))
    cfg = load_cfg(args, run_cfg_overrides(args, os.path.join(args.out, "probe")))  # the config, with every override
    if cfg.train.seed + args.seeds - 1 > MAX_SEED:
        raise UsageError(f"--seeds {args.seeds} from train.seed={cfg.train.seed}: the last seed would pass {MAX_SEED}; "
                         f"give a smaller train.seed")

# ---- main ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    try:
        return _main(argv)
    except (UsageError, ConfigError) as e:  # ConfigError: e.g. the run lock's, from inside train()
        print(error_line(e), file=sys.stderr)
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
    cfg = load_cfg(args, run_cfg_overrides(args, out))
    seeds = seeds_of(args, cfg)
    runs = pretrain_runs(args, seeds)
    print(f"reproduction in {out} ({'resumed' if args.resume else 'new'}): data {args.data}, budget {args.budget}, "
          f"config {args.config}{' + MoCo-v2 baseline' if args.baseline else ''}"
          + (f", seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""), flush=True)

    # 1. plan ----------------------------------------------------------------------------------------
    if state.done("plan"):
        plan = state.data["plan"]
        print("skip plan (done): " + plan_lines(plan)[0], flush=True)
    else:
        plan = probe(args, t_start)
        state.data["plan"] = plan
        state.mark("plan")
    for line in plan_lines(plan):
        print(line, flush=True)

    # 2. pretraining ------------------------------------------------------------------------------------
    # A short run logs often enough for a loss curve (>= ~20 points) unless train.log_every is given:
    # logging is not part of the recipe.
    log = []
    if not any(o.split("=", 1)[0].strip() == "train.log_every" for o in args.overrides):
        log = [f"train.log_every={max(1, min(cfg.train.log_every, plan['steps'] // 20))}"]
    finals = {}
    for run, method, seed in runs:
        stage = f"pretrain:{run}"
        run_dir = os.path.join(out, run)
        if state.done(stage):
            finals[run] = state.data["stages"][stage]["checkpoint"]
            print(f"skip {stage} (done): {finals[run]}", flush=True)
            continue
        from ..checkpoint import checkpoint_step, list_checkpoints
        resume = "auto" if list_checkpoints(run_dir) else ""
        print(f"{stage}: {plan['epochs']} epochs into {run_dir}" + (" (resuming its latest checkpoint)" if resume else ""),
              flush=True)
        ov = run_cfg_overrides(args, run_dir, [f"optim.epochs={plan['epochs']}", *METHOD_OVERRIDES[method], *log]
                               + ([f"train.seed={seed}"] if len(seeds) > 1 else [])
                               + ([f"train.resume={resume}"] if resume else []))
        t0 = time.time()
        summary = run_training(args, ov, args.nproc)
        wall = time.time() - t0 + state.data["stages"].get(f"{stage}:partial", {}).get("wall_s", 0.0)
        ckpts = list_checkpoints(run_dir)
        done_step = checkpoint_step(ckpts[-1]) if ckpts else 0
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
    from ..export import main as export_main
    os.makedirs(os.path.join(out, "export"), exist_ok=True)
    for run, _, _ in runs:
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
    from ..eval.__main__ import main as eval_main
    jobs = eval_jobs(args, cfg, runs, seeds)
    for trunk, mode, eval_argv in jobs:
        stage = f"eval:{trunk}:{mode}"
        if state.done(stage):
            print(f"skip {stage} (done)", flush=True)
            continue
        print(f"{stage} ...", flush=True)
        d = os.path.join(out, "eval", trunk)
        weights = "random" if method_of(trunk) == "random" else finals[trunk]
        call_cli(eval_main, [eval_argv[0], "--checkpoint", weights, "--out", d, "--cache-dir",
                             os.path.join(out, "eval", "feature_cache"), *eval_argv[1:]], "densecl_fast.eval")
        state.mark(stage, json=os.path.join(d, f"{mode}.json"))

    # 5. report ---------------------------------------------------------------------------------------------
    if state.done("report"):
        print(f"skip report (done): {os.path.join(out, 'report.md')}", flush=True)
        return 0
    paths = write_report(out, state.data, args, [r for r, _, _ in runs], skipped_evals(args), cfg,
                         trunks=list(dict.fromkeys(t for t, _, _ in jobs)), seeds=seeds)
    state.mark("report", files=paths)
    print("report: " + ", ".join(paths), flush=True)
    return 0
