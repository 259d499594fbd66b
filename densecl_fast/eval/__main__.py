"""python -m densecl_fast.eval MODE --checkpoint CKPT|random [--arch A] --data DATA --out DIR

MODE: knn | linear | svm | lowshot | dense | cells. Writes DIR/<MODE>.json and DIR/<MODE>.md and prints
one summary line. A bad argument, data set or checkpoint is one line `error: ...` on stderr and
exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


from ..data import DataError, mosaics
from ..usage import Parser, UsageError, run_cli
from ..weights import WeightsError
from . import cells, dense, features, knn, linear, result_files, svm
from .datasets import EvalSplit, load_eval_data

MODES = ("knn", "linear", "svm", "lowshot", "dense", "cells")


def _ints(s: str, what: str):
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{what} {s!r}: give comma-separated integers") from None
    if not v or min(v) < 1:
        raise UsageError(f"{what} {s!r}: give positive integers")
    return v


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m densecl_fast.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("mode", help=" | ".join(MODES))
    p.add_argument("--checkpoint", required=True, help="training checkpoint / exported trunk / any file densecl_fast.weights reads, or 'random'")
    p.add_argument("--arch", help="resnet18/34/50/101 (required with random; else a check)")
    p.add_argument("--encoder", default="query", choices=("query", "key"))
    p.add_argument("--seed", type=int, default=0, help="random trunk init, training seeds, low-shot sampling")
    p.add_argument("--data", required=True, help="synthetic | image folder | .txt list | VOC devkit | fashion-mnist:ROOT | "
                                                 "fashion-mnist-mosaics:ROOT")
    p.add_argument("--val", default="", help="separate val folder / list (else a deterministic split)")
    p.add_argument("--root", default="", help="base folder of relative paths in a .txt list")
    p.add_argument("--max-train", type=int, default=0, help="first N training images (0 = all)")
    p.add_argument("--max-val", type=int, default=0, help="first N eval images (0 = all)")
    p.add_argument("--synthetic-images", type=int, default=512)
    p.add_argument("--synthetic-resolution", type=int, default=160)
    p.add_argument("--data-cache-dir", default="~/.cache/densecl_fast", help="where the built-in set is generated")
    p.add_argument("--image-size", type=int, help="default: the mosaics' side for fashion-mnist-mosaics, else 224")
    p.add_argument("--batch-size", type=int, default=64, help="extraction batch")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--cache-dir", default="~/.cache/densecl_fast/features")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--input-blind", action="store_true",
                   help="every image replaced by a black one: an input-blind trunk, the chance-level reference")
    p.add_argument("--k", default="20", help="knn: comma list of k")
    p.add_argument("--temperature", type=float, default=knn.TEMPERATURE)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", choices=("imagenet",), help="linear: the seed recipe through the trunk (GPU)")
    g.add_argument("--quick", action="store_true", help="linear: on cached features (the default)")
    p.add_argument("--epochs", type=int, help="linear / dense / cells: epochs (default: the recipe's)")
    p.add_argument("--lr", type=float, help="linear quick / dense / cells: learning rate")
    p.add_argument("--layers", default="c5", help="svm/lowshot: comma list of c2..c5")
    p.add_argument("--costs", default=",".join(str(c) for c in svm.COSTS), help="svm: costs (+ 0.5**4..0.5**19 unless --no-extra-costs)")
    p.add_argument("--no-extra-costs", action="store_true")
    p.add_argument("--shots", default=",".join(map(str, svm.LOWSHOT_K)), help="lowshot: positives per class")
    p.add_argument("--samples", type=int, default=svm.LOWSHOT_SAMPLES, help="lowshot: independent draws")
    p.add_argument("--layer", default="c4", choices=("c4", "c5"), help="dense: feature map")
    p.add_argument("--class-weights", default="balanced", choices=dense.CLASS_WEIGHTS,
                   help="dense: loss weights (balanced: softened median-frequency; none: plain cross-entropy)")
    return p


def check_out(out: str, mode: str) -> None:
    """--out must be a folder we can write DIR/<mode>.json and .md into, checked before any data
    is read or feature extracted (an existing folder, or one that can be made)."""
    if not out:
        raise UsageError("--out is empty: name the results folder (e.g. --out eval/)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: is a file, not a folder")
    for ext in ("json", "md"):
        f = os.path.join(out, f"{mode}.{ext}")
        if os.path.isdir(f):
            raise UsageError(f"--out {out}: {f} is a folder, so the results cannot be written there")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):  # the nearest existing folder: os.makedirs creates the rest
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {parent} is not writable")


def blind(split: EvalSplit, image_size: int) -> EvalSplit:
    """`split` with every image black (labels unchanged): features that cannot depend on the input."""
    from PIL import Image
    black = Image.new("RGB", (image_size, image_size))
    return EvalSplit(split.name, split.keys, lambda i: black, split.classes, split.labels, split.targets, split.masks,
                     split.fingerprint_extra + ":input-blind", split.cells)


def run(args) -> tuple[dict, list, str]:
    if args.mode not in MODES:
        raise UsageError(f"unknown mode {args.mode!r}: use one of {', '.join(MODES)}")
    if args.image_size is None:
        try:
            spec = mosaics.parse_source(args.data)
        except DataError:
            spec = None  # load_eval_data says what is wrong with it
        args.image_size = spec.size if spec else 224
    if args.image_size < 32:
        raise UsageError(f"--image-size {args.image_size}: at least 32")
    if args.checkpoint == "random" and not args.arch:
        raise UsageError("--checkpoint random needs --arch (e.g. --arch resnet18)")
    layers = [s.strip() for s in args.layers.split(",") if s.strip()]
    if args.mode in ("svm", "lowshot") and (not layers or set(layers) - set(features.SVM_POOL_GRID)):
        raise UsageError(f"--layers {args.layers!r}: use c2, c3, c4, c5")
    ks = _ints(args.k, "--k")
    shots = _ints(args.shots, "--shots")
    try:
        costs = svm.cost_list([float(c) for c in args.costs.split(",") if c.strip()], not args.no_extra_costs)
    except ValueError:
        raise UsageError(f"--costs {args.costs!r}: give comma-separated numbers") from None
    if args.preset and args.mode != "linear":
        raise UsageError("--preset is for the linear mode")
    check_out(args.out, args.mode)
    try:
        device = features.resolve_device(args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    progress = not args.no_progress
    task = {"knn": "cls", "linear": "cls", "svm": "multilabel", "lowshot": "multilabel", "dense": "seg",
            "cells": "cells"}[args.mode]
    train, test = load_eval_data(args.data, task=task, val=args.val, root=args.root, max_train=args.max_train,
                                 max_val=args.max_val, synthetic_images=args.synthetic_images,
                                 synthetic_resolution=args.synthetic_resolution, data_cache_dir=args.data_cache_dir)
    if not len(train) or not len(test):
        raise DataError(f"--data {args.data}: empty {'train' if not len(train) else 'eval'} split")
    if args.input_blind:
        train, test = blind(train, args.image_size), blind(test, args.image_size)
    trunk, arch, trunk_id = features.build_trunk(args.checkpoint, args.arch, args.seed, args.encoder)
    names = {"knn": ["pool5"], "linear": ["pool5"], "svm": [f"svm_{l}" for l in layers],
             "lowshot": [f"svm_{l}" for l in layers], "dense": [f"map_{args.layer}"],
             "cells": [f"map_{l}" for l in cells.LAYERS] + ["pool5"]}[args.mode]  # pool5: a kNN after it reuses the pass
    cache = None if args.no_cache else args.cache_dir
    kw = dict(image_size=args.image_size, device=device, cache_dir=cache, batch_size=args.batch_size,
              workers=args.workers, progress=progress)
    t0 = time.time()
    need_train = not (args.mode == "linear" and args.preset)
    ftr, how_tr = features.get_features(trunk, trunk_id, train, names, **kw) if need_train else ({}, "not needed")
    fte, how_te = features.get_features(trunk, trunk_id, test, names, **kw)
    t_feat = time.time() - t0
    res = {"mode": args.mode, "checkpoint": args.checkpoint, "arch": arch, "encoder": args.encoder, "seed": args.seed,
           "data": args.data, "image_size": args.image_size, "num_train": len(train), "num_eval": len(test),
           "train_split": train.name, "eval_split": test.name, "classes": train.classes, "feature_names": names,
           "features": {"train": how_tr, "eval": how_te, "seconds": round(t_feat, 2)}, "device": str(device),
           "input_blind": args.input_blind}
    nc = len(train.classes)
    if args.mode == "knn":
        acc = knn.knn_accuracy(ftr["pool5"], train.labels, fte["pool5"], test.labels, ks, nc, args.temperature)
        res.update(top1={str(k): v for k, v in acc.items()}, temperature=args.temperature)
        rows = [(f"top-1 (k={k}, T={args.temperature})", f"{v:.2f}") for k, v in acc.items()]
        line = ", ".join(f"k={k} top-1 {v:.2f}%" for k, v in acc.items())
    elif args.mode == "linear":
        if args.preset == "imagenet":
            r = linear.train_imagenet_preset(trunk, train, fte["pool5"], test.labels, nc, image_size=args.image_size,
                                             device=device, workers=args.workers, epochs=args.epochs, seed=args.seed,
                                             progress=progress)
            res["recipe"] = "imagenet"
        else:
            r = linear.train_quick(ftr["pool5"], train.labels, fte["pool5"], test.labels, nc,
                                   epochs=args.epochs or linear.QUICK_EPOCHS, lr=args.lr or linear.QUICK_LR,
                                   seed=args.seed, progress=progress)
            res["recipe"] = "quick"
        res.update(r)
        rows = [("top-1", f"{r['top1']:.2f}"), ("recipe", res["recipe"]), ("epochs", str(r["epochs"]))]
        line = f"linear ({res['recipe']}) top-1 {r['top1']:.2f}%"
    elif args.mode == "svm":
        res["costs"] = costs
        per_layer, rows = {}, []
        for n, l in zip(names, layers):
            r = svm.svm_full(ftr[n], train.multilabel_targets(), fte[n], test.multilabel_targets(), train.classes,
                             costs, progress)
            per_layer[l] = r
            rows.append((f"mAP {l}", f"{r['mAP']:.2f}"))
        res["layers"] = per_layer
        line = ", ".join(f"{l} mAP {per_layer[l]['mAP']:.2f}" for l in layers)
    elif args.mode == "lowshot":
        res["costs"] = costs
        per_layer, rows = {}, []
        for n, l in zip(names, layers):
            r = svm.svm_lowshot(ftr[n], train.multilabel_targets(), fte[n], test.multilabel_targets(), train.classes,
                                costs, shots, args.samples, args.seed, progress)
            if not r["k"]:
                raise DataError(f"low-shot: no k of {shots} is possible on this training split: {r['skipped']}")
            per_layer[l] = r
            rows += [(f"{l} k={k}", f"{v['mean']:.2f} ± {v['std']:.2f}") for k, v in r["k"].items()]
            rows += [(f"{l} k={k}", f"skipped: {why}") for k, why in r["skipped"].items()]
        res["layers"] = per_layer
        line = "; ".join(f"{l}: " + ", ".join(f"k={k} {v['mean']:.2f}±{v['std']:.2f}" for k, v in per_layer[l]["k"].items())
                         for l in layers)
    elif args.mode == "cells":
        res["cell_classes"] = list(mosaics.CELL_CLASSES)
        rows, parts = [], []
        for l in cells.LAYERS:
            r = cells.train_cells(ftr[f"map_{l}"], train.cells, fte[f"map_{l}"], test.cells,
                                  epochs=args.epochs or cells.CELL_EPOCHS, lr=args.lr or cells.CELL_LR, seed=args.seed,
                                  min_steps=0 if args.epochs else cells.CELL_MIN_STEPS, progress=progress)
            res[l] = r
            res[f"cell_{l}_acc"], res[f"cell_{l}_mean_class_acc"] = r["acc"], r["mean_class_acc"]
            g = r["grid"]
            rows += [(f"{l} ({g}x{g}) cell accuracy", f"{r['acc']:.2f}"),
                     (f"{l} ({g}x{g}) mean per-class accuracy", f"{r['mean_class_acc']:.2f}"),
                     (f"{l} chance (commonest class)", f"{r['chance']:.2f}")]
            parts.append(f"{l} ({g}x{g}) cell acc {r['acc']:.2f}%, mean per-class {r['mean_class_acc']:.2f}%")
        line = "cells probe: " + "; ".join(parts)
    else:
        n = names[0]
        r = dense.train_dense(ftr[n], dense.load_masks(train, args.image_size), fte[n],
                              dense.load_masks(test, args.image_size), nc, epochs=args.epochs or dense.DENSE_EPOCHS,
                              lr=args.lr or dense.DENSE_LR, class_weights=args.class_weights,
                              background=0 if train.classes[0] == "background" else None, seed=args.seed,
                              progress=progress, device=device)
        res.update(r, layer=args.layer, iou_per_class=dict(zip(train.classes, r["iou"])))
        rows = [(f"foreground mIoU ({args.layer})", f"{r['fg_mIoU']:.2f}"), (f"mIoU ({args.layer})", f"{r['mIoU']:.2f}"),
                ("pixel accuracy", f"{r['pixel_acc']:.2f}"), ("class weights", args.class_weights)]
        rows += [(f"IoU {c}", "–" if v is None else f"{v:.2f}") for c, v in zip(train.classes, r["iou"])]
        line = f"dense probe ({args.layer}) foreground mIoU {r['fg_mIoU']:.2f}%, mIoU {r['mIoU']:.2f}%"
    return res, rows, line


def main(argv=None) -> int:
    def evaluate():
        args = parser().parse_args(argv)
        res, rows, line = run(args)
        return args, res, line, result_files.write(args.out, args.mode, res, rows)

    rc, done = run_cli(evaluate, (DataError, WeightsError))
    if rc:
        return rc
    args, res, line, (jpath, mpath) = done
    feats = res["features"]
    print(f"{args.mode} {res['checkpoint']} ({res['arch']}) on {res['data']} [{res['eval_split']}, {res['num_eval']} images]: "
          f"{line} (features {feats['train']}/{feats['eval']}; wrote {jpath}, {mpath})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
