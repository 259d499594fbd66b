#!/usr/bin/env python
"""Profile the DenseCL training step: images/s, where the milliseconds go, memory, MFU, projection.

    python perf/profile.py                                # everything this machine can run, <= 8 min
    python perf/profile.py --out perf/results/h100 --trace
    python perf/profile.py --variants eager_bf16_cl,compiled --repeats 3
    python perf/profile.py --config smoke --device cpu    # no GPU: small shapes, CUDA-only variants skipped
    python perf/profile.py --data-dir /data/imagenet/train  # end-to-end variants on real data
    python perf/profile.py --config densecl_r50_200e_in1k optim.batch_size=128   # key=value overrides

Every variant runs the trainer's own train_step (densecl_fast.trainer) in this one process, on the
same card, one after the other (the fastest are reused for the end-to-end runs):

    mmselfsup_fp32_b32   the seed's step: eager fp32, NCHW, batch 32 per GPU (mmselfsup 8x32 recipe)
    eager_fp32           eager fp32, NCHW, at the config batch
    eager_bf16_cl        eager bf16 autocast + channels-last
    eager_bf16_cl_fused  ... + fused Triton loss kernels                          (CUDA only)
    compiled             torch.compile'd encoders, bf16 + channels-last (the "compiled eager step")
    compiled_fused       ... + fused Triton loss kernels                          (CUDA only)
    e2e_torchvision      fastest model-only setting above, fed by the torchvision loader over JPEGs
    e2e_dali             the same, fed by the DALI loader over JPEGs (GPU decoding; CPU graph on the CPU)

Model-only variants are fed synthetic tensors already on the device. The JPEGs are generated once
(500x375, cached) unless --data-dir points at a real image folder.

For each variant: images/s (median and min-max over repeats of timed steps; every repeat is bounded
by device synchronizes); per-stage time (data_wait, query_forward, momentum_update, key_forward,
loss_global, matching, loss_dense, enqueue, backward, optimizer) from CUDA events around the
model's own profiler ranges (wall clock on the CPU) -- "other" is the rest of the step: zero_grad,
queue clones, the loss sum and, on the GPU, idle gaps where the device waits for the host (such as
after the enqueue's host sync) -- plus the host time blocked on the loader; peak
memory (CUDA allocator); achieved TFLOP/s = FLOPs per image x images/s, and MFU against the bf16
matmul ceiling measured in-process (or --peak-tflops). FLOPs per image come from FlopCounterMode
over one step (see results.json "flops.includes" for exactly what is counted).

Outputs in --out: results.json (everything), results.md (tables), throughput.png, stages.png,
trace_<variant>.json.gz with --trace (open in ui.perfetto.dev or chrome://tracing). The projection
turns images/s into the wall clock of the 200-epoch ImageNet recipe (1,281,167 x 200 images) on 1
and N cards (--gpus, --scaling-efficiency). A variant that fails (compile error, OOM, missing loader)
is recorded as failed with its error and the suite goes on; with --budget-seconds the repeats are
scaled down and variants that no longer fit are recorded as "skipped: budget".

Exit status: 0 when at least one variant was measured, 1 when none was, 2 on a bad config, 130 when
interrupted (the results measured so far are written in every case).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if __name__ == "__main__":
    # Run as a script, this file's folder would come first on sys.path and `perf/profile.py` would
    # shadow the standard library's `profile` (which cProfile, used by torch, imports).
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))


def _resolution(text: str):
    try:
        w, h = (int(x) for x in text.lower().split("x"))
        assert w >= 8 and h >= 8
        return w, h
    except Exception:  # noqa: BLE001
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 500x375, got {text!r}")


def _int_list(text: str):
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
        assert out and all(n >= 1 for n in out)
        return out
    except Exception:  # noqa: BLE001
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of card counts, e.g. 1,8, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perf/profile.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--config", default=None,
                   help="preset or YAML file (default: densecl_r50_200e_in1k on CUDA, smoke on the CPU)")
    g.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.batch_size=128")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    g.add_argument("--variants", default=None, help="comma-separated subset of the variants above (default: all)")
    g.add_argument("--skip", default=None, help="comma-separated variants to leave out")
    g.add_argument("--baseline-batch", type=int, default=32,
                   help="per-GPU batch of the mmselfsup-style variant (default 32, the seed's 8x32)")
    g.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    g.add_argument("--cudnn-benchmark", action="store_true",
                   help="set torch.backends.cudnn.benchmark (the trainer leaves it off)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("how long")
    g.add_argument("--warmup", type=int, default=5, help="warm-up steps per variant (default 5; compile is in the first)")
    g.add_argument("--steps", type=int, default=10, help="timed steps per repeat (default 10)")
    g.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (default 5)")
    g.add_argument("--budget-seconds", type=float, default=480.0,
                   help="wall-clock budget of the whole suite, compile and set-up included (default 480; "
                        "0 = unlimited): repeats shrink to fit, variants that no longer fit are skipped")
    g.add_argument("--compile-estimate-s", type=float, default=None,
                   help="expected compile time before one was measured, for budget planning "
                        "(default 120 on CUDA, 90 on the CPU)")
    g = p.add_argument_group("data variants")
    g.add_argument("--data-dir", default=None, help="image folder for the end-to-end variants (default: generated JPEGs)")
    g.add_argument("--data-images", type=int, default=0,
                   help="number of generated JPEG files (default: enough that the timed steps stay in one epoch)")
    g.add_argument("--data-resolution", type=_resolution, default=(500, 375), help="generated JPEG size (default 500x375)")
    g.add_argument("--data-cache", default="~/.cache/densecl_fast/perf", help="where generated JPEGs are kept")
    g.add_argument("--workers", type=int, default=None,
                   help="loader workers (torchvision) / CPU threads (DALI) (default: min(16, CPU count))")
    g = p.add_argument_group("outputs")
    g.add_argument("--out", default=None, help="results folder (default perf/results/<date-time>)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="the card's bf16 matmul ceiling in TFLOP/s for MFU (default: measured in-process)")
    g.add_argument("--trace", action="store_true",
                   help="also write a Chrome trace (trace_<variant>.json.gz) of a few steps of each variant")
    g.add_argument("--trace-variants", default=None, help="with --trace: only these (comma-separated)")
    g.add_argument("--trace-steps", type=int, default=3, help="steps per trace (default 3)")
    g.add_argument("--gpus", type=_int_list, default=[1, 8], help="card counts for the projection (default 1,8)")
    g.add_argument("--scaling-efficiency", type=float, default=0.9,
                   help="assumed per-card efficiency on more than one card (default 0.9)")
    g.add_argument("--epochs", type=int, default=200, help="projection: epochs (default 200)")
    g.add_argument("--dataset-images", type=int, default=1_281_167, help="projection: images per epoch (ImageNet-1k)")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    g.add_argument("--list-variants", action="store_true", help="print the variants and exit")
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
        from perf._variants import default_variants
        for v in default_variants(args.baseline_batch):
            print(f"{v.name:22s} {v.title}{'  [CUDA only]' if v.cuda_only else ''}")
        return 0
    from perf import _suite  # heavy imports (torch, the model) only once the arguments are good
    from densecl_fast.config import ConfigError
    try:
        return _suite.run(args, argv, t0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
