"""Budget and plan arithmetic (pure, tested): a budget string, the schedule that fits it, the
projections of the full recipe, and how durations read."""
from __future__ import annotations

import math
import re
import time

from ..recipe import ASSUMED_SCALING, IMAGENET_TRAIN_IMAGES, RECIPE_EPOCHS
from .errors import UsageError

_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_budget(text: str) -> dict:
    """'8h', '90m', '1h30m', '45s', '2d' -> {"kind": "time", "seconds": s}; '20ep' -> {"kind": "epochs", ...}."""
    s = str(text).strip().lower()
    m = re.fullmatch(r"(\d+)\s*(ep|epoch|epochs)", s)
    if m:
        n = int(m.group(1))
        if not 1 <= n <= RECIPE_EPOCHS:
            raise UsageError(f"--budget {text}: give 1 to {RECIPE_EPOCHS} epochs (the recipe's length)")
        return {"kind": "epochs", "epochs": n, "text": text}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])", s)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smhd])", "", s).strip():
        raise UsageError(f"--budget {text!r}: use a duration (8h, 90m, 1h30m, 45s) or epochs (20ep)")
    seconds = sum(float(v) * _TIME_UNITS[u] for v, u in parts)
    if not math.isfinite(seconds):  # hundreds of digits overflow a float
        raise UsageError(f"--budget {str(text)[:40]}{'...' if len(str(text)) > 40 else ''}: too large a number")
    if seconds <= 0:
        raise UsageError(f"--budget {text}: must be more than 0")
    return {"kind": "time", "seconds": seconds, "text": text}


def fmt_duration(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def plan_for_budget(budget: dict, *, step_s: float, steps_per_epoch: int, num_images: int, global_batch: int,
                    startup_s: float, runs: int, spent_s: float, nproc: int, device: str,
                    single_ips: float | None = None, now: float | None = None) -> dict:
    """The schedule that fits `budget`, and the projections of the full recipe.

    step_s: measured seconds per training step (all `nproc` processes together, data included);
    startup_s: measured per-run overhead outside the steps (data listing, model build, final save);
    runs: pretraining runs sharing the budget (2 with --baseline: both get the same epochs);
    spent_s: seconds of the budget already used (the probe); single_ips: images/s of one process at
    the per-process batch, when it was measured (gives the multi-process scaling efficiency).
    """
    now = time.time() if now is None else now
    epoch_s = step_s * steps_per_epoch
    if budget["kind"] == "epochs":
        epochs, fits = budget["epochs"], None
    else:
        avail = budget["seconds"] - spent_s - runs * startup_s
        fits = int(avail // (runs * epoch_s)) if avail > 0 else 0
        if fits < 1:
            need = spent_s + runs * (startup_s + epoch_s)
            raise UsageError(
                f"--budget {budget['text']}: one epoch takes ~{fmt_duration(epoch_s)} per run ({runs} run(s), "
                f"~{fmt_duration(startup_s)} start-up each, {fmt_duration(spent_s)} already spent measuring), so "
                f"no full epoch fits; give at least ~{fmt_duration(need * 1.1)} or a budget in epochs (1ep)")
        epochs = min(fits, RECIPE_EPOCHS)
    run_s = startup_s + epochs * epoch_s
    ips = global_batch / step_s
    if nproc > 1 and single_ips:
        eff, eff_note = ips / (nproc * single_ips), f"measured: {nproc} processes vs one at the per-process batch"
        if eff > 1.05:  # superlinear scaling is a noisy probe (a shared machine, too few steps), not a fact
            eff_note += "; above 100%: a noisy measurement, rerun with more --probe-steps"
    else:
        eff, eff_note = ASSUMED_SCALING, "assumed (not measured here): give --nproc N to measure it"
    per_device = single_ips if (nproc > 1 and single_ips) else ips / nproc
    full_here = RECIPE_EPOCHS * epoch_s
    full_in1k = RECIPE_EPOCHS * IMAGENET_TRAIN_IMAGES / ips

    def on(n):  # the whole recipe over this data set on n devices of this kind
        return RECIPE_EPOCHS * num_images / (per_device * n * (eff if n > 1 else 1.0))

    return {
        "budget": budget, "epochs": epochs, "epochs_that_fit": fits, "steps_per_epoch": steps_per_epoch,
        "steps": epochs * steps_per_epoch, "runs": runs, "global_batch": global_batch, "num_images": num_images,
        "nproc": nproc, "device": device, "step_s": step_s, "images_per_s": ips, "images_per_s_per_device": per_device,
        "startup_s": startup_s, "epoch_s": epoch_s, "run_s": run_s, "pretrain_s": runs * run_s,
        "expected_finish": now + runs * run_s, "planned_at": now, "recipe_epochs": RECIPE_EPOCHS,
        "full_recipe_s_here": full_here, "full_recipe_s_in1k_here": full_in1k,
        "full_recipe_s_1_device": on(1), "full_recipe_s_8_devices": on(8),
        "scaling_efficiency": eff, "scaling_note": eff_note,
    }


def plan_lines(plan: dict) -> list[str]:
    p = plan
    fin = time.strftime("%Y-%m-%d %H:%M", time.localtime(p["expected_finish"]))
    if p.get("planned_at"):
        fin += time.strftime(" (planned %Y-%m-%d %H:%M)", time.localtime(p["planned_at"]))
    seeds = p.get("seeds", 1)
    runs = "DenseCL and MoCo-v2 (λ = 0), one after the other" if p["runs"] == 2 * seeds else "DenseCL"
    if seeds > 1:
        runs += f", for each of {seeds} seeds ({p['runs']} runs)"
    return [
        f"plan: budget {p['budget']['text']} -> {p['epochs']} epoch(s) of the recipe, cosine compressed to them "
        f"({p['steps']} steps of {p['steps_per_epoch']} per epoch, global batch {p['global_batch']}); runs: {runs}",
        f"  measured: {p['images_per_s']:,.1f} images/s ({p['step_s']:.3f} s/step) on {p['nproc']} x {p['device']}, "
        f"start-up ~{fmt_duration(p['startup_s'])} per run; an epoch ~{fmt_duration(p['epoch_s'])}",
        f"  expected pretraining finish: {fin} (in {fmt_duration(p['pretrain_s'])}; evaluation comes after)",
        f"  the full {p['recipe_epochs']} epochs here: {fmt_duration(p['full_recipe_s_here'])} on this data set "
        f"({p['num_images']:,} images); ImageNet-1k at this speed: {fmt_duration(p['full_recipe_s_in1k_here'])}",
        f"  on 1 device: {fmt_duration(p['full_recipe_s_1_device'])}; on 8 such devices: "
        f"{fmt_duration(p['full_recipe_s_8_devices'])} (scaling {p['scaling_efficiency']:.0%}, {p['scaling_note']})",
    ]
