"""The reproduction's plots: loss.png, knn.png, throughput.png and eval.png in OUT, from the runs'
metrics.jsonl and the evaluation figures report.py gathers."""
from __future__ import annotations

import os

from ..metrics import read_metrics
from .runs import RUN_TITLE, method_of, title

METHOD_COLOR = {"densecl": "tab:blue", "mocov2": "tab:orange", "random": "tab:gray"}
SEED_STYLE = ("-", "--", ":", "-.")


def _save(fig, out, name):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _seed_rank(name: str, runs: list[str]) -> int:
    """0 for the first seed of a method, 1 for its second, ... (line style and label of its curves)."""
    return [r for r in runs if method_of(r) == method_of(name)].index(name)


def plot_all(out: str, runs: list[str], ev: dict, rows, plan: dict, groups: dict | None = None) -> list[str]:
    """loss.png, knn.png (when the runs logged the online kNN monitor), throughput.png, eval.png.
    One colour per method, one line style per seed; with several seeds eval.png shows each method's
    mean with its standard deviation and the per-seed values (`groups`: metric -> method -> stats)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def style(run):
        k = _seed_rank(run, runs)
        return dict(color=METHOD_COLOR[method_of(run)], first=k == 0, ls=SEED_STYLE[k % len(SEED_STYLE)])

    several = len(runs) > len({method_of(r) for r in runs})
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        recs = read_metrics(os.path.join(out, run))
        if not recs:
            continue
        st, x = style(run), [r["epoch"] for r in recs]
        name = RUN_TITLE[method_of(run)] if several else title(run)
        if several:  # the total loss per run, the dense loss in thin lines: 3 curves x 6 runs do not read
            ax.plot(x, [r["loss"] for r in recs], color=st["color"], ls=st["ls"], label=f"{name}: loss" if st["first"] else None)
            ax.plot(x, [r["loss_dense"] for r in recs], color=st["color"], ls=st["ls"], lw=0.7, alpha=0.6,
                    label=f"{name}: dense" if st["first"] else None)
            continue
        ax.plot(x, [r["loss"] for r in recs], color=st["color"], label=f"{name}: loss")
        ax.plot(x, [r["loss_single"] for r in recs], color=st["color"], ls="--", lw=1, label=f"{name}: global")
        ax.plot(x, [r["loss_dense"] for r in recs], color=st["color"], ls=":", lw=1, label=f"{name}: dense")
    ax.set_xlabel("epoch")
    ax.set_ylabel("InfoNCE loss")
    ax.set_title(f"pretraining loss ({plan['epochs']} epochs of the compressed recipe)"
                 + ("; line style = seed" if several else ""))
    ax.legend(fontsize=7)
    paths.append(_save(fig, out, "loss.png"))

    curves = {run: [r for r in read_metrics(os.path.join(out, run)) if "knn_top1" in r] for run in runs}
    if any(curves.values()):  # the online kNN monitor's records (train.knn_data)
        fig, ax = plt.subplots(figsize=(7, 4))
        for run, recs in curves.items():
            if recs:
                st = style(run)
                ax.plot([r["epoch"] for r in recs], [r["knn_top1"] for r in recs], color=st["color"], ls=st["ls"],
                        marker="o", ms=3, label=title(run))
        ax.set_xlabel("epoch")
        ax.set_ylabel("kNN top-1 (%)")
        ax.set_title("online kNN monitor during pretraining (train.knn_data)")
        ax.legend(fontsize=7)
        paths.append(_save(fig, out, "knn.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        recs = read_metrics(os.path.join(out, run))[1:]  # the first record holds start-up
        if recs:
            st = style(run)
            ax.plot([r["step"] for r in recs], [r["img_per_s"] for r in recs], color=st["color"], ls=st["ls"], lw=1,
                    label=title(run))
    ax.axhline(plan["images_per_s"], color="gray", ls="--", label=f"probe median {plan['images_per_s']:.1f}")
    ax.set_xlabel("step")
    ax.set_ylabel("images / s (all processes, data included)")
    ax.set_title("training throughput")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out, "throughput.png"))

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) + 2), 4))
    if groups:
        methods = [m for m in RUN_TITLE if any(m in groups[k] for k, _, _ in rows)]
        width = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            xs = [j + i * width for j in range(len(rows))]
            stats = [groups[k].get(m) for k, _, _ in rows]
            ax.bar(xs, [g["mean"] if g else 0 for g in stats], width, yerr=[g["std"] or 0 if g else 0 for g in stats],
                   color=METHOD_COLOR[m], alpha=0.7, capsize=3, label=f"{RUN_TITLE[m]}: mean ± std")
            for x, g in zip(xs, stats):
                if g:
                    ax.plot([x] * len(g["per_seed"]), list(g["per_seed"].values()), "k.", ms=4)
        ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(rows))])
        ax.set_title(f"evaluation after {plan['epochs']} epoch(s): mean ± std over seeds, dots = seeds")
    else:
        trunks = [t for t in ev if ev[t]]
        width = 0.8 / max(1, len(trunks) + 1)
        for i, t in enumerate(trunks):
            vals = [ev[t].get(k) for k, _, _ in rows]
            ax.bar([j + i * width for j in range(len(rows))], [v if v is not None else 0 for v in vals], width,
                   label=f"ours: {title(t)}")
        pub = [p for _, _, p in rows]
        if any(p is not None for p in pub):
            ax.bar([j + len(trunks) * width for j in range(len(rows))], [p or 0 for p in pub], width,
                   color="lightgray", hatch="//", label="seed, published (200 epochs)")
        ax.set_xticks([j + width * len(trunks) / 2 for j in range(len(rows))])
        ax.set_title(f"evaluation after {plan['epochs']} epoch(s)")
    ax.set_xticklabels([k for k, _, _ in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out, "eval.png"))
    return paths
