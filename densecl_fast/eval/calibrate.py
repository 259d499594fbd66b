"""Calibrate the per-cell probe before trusting it: the reference trunks in one table.

    python -m densecl_fast.eval.calibrate --data fashion-mnist-mosaics:/usr/share/datasets/fashion-mnist --out runs/cells_calibration

Rows (each through `python -m densecl_fast.eval cells` and `knn`, into OUT/<row>/):
  random_s<S>     the seeded random-init trunk, one row per `--seeds` entry;
  input_blind     the first random trunk fed black images (`--input-blind`): what a trunk that sees
                  nothing scores (the commonest class's share on accuracy, 1/11 on mean per-class);
  label_trained   a trunk trained on the mosaics' cell labels (`densecl_fast.eval.supervised`,
                  written to OUT/label_trained.pth; or `--label-trained FILE`).
The probe counts as calibrated when the label-trained trunk's C5 cell accuracy is at least `--margin`
points (default 20) above every random trunk's. The global kNN (pooled C5, k = 20, the mosaic's label:
the class most quadrants hold) is beside it. Writes OUT/calibration.json and OUT/calibration.md and
prints the table. Exit status 0 whatever the verdict (it is a measurement); bad input: one line
`error: ...`, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..data import DataError, mosaics
from ..usage import Parser, UsageError, run_cli
from . import supervised
from .__main__ import main as eval_main

MARGIN = 20.0
KNN_K = 20


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m densecl_fast.eval.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="fashion-mnist-mosaics:ROOT[#train=N,test=N,size=S]")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--seeds", default="0,1", help="random-init trunks (comma list); the first also seeds the "
                                                  "input-blind trunk, the label-trained run and every probe")
    p.add_argument("--label-trained", default="", help="an existing label-trained trunk (else one is trained)")
    p.add_argument("--steps", type=int, default=supervised.STEPS, help="label-trained run: steps")
    p.add_argument("--batch-size", type=int, default=supervised.BATCH, help="label-trained run: batch")
    p.add_argument("--max-train", type=int, default=0, help="first N training mosaics (probe, kNN bank, label-trained run)")
    p.add_argument("--max-val", type=int, default=0, help="first N test mosaics scored")
    p.add_argument("--probe-epochs", type=int, default=0, help="cells probe epochs (0: its recipe's)")
    p.add_argument("--margin", type=float, default=MARGIN, help="points the label-trained trunk must lead by (C5)")
    p.add_argument("--workers", type=int, default=0, help="eval data workers")
    p.add_argument("--data-cache-dir", default="~/.cache/densecl_fast", help="where the mosaics are generated")
    p.add_argument("--cache-dir", default="", help="feature cache (default OUT/feature_cache)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _eval(mode: str, checkpoint: str, out: str, args, seed: int, extra=()) -> dict:
    argv = [mode, "--checkpoint", checkpoint, "--arch", args.arch, "--data", args.data, "--out", out, "--seed", str(seed),
            "--max-train", str(args.max_train), "--max-val", str(args.max_val), "--workers", str(args.workers),
            "--data-cache-dir", args.data_cache_dir, "--cache-dir", args.cache_dir, *extra]
    if mode == "knn":
        argv += ["--k", str(KNN_K)]
    elif args.probe_epochs:
        argv += ["--epochs", str(args.probe_epochs)]
    if args.no_progress:
        argv.append("--no-progress")
    print("  $ python -m densecl_fast.eval " + " ".join(argv), flush=True)
    if eval_main(argv) != 0:
        raise UsageError(f"densecl_fast.eval {mode} of {checkpoint} failed (its error is above)")
    with open(os.path.join(out, f"{mode}.json")) as f:
        return json.load(f)


def _row(name: str, what: str, cells: dict, knn: dict) -> dict:
    r = {"trunk": name, "what": what, "knn_top1": knn["top1"][str(KNN_K)]}
    for l in ("c5", "c4"):
        r[f"cell_{l}_acc"], r[f"cell_{l}_mean_class_acc"] = cells[l]["acc"], cells[l]["mean_class_acc"]
        r[f"{l}_grid"], r[f"{l}_chance"] = cells[l]["grid"], cells[l]["chance"]
    return r


def table(rows: list[dict]) -> list[str]:
    g5, g4 = rows[0]["c5_grid"], rows[0]["c4_grid"]
    md = [f"| trunk | C5 ({g5}x{g5}) cell acc | C5 mean per-class | C4 ({g4}x{g4}) cell acc | C4 mean per-class | "
          f"global kNN top-1 (k = {KNN_K}) |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['what']} | {r['cell_c5_acc']:.2f} | {r['cell_c5_mean_class_acc']:.2f} | {r['cell_c4_acc']:.2f} | "
                  f"{r['cell_c4_mean_class_acc']:.2f} | {r['knn_top1']:.2f} |")
    return md


def run(args) -> dict:
    spec = mosaics.parse_source(args.data)
    if spec is None:
        raise UsageError(f"--data {args.data}: the cells probe's calibration needs fashion-mnist-mosaics:ROOT")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds {args.seeds!r}: give comma-separated integers") from None
    if not seeds:
        raise UsageError("--seeds: give at least one seed")
    if args.label_trained and not os.path.isfile(args.label_trained):
        raise UsageError(f"--label-trained {args.label_trained}: no such file")
    args.out = os.path.abspath(args.out)
    args.cache_dir = args.cache_dir or os.path.join(args.out, "feature_cache")
    os.makedirs(args.out, exist_ok=True)
    t0, rows, s0 = time.time(), [], seeds[0]
    for s in seeds:
        d = os.path.join(args.out, f"random_s{s}")
        rows.append(_row(f"random_s{s}", f"random init, seed {s}", _eval("cells", "random", d, args, s),
                         _eval("knn", "random", d, args, s)))
    d = os.path.join(args.out, "input_blind")
    rows.append(_row("input_blind", f"input-blind (random seed {s0}, black images)",
                     _eval("cells", "random", d, args, s0, ["--input-blind"]),
                     _eval("knn", "random", d, args, s0, ["--input-blind"])))
    ckpt = args.label_trained
    if not ckpt:
        ckpt = os.path.join(args.out, "label_trained.pth")
        print(f"  training the label-trained trunk ({args.steps} steps) into {ckpt}", flush=True)
        rc = supervised.main(["--data", args.data, "--out", ckpt, "--arch", args.arch, "--steps", str(args.steps),
                              "--batch-size", str(args.batch_size), "--seed", str(s0), "--max-train", str(args.max_train),
                              "--data-cache-dir", args.data_cache_dir] + (["--no-progress"] if args.no_progress else []))
        if rc != 0:
            raise UsageError("the label-trained run failed (its error is above)")
    d = os.path.join(args.out, "label_trained")
    what = "label-trained" + (f" ({args.steps} steps on the cell labels)" if not args.label_trained else f" ({ckpt})")
    rows.append(_row("label_trained", what, _eval("cells", ckpt, d, args, s0), _eval("knn", ckpt, d, args, s0)))

    randoms = [r for r in rows if r["trunk"].startswith("random_s")]
    lead = rows[-1]["cell_c5_acc"] - max(r["cell_c5_acc"] for r in randoms)
    blind = rows[len(randoms)]
    res = {"data": args.data, "arch": args.arch, "seeds": seeds, "rows": rows, "margin": args.margin,
           "label_trained_lead_c5": lead, "calibrated": lead >= args.margin,
           "chance_c5": blind["c5_chance"], "chance_c4": blind["c4_chance"], "label_trained": ckpt,
           "seconds": round(time.time() - t0, 1)}
    verdict = (f"label-trained − best random on C5 cell accuracy: {lead:+.2f} points: the probe "
               + (f"is calibrated (≥ {args.margin:g})" if res["calibrated"] else f"is NOT calibrated (< {args.margin:g})"))
    md = ["# Per-cell probe calibration", "", f"Data `{args.data}`, {args.arch}; probes and kNN seeded with {s0}.", "",
          *table(rows), "",
          f"Chance (the commonest cell class, what a constant answer scores): C5 {blind['c5_chance']:.2f}, "
          f"C4 {blind['c4_chance']:.2f}; mean per-class chance 1/11 = 9.09.", "", f"**{verdict}.**", ""]
    res["verdict"] = verdict
    with open(os.path.join(args.out, "calibration.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "calibration.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md[4:]), flush=True)
    return res


def main(argv=None) -> int:
    return run_cli(lambda: run(parser().parse_args(argv)), (DataError,))[0]


if __name__ == "__main__":
    sys.exit(main())
