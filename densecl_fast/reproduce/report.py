"""The reproduction's report: report.md and report.json (with the plots of plots.py), from OUT/state.json,
the runs' metrics.jsonl and the eval tools' JSON files (nothing here is typed in by hand except
the seed's published 200-epoch figures, which are labelled as such everywhere they appear)."""
from __future__ import annotations

import json
import math
import os
import statistics
import time

from ..recipe import IMAGENET_TRAIN_IMAGES
from .plan import fmt_duration, plan_lines
from ..metrics import read_metrics
from .plots import plot_all
from .runs import RUN_TITLE, method_of, title

LOWSHOT_K = (1, 2, 4, 8, 16, 32, 64, 96)

# The seed (mmselfsup densecl_resnet50_8xb32-coslr-200e_in1k): ImageNet, 200 epochs, ResNet-50.
PUBLISHED_200EP = {
    "voc07_svm_c5": 82.5,
    "lowshot": dict(zip(map(str, LOWSHOT_K), (42.68, 50.64, 61.74, 68.17, 72.99, 76.07, 79.19, 80.55))),
    "imagenet_linear_avgpool": 63.34,
    "knn_k20": 48.5,
    "voc0712_faster_rcnn_c4_ap50": 82.14,
    "voc12aug_fcn_miou": 69.47,
}
# The paper's own same-budget comparison (original repo, ImageNet 200 epochs): DenseCL vs MoCo-v2.
PAPER_DENSECL_VS_MOCO = {"VOC det AP": (58.7, 57.0), "VOC seg mIoU": (69.4, 67.5)}


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def collect_evals(out: str, trunks: list[str]) -> dict:
    """{trunk: {metric: value}} from OUT/eval/TRUNK/*.json (metric names as in report.json)."""
    res = {}
    for t in trunks:
        d = os.path.join(out, "eval", t)
        r = {}
        knn = _load(os.path.join(d, "knn.json"))
        if knn:
            for k, v in knn["top1"].items():
                r[f"knn_k{k}"] = v
        dense = _load(os.path.join(d, "dense.json"))
        if dense:
            if "fg_mIoU" in dense:
                r["dense_fg_miou"] = dense["fg_mIoU"]
            r["dense_miou"] = dense["mIoU"]
            r["dense_pixel_acc"] = dense["pixel_acc"]
        cells = _load(os.path.join(d, "cells.json"))
        if cells:
            for k in ("cell_c5_acc", "cell_c4_acc", "cell_c5_mean_class_acc", "cell_c4_mean_class_acc"):
                r[k] = cells[k]
        svm = _load(os.path.join(d, "svm.json"))
        if svm:
            r["voc07_svm_c5"] = svm["layers"]["c5"]["mAP"]
        low = _load(os.path.join(d, "lowshot.json"))
        if low:
            for k, v in low["layers"]["c5"]["k"].items():
                r[f"lowshot_k{k}"] = v["mean"]
        res[t] = r
    return res


def run_summary(out: str, run: str, stage: dict | None) -> dict:
    recs = read_metrics(os.path.join(out, run))
    if not recs:
        return {}
    ips = [r["img_per_s"] for r in recs[1:]] or [recs[0]["img_per_s"]]  # the first window holds start-up
    tail = recs[-max(1, len(recs) // 10):]
    return {"steps": recs[-1]["step"], "epochs": recs[-1]["epoch"], "first_loss": recs[0]["loss"],
            "final_loss": statistics.mean(r["loss"] for r in tail),
            "final_loss_dense": statistics.mean(r["loss_dense"] for r in tail),
            "final_loss_global": statistics.mean(r["loss_single"] for r in tail),
            "images_per_s_median": statistics.median(ips), "wall_s": (stage or {}).get("wall_s"),
            "checkpoint": (stage or {}).get("checkpoint")}


def _num(v, nd=2):
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


def _signed(v):
    return "–" if v is None else f"{v:+.2f}"


def metric_rows(ev: dict) -> list[tuple[str, str, float | None]]:
    """(key, label, published 200-epoch value or None) of the metrics present in any trunk."""
    have = set().union(*[set(v) for v in ev.values()]) if ev else set()
    rows = []
    for k in ("10", "20", "100", "200"):
        if f"knn_k{k}" in have:
            rows.append((f"knn_k{k}", f"kNN top-1, k = {k}", PUBLISHED_200EP["knn_k20"] if k == "20" else None))
    if "dense_fg_miou" in have:
        rows.append(("dense_fg_miou", "dense probe foreground mIoU (C4, our protocol)", None))
    if "dense_miou" in have:
        rows.append(("dense_miou", "dense probe mIoU (C4, our protocol)", None))
    for k, label in (("cell_c5_acc", "cells probe accuracy (C5 cells, our protocol)"),
                     ("cell_c4_acc", "cells probe accuracy (C4 cells, our protocol)"),
                     ("cell_c5_mean_class_acc", "cells probe mean per-class accuracy (C5)"),
                     ("cell_c4_mean_class_acc", "cells probe mean per-class accuracy (C4)")):
        if k in have:
            rows.append((k, label, None))
    if "voc07_svm_c5" in have:
        rows.append(("voc07_svm_c5", "VOC07 SVM mAP (C5)", PUBLISHED_200EP["voc07_svm_c5"]))
    for k in LOWSHOT_K:
        if f"lowshot_k{k}" in have:
            rows.append((f"lowshot_k{k}", f"VOC07 low-shot mAP, k = {k}", PUBLISHED_200EP["lowshot"][str(k)]))
    return rows


def commands(out: str, runs: list[str], state: dict, arch: str = "resnet50") -> dict:
    """Fine-tunes that stay in their own tools, from the exported files. The benchmark configs are
    ResNet-50's; another depth needs the depth keys (and its own mm configs)."""
    d2_extra = "" if arch == "resnet50" else (
        f" MODEL.RESNETS.DEPTH {arch[6:]}" + (" MODEL.RESNETS.RES2_OUT_CHANNELS 64" if arch in ("resnet18", "resnet34") else ""))
    mm_note = "" if arch == "resnet50" else f"  # the config is ResNet-50's: set model.backbone.depth={arch[6:]} (and its widths) for {arch}"
    cmds = {}
    for run in runs:
        files = state["stages"].get(f"export:{run}", {}).get("files", {})
        d2, mm = files.get("detectron2"), files.get("mmdet")
        cmds[run] = {
            "detectron2_voc0712_faster_rcnn_c4": (
                "cd moco/detection  # github.com/facebookresearch/moco (what DenseCL's own benchmarks use)\n"
                f"python train_net.py --config-file configs/pascal_voc_R_50_C4_24k_moco.yaml --num-gpus 8 "
                f"MODEL.WEIGHTS {d2}{d2_extra}"),
            "mmdet_voc0712_faster_rcnn_c4": (
                "cd mmselfsup  # 0.x, the seed's benchmark configs\n"
                "bash tools/benchmarks/mmdetection/mim_dist_train_c4.sh "
                f"configs/benchmarks/mmdetection/voc0712/faster_rcnn_r50_c4_mstrain_24k_voc0712.py {mm} 8{mm_note}"),
            "mmseg_voc12aug_fcn": (
                "cd mmselfsup  # 0.x\n"
                "bash tools/benchmarks/mmsegmentation/mim_dist_train.sh "
                f"configs/benchmarks/mmsegmentation/voc12aug/fcn_r50-d8_512x512_20k_voc12aug.py {mm} 4{mm_note}"),
            "imagenet_linear": (
                f"python -m densecl_fast.eval linear --checkpoint {state['stages'].get(f'pretrain:{run}', {}).get('checkpoint')} "
                "--data IMAGENET_TRAIN --val IMAGENET_VAL --preset imagenet --out "
                f"{os.path.join(out, 'eval', run)}"),
        }
    return cmds


def _stats(values: dict) -> dict:
    """{seed: value} -> per-seed values, mean and sample standard deviation (None with one seed)."""
    v = list(values.values())
    return {"per_seed": values, "mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else None,
            "n": len(v)}


def seed_groups(ev: dict, rows, trunks: list[str]) -> tuple[dict, dict]:
    """Per metric: each method's per-seed values with mean and std; and the paired differences
    (the same seed's DenseCL minus MoCo-v2, DenseCL minus random, MoCo-v2 minus random)."""
    groups, diffs = {}, {}
    for k, _, _ in rows:
        by = {}
        for t in trunks:
            v = ev.get(t, {}).get(k)
            if v is not None:
                by.setdefault(method_of(t), {})[t.partition("_s")[2] or "0"] = v
        groups[k] = {m: _stats(vals) for m, vals in by.items()}
        for a, b in (("densecl", "mocov2"), ("densecl", "random"), ("mocov2", "random")):
            pa, pb = by.get(a, {}), by.get(b, {})
            common = [s for s in pa if s in pb]
            if common:
                d = _stats({s: pa[s] - pb[s] for s in common})
                d["ahead"] = sum(x > 0 for x in d["per_seed"].values())
                diffs.setdefault(f"{a}_minus_{b}", {})[k] = d
    return groups, diffs


def _mean_std(g, signed=False) -> str:
    if not g:
        return "–"
    m = f"{g['mean']:+.2f}" if signed else f"{g['mean']:.2f}"
    return m + (f" ± {g['std']:.2f}" if g["std"] is not None else "")


def seeds_section(groups: dict, diffs: dict, rows, trunks: list[str], ev: dict, seeds: list[int]) -> list[str]:
    """report.md's tables with several seeds: mean ± std per method, the paired differences (how many
    seeds each way), and every per-seed figure."""
    methods = [m for m in RUN_TITLE if any(method_of(t) == m for t in trunks)]
    pairs = [p for p in ("densecl_minus_mocov2", "densecl_minus_random", "mocov2_minus_random") if p in diffs]
    pair_title = {"densecl_minus_mocov2": "DenseCL − MoCo-v2", "densecl_minus_random": "DenseCL − random",
                  "mocov2_minus_random": "MoCo-v2 − random"}
    head = ["metric"] + [f"{RUN_TITLE[m]}: mean ± std" for m in methods] + [pair_title[p] for p in pairs] \
        + ["seed, published (200 epochs)"]
    md = [f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): the training seed of each pretraining run, the "
          "init seed of each random trunk, and the probes' seed. Means and sample standard deviations over seeds; "
          "a difference is taken within a seed (the same data order and probe seed) and reported as mean ± std, "
          "with the number of seeds in which the first is ahead.", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, label, pub in rows:
        cells = [label] + [_mean_std(groups[k].get(m)) for m in methods]
        for p in pairs:
            d = diffs[p].get(k)
            cells.append(f"{_mean_std(d, signed=True)} ({d['ahead']}/{d['n']} ahead)" if d else "–")
        cells.append(_num(pub) + (" (200 ep)" if pub is not None else ""))
        md.append("| " + " | ".join(cells) + " |")
    md += ["", "Per seed:", "", "| seed | trunk | " + " | ".join(k for k, _, _ in rows) + " |",
           "|---|---|" + "---|" * len(rows)]
    for seed in seeds:
        for t in trunks:
            if t.partition("_s")[2] == str(seed) and t in ev:
                md.append(f"| {seed} | {RUN_TITLE[method_of(t)]} | " + " | ".join(_num(ev[t].get(k)) for k, _, _ in rows) + " |")
    return md + [""]


def write_report(out: str, state: dict, args, runs: list[str], skipped: dict, cfg, trunks: list[str] | None = None,
                 seeds: list[int] | None = None) -> list[str]:
    """runs: the pretraining runs' names; trunks: every evaluated trunk (runs and random inits);
    seeds: the training seeds (several: the tables give per-seed figures, means and std)."""
    plan = state["plan"]
    seeds = seeds or [cfg.train.seed]
    trunks = trunks or runs + ([] if args.no_random else ["random"])
    ev = collect_evals(out, trunks)
    rows = metric_rows(ev)
    summaries = {r: run_summary(out, r, state["stages"].get(f"pretrain:{r}")) for r in runs}
    groups, seed_diffs = seed_groups(ev, rows, trunks) if len(seeds) > 1 else ({}, {})
    diff = {}
    if "mocov2" in runs:
        for k, _, _ in rows:
            a, b = ev.get("densecl", {}).get(k), ev.get("mocov2", {}).get(k)
            diff[k] = None if a is None or b is None else a - b
    cmds = commands(out, runs, state, cfg.model.arch)
    pngs = plot_all(out, runs, ev, rows, plan, groups)

    report = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "args": state["args"], "plan": plan, "runs": summaries,
              "eval": ev, "densecl_minus_mocov2": diff, "seeds": seeds, "by_method": groups,
              "paired_differences": seed_diffs, "published_200ep": PUBLISHED_200EP,
              "paper_densecl_vs_mocov2_200ep": {k: {"densecl": a, "mocov2": b, "difference": a - b}
                                                for k, (a, b) in PAPER_DENSECL_VS_MOCO.items()},
              "not_evaluated": skipped, "commands": cmds, "plots": [os.path.basename(p) for p in pngs]}
    jpath = os.path.join(out, "report.json")
    with open(jpath, "w") as f:
        json.dump(report, f, indent=1)

    c = plan["config"]
    md = [f"# DenseCL short-budget reproduction: {plan['epochs']} of {plan['recipe_epochs']} epochs", "",
          f"Data `{args.data}` ({plan['num_images']:,} images), config `{c['preset']}` ({c['arch']}, {c['image_size']} px, "
          f"global batch {c['batch_size']}, lr {c['lr_per_256']} per 256, λ = {c['loss_lambda']}), "
          f"{plan['nproc']} × {plan['device']}; overrides: `{' '.join(state['args'].get('overrides', [])) or 'none'}`.",
          "", "## Plan", "", *[f"    {ln}" for ln in plan_lines(plan)], "",
          "The schedule is the recipe with its cosine compressed to the epochs that fit; everything else is unchanged.",
          f"Throughput was measured by a {plan['probe']['timed_steps']}-step timed run of the trainer with these exact "
          "settings (data loading included). Epoch-boundary and periodic-checkpoint costs are not in the estimate.",
          "", "## Pretraining", "", "| run | steps | epochs | loss first → last | global / dense (last) | median img/s | wall clock |",
          "|---|---|---|---|---|---|---|"]
    for r in runs:
        s = summaries[r]
        if s:
            md.append(f"| {title(r)} | {s['steps']} | {s['epochs']:g} | {_num(s['first_loss'], 3)} → "
                      f"{_num(s['final_loss'], 3)} | {_num(s['final_loss_global'], 3)} / {_num(s['final_loss_dense'], 3)} | "
                      f"{s['images_per_s_median']:.1f} | {fmt_duration(s['wall_s']) if s['wall_s'] else '–'} |")
    md += ["", "MoCo-v2 here is the same model and schedule with λ = 0: its dense loss is computed and logged "
           "but has no weight.", "", "![loss](loss.png) ![throughput](throughput.png)"
           + (" ![kNN during pretraining](knn.png)" if any(p.endswith("knn.png") for p in pngs) else ""), "",
           f"## Evaluation (ours after {plan['epochs']} epoch(s); published figures are 200-epoch ImageNet ResNet-50)", ""]
    if len(seeds) > 1:
        md += seeds_section(groups, seed_diffs, rows, trunks, ev, seeds)
        head = None
    else:
        head = ["metric"] + [f"ours: {title(t)}" for t in trunks if t in ev]
    if head:
        if "mocov2" in runs:
            head.append("DenseCL − MoCo-v2")
        head.append("seed, published (200 epochs)")
        md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for k, label, pub in rows:
            cells = [label] + [_num(ev[t].get(k)) for t in trunks if t in ev]
            if "mocov2" in runs:
                cells.append(_signed(diff.get(k)))
            cells.append(_num(pub) + (" (200 ep)" if pub is not None else ""))
            md.append("| " + " | ".join(cells) + " |")
    md += ["", "Published 200-epoch figures not evaluated here (fine-tunes in their own tools, commands below): "
           f"ImageNet linear {PUBLISHED_200EP['imagenet_linear_avgpool']} (AvgPool), VOC07+12 Faster R-CNN C4 AP50 "
           f"{PUBLISHED_200EP['voc0712_faster_rcnn_c4_ap50']}, VOC12aug FCN mIoU {PUBLISHED_200EP['voc12aug_fcn_miou']}.",
           ""]
    if "mocov2" in runs and diff and len(seeds) == 1:
        md.append("**DenseCL − MoCo-v2 at the same budget** (positive = DenseCL better): " + ", ".join(
            f"{k} {_signed(v)}" for k, v in diff.items()) + ".")
    if any(method_of(r) == "mocov2" for r in runs):
        md.append("The paper's claim at 200 ImageNet epochs (original repo): " + ", ".join(
            f"{k} {a} vs {b} ({a - b:+.1f})" for k, (a, b) in PAPER_DENSECL_VS_MOCO.items()) + ".")
        md.append("")
    if args.data == "synthetic" or (args.val == "" and args.data != "synthetic" and not args.data.startswith(("fashion-mnist:", "fashion-mnist-mosaics:"))):
        md.append("The kNN evaluation split is the eval tool's deterministic hold-out of the pretraining images "
                  "(every 5th image), not a separate validation set." if args.data != "synthetic" else
                  "On the built-in set the eval split is every 5th image of the pretraining set (labels and masks are "
                  "never used in pretraining).")
        md.append("")
    if skipped:
        md += ["Not evaluated:", ""] + [f"- {k}: {v}" for k, v in skipped.items()] + [""]
    md += ["![eval](eval.png)", "", "## Fine-tunes (exported weights; run in those tools)", ""]
    for r in runs:
        files = state["stages"].get(f"export:{r}", {}).get("files", {})
        md += [f"### {title(r)}", "", "Exports: " + ", ".join(f"`{v}` ({k})" for k, v in files.items()), ""]
        for name, cmd in cmds[r].items():
            md += [f"{name}:", "", "```bash", cmd, "```", ""]
    if plan["num_images"] < IMAGENET_TRAIN_IMAGES // 10:
        md += ["**Scale**: this is a small-scale run; its numbers check the pipeline and the direction of the "
               "DenseCL − MoCo-v2 difference, not the published values.", ""]
    mpath = os.path.join(out, "report.md")
    with open(mpath, "w") as f:
        f.write("\n".join(md) + "\n")
    return [mpath, jpath, *pngs]
