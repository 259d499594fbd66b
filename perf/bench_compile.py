"""Cold and warm compile time of the training step: whole encoders vs per-block regions.

    python -m perf.bench_compile --device cpu --arch resnet50 --image-size 64 --batch 8
    python -m perf.bench_compile --device cuda --arch resnet50 --image-size 224 --batch 256 --scopes blocks

Each measurement runs in a fresh process with an empty inductor cache folder of its own
(TORCHINDUCTOR_CACHE_DIR), builds DenseCL and the one-process engine exactly as `python -m perf`
does, and times the trainer's train_step: compile = first step minus the median of the next
steady steps (both encoders, the query's backward, the optimizer), in wall-clock seconds and in
CPU seconds of the process and its compile workers (less sensitive to other jobs on a shared CPU). "warm" runs again in another
fresh process after loading the artifacts the cold run saved (torch.compiler.save/load_cache_artifacts,
as train.compile does through data.cache_dir or the run's checkpoint folder), and reports the
inductor / AOTAutograd cache hits. Prints a markdown table; --out also gets compile.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args) -> dict:
    import statistics

    import torch
    from torch._dynamo.utils import counters

    from densecl_fast.config import load_config
    from densecl_fast.engines.compiling import CompileCache, CompileSettings
    from perf.runner import build_model
    from perf.sources import SyntheticSource, kernels_backend
    from densecl_fast.engines import train_step

    device = torch.device(args.device)
    cfg = load_config("smoke", [f"model.arch={args.arch}", f"data.image_size={args.image_size}",
                                f"optim.batch_size={args.batch}", f"model.bn_group_size={args.bn_group_size}",
                                f"model.queue_len={max(args.batch, 1024 // args.batch * args.batch)}"])
    settings = CompileSettings(args.scope, args.mode)
    cache = CompileCache("bench", [args.artifacts])
    info = cache.load() if args.phase == "warm" else None
    t0 = time.perf_counter()
    model, engine = build_model(cfg, device, args.precision, True, settings)
    build_s = time.perf_counter() - t0
    src = SyntheticSource(args.batch, args.image_size, device, True, 0)

    def cpu_s():   # this process and its finished children (inductor's compile workers)
        r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime

    def step():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), cpu_s()
        train_step(model, engine, *src.next(), 0.01, 0.5)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, cpu_s() - c

    with kernels_backend(False, device):
        first, first_cpu = step()
        steady, steady_cpu = zip(*[step() for _ in range(args.steady)])
    if args.phase == "cold":
        cache.save()
    return {"scope": args.scope, "mode": args.mode, "phase": args.phase, "build_s": build_s, "first_step_s": first,
            "steady_step_s": statistics.median(steady), "compile_s": first - statistics.median(steady),
            "compile_cpu_s": first_cpu - statistics.median(steady_cpu),
            "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "loaded_artifacts": None if info is None else sum(len(v) for v in info.artifacts.values()),
            "inductor_cache": {k: v for k, v in counters["inductor"].items() if "cache" in k},
            "aot_autograd_cache": {k: v for k, v in counters["aot_autograd"].items() if "cache" in k}}


def run_one(args, scope, phase, artifacts) -> dict:
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache_dir:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "PYTHONPATH": ROOT}
        cmd = [sys.executable, "-m", "perf.bench_compile", "--child", "--scope", scope, "--phase", phase,
               "--artifacts", artifacts, "--device", args.device, "--arch", args.arch,
               "--image-size", str(args.image_size), "--batch", str(args.batch), "--bn-group-size", str(args.bn_group_size),
               "--precision", args.precision, "--mode", args.mode, "--steady", str(args.steady)]
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=args.timeout)
        wall = time.perf_counter() - t
    if r.returncode != 0:
        return {"scope": scope, "phase": phase, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:300],
                "process_s": wall}
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "process_s": wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.bench_compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--bn-group-size", type=int, default=32)
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--mode", default="default")
    p.add_argument("--scopes", default="encoders,blocks", help="comma-separated: encoders, blocks")
    p.add_argument("--no-warm", action="store_true", help="skip the warm-start measurement")
    p.add_argument("--steady", type=int, default=3, help="steady steps after the first (median)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per measuring process")
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scope", default="blocks", help=argparse.SUPPRESS)
    p.add_argument("--phase", default="cold", help=argparse.SUPPRESS)
    p.add_argument("--artifacts", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.child:
        print(json.dumps(child(args)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="compile-artifacts-") as art_root:
        for scope in [s.strip() for s in args.scopes.split(",") if s.strip()]:
            art = os.path.join(art_root, scope)
            for phase in ("cold",) + (() if args.no_warm else ("warm",)):
                rows.append(run_one(args, scope, phase, art))
                print(f"[bench_compile] {scope} {phase}: " + json.dumps(rows[-1]), file=sys.stderr, flush=True)
                if args.out:   # row by row: a run cut by a time limit keeps what it measured
                    os.makedirs(args.out, exist_ok=True)
                    with open(os.path.join(args.out, "compile.json"), "w") as f:
                        json.dump({"rows": rows}, f, indent=2)
    shapes = (f"{args.arch}, {args.image_size} px, batch {args.batch}, bn_group_size {args.bn_group_size}, "
              f"{args.precision}, channels-last, {args.device}, mode {args.mode}")
    lines = [f"Compile time of one training step ({shapes}); compile = first step - median steady step", "",
             "| scope | start | compile s (wall) | compile CPU s | first step s | steady step s | process s | graphs | "
             "cache hits (inductor / AOT) |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['scope']} | {r['phase']} | failed: {r['error']} | | | | {r['process_s']:.1f} | | |")
            continue
        hits = f"{r['inductor_cache'].get('fxgraph_cache_hit', 0)} / {r['aot_autograd_cache'].get('autograd_cache_hit', 0)}"
        cpu = f"{r['compile_cpu_s']:.1f}" if "compile_cpu_s" in r else "–"
        lines.append(f"| {r['scope']} | {r['phase']} | {r['compile_s']:.1f} | {cpu} | {r['first_step_s']:.1f} | "
                     f"{r['steady_step_s']:.2f} | {r['process_s']:.1f} | {r['graphs']} | {hits} |")
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compile.json"), "w") as f:
            json.dump({"shapes": shapes, "rows": rows}, f, indent=2)
        with open(os.path.join(args.out, "compile.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
