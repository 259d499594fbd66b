"""Two-view data pipeline throughput: DALI vs torchvision/PIL, on a folder of generated JPEGs.

    python -m perf.bench_data --device cuda                     # both backends, H100-sized run
    python -m perf.bench_data --device cpu --threads 2 --batch 32 --steps 8
    python -m perf.bench_data --device cuda --backends dali --sweep data.dali.hw_decoder_load=0.5,0.65,0.8,0.95

Images/s counts source images per second, each delivered as two augmented views on the target
device (what a training step consumes), after `--warmup` untimed batches. Loader options are config
keys given as `data.<key>=<value>` overrides, taken as the trainer takes them; `--sweep KEY=V1,...`
times the DALI loader once per value. pytest-benchmark cases: perf/bench_cases.py (`-k data`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from densecl_fast.config import ConfigError, load_config
from densecl_fast.data import build_loader

from .jpegs import ensure_jpeg_folder

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_loader(folder, backend, batch, device, image_size, workers, cache_dir, overrides=(), config=None,
                channels_last=True, dtype=torch.float32):
    """The library's own loader over `folder` (the pytest-benchmark data cases use it too)."""
    cfg = load_config(config, [f"data.source={folder}", f"data.backend={backend}", f"data.image_size={image_size}",
                               f"data.num_workers={workers}", f"data.cache_dir={cache_dir}", *overrides])
    return build_loader(cfg.data, batch_size=batch, device=torch.device(device), channels_last=channels_last,
                        dtype=dtype)


def time_loader(loader, steps, warmup, device):
    """Images/s over `steps` batches after `warmup` untimed ones (epochs chained as needed)."""
    def now():
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def batches():
        for epoch in range(1 << 30):
            loader.set_epoch(epoch)
            yield from loader

    it = batches()
    for _ in range(warmup):
        next(it)
    t0 = now()
    n = sum(next(it)[0].shape[0] for _ in range(steps))
    dt = now() - t0
    it.close()
    return {"images_per_s": n / dt, "seconds": dt, "batches": steps, "batch": n // steps}


def run(args):
    folder = args.data_dir or ensure_jpeg_folder(args.cache_dir, args.num_images, *map(int, args.resolution.split("x")),
                                                 workers=os.cpu_count())["path"]
    key, _, values = args.sweep.partition("=")
    results = []
    for backend in args.backends.split(","):
        for extra in ([[f"{key}={v}"] for v in values.split(",")] if backend == "dali" and args.sweep else [[]]):
            loader = make_loader(folder, backend, args.batch, args.device, args.image_size, args.threads,
                                 args.cache_dir, [*args.overrides, *extra], args.config, not args.nchw,
                                 DTYPES[args.dtype])
            try:
                r = time_loader(loader, args.steps, args.warmup, args.device)
            finally:
                getattr(loader, "close", lambda: None)()
            r.update(backend=backend, device=args.device, threads=args.threads, image_size=args.image_size,
                     dtype=args.dtype if backend == "dali" else "fp32", overrides=list(args.overrides) + extra)
            results.append(r)
            print(f"{backend:5s} {args.device:4s} {args.threads:2d} threads  batch {r['batch']:4d}  "
                  f"{r['images_per_s']:8.1f} two-view images/s  ({r['batches']} batches, {r['seconds']:.2f} s) "
                  f"{' '.join(extra)}", flush=True)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m perf.bench_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("overrides", nargs="*", help="key=value config overrides, e.g. data.dali.hue=linear")
    add("--config", default=None, help="preset or YAML file for the data section (default: the library defaults)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    add("--backends", default="dali,torch", help="comma-separated: dali, torch (default dali,torch)")
    add("--batch", type=int, default=256, help="images per batch (default 256)")
    add("--steps", type=int, default=40, help="timed batches (default 40)")
    add("--warmup", type=int, default=5, help="untimed batches first (default 5)")
    add("--threads", type=int, default=os.cpu_count(), help="DALI CPU threads / DataLoader workers (default: CPUs)")
    add("--image-size", type=int, default=224, help="side of each view (default 224)")
    add("--num-images", type=int, default=2048, help="JPEGs in the generated folder (default 2048)")
    add("--resolution", default="500x375", help="WxH of the generated JPEGs (default 500x375)")
    add("--data-dir", default="", help="an image folder to read instead of generated JPEGs")
    add("--cache-dir", default="~/.cache/densecl_fast", help="where the JPEGs are kept")
    add("--dtype", default="fp32", choices=sorted(DTYPES), help="DALI output dtype (default fp32)")
    add("--nchw", action="store_true", help="contiguous NCHW instead of channels-last")
    add("--sweep", default="", help="KEY=V1,V2,...: time the DALI loader once per value of a config key, "
        "e.g. data.dali.hw_decoder_load=0.5,0.65,0.8 (GPU decoding only)")
    add("--json", default="", help="also write the results here")
    args = p.parse_args(argv)
    if args.sweep and "=" not in args.sweep:
        p.error("--sweep must look like KEY=V1,V2,...")
    if min(args.steps, args.batch) < 1:
        p.error("--steps and --batch must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU only'}, {os.cpu_count()} CPU "
          "cores" + ("" if args.device == "cuda" else " (figures are CPU figures)"), flush=True)
    try:
        results = run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
