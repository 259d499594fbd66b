#!/usr/bin/env python
"""Two-view data pipeline throughput: DALI vs torchvision/PIL, on a folder of synthetic JPEGs.

    python perf/bench_data.py --device cuda                     # both backends, H100-sized run
    python perf/bench_data.py --device cpu --threads 2 --batch 32 --steps 8
    python perf/bench_data.py --device cuda --backends dali --hw-decoder-load 0.5,0.65,0.8,0.95

Images/s counts source images per second, each delivered as two augmented views (the batch pair
im_q, im_k) on the target device: what a training step consumes. The first `--warmup` batches
(pipeline build, worker start, cache warm-up) are not timed. The data set is generated once
(`--data-dir`, default under ~/.cache/densecl_fast): `--num-images` JPEGs of `--resolution`
(500x375 by default, ImageNet-like), textured scenes at quality 90.

pytest-benchmark (`pytest perf/bench_data.py`): small CPU runs of both backends, and a CUDA run of
DALI that is skipped without a GPU.

For a training-step-fed-by-DALI comparison use `densecl_fast.data.dali_loader.loader_for_folder`
(a ready loader over any folder) and `make_jpeg_folder` below.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Run as a script, perf/ would shadow standard modules (perf/profile.py vs the stdlib's profile).
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402


def make_jpeg_folder(folder: str, num_images: int = 512, width: int = 500, height: int = 375,
                     quality: int = 90, classes: int = 8) -> str:
    """`num_images` textured JPEGs in `classes` sub-folders (ImageFolder layout); reused when present."""
    from PIL import Image

    folder = os.path.abspath(os.path.expanduser(folder))
    marker = os.path.join(folder, ".complete")
    if os.path.isfile(marker):
        return folder
    rs = np.random.RandomState(1234)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(num_images):
        d = os.path.join(folder, f"class{i % classes:02d}")
        os.makedirs(d, exist_ok=True)
        c0, c1 = rs.uniform(0, 255, 3), rs.uniform(0, 255, 3)
        fx, fy = rs.uniform(0.01, 0.08, 2)
        t = (0.5 + 0.5 * np.sin(xx * fx + yy * fy + rs.uniform(0, 6.3)))[..., None]
        img = c0 * t + c1 * (1 - t)
        cx, cy, r = rs.uniform(0, width), rs.uniform(0, height), rs.uniform(30, 150)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rs.uniform(0, 255, 3)
        img += rs.normal(0, 12, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            os.path.join(d, f"{i:06d}.jpg"), "JPEG", quality=quality)
    with open(marker, "w") as f:
        f.write(f"{num_images} {width}x{height} q{quality}\n")
    return folder


def _data_cfg(folder: str, image_size: int, threads: int, cache_dir: str, backend: str):
    from densecl_fast.config import DataConfig
    return DataConfig(source=folder, backend=backend, image_size=image_size, num_workers=threads, cache_dir=cache_dir)


def make_loader(backend: str, folder: str, *, device: str, batch: int, image_size: int, threads: int,
                cache_dir: str, dtype: torch.dtype = torch.float32, channels_last: bool = True, **dali_options):
    dev = torch.device(device)
    if backend == "dali":
        from densecl_fast.data.dali_loader import loader_for_folder
        return loader_for_folder(folder, batch_size=batch, device=dev, image_size=image_size, num_threads=threads,
                                 dtype=dtype, channels_last=channels_last, cache_dir=cache_dir, **dali_options)
    from densecl_fast.data.torch_loader import TorchTwoViewLoader
    return TorchTwoViewLoader(_data_cfg(folder, image_size, threads, cache_dir, "torch"), batch_size=batch,
                              device=dev, channels_last=channels_last)


def time_loader(loader, steps: int, warmup: int, device: str) -> Dict[str, float]:
    """Images/s over `steps` batches after `warmup` untimed ones (epochs are chained as needed)."""
    cuda = device.startswith("cuda")
    done, epoch, t0, timed = 0, 0, None, 0
    n_per = None
    while done < warmup + steps:
        loader.set_epoch(epoch)
        for q, k in loader:
            n_per = q.shape[0]
            done += 1
            if done == warmup:
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            elif done > warmup:
                timed += 1
            if done >= warmup + steps:
                break
        epoch += 1
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - (t0 if t0 is not None else time.perf_counter())
    ips = timed * n_per / dt if dt > 0 else float("nan")
    return {"images_per_s": ips, "seconds": dt, "batches": timed, "batch": n_per}


def run(args) -> List[dict]:
    folder = make_jpeg_folder(args.data_dir or os.path.join(
        os.path.expanduser(args.cache_dir), f"bench-jpegs-{args.num_images}-{args.resolution}"),
        args.num_images, *map(int, args.resolution.split("x")))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    results = []
    for backend in args.backends.split(","):
        sweep = args.hw_decoder_load.split(",") if (backend == "dali" and args.hw_decoder_load) else [None]
        for load in sweep:
            opts = {}
            if backend == "dali":
                if load is not None:
                    opts["hw_decoder_load"] = float(load)
                if args.hue:
                    opts["hue"] = args.hue
            loader = make_loader(backend, folder, device=args.device, batch=args.batch, image_size=args.image_size,
                                 threads=args.threads, cache_dir=args.cache_dir, dtype=dtype,
                                 channels_last=not args.nchw, **opts)
            r = time_loader(loader, args.steps, args.warmup, args.device)
            r.update(backend=backend, device=args.device, threads=args.threads, image_size=args.image_size,
                     dtype=args.dtype if backend == "dali" else "fp32", **{f"dali_{k}": v for k, v in opts.items()})
            if hasattr(loader, "close"):
                loader.close()
            del loader
            results.append(r)
            extra = " ".join(f"{k}={v}" for k, v in opts.items())
            print(f"{backend:5s} {args.device:4s} {args.threads:2d} threads  batch {r['batch']:4d}  "
                  f"{r['images_per_s']:8.1f} two-view images/s  ({r['batches']} batches, {r['seconds']:.2f} s) {extra}",
                  flush=True)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--backends", default="dali,torch", help="comma-separated: dali, torch")
    p.add_argument("--batch", type=int, default=256, help="images per batch (per rank)")
    p.add_argument("--steps", type=int, default=40, help="timed batches")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="DALI CPU threads / torch DataLoader workers")
    p.add_argument("--image-size", type=int, default=224, help="side of each view")
    p.add_argument("--num-images", type=int, default=2048, help="JPEGs in the generated folder")
    p.add_argument("--resolution", default="500x375", help="WxH of the generated JPEGs")
    p.add_argument("--data-dir", default="", help="use/generate the JPEG folder here")
    p.add_argument("--cache-dir", default="~/.cache/densecl_fast")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="DALI output dtype")
    p.add_argument("--nchw", action="store_true", help="contiguous NCHW instead of channels-last")
    p.add_argument("--hue", default="", choices=["", "auto", "exact", "linear"], help="DALI hue op")
    p.add_argument("--hw-decoder-load", default="", help="DALI: comma-separated values to sweep (GPU only)")
    p.add_argument("--json", default="", help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device", file=sys.stderr)
        return 2
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores", flush=True)
    else:
        print(f"device: CPU only, {os.cpu_count()} CPU cores (figures are CPU figures)", flush=True)
    results = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


# ---- pytest-benchmark ---------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the CLI does not need pytest
    pytest = None

if pytest is not None:
    def _dali_or_skip():
        pytest.importorskip("nvidia.dali")

    @pytest.fixture(scope="module")
    def jpeg_folder(tmp_path_factory):
        return make_jpeg_folder(str(tmp_path_factory.mktemp("bench") / "jpegs"), num_images=64, width=160, height=120)

    def _bench(benchmark, backend, folder, device, tmp_path, batch=16, image_size=64, **opts):
        loader = make_loader(backend, folder, device=device, batch=batch, image_size=image_size,
                             threads=min(2, os.cpu_count() or 1), cache_dir=str(tmp_path / "cache"), **opts)
        loader.set_epoch(0)
        for _ in loader:   # warm-up: build, workers, page cache
            pass
        state = {"epoch": 1}

        def epoch():
            loader.set_epoch(state["epoch"])
            state["epoch"] += 1
            n = 0
            for q, k in loader:
                n += q.shape[0]
            if device == "cuda":
                torch.cuda.synchronize()
            return n

        n = benchmark.pedantic(epoch, rounds=3, iterations=1)
        benchmark.extra_info["images_per_epoch"] = n
        benchmark.extra_info["images_per_s"] = n / benchmark.stats.stats.mean
        assert n == len(loader) * batch

    @pytest.mark.dali
    def test_bench_dali_cpu(benchmark, jpeg_folder, tmp_path):
        _dali_or_skip()
        _bench(benchmark, "dali", jpeg_folder, "cpu", tmp_path)

    def test_bench_torch_cpu(benchmark, jpeg_folder, tmp_path):
        _bench(benchmark, "torch", jpeg_folder, "cpu", tmp_path)

    @pytest.mark.dali
    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    def test_bench_dali_cuda(benchmark, jpeg_folder, tmp_path):
        _dali_or_skip()
        _bench(benchmark, "dali", jpeg_folder, "cuda", tmp_path, batch=32, image_size=224, dtype=torch.bfloat16)


if __name__ == "__main__":
    sys.exit(main())
