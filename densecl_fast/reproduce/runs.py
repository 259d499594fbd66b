"""The runs the stages start: pretraining (in this process, or torchrun around
`python -m densecl_fast.pretrain`), the export and eval CLIs (their metrics.jsonl: ../metrics.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from .errors import RunFailed, UsageError

EXPORT_FORMATS = (("torchvision", "pth"), ("detectron2", "pkl"), ("mmdet", "mm.pth"))


# ---- pretraining: in-process, or torchrun around `python -m densecl_fast.pretrain` -----------------

PRETRAIN_MODULE = "densecl_fast.pretrain"
# The folder this densecl_fast is imported from: an install's site-packages, or a checkout's root
# (launch/reproduce.py puts it on its own sys.path, which a child does not inherit).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pretrain_command(config: str, overrides: list[str], nproc: int | None = None) -> list[str]:
    """The pretraining CLI as a child process, started as a module (an install has no launch/ folder):
    under torchrun with `nproc` processes, else in this interpreter."""
    head = [sys.executable, "-m"] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m"]
    return [*head, PRETRAIN_MODULE, "--config", config, *overrides]


def child_env() -> dict:
    """This process's environment, with PYTHONPATH leading to the same densecl_fast when it is not
    an installed one (a checkout run as launch/reproduce.py without `pip install`). PYTHONSAFEPATH
    (Python 3.11+): `python -m` would otherwise put the working folder first on sys.path, and a
    reproduction started inside another checkout would train that checkout's densecl_fast."""
    import site
    env = dict(os.environ, PYTHONSAFEPATH="1")
    installed = {os.path.realpath(p) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if os.path.realpath(PACKAGE_ROOT) not in installed:
        env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT, *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_cfg_overrides(args, out_dir: str, extra=()) -> list[str]:
    return [f"data.source={args.data}", *args.overrides, f"train.out_dir={out_dir}", *extra]


def load_cfg(args, overrides):
    from ..config import ConfigError, load_config
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
        from ..checkpoint import CheckpointError, CheckpointWriteError
        from ..config import ConfigError
        from ..data import DataError
        from ..trainer import NonFiniteLossError, train
        try:
            return train(cfg)
        except (CheckpointWriteError, NonFiniteLossError) as e:
            raise RunFailed(f"{e} (continue with --resume once fixed)") from None
        except (DataError, CheckpointError, ConfigError) as e:  # ConfigError: e.g. train.out_dir in use
            raise UsageError(str(e)) from None
    cmd = pretrain_command(args.config, overrides, nproc)
    print("  $ " + " ".join(cmd), flush=True)
    try:  # follow a redirect of sys.stdout when it is a real file
        sys.stdout.flush()
        out = sys.stdout if sys.stdout.fileno() >= 0 else None
    except (AttributeError, OSError, ValueError):
        out = None
    env = child_env()
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
        raise UsageError(f"pretraining refused its input ({PRETRAIN_MODULE} exit status 2; see the error above)")
    from ..checkpoint import checkpoint_step, list_checkpoints
    ckpts = list_checkpoints(cfg.train.out_dir)
    step = checkpoint_step(ckpts[-1]) if ckpts else 0
    return {"status": "finished" if rc == 0 else f"failed (exit status {rc})", "step": step, "total_steps": None}



# ---- the runs: methods x seeds ----------------------------------------------------------------------------

METHOD_OVERRIDES = {"densecl": [], "mocov2": ["model.loss_lambda=0"]}


def seeds_of(args, cfg) -> list[int]:
    """The training seeds: the config's `train.seed`, then the next --seeds - 1 integers."""
    return [cfg.train.seed + i for i in range(getattr(args, "seeds", 1) or 1)]


def run_name(method: str, seed: int, seeds: list[int]) -> str:
    """OUT/<name>/: `densecl`, `mocov2`, `random` with one seed (the layout before --seeds existed);
    `densecl_s0`, `mocov2_s0`, `random_s0`, ... with several."""
    return method if len(seeds) == 1 else f"{method}_s{seed}"


def method_of(name: str) -> str:
    return name.split("_s")[0]


RUN_TITLE = {"densecl": "DenseCL", "mocov2": "MoCo-v2 (λ = 0)", "random": "random init"}


def title(name: str) -> str:
    """'densecl' -> 'DenseCL'; 'mocov2_s1' -> 'MoCo-v2 (λ = 0), seed 1'."""
    method, _, seed = name.partition("_s")
    return RUN_TITLE[method] + (f", seed {seed}" if seed else "")


def pretrain_runs(args, seeds: list[int]) -> list[tuple[str, str, int]]:
    """(run name, method, seed) of every pretraining run, seed by seed: a stopped reproduction has
    whole DenseCL / MoCo-v2 pairs behind it."""
    methods = ["densecl"] + (["mocov2"] if args.baseline else [])
    return [(run_name(m, s, seeds), m, s) for s in seeds for m in methods]


def has_cells(data: str) -> bool:
    """Pretraining data with a label per grid cell: the Fashion-MNIST mosaics (the cells probe)."""
    from ..data.mosaics import parse_source
    return parse_source(data) is not None


def has_masks(data: str) -> bool:
    """Pretraining data the dense probe can use directly (--voc aside): the built-in set."""
    return data == "synthetic"


# ---- evaluation and export -----------------------------------------------------------------------------

def eval_jobs(args, cfg, runs: list[tuple[str, str, int]], seeds: list[int]) -> list[tuple[str, str, list[str]]]:
    """(trunk, mode, eval CLI arguments without --checkpoint/--out) of every evaluation to run: every
    pretraining run, and a random-init trunk per seed (its init seed; the probes' seed too)."""
    size = args.eval_image_size or cfg.data.image_size
    workers = cfg.data.num_workers if args.eval_workers < 0 else args.eval_workers
    max_train = cfg.data.max_images if args.eval_max_train < 0 else args.eval_max_train
    common = ["--image-size", str(size), "--workers", str(workers), "--arch", cfg.model.arch, "--no-progress"]
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
    elif has_masks(args.data):
        per_trunk.append(("dense", ["dense", *data, *limits, "--layer", "c4"]))
    if has_cells(args.data):
        per_trunk.append(("cells", ["cells", *data, *limits]))
    trunks = [(name, seed) for name, _, seed in runs]
    if not args.no_random:
        trunks += [(run_name("random", s, seeds), s) for s in seeds]
    return [(t, mode, a + common + ["--seed", str(seed)]) for t, seed in trunks for mode, a in per_trunk]


def skipped_evals(args) -> dict:
    out = {}
    if not args.voc:
        out["svm"] = out["lowshot"] = "no --voc given (the VOC07 SVM and low-shot protocols need Pascal VOC 2007)"
        if not has_masks(args.data):
            out["dense"] = ("no masks: the dense probe needs --voc or the built-in data set (--data synthetic)"
                            + ("; the mosaics' dense evaluation is the cells probe" if has_cells(args.data) else ""))
    out["linear"] = ("not run: the seed's ImageNet linear protocol (100 epochs through the trunk) is a separate GPU "
                     "job; the report gives its command")
    return out


def call_cli(module_main, argv: list[str], what: str) -> None:
    print(f"  $ python -m {what} " + " ".join(argv), flush=True)
    rc = module_main(argv)
    if rc != 0:
        raise UsageError(f"{what} {argv[0]} failed (exit status {rc}; its error is above)")
