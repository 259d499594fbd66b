"""The reproduction's report: report.md, report.json and three PNG plots, from OUT/state.json,
the runs' metrics.jsonl and the eval tools' JSON files (nothing here is typed in by hand except
the seed's published 200-epoch figures, which are labelled as such everywhere they appear)."""
from __future__ import annotations

import json
import math
import os
import statistics
import time

from .plan import IMAGENET_TRAIN_IMAGES, fmt_duration, plan_lines
from .runs import read_metrics

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

RUN_TITLE = {"densecl": "DenseCL", "mocov2": "MoCo-v2 (λ = 0)", "random": "random init"}


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
            r["dense_miou"] = dense["mIoU"]
            r["dense_pixel_acc"] = dense["pixel_acc"]
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


def _f(v, nd=2):
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


def _signed(v):
    return "–" if v is None else f"{v:+.2f}"


def metric_rows(ev: dict, ks_knn=("20",)) -> list[tuple[str, str, float | None]]:
    """(key, label, published 200-epoch value or None) of the metrics present in any trunk."""
    have = set().union(*[set(v) for v in ev.values()]) if ev else set()
    rows = []
    for k in ("10", "20", "100", "200"):
        if f"knn_k{k}" in have:
            rows.append((f"knn_k{k}", f"kNN top-1, k = {k}", PUBLISHED_200EP["knn_k20"] if k == "20" else None))
    if "dense_miou" in have:
        rows.append(("dense_miou", "dense probe mIoU (C4, our protocol)", None))
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


def _save(fig, out, name):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(out: str, runs: list[str], ev: dict, rows, plan: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for run, color in zip(runs, ("tab:blue", "tab:orange")):
        recs = read_metrics(os.path.join(out, run))
        if not recs:
            continue
        x = [r["epoch"] for r in recs]
        ax.plot(x, [r["loss"] for r in recs], color=color, label=f"{RUN_TITLE[run]}: loss")
        ax.plot(x, [r["loss_single"] for r in recs], color=color, ls="--", lw=1, label=f"{RUN_TITLE[run]}: global")
        ax.plot(x, [r["loss_dense"] for r in recs], color=color, ls=":", lw=1, label=f"{RUN_TITLE[run]}: dense")
    ax.set_xlabel("epoch")
    ax.set_ylabel("InfoNCE loss")
    ax.set_title(f"pretraining loss ({plan['epochs']} epochs of the compressed recipe)")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out, "loss.png"))

    curves = {run: [r for r in read_metrics(os.path.join(out, run)) if "knn_top1" in r] for run in runs}
    if any(curves.values()):  # the online kNN monitor's records (train.knn_data)
        fig, ax = plt.subplots(figsize=(7, 4))
        for (run, recs), color in zip(curves.items(), ("tab:blue", "tab:orange")):
            if recs:
                ax.plot([r["epoch"] for r in recs], [r["knn_top1"] for r in recs], color=color, marker="o",
                        label=RUN_TITLE[run])
        ax.set_xlabel("epoch")
        ax.set_ylabel("kNN top-1 (%)")
        ax.set_title("online kNN monitor during pretraining (train.knn_data)")
        ax.legend(fontsize=8)
        paths.append(_save(fig, out, "knn.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for run, color in zip(runs, ("tab:blue", "tab:orange")):
        recs = read_metrics(os.path.join(out, run))[1:]  # the first record holds start-up
        if recs:
            ax.plot([r["step"] for r in recs], [r["img_per_s"] for r in recs], color=color, lw=1, label=RUN_TITLE[run])
    ax.axhline(plan["images_per_s"], color="gray", ls="--", label=f"probe median {plan['images_per_s']:.1f}")
    ax.set_xlabel("step")
    ax.set_ylabel("images / s (all processes, data included)")
    ax.set_title("training throughput")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out, "throughput.png"))

    trunks = [t for t in ev if ev[t]]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) + 2), 4))
    width = 0.8 / max(1, len(trunks) + 1)
    for i, t in enumerate(trunks):
        vals = [ev[t].get(k) for k, _, _ in rows]
        ax.bar([j + i * width for j in range(len(rows))], [v if v is not None else 0 for v in vals], width,
               label=f"ours: {RUN_TITLE[t]}")
    pub = [p for _, _, p in rows]
    if any(p is not None for p in pub):
        ax.bar([j + len(trunks) * width for j in range(len(rows))], [p or 0 for p in pub], width, color="lightgray",
               hatch="//", label="seed, published (200 epochs)")
    ax.set_xticks([j + width * len(trunks) / 2 for j in range(len(rows))])
    ax.set_xticklabels([k for k, _, _ in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_title(f"evaluation after {plan['epochs']} epoch(s)")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out, "eval.png"))
    return paths


def write_report(out: str, state: dict, args, runs: list[str], skipped: dict, cfg) -> list[str]:
    plan = state["plan"]
    trunks = runs + ([] if args.no_random else ["random"])
    ev = collect_evals(out, trunks)
    rows = metric_rows(ev)
    summaries = {r: run_summary(out, r, state["stages"].get(f"pretrain:{r}")) for r in runs}
    diff = {}
    if "mocov2" in runs:
        for k, _, _ in rows:
            a, b = ev.get("densecl", {}).get(k), ev.get("mocov2", {}).get(k)
            diff[k] = None if a is None or b is None else a - b
    cmds = commands(out, runs, state, cfg.model.arch)
    pngs = plot_all(out, runs, ev, rows, plan)

    report = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "args": state["args"], "plan": plan, "runs": summaries,
              "eval": ev, "densecl_minus_mocov2": diff, "published_200ep": PUBLISHED_200EP,
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
            md.append(f"| {RUN_TITLE[r]} | {s['steps']} | {s['epochs']:g} | {_f(s['first_loss'], 3)} → "
                      f"{_f(s['final_loss'], 3)} | {_f(s['final_loss_global'], 3)} / {_f(s['final_loss_dense'], 3)} | "
                      f"{s['images_per_s_median']:.1f} | {fmt_duration(s['wall_s']) if s['wall_s'] else '–'} |")
    md += ["", "MoCo-v2 here is the same model and schedule with λ = 0: its dense loss is computed and logged "
           "but has no weight.", "", "![loss](loss.png) ![throughput](throughput.png)"
           + (" ![kNN during pretraining](knn.png)" if any(p.endswith("knn.png") for p in pngs) else ""), "",
           f"## Evaluation (ours after {plan['epochs']} epoch(s); published figures are 200-epoch ImageNet ResNet-50)", ""]
    head = ["metric"] + [f"ours: {RUN_TITLE[t]}" for t in trunks if t in ev]
    if "mocov2" in runs:
        head.append("DenseCL − MoCo-v2")
    head.append("seed, published (200 epochs)")
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, label, pub in rows:
        cells = [label] + [_f(ev[t].get(k)) for t in trunks if t in ev]
        if "mocov2" in runs:
            cells.append(_signed(diff.get(k)))
        cells.append(_f(pub) + (" (200 ep)" if pub is not None else ""))
        md.append("| " + " | ".join(cells) + " |")
    md += ["", "Published 200-epoch figures not evaluated here (fine-tunes in their own tools, commands below): "
           f"ImageNet linear {PUBLISHED_200EP['imagenet_linear_avgpool']} (AvgPool), VOC07+12 Faster R-CNN C4 AP50 "
           f"{PUBLISHED_200EP['voc0712_faster_rcnn_c4_ap50']}, VOC12aug FCN mIoU {PUBLISHED_200EP['voc12aug_fcn_miou']}.",
           ""]
    if "mocov2" in runs and diff:
        md.append("**DenseCL − MoCo-v2 at the same budget** (positive = DenseCL better): " + ", ".join(
            f"{k} {_signed(v)}" for k, v in diff.items()) + ".")
        md.append("The paper's claim at 200 ImageNet epochs (original repo): " + ", ".join(
            f"{k} {a} vs {b} ({a - b:+.1f})" for k, (a, b) in PAPER_DENSECL_VS_MOCO.items()) + ".")
        md.append("")
    if args.data == "synthetic" or (args.val == "" and args.data != "synthetic" and not args.data.startswith("fashion-mnist:")):
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
        md += [f"### {RUN_TITLE[r]}", "", "Exports: " + ", ".join(f"`{v}` ({k})" for k, v in files.items()), ""]
        for name, cmd in cmds[r].items():
            md += [f"{name}:", "", "```bash", cmd, "```", ""]
    if plan["num_images"] < IMAGENET_TRAIN_IMAGES // 10:
        md += ["**Scale**: this is a small-scale run; its numbers check the pipeline and the direction of the "
               "DenseCL − MoCo-v2 difference, not the published values.", ""]
    mpath = os.path.join(out, "report.md")
    with open(mpath, "w") as f:
        f.write("\n".join(md) + "\n")
    return [mpath, jpath, *pngs]
