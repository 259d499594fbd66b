"""What `python -m perf` writes: the projection, the goal verdict, results.json, results.md, the plots."""
from __future__ import annotations

import json
import math
import os

from densecl_fast.recipe import ASSUMED_SCALING, IMAGENET_TRAIN_IMAGES, RECIPE_EPOCHS

from .measure import STAGES

GOAL = {"images_per_s": 4000.0, "vs_compiled": 1.4, "vs_mmselfsup": 4.5,
        "variant": "e2e_dali", "compiled": "compiled", "mmselfsup": "mmselfsup_fp32_b32"}


def _ips(v):
    return v["images_per_s"]["median"] if v and v.get("status") == "ok" and v.get("images_per_s") else None


def recipe_hours(images_per_s, gpus=1, efficiency=ASSUMED_SCALING, images=IMAGENET_TRAIN_IMAGES, epochs=RECIPE_EPOCHS):
    """Hours for `epochs` passes over `images`, each of `gpus` cards at `efficiency` of its single-card rate."""
    if not images_per_s or images_per_s <= 0:
        return math.inf
    return images * epochs / (images_per_s * gpus * (efficiency if gpus > 1 else 1.0)) / 3600.0


def projection(variants, gpus=(1, 8), efficiency=ASSUMED_SCALING, images=IMAGENET_TRAIN_IMAGES, epochs=RECIPE_EPOCHS):
    """Wall clock of the recipe from the headline variant: DALI end to end, else torchvision end to end,
    else the fastest model-only variant (flagged: data loading not included)."""
    ok = {v["name"]: v for v in variants if _ips(v)}
    head, note = None, "no variant succeeded"
    model_only = [v for v in ok.values() if v.get("data") == "synthetic"]
    if "e2e_dali" in ok:
        head, note = ok["e2e_dali"], "end to end: DALI over JPEGs"
    elif "e2e_torchvision" in ok:
        head, note = ok["e2e_torchvision"], "end to end: torchvision loader over JPEGs"
    elif model_only:
        head, note = max(model_only, key=_ips), "model only (synthetic on-device input): data loading NOT included"
    out = {"images": images, "epochs": epochs, "scaling_efficiency": efficiency, "gpus": list(gpus),
           "assumption": (f"N cards run data-parallel at {efficiency:.0%} of N x the single-card images/s "
                          "(an assumption, not measured: gradient all-reduce, key all-gather and SyncBN cost "
                          "are not modelled); each card keeps the measured per-card batch, so the global batch "
                          "is N x that batch (lr scaled linearly). Excludes checkpointing, start-up and evaluation."),
           "headline": None,
           "per_variant_1gpu_hours": {n: recipe_hours(_ips(v), 1, efficiency, images, epochs) for n, v in ok.items()}}
    if head is not None:
        out["headline"] = {"variant": head["name"], "note": note, "images_per_s_per_gpu": _ips(head),
                           "hours": {str(n): recipe_hours(_ips(head), n, efficiency, images, epochs) for n in gpus}}
    base = ok.get(GOAL["mmselfsup"])
    if base is not None:
        out["seed_recipe_8x32"] = {
            "variant": base["name"], "images_per_s_per_gpu": _ips(base),
            "hours_on_8": recipe_hours(_ips(base), 8, efficiency, images, epochs),
            "note": f"the seed's 8-card recipe as {base['name']} runs it (eager fp32, batch "
                    f"{(base.get('settings') or {}).get('batch')} per card) on 8 cards of this kind, model only, "
                    "same scaling assumption"}
    return out


def goal_verdict(variants, device_name, batch, image_size):
    """>= 4000 img/s end to end (DALI, JPEGs) on one H100 at batch 256, >= 1.4x the compiled eager step
    and >= 4.5x the mmselfsup-style step of the same run."""
    by = {v["name"]: v for v in variants}
    e2e, comp, base = (_ips(by.get(GOAL[k])) for k in ("variant", "compiled", "mmselfsup"))
    out = {"target": dict(GOAL), "e2e_dali_images_per_s": e2e, "compiled_images_per_s": comp,
           "mmselfsup_images_per_s": base, "ratio_vs_compiled": e2e / comp if e2e and comp else None,
           "ratio_vs_mmselfsup": e2e / base if e2e and base else None}
    out["checks"] = {"images_per_s": None if e2e is None else e2e >= GOAL["images_per_s"],
                     **{k: None if out[f"ratio_{k}"] is None else out[f"ratio_{k}"] >= GOAL[k]
                        for k in ("vs_compiled", "vs_mmselfsup")}}
    why_not = []
    if "H100" not in device_name:
        why_not.append(f"the goal is set for one H100, this device is {device_name}")
    if batch != 256 or image_size != 224:
        why_not.append(f"the goal is at batch 256, 224 px (this run: batch {batch}, {image_size} px)")
    missing = [GOAL[k] for k, x in (("variant", e2e), ("compiled", comp), ("mmselfsup", base)) if x is None]
    if missing:
        why_not.append("no measurement in this run of " + ", ".join(missing))
    out["verdict"] = ("not judged: " + "; ".join(why_not) if why_not
                      else "PASS" if all(out["checks"].values()) else "FAIL")
    return out


# Same-run baselines: what the grouped BN and our kernels cost or gain against what a user
# writes instead (ordinary BatchNorm over the whole batch), eager and compiled.
RATIOS = (("grouping_cost", "eager_bf16_cl_fused", "eager_plain_bn", 0.95),
          ("compiled", "compiled_fused", "compiled_plain_bn", 1.0),
          ("grouped_bn_alone_eager", "eager_bf16_cl", "eager_plain_bn", None),
          ("grouped_bn_alone_compiled", "compiled", "compiled_plain_bn", None))


def baseline_ratios(variants):
    """name -> {ours, baseline, ratio (images/s ours / baseline, same run), target, met}."""
    by = {v["name"]: v for v in variants}
    out = {}
    for name, ours, base, target in RATIOS:
        a, b = _ips(by.get(ours)), _ips(by.get(base))
        r = a / b if a and b else None
        out[name] = {"ours": ours, "baseline": base, "ratio": r, "target": target,
                     "met": None if r is None or target is None else r >= target}
    return out


def _finite(x):
    """Strict JSON: non-finite floats become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    return [_finite(v) for v in x] if isinstance(x, (list, tuple)) else x


def write_json(path, results):
    with open(path + ".tmp", "w") as f:
        json.dump(_finite(results), f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def _num(x, fmt="{:,.0f}"):
    return "–" if x is None else fmt.format(x)


def tflops_text(x):
    return "–" if x is None else (f"{x:,.1f}" if x >= 10 else f"{x:.3g}")


def _hours(h):
    return "–" if h is None or not math.isfinite(h) else f"{h:,.1f} h ({h / 24:,.2f} days)"


def settings_text(v):
    s = v.get("settings") or {}
    return ", ".join([f"batch {s.get('batch')}", s.get("precision", "?")]
                     + (["channels-last"] if s.get("channels_last") else [])
                     + ["compiled" if s.get("compile") else "eager",
                        "fused kernels" if s.get("fused") else "reference kernels",
                        {"synthetic": "synthetic on-device input", "torch": "torchvision loader",
                         "dali": "DALI loader"}.get(s.get("data"), str(s.get("data")))])


def _table(head, rows, text=(0,)):
    """A markdown table; the columns in `text` are left-aligned, the others (figures) right-aligned."""
    return ["| " + " | ".join(head) + " |", "|" + "".join("---|" if i in text else "---:|" for i in range(len(head)))] + \
           ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def markdown(results):
    m, env, g, pr = results["meta"], results["environment"], results.get("goal"), results.get("projection")
    peak, flops, variants = results.get("peak") or {}, results.get("flops") or {}, results["variants"]
    L = [f"# DenseCL step profile: {env.get('device_name')}", "",
         f"- date: {m['date']}; commit {env.get('commit') or '?'}{' (dirty tree)' if env.get('dirty') else ''}",
         f"- command: `{m['command']}`"] + ([f"- **{m['note']}**"] if m.get("note") else []) + [
         f"- config: {m['config']} | {m['arch']} | batch {m['batch']} | {m['image_size']} px | "
         f"queue {m['queue_len']} | bn_group_size {m['bn_group_size']}",
         f"- torch {env.get('torch')}, torchvision {env.get('torchvision')}, triton {env.get('triton')}, "
         f"DALI {env.get('dali') or 'not installed'}, CUDA {env.get('cuda_runtime')}, fused kernels: {m.get('fused_kernels')}",
         f"- timing: {m['timing']}; images/s = median over repeats (spread = min–max); "
         f"warm-up {m['warmup']}, {m['steps']} steps x {m['repeats']} repeats unless noted"]
    if peak:
        L.append(f"- ceiling: {tflops_text(peak.get('tflops'))} TFLOP/s {peak.get('what', '')} "
                 f"({peak.get('source')}{': ' + peak['method'] if peak.get('method') else ''}); "
                 "MFU = achieved TFLOP/s / this ceiling for every variant, fp32 ones included")
    if flops.get("per_image"):
        L.append(f"- FLOPs: {flops['per_image'] / 1e9:,.2f} GFLOP per image per step ({flops.get('method')}); "
                 f"{flops.get('includes', '')}")
    elif flops.get("error"):
        L.append(f"- FLOPs: not counted ({flops['error']}); TFLOP/s and MFU omitted")
    if m.get("data"):
        L.append(f"- data variants: {m['data']}")
    rows = []
    for v in variants:
        ips = v.get("images_per_s") or {}
        status = v["status"] if v["status"] == "ok" else f"{v['status']}: {v.get('reason') or v.get('error', '')}"
        spread = f"{_num(ips.get('min'))}–{_num(ips.get('max'))} (±{ips.get('spread_pct', 0):.1f}%)" if ips else "–"
        rows.append([v["name"], settings_text(v), _num(ips.get("median")), spread, _num(v.get("step_ms"), "{:,.1f}"),
                     _num(v.get("peak_memory_gib"), "{:,.1f} GiB"), tflops_text(v.get("tflops")),
                     _num(v.get("mfu"), "{:.1%}"), status.replace("|", "/").replace("\n", " ")[:160]])
    L += ["", "## Throughput", ""] + _table(["variant", "settings", "images/s (median)", "spread", "ms/step",
                                             "peak memory", "TFLOP/s", "MFU", "status"], rows, (0, 1, 8))
    ok = [v for v in variants if v["status"] == "ok" and v.get("stages_ms")]
    if ok:
        cols = [s for s in STAGES if any(s in v["stages_ms"] for v in ok)] + ["other"]
        L += ["", f"## Where the milliseconds go (ms per step, mean of the timed steps; {m['timing']})", ""]
        L += _table(["variant"] + cols + ["step"], [[v["name"]] + [_num(v["stages_ms"].get(c), "{:,.2f}") for c in cols]
                                                    + [_num(v.get("stage_step_ms"), "{:,.2f}")] for v in ok])
    ratios = results.get("ratios") or {}
    if any(x["ratio"] is not None for x in ratios.values()):
        L += ["", "## Same-run baselines (ordinary BatchNorm over the whole batch)", ""]
        L += _table(["ratio", "ours / baseline", "images/s ratio", "target", "met"],
                    [[k, f"{x['ours']} / {x['baseline']}", _num(x["ratio"], "{:.3f}x"),
                      "–" if x["target"] is None else f"≥ {x['target']}x",
                      "–" if x["met"] is None else ("yes" if x["met"] else "NO")] for k, x in ratios.items()], (0, 1))
    comp = [v for v in variants if v.get("compile_s") is not None or v.get("jit_s") is not None]
    if comp:
        L += ["", "## One-off time in the first step (first step minus the median of the steady steps after it; "
                  "compile: both encoders, forward and backward, with the Triton JIT of fused kernels new to the "
                  "process; JIT: the fused kernels' Triton JIT and autotuning alone)", ""]
        L += _table(["variant", "compile mode", "compile s", "JIT s", "first step s", "warm-up steps"],
                    [[v["name"], (v.get("settings") or {}).get("compile_mode", "default"),
                      _num(v.get("compile_s"), "{:,.1f}"), _num(v.get("jit_s"), "{:,.1f}"),
                      _num(v.get("first_step_s"), "{:,.1f}"), _num(v.get("warmup_steps"), "{:d}")] for v in comp], (0, 1))
    if pr:
        L += ["", f"## Projection: {pr['epochs']} epochs x {pr['images']:,} images", ""]
        head = pr.get("headline")
        if head:
            L += [f"From **{head['variant']}** ({head['note']}), {head['images_per_s_per_gpu']:,.0f} images/s per card:",
                  ""] + _table(["cards", "wall clock"], [[n, _hours(h)] for n, h in head["hours"].items()], (1,))
        if pr.get("seed_recipe_8x32"):
            s = pr["seed_recipe_8x32"]
            L.append(f"\nSeed recipe ({s['note']}): {_hours(s['hours_on_8'])}.")
        L.append(f"\nScaling assumption: {pr['assumption']}")
        if pr.get("per_variant_1gpu_hours"):
            L.append("\nOne card, per variant: " + "; ".join(
                f"{k} {_hours(h)}" for k, h in pr["per_variant_1gpu_hours"].items()))
    if g:
        t = g["target"]
        L += ["", "## Goal", "",
              f"≥ {t['images_per_s']:,.0f} images/s end to end (DALI, JPEGs) on one H100 at batch 256, ≥ "
              f"{t['vs_compiled']}x the compiled eager step and ≥ {t['vs_mmselfsup']}x the mmselfsup-style step "
              "of the same run.", "",
              f"- e2e_dali {_num(g['e2e_dali_images_per_s'])} images/s; vs compiled "
              f"{_num(g['ratio_vs_compiled'], '{:.2f}x')}; vs mmselfsup-style {_num(g['ratio_vs_mmselfsup'], '{:.2f}x')}",
              f"- verdict: **{g['verdict']}**"]
    notes = [f"- {v['name']}: {n}" for v in variants for n in v.get("notes", [])]
    return "\n".join(L + (["", "## Notes", ""] + notes if notes else [])) + "\n"


def write_plots(results, out_dir):
    """throughput.png (images/s per variant, min–max bars) and stages.png (stacked µs per image)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    variants, title = results["variants"], results["environment"].get("device_name", "")
    ips = [v.get("images_per_s") or {} for v in variants]
    med = [i.get("median") or 0.0 for i in ips]
    err = [[m - (i.get("min") or m) for m, i in zip(med, ips)], [(i.get("max") or m) - m for m, i in zip(med, ips)]]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(variants) + 1.6))
    ax.barh(range(len(variants)), med, xerr=err, capsize=3,
            color=["C0" if v["status"] == "ok" else "0.8" for v in variants])
    for i, v in enumerate(variants):
        ax.text(med[i] + err[1][i], i, "  " + (f"{med[i]:,.0f}" if v["status"] == "ok" else v["status"]),
                va="center", fontsize=8)
    ax.set_yticks(range(len(variants)), [v["name"] for v in variants])
    ax.set_xlim(0, max([m + h for m, h in zip(med, err[1])] + [1.0]) * 1.25)
    paths = [_finish(plt, fig, ax, "images/s (median over repeats; bars: min–max)",
                     f"DenseCL training step: {title}", os.path.join(out_dir, "throughput.png"))]

    ok = [v for v in variants if v["status"] == "ok" and v.get("stages_ms")]
    fig, ax = plt.subplots(figsize=(11, 0.55 * max(1, len(ok)) + 1.8))
    left = [0.0] * len(ok)
    for j, c in enumerate(list(STAGES) + ["other"]):
        widths = [max(0.0, v["stages_ms"].get(c) or 0.0) * 1e3 / v["settings"]["batch"] for v in ok]
        if any(widths):
            ax.barh(range(len(ok)), widths, left=left, label=c, color=plt.cm.tab20(j % 20))
            left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(ok)), [v["name"] for v in ok])
    if ok:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return paths + [_finish(plt, fig, ax, "µs per image (stage time per step / batch)",
                            f"Where the time goes: {title}", os.path.join(out_dir, "stages.png"))]


def _finish(plt, fig, ax, xlabel, title, path):
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
