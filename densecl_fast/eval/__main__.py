"""python -m densecl_fast.eval MODE --checkpoint CKPT|random --data SOURCE [--out DIR]

    python -m densecl_fast.eval knn --checkpoint runs/x/checkpoints/ckpt_000001248.pt \\
        --data fashion-mnist:/usr/share/datasets/fashion-mnist --image-size 64 --max-val 2000
    python -m densecl_fast.eval linear --checkpoint random --arch resnet18 --data synthetic

Modes: knn (weighted k-NN, k = 20, T = 0.07; --k 10,20,100,200), linear (quick linear probe on cached
features). Writes DIR/<mode>.json and DIR/<mode>.md and prints one summary line. Errors are one line
on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from ..checkpoint import CheckpointError
from ..data import DataError
from ..weights import ARCHS, WeightsError
from . import features as feat
from .datasets import load_splits
from .knn import DEFAULT_K, TEMPERATURE, knn_accuracy
from .linear import quick_linear

MODES = ("knn", "linear")


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m densecl_fast.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("mode", choices=MODES)
    p.add_argument("--checkpoint", required=True, help="weights file (training checkpoint, export, ...) or 'random'")
    p.add_argument("--arch", choices=ARCHS, help="needed with --checkpoint random; else checked against the file")
    p.add_argument("--encoder", default="query", choices=("query", "key"))
    p.add_argument("--data", required=True, help="fashion-mnist:ROOT | synthetic | image folder | .txt list")
    p.add_argument("--val", default="", help="evaluation set (default: the test split / every 5th image held out)")
    p.add_argument("--max-train", type=int, default=0, help="first N training images (0 = all)")
    p.add_argument("--max-val", type=int, default=0, help="first N evaluation images (0 = all)")
    p.add_argument("--image-size", type=int, default=224, help="eval resolution (64 for Fashion-MNIST's 28 px)")
    p.add_argument("--k", default=str(DEFAULT_K), help="knn: comma list of k")
    p.add_argument("--temperature", type=float, default=TEMPERATURE, help="knn: vote temperature")
    p.add_argument("--seed", type=int, default=0, help="seed of the random trunk")
    p.add_argument("--out", default="eval_results", help="folder for <mode>.json and <mode>.md")
    p.add_argument("--cache-dir", default="~/.cache/densecl_fast/features")
    p.add_argument("--data-cache-dir", default="~/.cache/densecl_fast", help="where built-in/converted data live")
    p.add_argument("--synthetic-images", type=int, default=512, help="size of the built-in set (as data.synthetic_images)")
    p.add_argument("--synthetic-resolution", type=int, default=160, help="its image side (as data.synthetic_resolution)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        args.ks = sorted({int(k) for k in args.k.split(",")})
    except ValueError:
        p.error(f"--k {args.k!r}: give integers, e.g. 10,20,100,200")
    if min(args.ks) < 1 or args.image_size < 32 or args.max_train < 0 or args.max_val < 0:
        p.error("--k must be >= 1, --image-size >= 32, --max-train/--max-val >= 0")
    return args


def run(args) -> dict:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    train, val = load_splits(args.data, args.val, max_train=args.max_train, max_val=args.max_val,
                             cache_dir=args.data_cache_dir, synthetic_images=args.synthetic_images,
                             synthetic_resolution=args.synthetic_resolution)
    trunk, arch, weights_id = feat.build_trunk(args.checkpoint, args.arch, args.encoder, args.seed)
    kw = dict(batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress)
    t0 = time.perf_counter()
    xtr = feat.cached_features(trunk, weights_id, train, args.image_size, device, args.cache_dir, **kw)
    xte = feat.cached_features(trunk, weights_id, val, args.image_size, device, args.cache_dir, **kw)
    ytr, yte = torch.from_numpy(train.labels), torch.from_numpy(val.labels)
    n_cls = len(train.classes)
    if args.mode == "knn":
        accs = knn_accuracy(xtr, ytr, xte, yte, args.ks, n_cls, args.temperature)
        metrics = {f"top1_k{k}": a for k, a in accs.items()}
        protocol = f"weighted kNN, cosine, T = {args.temperature}"
    else:
        metrics = quick_linear(xtr, ytr, xte, yte, n_cls)
        protocol = "quick linear probe (standardised pooled C5, L-BFGS cross-entropy)"
    return {"mode": args.mode, "checkpoint": args.checkpoint, "weights": weights_id, "encoder": args.encoder,
            "arch": arch, "data": args.data, "train": train.name,
            "val": val.name, "n_train": len(train), "n_val": len(val), "classes": n_cls,
            "image_size": args.image_size, "protocol": protocol, "metrics": metrics,
            "seconds": round(time.perf_counter() - t0, 1)}


def write(result: dict, out: str) -> str:
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, result["mode"])
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=2)
    rows = "\n".join(f"| {k} | {v:.2f} |" for k, v in result["metrics"].items())
    with open(base + ".md", "w") as f:
        f.write(f"# {result['mode']}: {result['checkpoint']}\n\n{result['protocol']}; train {result['train']} "
                f"({result['n_train']}), eval {result['val']} ({result['n_val']}), {result['image_size']} px\n\n"
                f"| metric | % |\n|---|---|\n{rows}\n")
    return base


def main(argv=None) -> int:
    args = parse(argv)
    try:
        result = run(args)
    except (DataError, WeightsError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    base = write(result, args.out)
    summary = ", ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items())
    print(f"{result['mode']} {result['checkpoint']}: {summary} ({result['n_val']} eval images); {base}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
