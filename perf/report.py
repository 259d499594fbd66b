"""What `python -m perf` writes: the projection, the goal verdict, results.json, results.md, the plots."""
from __future__ import annotations

import json
import math
import os

from .measure import STAGES

IMAGENET_TRAIN_IMAGES = 1_281_167
RECIPE_EPOCHS = 200

GOAL = {"images_per_s": 4000.0, "vs_compiled": 1.4, "vs_mmselfsup": 4.5,
        "variant": "e2e_dali", "compiled": "compiled", "mmselfsup": "mmselfsup_fp32_b32"}


# ---- projection ----------------------------------------------------------------------------------

def recipe_hours(images_per_s: float, gpus: int = 1, efficiency: float = 0.9,
                 images: int = IMAGENET_TRAIN_IMAGES, epochs: int = RECIPE_EPOCHS) -> float:
    """Wall clock (hours) of `epochs` passes over `images` at `images_per_s` per card on `gpus`
    cards, each card reaching `efficiency` of its single-card rate when gpus > 1."""
    if not images_per_s or images_per_s <= 0:
        return math.inf
    rate = images_per_s * gpus * (efficiency if gpus > 1 else 1.0)
    return images * epochs / rate / 3600.0


def headline_variant(variants: list):
    """The variant a projection quotes: DALI end to end, else torchvision end to end, else the
    fastest model-only variant (flagged: data loading not included)."""
    ok = {v["name"]: v for v in variants if v.get("status") == "ok" and v.get("images_per_s")}
    for name, note in (("e2e_dali", "end to end: DALI over JPEGs"),
                       ("e2e_torchvision", "end to end: torchvision loader over JPEGs")):
        if name in ok:
            return ok[name], note
    model_only = [v for v in ok.values() if v.get("data") == "synthetic"]
    if model_only:
        best = max(model_only, key=lambda v: v["images_per_s"]["median"])
        return best, "model only (synthetic on-device input): data loading NOT included"
    return None, "no variant succeeded"


def projection(variants: list, gpus=(1, 8), efficiency: float = 0.9, images: int = IMAGENET_TRAIN_IMAGES,
               epochs: int = RECIPE_EPOCHS) -> dict:
    head, note = headline_variant(variants)
    out = {
        "images": images, "epochs": epochs, "scaling_efficiency": efficiency, "gpus": list(gpus),
        "assumption": (f"N cards run data-parallel at {efficiency:.0%} of N x the single-card images/s "
                       "(an assumption, not measured: gradient all-reduce, key all-gather and SyncBN cost "
                       "are not modelled); each card keeps the measured per-card batch, so the global batch "
                       "is N x that batch (lr scaled linearly). Excludes checkpointing, start-up and evaluation."),
        "headline": None, "per_variant_1gpu_hours": {},
    }
    for v in variants:
        if v.get("status") == "ok" and v.get("images_per_s"):
            out["per_variant_1gpu_hours"][v["name"]] = recipe_hours(v["images_per_s"]["median"], 1, efficiency,
                                                                    images, epochs)
    if head is not None:
        ips = head["images_per_s"]["median"]
        out["headline"] = {"variant": head["name"], "note": note, "images_per_s_per_gpu": ips,
                           "hours": {str(n): recipe_hours(ips, n, efficiency, images, epochs) for n in gpus}}
    base = next((v for v in variants if v["name"] == GOAL["mmselfsup"] and v.get("status") == "ok"), None)
    if base is not None:
        ips = base["images_per_s"]["median"]
        out["seed_recipe_8x32"] = {
            "variant": base["name"], "images_per_s_per_gpu": ips,
            "hours_on_8": recipe_hours(ips, 8, efficiency, images, epochs),
            "note": f"the seed's 8-card recipe as {base['name']} runs it (eager fp32, batch "
                    f"{(base.get('settings') or {}).get('batch')} per card) on 8 cards of this kind, model only, "
                    "same scaling assumption"}
    return out


# ---- goal ----------------------------------------------------------------------------------------

def goal_verdict(variants: list, device_name: str, batch: int, image_size: int) -> dict:
    """Judge the performance goal: >= 4000 img/s end to end (DALI, JPEGs) on one H100 at batch 256,
    >= 1.4x the compiled eager step and >= 4.5x the mmselfsup-style step of the same run."""
    by = {v["name"]: v for v in variants}

    def ips(name):
        v = by.get(name)
        return v["images_per_s"]["median"] if v and v.get("status") == "ok" and v.get("images_per_s") else None

    e2e, comp, base = ips(GOAL["variant"]), ips(GOAL["compiled"]), ips(GOAL["mmselfsup"])
    out = {"target": dict(GOAL), "e2e_dali_images_per_s": e2e, "compiled_images_per_s": comp,
           "mmselfsup_images_per_s": base,
           "ratio_vs_compiled": e2e / comp if e2e and comp else None,
           "ratio_vs_mmselfsup": e2e / base if e2e and base else None}
    checks = {
        "images_per_s": None if e2e is None else e2e >= GOAL["images_per_s"],
        "vs_compiled": None if out["ratio_vs_compiled"] is None else out["ratio_vs_compiled"] >= GOAL["vs_compiled"],
        "vs_mmselfsup": None if out["ratio_vs_mmselfsup"] is None else out["ratio_vs_mmselfsup"] >= GOAL["vs_mmselfsup"],
    }
    out["checks"] = checks
    why_not = []
    if "H100" not in device_name:
        why_not.append(f"the goal is set for one H100, this device is {device_name}")
    if batch != 256 or image_size != 224:
        why_not.append(f"the goal is at batch 256, 224 px (this run: batch {batch}, {image_size} px)")
    missing = [n for n, x in ((GOAL["variant"], e2e), (GOAL["compiled"], comp), (GOAL["mmselfsup"], base))
               if x is None]
    if missing:
        why_not.append("no measurement in this run of " + ", ".join(missing))
    if why_not:
        out["verdict"] = "not judged: " + "; ".join(why_not)
    else:
        out["verdict"] = "PASS" if all(checks.values()) else "FAIL"
    return out


# ---- files ---------------------------------------------------------------------------------------

def write_json(path: str, results: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_finite(results), f, indent=2, default=str)
    os.replace(tmp, path)


def _finite(x):
    """Strict JSON: non-finite floats become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _f(x, fmt="{:,.0f}", none="–"):
    return none if x is None else fmt.format(x)


def tflops_text(x):
    return "–" if x is None else (f"{x:,.1f}" if x >= 10 else f"{x:.3g}")


def _hours(h):
    if h is None or not math.isfinite(h):
        return "–"
    return f"{h:,.1f} h ({h / 24:,.2f} days)"


def settings_text(v: dict) -> str:
    s = v.get("settings") or {}
    parts = [f"batch {s.get('batch')}", s.get("precision", "?")]
    if s.get("channels_last"):
        parts.append("channels-last")
    parts.append("compiled" if s.get("compile") else "eager")
    parts.append("fused kernels" if s.get("fused") else "reference kernels")
    parts.append({"synthetic": "synthetic on-device input", "torch": "torchvision loader",
                  "dali": "DALI loader"}.get(s.get("data"), str(s.get("data"))))
    return ", ".join(parts)


def markdown(results: dict) -> str:
    m, env = results["meta"], results["environment"]
    peak, flops = results.get("peak") or {}, results.get("flops") or {}
    L = [f"# DenseCL step profile: {env.get('device_name')}", ""]
    L.append(f"- date: {m['date']}; commit {env.get('commit') or '?'}{' (dirty tree)' if env.get('dirty') else ''}")
    L.append(f"- command: `{m['command']}`")
    if m.get("note"):
        L.append(f"- **{m['note']}**")
    L.append(f"- config: {m['config']} | {m['arch']} | batch {m['batch']} | {m['image_size']} px | "
             f"queue {m['queue_len']} | bn_group_size {m['bn_group_size']}")
    L.append(f"- torch {env.get('torch')}, torchvision {env.get('torchvision')}, triton {env.get('triton')}, "
             f"DALI {env.get('dali') or 'not installed'}, CUDA {env.get('cuda_runtime')}, "
             f"fused kernels: {m.get('fused_kernels')}")
    L.append(f"- timing: {m['timing']}; images/s = median over repeats (spread = min–max); "
             f"warm-up {m['warmup']}, {m['steps']} steps x {m['repeats']} repeats unless noted")
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
    L += ["", "## Throughput", "",
          "| variant | settings | images/s (median) | spread | ms/step | peak memory | TFLOP/s | MFU | status |",
          "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for v in results["variants"]:
        ips = v.get("images_per_s") or {}
        mem = v.get("peak_memory_gib")
        status = v["status"] if v["status"] == "ok" else f"{v['status']}: {v.get('reason') or v.get('error', '')}"
        status = status.replace("|", "/").replace("\n", " ")[:160]
        spread = (f"{_f(ips.get('min'))}–{_f(ips.get('max'))} (±{ips.get('spread_pct', 0):.1f}%)"
                  if ips else "–")
        L.append(f"| {v['name']} | {settings_text(v)} | {_f(ips.get('median'))} | {spread} | "
                 f"{_f(v.get('step_ms'), '{:,.1f}')} | {_f(mem, '{:,.1f} GiB')} | {tflops_text(v.get('tflops'))} | "
                 f"{_f(v.get('mfu'), '{:.1%}')} | {status} |")
    ok = [v for v in results["variants"] if v["status"] == "ok" and v.get("stages_ms")]
    if ok:
        cols = [s for s in STAGES if any(s in v["stages_ms"] for v in ok)] + ["other"]
        L += ["", f"## Where the milliseconds go (ms per step, mean of the timed steps; {m['timing']})", "",
              "| variant | " + " | ".join(cols) + " | step |", "|---|" + "---:|" * (len(cols) + 1)]
        for v in ok:
            st = v["stages_ms"]
            L.append(f"| {v['name']} | " + " | ".join(_f(st.get(c), "{:,.2f}") for c in cols)
                     + f" | {_f(v.get('stage_step_ms'), '{:,.2f}')} |")
        e2e = [v for v in ok if v["settings"]["data"] != "synthetic"]
        if e2e:
            by = {v["name"]: v for v in results["variants"]}
            L += ["", "## Data feeding (same model settings: synthetic on-device tensors vs loaders)", "",
                  "| data | variant | images/s | vs synthetic | data_wait stage, ms/step | host blocked on the loader, ms/step |",
                  "|---|---|---:|---:|---:|---:|"]
            src = by.get(e2e[0]["settings"].get("settings_from", ""))
            if src and src.get("status") == "ok":
                L.append(f"| synthetic | {src['name']} | {_f(src['images_per_s']['median'])} | 1.00x | "
                         f"{_f(src['stages_ms'].get('data_wait'), '{:,.2f}')} | – |")
            for v in e2e:
                base = by.get(v["settings"].get("settings_from", ""))
                ratio = (v["images_per_s"]["median"] / base["images_per_s"]["median"]
                         if base and base.get("status") == "ok" else None)
                L.append(f"| {v['settings']['data']} | {v['name']} | {_f(v['images_per_s']['median'])} | "
                         f"{_f(ratio, '{:.2f}x')} | {_f(v['stages_ms'].get('data_wait'), '{:,.2f}')} | "
                         f"{_f(v.get('data_wait_host_ms'), '{:,.2f}')} |")
    pr = results.get("projection") or {}
    if pr:
        L += ["", f"## Projection: {pr['epochs']} epochs x {pr['images']:,} images", ""]
        head = pr.get("headline")
        if head:
            L.append(f"From **{head['variant']}** ({head['note']}), {head['images_per_s_per_gpu']:,.0f} images/s per card:")
            L.append("")
            L.append("| cards | wall clock |")
            L.append("|---:|---|")
            for n, h in head["hours"].items():
                L.append(f"| {n} | {_hours(h)} |")
        if pr.get("seed_recipe_8x32"):
            s = pr["seed_recipe_8x32"]
            L.append(f"\nSeed recipe ({s['note']}): {_hours(s['hours_on_8'])}.")
        L.append(f"\nScaling assumption: {pr['assumption']}")
        if pr.get("per_variant_1gpu_hours"):
            L.append("\nOne card, per variant: " + "; ".join(
                f"{k} {_hours(h)}" for k, h in pr["per_variant_1gpu_hours"].items()))
    g = results.get("goal")
    if g:
        L += ["", "## Goal", "",
              f"≥ {g['target']['images_per_s']:,.0f} images/s end to end (DALI, JPEGs) on one H100 at batch 256, "
              f"≥ {g['target']['vs_compiled']}x the compiled eager step and ≥ {g['target']['vs_mmselfsup']}x the "
              "mmselfsup-style step of the same run.", "",
              f"- e2e_dali {_f(g['e2e_dali_images_per_s'])} images/s; vs compiled "
              f"{_f(g['ratio_vs_compiled'], '{:.2f}x')}; vs mmselfsup-style {_f(g['ratio_vs_mmselfsup'], '{:.2f}x')}",
              f"- verdict: **{g['verdict']}**"]
    notes = [f"- {v['name']}: {n}" for v in results["variants"] for n in v.get("notes", [])]
    if notes:
        L += ["", "## Notes", ""] + notes
    return "\n".join(L) + "\n"


def write_plots(results: dict, out_dir: str) -> list:
    """throughput.png (images/s per variant, min–max bars) and stages.png (stacked µs per image)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written = []
    variants = results["variants"]
    title = results["environment"].get("device_name", "")
    names = [v["name"] for v in variants]
    med = [(v.get("images_per_s") or {}).get("median") or 0.0 for v in variants]
    lo = [m - ((v.get("images_per_s") or {}).get("min") or m) for m, v in zip(med, variants)]
    hi = [((v.get("images_per_s") or {}).get("max") or m) - m for m, v in zip(med, variants)]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(names) + 1.6))
    y = range(len(names))
    ax.barh(y, med, xerr=[lo, hi], color=["C0" if v["status"] == "ok" else "0.8" for v in variants], capsize=3)
    for i, v in enumerate(variants):
        label = f"{med[i]:,.0f}" if v["status"] == "ok" else v["status"]
        ax.text(med[i] + hi[i], i, "  " + label, va="center", fontsize=8)
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlabel("images/s (median over repeats; bars: min–max)")
    ax.set_title(f"DenseCL training step: {title}", fontsize=10)
    ax.set_xlim(0, max([m + h for m, h in zip(med, hi)] + [1.0]) * 1.25)
    fig.tight_layout()
    p = os.path.join(out_dir, "throughput.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)

    ok = [v for v in variants if v["status"] == "ok" and v.get("stages_ms")]
    fig, ax = plt.subplots(figsize=(11, 0.55 * max(1, len(ok)) + 1.8))
    cols = list(STAGES) + ["other"]
    left = [0.0] * len(ok)
    for j, c in enumerate(cols):
        widths = [max(0.0, (v["stages_ms"].get(c) or 0.0)) * 1e3 / v["settings"]["batch"] for v in ok]
        if not any(widths):
            continue
        ax.barh(range(len(ok)), widths, left=left, label=c, color=plt.cm.tab20(j % 20))
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(list(range(len(ok))), [v["name"] for v in ok])
    ax.invert_yaxis()
    ax.set_xlabel("µs per image (stage time per step / batch)")
    ax.set_title(f"Where the time goes: {title}", fontsize=10)
    if ok:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    p = os.path.join(out_dir, "stages.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)
    return written
