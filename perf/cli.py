"""Profile the DenseCL training step: images/s, where the milliseconds go, memory, MFU, projection.

    python -m perf                                # everything this machine can run, <= 8 min
    python -m perf --out perf/results/h100 --trace
    python -m perf --variants eager_bf16_cl,compiled --repeats 3
    python -m perf --config smoke --device cpu    # no GPU: small shapes, CUDA-only variants skipped
    python -m perf --data-dir /data/imagenet/train  # end-to-end variants on real data
    python -m perf --config densecl_r50_200e_in1k optim.batch_size=128   # key=value overrides

Run from the repository root (`-m` then measures this checkout). Each variant (--list-variants)
runs the trainer's own train_step in this process on one card, fed synthetic tensors on the device
or, end to end, the torchvision or DALI loader over JPEGs. Per variant: images/s (median, min-max
over repeats), ms per stage, peak memory, TFLOP/s and MFU; --out gets results.json, results.md,
throughput.png, stages.png (and trace_<variant>.json.gz with --trace). A failing variant is recorded
and the suite goes on; --budget-seconds gives each variant one time cap before it starts (an equal
share of what is left, compile and Triton JIT estimates set aside; a variant's steady steps keep
their share however long its first step took): repeats shrink to fit, variants that no longer
fit are "skipped: budget".

Exit status: 0 when at least one variant was measured, 1 when none was, 2 on a bad config, 130 when
interrupted (the results measured so far are written in every case).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from densecl_fast.config import COMPILE_MODES, COMPILE_SCOPES


def _ints(sep, least, what):
    def parse(text):
        try:
            out = [int(x) for x in text.lower().split(sep) if x.strip()]
        except ValueError:
            out = []
        if not out or min(out) < least or (sep == "x" and len(out) != 2):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return tuple(out) if sep == "x" else out
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument_group("what to run").add_argument
    add("--config", default=None, help="preset or YAML file (default: densecl_r50_200e_in1k on CUDA, smoke on the CPU)")
    add("overrides", nargs="*", help="key=value config overrides, e.g. optim.batch_size=128")
    add("--device", default="auto", choices=["auto", "cuda", "cpu"])
    add("--variants", default=None, help="comma-separated subset of the variants above (default: all)")
    add("--skip", default=None, help="comma-separated variants to leave out")
    add("--baseline-batch", type=int, default=32,
        help="per-GPU batch of the mmselfsup-style variant (default 32, the seed's 8x32)")
    add("--compile-mode", default="default", choices=COMPILE_MODES)
    add("--compile-scope", default="blocks", choices=COMPILE_SCOPES,
        help="what the compiled variants compile: each residual block and neck (default, as train.compile) or "
             "each whole encoder (train.compile_scope=encoders)")
    add("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
        help="torch.backends.cudnn.benchmark on CUDA (default on, as the trainer; --no-cudnn-benchmark: off)")
    add("--seed", type=int, default=0)
    add = p.add_argument_group("how long").add_argument
    add("--warmup", type=int, default=5, help="warm-up steps per variant (default 5; compile is in the first)")
    add("--steps", type=int, default=10, help="timed steps per repeat (default 10)")
    add("--repeats", type=int, default=5, help="timed repeats per variant (default 5)")
    add("--budget-seconds", type=float, default=480.0,
        help="wall-clock budget of the whole suite, compile and set-up included (default 480; 0 = unlimited): "
             "repeats shrink to fit, variants that no longer fit are skipped")
    add("--compile-estimate-s", type=float, default=None, help="expected compile time before one was measured, "
        "set aside in the time caps (default 120 on CUDA, 90 on the CPU)")
    add = p.add_argument_group("data variants").add_argument
    add("--data-dir", default=None, help="image folder for the end-to-end variants (default: generated JPEGs)")
    add("--data-images", type=int, default=0,
        help="number of generated JPEG files (default: enough that the timed steps stay in one epoch)")
    add("--data-resolution", type=_ints("x", 8, "WIDTHxHEIGHT, e.g. 500x375"), default=(500, 375),
        help="generated JPEG size (default 500x375)")
    add("--data-cache", default="~/.cache/densecl_fast/perf", help="where generated JPEGs are kept")
    add("--workers", type=int, default=None,
        help="loader workers (torchvision) / CPU threads (DALI) (default: min(16, CPU count))")
    add = p.add_argument_group("outputs").add_argument
    add("--out", default=None, help="results folder (default perf/results/<date-time>)")
    add("--peak-tflops", type=float, default=None,
        help="the card's bf16 matmul ceiling in TFLOP/s for MFU (default: measured in-process)")
    add("--trace", action="store_true", help="also write a Chrome trace (trace_<variant>.json.gz) of a few steps")
    add("--trace-variants", default=None, help="with --trace: only these (comma-separated)")
    add("--trace-steps", type=int, default=3, help="steps per trace (default 3)")
    add("--gpus", type=_ints(",", 1, "comma-separated card counts, e.g. 1,8"), default=[1, 8],
        help="card counts for the projection (default 1,8)")
    add("--scaling-efficiency", type=float, default=0.9,
        help="assumed per-card efficiency on more than one card (default 0.9)")
    add("--epochs", type=int, default=200, help="projection: epochs (default 200)")
    add("--dataset-images", type=int, default=1_281_167, help="projection: images per epoch (ImageNet-1k)")
    add("--no-plots", action="store_true")
    add("--quiet", action="store_true", help="no progress lines")
    add("--list-variants", action="store_true", help="print the variants and exit")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("warmup", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if not 0 < args.scaling_efficiency <= 1:
        p.error("--scaling-efficiency must be in (0, 1]")
    if args.out is None:
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        args.out = os.path.join(root, time.strftime("%Y%m%d-%H%M%S"))
    return args


def main(argv=None) -> int:
    t0 = time.monotonic()
    args = parse_args(argv)
    if args.list_variants:
        from .variants import default_variants
        for v in default_variants(args.baseline_batch):
            print(f"{v.name:22s} {v.title}{'  [CUDA only]' if v.cuda_only else ''}")
        return 0
    from . import runner  # heavy imports (torch, the model) only once the arguments are good
    from densecl_fast.config import ConfigError
    try:
        return runner.run(args, argv, t0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
