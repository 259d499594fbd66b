"""Runs the variants of `python -m perf` one after the other, each under one time cap.

Every variant runs the trainer's own `train_step` on a `DenseCL` built from the config, so what is
timed is what `launch/pretrain.py` runs. Variants are independent and fail soft: an exception
(compile error, OOM, missing loader) is recorded with its message and the suite moves on.

Budget: before a variant starts it gets one cap, in seconds: its own minimum cost (build,
compile, a few steps, loader start) plus a fair share of what the budget leaves after the minimum
of every later variant that still fits, never eating into those. Warm-up, timed repeats and the
trace all stop at that cap; a variant whose minimum does not fit what is left is skipped, and one
whose cap leaves no room for a timed step after its warm-up times a single step if the later
variants' minimum still leaves room for it.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import math
import os
import shlex
import signal
import statistics
import sys
import threading
import time
import traceback
from typing import List

import torch

from densecl_fast import stages
from densecl_fast.config import load_config, validate
from densecl_fast.data import build_loader, dali_available
from densecl_fast.engines.single import SingleEngine
from densecl_fast.model import DenseCL
from densecl_fast.trainer import train_step

from . import report
from .environment import environment, process_peak_rss_bytes
from .jpegs import ensure_jpeg_folder
from .measure import STAGES, StageClock, count_step_flops, marks_for, measure_matmul_tflops
from .sources import LoaderSource, Skip, SyntheticSource, fused_kernels_status, kernels_backend, loader_unavailable
from .variants import Variant, default_variants, fit_plan

OUTPUT_RESERVE_S = 5.0   # kept back from the budget for writing the JSON, markdown and plots

# ---- the suite -----------------------------------------------------------------------------------

class Suite:
    def __init__(self, args, argv, t0):
        self.args = args
        self.say = (lambda *a: None) if args.quiet else (lambda *a: print("[perf]", *a, flush=True))
        self.t0 = t0
        self.budget_s = args.budget_seconds if args.budget_seconds and args.budget_seconds > 0 else math.inf
        self.device = resolve_device(args.device)
        cfg_name = args.config or ("densecl_r50_200e_in1k" if self.device.type == "cuda" else "smoke")
        self.cfg = load_config(cfg_name, list(args.overrides))
        self.cfg_name = cfg_name
        self.batch = self.cfg.optim.batch_size
        self.image_size = self.cfg.data.image_size
        self.marks = marks_for(self.device)
        self.workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
        self.variants = select_variants(args)
        self.records: List[dict] = []
        self._model = None           # (key, model, engine) reused by variants with the same key
        self._model_dtypes = set()   # input dtypes the cached model has seen (a compiled one retraces on a new one)
        self.jpegs = None
        self.compile_failed = {}     # model key -> (variant, error): a failed compile is not retried
        self.est = {"build_s": 3.0 if self.device.type == "cuda" else 1.0,
                    "compile_s": args.compile_estimate_s if args.compile_estimate_s is not None
                    else (120.0 if self.device.type == "cuda" else 90.0),
                    "per_image_s": None, "loader_start_s": 5.0}
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise SystemExit(f"error: --out {args.out} exists and is not a folder")
        os.makedirs(args.out, exist_ok=True)
        self.results = {
            "meta": {
                "tool": "python -m perf",
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "command": "python -m perf " + shlex.join(argv if argv is not None else sys.argv[1:]),
                "config": cfg_name, "arch": self.cfg.model.arch, "batch": self.batch,
                "image_size": self.image_size, "queue_len": self.cfg.model.queue_len,
                "bn_group_size": self.cfg.model.bn_group_size, "timing": self.marks.kind,
                "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
                "budget_seconds": args.budget_seconds, "workers": self.workers,
                "fused_kernels": fused_kernels_status(self.device), "data": None,
                "cuda": self.device.type == "cuda",
                "note": None if self.device.type == "cuda" else
                "CPU run: small shapes, CUDA-only variants skipped; not a GPU speed claim",
            },
            "environment": {}, "peak": None, "flops": None, "variants": [], "projection": None, "goal": None,
        }

    # -- bookkeeping
    def spent(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        """Budget seconds left for variants (the output reserve kept back)."""
        return self.budget_s - self.spent() - OUTPUT_RESERVE_S

    def save(self, plots=False):
        r, a = self.results, self.args
        r["variants"] = self.records
        r["projection"] = report.projection(self.records, a.gpus, a.scaling_efficiency, a.dataset_images, a.epochs)
        r["goal"] = report.goal_verdict(self.records, r["environment"].get("device_name", ""),
                                        self.batch, self.image_size)
        r["meta"]["seconds"] = self.spent()
        report.write_json(os.path.join(a.out, "results.json"), r)
        with open(os.path.join(a.out, "results.md"), "w") as f:
            f.write(report.markdown(r))
        if plots and not a.no_plots:
            try:
                r["plots"] = report.write_plots(r, a.out)
            except Exception as e:  # noqa: BLE001 -- plots are a convenience; the JSON is the record
                self.say(f"plots failed: {type(e).__name__}: {e}")
                r["plots_error"] = f"{type(e).__name__}: {e}"
            report.write_json(os.path.join(a.out, "results.json"), r)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- set-up measurements
    def measure_setup(self):
        r = self.results
        r["environment"] = environment(self.device)
        self.say(f"device {r['environment']['device_name']} | config {self.cfg_name} ({self.cfg.model.arch}, "
                 f"batch {self.batch}, {self.image_size} px) | budget {self.args.budget_seconds or 'unlimited'} s "
                 f"| out {self.args.out}")
        if self.args.peak_tflops:
            r["peak"] = {"tflops": self.args.peak_tflops, "source": "given (--peak-tflops)",
                         "what": "bf16 matmul", "method": None}
        else:
            try:
                r["peak"] = measure_matmul_tflops(self.device, max_seconds=min(15.0, max(1.0, self.left() / 20)))
            except Exception as e:  # noqa: BLE001
                r["peak"] = {"tflops": None, "source": "failed", "what": "", "method": f"{type(e).__name__}: {e}"}
        p = r["peak"]
        self.say(f"ceiling: {report.tflops_text(p['tflops'])} TFLOP/s {p['what']} ({p['source']})")
        try:
            r["flops"] = count_step_flops(self.cfg.model, self.batch, self.image_size, fallback_device=self.device)
            self.say(f"FLOPs: {r['flops']['per_image'] / 1e9:,.2f} GFLOP per image per step ({r['flops']['method']})")
        except Exception as e:  # noqa: BLE001
            r["flops"] = {"per_image": None, "error": f"{type(e).__name__}: {e}"}
            self.say(f"FLOP count failed: {e}")

    # -- model cache
    def drop_model(self):
        if self._model is None:
            return
        compiled = self._model[0][4]
        self._model = None
        gc.collect()
        if compiled:   # forget its graphs too (fresh models would pile up recompiles)
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def model_key(self, s: dict) -> tuple:
        return (s["batch"], s["bn_group_size"], s["precision"], s["channels_last"], s["compile"], self.args.compile_mode)

    def get_model(self, s: dict):
        key = self.model_key(s)
        if self._model is not None and self._model[0] == key:
            return self._model[1:], True
        self.drop_model()
        cfg = copy.deepcopy(self.cfg)
        cfg.optim.batch_size = s["batch"]
        cfg.model.bn_group_size = s["bn_group_size"]
        validate(cfg)
        t = time.perf_counter()
        torch.manual_seed(self.args.seed)
        model = DenseCL(cfg.model).to(self.device)
        if s["channels_last"]:
            model.to(memory_format=torch.channels_last)
        # The trainer's single-process engine: same optimizer, autocast and step body as a training run.
        engine = SingleEngine(self.device, s["precision"])
        mode = None if self.args.compile_mode == "default" else self.args.compile_mode
        engine.setup(model, cfg.optim, cfg.optim.lr * s["batch"] / 256, compile=s["compile"], compile_mode=mode)
        model.train()
        self.est["build_s"] = time.perf_counter() - t + 0.5
        self._model = (key, model, engine)
        self._model_dtypes = set()
        return self._model[1:], False

    # -- settings and estimates
    def settings_for(self, v: Variant) -> dict:
        s = {"batch": v.batch or self.batch,
             "bn_group_size": self.cfg.model.bn_group_size if v.bn_group_size is None else v.bn_group_size,
             "precision": v.precision, "channels_last": v.channels_last, "compile": v.compile, "fused": v.fused,
             "data": v.data}
        if v.inherit:
            cands = [r for r in self.records if r["status"] == "ok" and r["settings"]["data"] == "synthetic"
                     and r["settings"]["batch"] == self.batch]
            if cands:
                best = max(cands, key=lambda r: r["images_per_s"]["median"])
                s.update({k: best["settings"][k] for k in ("precision", "channels_last", "compile", "fused",
                                                          "bn_group_size")})
                s["settings_from"] = best["name"]
            else:
                s.update({"precision": "bf16", "channels_last": True, "compile": True,
                          "fused": self.device.type == "cuda"})
                s["settings_from"] = "default full stack (no model-only variant at this batch succeeded in this run)"
        return s

    def step_estimate(self, s):
        return (self.est["per_image_s"] or 0.0) * s["batch"] * (2.0 if s["precision"] == "fp32" else 1.0)

    def min_cost(self, s, compiled_ready=False) -> float:
        """Seconds a variant needs at least: build, compile, a few steps, the loader and its JPEGs."""
        cached = self._model is not None and self._model[0][:5] == self.model_key(s)[:5]
        c = 0.0 if cached else self.est["build_s"]
        retrace = cached and s["compile"] and self._model_dtypes and self.input_dtype(s) not in self._model_dtypes
        if s["compile"] and ((not cached and not compiled_ready) or retrace):
            c += self.est["compile_s"]
        c += (2 if s["compile"] else 1) * self.step_estimate(s) + self.step_estimate(s)
        if s["data"] != "synthetic":
            c += self.est["loader_start_s"] + 3 * self.step_estimate(s)
            if self.jpegs is None and not self.args.data_dir:
                c += self.data_images_needed(s) * 0.02 / max(1, self.workers) + 1.0
        return c

    def later_minimum(self, index: int):
        """(seconds, count): the minimum cost of the variants after `index` that still fit. One
        that does not fit is left out: it will be skipped anyway and must not starve the ones before it."""
        left = self.left()
        rest, n_rest, compile_counted = 0.0, 0, False
        for v in self.variants[index + 1:]:
            if v.cuda_only and self.device.type != "cuda":
                continue
            sv = self.settings_for(v)
            c = self.min_cost(sv, compiled_ready=compile_counted)
            if rest + c <= left:
                rest, n_rest = rest + c, n_rest + 1
                compile_counted = compile_counted or sv["compile"]
        return rest, n_rest

    def time_cap(self, index: int, s: dict) -> float:
        """The seconds variant `index` may take (see the module docstring)."""
        left = self.left()
        if not math.isfinite(left):
            return math.inf
        rest, n_rest = self.later_minimum(index)
        own = self.min_cost(s)
        return min(own + max(0.0, left - rest - own) / (1 + n_rest), left - rest)

    def data_plan(self, s):
        """(warm-up steps, timed steps per repeat, repeats) of a variant."""
        a = self.args
        warm, steps, repeats = a.warmup, a.steps, a.repeats
        if s["data"] == "torch":   # workers deliver whole batches in bursts: one round to fill, two per repeat
            warm, steps = max(warm, self.workers + 1), max(steps, 2 * self.workers)
            repeats = min(repeats, 3)
        elif s["data"] == "dali":
            warm = max(warm, 3)
        if s["compile"]:
            warm = max(warm, 2)
        return warm, steps, repeats

    def data_images_needed(self, s):
        if self.args.data_images:
            return self.args.data_images
        warm, steps, repeats = self.data_plan(s)
        return (warm + steps * repeats + self.args.trace_steps + 4) * s["batch"]

    def input_dtype(self, s) -> torch.dtype:
        """The dtype of the batches the trainer would feed: DALI emits bf16 on CUDA when training in bf16
        (and DALI is the default backend on CUDA when installed); torchvision emits float32."""
        bf16 = self.device.type == "cuda" and s["precision"] == "bf16"
        if s["data"] == "torch":
            return torch.float32
        if s["data"] == "dali":
            return torch.bfloat16 if bf16 else torch.float32
        return torch.bfloat16 if bf16 and dali_available() else torch.float32

    def jpeg_folder(self, s) -> str:
        if self.args.data_dir:
            self.results["meta"]["data"] = f"folder {self.args.data_dir}, {self.workers} workers/threads"
            return self.args.data_dir
        # one folder for every data variant of the run: the largest need
        need = max([self.data_images_needed(s), s["batch"]]
                   + [self.data_images_needed(self.settings_for(v)) for v in self.variants if v.data != "synthetic"])
        if self.jpegs is None or self.jpegs["count"] < need:
            w, h = self.args.data_resolution
            self.say(f"  generating {need:,} JPEGs {w}x{h} in {self.args.data_cache} ...")
            self.jpegs = ensure_jpeg_folder(self.args.data_cache, need, w, h, workers=max(1, self.workers))
            self.say(f"  JPEG folder {self.jpegs['path']} ({'made' if self.jpegs['generated'] else 'reused'} "
                     f"in {self.jpegs['seconds']:.1f} s)")
        j = self.jpegs
        self.results["meta"]["data"] = (f"generated JPEGs {j['width']}x{j['height']} q90 ({j['distinct']} distinct, "
                                        f"{j['count']:,} files), {self.workers} workers/threads")
        return j["path"]

    def make_source(self, s, notes):
        if s["data"] == "synthetic":
            return SyntheticSource(s["batch"], self.image_size, self.device, s["channels_last"], self.args.seed,
                                   self.input_dtype(s))
        folder = self.jpeg_folder(s)
        dcfg = copy.deepcopy(self.cfg.data)
        dcfg.source, dcfg.backend, dcfg.num_workers = folder, s["data"], self.workers
        loader = build_loader(dcfg, batch_size=s["batch"], rank=0, world_size=1, device=self.device,
                              seed=self.args.seed, channels_last=s["channels_last"], dtype=self.input_dtype(s))
        notes.append(f"data: {folder}, {len(loader)} steps per epoch, {self.workers} workers/threads")
        if s["data"] == "dali" and self.device.type != "cuda":
            notes.append("DALI on the CPU (CPU decoding): not the GPU pipeline the goal is about")
        return LoaderSource(loader)

    # -- one variant
    def run_variant(self, index: int, v: Variant) -> dict:
        tag = f"{index + 1}/{len(self.variants)} {v.name}"
        s = self.settings_for(v)
        rec = {"name": v.name, "title": v.title, "status": None, "settings": s, "data": s["data"], "notes": []}
        t_start = time.monotonic()
        try:
            if v.cuda_only and self.device.type != "cuda":
                raise Skip("needs CUDA (not run on the CPU)")
            if s["fused"] and self.device.type != "cuda":
                raise Skip("fused Triton kernels need CUDA")
            failed = self.compile_failed.get(self.model_key(s)) if s["compile"] else None
            if failed:
                raise Skip(f"not retried: compiling this model failed in {failed[0]} ({failed[1][:200]})")
            why = loader_unavailable(s["data"])
            if why:
                raise Skip(why)
            need, left = self.min_cost(s), self.left()
            if left < need:
                raise Skip(f"budget (needs ~{need:.0f} s, {max(0.0, left):.0f} s left)")
            cap = self.time_cap(index, s)
            self.say(f"{tag}: start: {report.settings_text(rec)}"
                     + (f" (settings of {s['settings_from']})" if "settings_from" in s else "")
                     + (f" | {cap:.0f} s of {left:.0f} s left" if math.isfinite(cap) else ""))
            with kernels_backend(s["fused"], self.device) as active:
                rec["kernels_active"] = active
                self._measure(index, v, s, rec, time.perf_counter() + cap)
            rec["status"] = "ok"
            ips = rec["images_per_s"]
            self.say(f"{tag}: done: {ips['median']:,.1f} images/s (min {ips['min']:,.1f}, max {ips['max']:,.1f}), "
                     f"{rec['step_ms']:,.1f} ms/step"
                     + (f", peak {rec['peak_memory_gib']:.1f} GiB" if rec.get("peak_memory_gib") is not None else "")
                     + (f", MFU {rec['mfu']:.1%}" if rec.get("mfu") is not None else "")
                     + f" [{time.monotonic() - t_start:.0f} s]")
        except Skip as e:
            rec.update(status="skipped", reason=str(e))
            self.say(f"{tag}: skipped: {e}")
        except KeyboardInterrupt:
            rec.update(status="failed", error="interrupted")
            self.drop_model()
            raise
        except Exception as e:  # noqa: BLE001 -- fail soft: record and go on
            rec.update(status="failed", error=f"{type(e).__name__}: {e}".strip()[:2000],
                       traceback=traceback.format_exc(limit=12)[-4000:])
            self.say(f"{tag}: FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            if s["compile"] and rec.get("phase") in ("build", "first step"):
                self.compile_failed[self.model_key(s)] = (v.name, rec["error"])
            self.drop_model()   # its state may be broken (OOM mid-step, failed compile)
        finally:
            rec["seconds"] = time.monotonic() - t_start
            gc.collect()
            if self.device.type == "cuda":
                with contextlib.suppress(Exception):
                    torch.cuda.empty_cache()
        return rec

    def _measure(self, index, v, s, rec, deadline):
        a = self.args
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        rec["phase"] = "build"
        (model, engine), reused = self.get_model(s)
        rec["phase"] = "data set-up"
        rec["model_reused"] = reused
        lr = self.cfg.optim.lr * s["batch"] / 256
        lam = self.cfg.model.loss_lambda
        source = self.make_source(s, rec["notes"])
        dtype = self.input_dtype(s)
        retrace = bool(reused and s["compile"] and self._model_dtypes and dtype not in self._model_dtypes)
        if retrace:
            rec["notes"].append(f"inputs are {dtype} (what the trainer feeds from this loader); the compiled model "
                                f"had seen {', '.join(sorted(map(str, self._model_dtypes)))}: it recompiles in the first step")
        self._model_dtypes.add(dtype)
        rec["input_dtype"] = str(dtype).replace("torch.", "")
        clock = StageClock(self.marks)
        host_wait = []
        out = None

        def time_left():
            return deadline - time.perf_counter()

        def one_step(measure: bool):
            nonlocal out
            if measure:
                clock.begin_step()
            with clock.stage("data_wait"):
                t = time.perf_counter()
                im_q, im_k = source.next()
                if measure:
                    host_wait.append(time.perf_counter() - t)
            out = train_step(model, engine, im_q, im_k, lr, lam)
            if measure:
                clock.end_step()

        def timed_step():
            t = time.perf_counter()
            one_step(False)
            self.sync()
            return time.perf_counter() - t

        try:
            with stages.timed(clock):
                warm, steps, want_repeats = self.data_plan(s)
                compiling = s["compile"] and (not reused or retrace)
                if compiling:
                    self.say("  compiling (first step) ...")
                rec["phase"] = "first step" if compiling or not reused else "warm-up"
                first = rec["first_step_s"] = timed_step()
                rec["phase"] = "warm-up"
                warm_times = []
                for i in range(1, warm):
                    warm_times.append(timed_step())
                    if i >= 2 and time_left() < warm_times[-1] * (steps + 2):
                        rec["notes"].append(f"warm-up cut to {i + 1} steps (budget)")
                        break
                step_s = statistics.median(warm_times[-3:]) if warm_times else first
                rec["warmup_steps"] = 1 + len(warm_times)
                if compiling:
                    self.est["compile_s"] = max(1.0, first - step_s)
                    rec["compile_s"] = first - step_s

                plan = fit_plan(step_s, time_left(), steps, want_repeats)
                if plan is None and step_s <= self.left() - self.later_minimum(index)[0]:
                    plan = (1, 1)   # past its share, but the later variants' minimum still fits
                if plan is None:
                    raise Skip(f"budget (a step takes {step_s:.1f} s, {max(0.0, time_left()):.0f} s "
                               "left for this variant)")
                if plan != (steps, want_repeats):
                    rec["notes"].append(f"timed {plan[0]} steps x {plan[1]} repeats instead of "
                                        f"{steps} x {want_repeats} (budget)")
                elif (steps, want_repeats) != (a.steps, a.repeats):
                    rec["notes"].append(f"timed {steps} steps x {want_repeats} repeats, warm-up {warm} "
                                        "(data variant: covers the loader's start-up and bursts)")
                steps, repeats = plan
                self.say(f"  warm-up {rec['warmup_steps']} steps (first {first:.2f} s, then {step_s * 1e3:,.1f} ms); "
                         f"timing {repeats} x {steps} steps")
                rec["phase"] = "timed"
                wraps0 = source.wraps
                per_repeat = []
                for r in range(repeats):
                    self.sync()
                    t = time.perf_counter()
                    for _ in range(steps):
                        one_step(True)
                    self.sync()
                    per_repeat.append(steps * s["batch"] / (time.perf_counter() - t))
                    if r + 1 < repeats and time_left() < (time.perf_counter() - t) * 0.5:
                        rec["notes"].append(f"stopped after {r + 1} of {repeats} repeats (budget)")
                        break
                if source.wraps > wraps0:
                    rec["notes"].append(f"the loader crossed {source.wraps - wraps0} epoch boundaries while timed")
                rec["final_loss"] = loss = float(out["loss"].detach().float())
                if not math.isfinite(loss):
                    rec["notes"].append(f"loss is {loss} (timing is still valid; the run would have stopped)")
                summ = clock.summary()
                if a.trace and a.trace_steps > 0 and (not a.trace_variants or v.name in a.trace_variants.split(",")):
                    if time_left() < step_s * a.trace_steps * 4 + 5:
                        rec["notes"].append("trace skipped (budget)")
                    else:
                        self._trace(v, one_step, rec)
        finally:
            source.close()
        rec["steps"] = steps
        self._record(s, rec, per_repeat, summ, host_wait)

    def _record(self, s, rec, per_repeat, summ, host_wait):
        """The figures of a measured variant, from its repeats and stage summary."""
        med = statistics.median(per_repeat)
        rec["repeats_images_per_s"] = per_repeat
        rec["images_per_s"] = {"median": med, "min": min(per_repeat), "max": max(per_repeat),
                               "spread_pct": 100.0 * (max(per_repeat) - min(per_repeat)) / 2 / med,
                               "stdev": statistics.stdev(per_repeat) if len(per_repeat) > 1 else 0.0,
                               "repeats": len(per_repeat)}
        rec["repeats"] = len(per_repeat)
        rec["step_ms"] = 1e3 * s["batch"] / med
        rec["stages_ms"] = {k: 1e3 * val for k, val in summ["stages"].items()}
        rec["stages_ms"]["other"] = 1e3 * summ["other"]
        rec["stage_step_ms"] = 1e3 * summ["step"]
        if summ["nested"]:
            rec["nested_stages_ms"] = {k: 1e3 * val for k, val in summ["nested"].items()}
        missing = [st for st in STAGES if st not in summ["stages"]]
        if missing:
            rec["notes"].append("stage ranges not seen: " + ", ".join(missing))
        rec["data_wait_host_ms"] = 1e3 * statistics.mean(host_wait) if host_wait else None
        if self.device.type == "cuda":
            rec["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            rec["peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        else:
            rss = process_peak_rss_bytes()
            rec["peak_memory_gib"] = None
            rec["process_peak_rss_gib"] = rss / 2**30 if rss else None
        fl = (self.results.get("flops") or {}).get("per_image")
        peak = (self.results.get("peak") or {}).get("tflops")
        if fl:
            rec["tflops"] = fl * med / 1e12
            rec["mfu"] = rec["tflops"] / peak if peak else None
            if rec["mfu"] and rec["mfu"] > 1.0:
                rec["notes"].append("MFU above 100%: the measured ceiling is too low (a busy machine while it was "
                                    "measured?); pass --peak-tflops")
        per_image = 1.0 / med * (0.5 if s["precision"] == "fp32" else 1.0)
        self.est["per_image_s"] = max(self.est["per_image_s"] or 0.0, per_image)

    def _trace(self, v, one_step, rec):
        """A Chrome trace of a few steps under the PyTorch profiler."""
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        try:
            with profile(activities=acts) as prof:
                for _ in range(self.args.trace_steps):
                    one_step(False)
                self.sync()
            path = os.path.join(self.args.out, f"trace_{v.name}.json.gz")
            prof.export_chrome_trace(path)
            rec["trace"] = path
        except Exception as e:  # noqa: BLE001
            rec["notes"].append(f"trace failed: {type(e).__name__}: {e}")

    # -- all of it
    def run(self) -> int:
        interrupted = False
        try:
            self.measure_setup()
        except KeyboardInterrupt:
            interrupted = True
            self.say("interrupted during set-up; writing what was measured")
        self.save()
        for i, v in enumerate(self.variants):
            if interrupted:
                rec = {"status": "skipped", "reason": "interrupted"}
            else:
                try:
                    rec = self.run_variant(i, v)
                except KeyboardInterrupt:
                    interrupted = True
                    rec = {"status": "failed", "error": "interrupted"}
                    self.say(f"{v.name}: interrupted; writing what was measured")
            if "name" not in rec:
                rec = {"name": v.name, "title": v.title, **rec, "settings": self.settings_for(v), "data": v.data,
                       "notes": []}
            self.records.append(rec)
            self.save()
        self.drop_model()
        self.save(plots=True)
        if not self.args.quiet:
            print("\n" + report.markdown(self.results), flush=True)
            print(f"[perf] wrote {os.path.join(self.args.out, 'results.json')}, results.md"
                  + ("" if self.args.no_plots else ", throughput.png, stages.png")
                  + f" in {self.spent():.0f} s", flush=True)
        if interrupted:
            return 130
        return 0 if any(r["status"] == "ok" for r in self.records) else 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible")
    return torch.device(name)


def select_variants(args) -> List[Variant]:
    allv = default_variants(args.baseline_batch)
    names = [v.name for v in allv]
    chosen = allv
    for opt, text in (("--variants", args.variants), ("--skip", args.skip)):
        listed = [x.strip() for x in (text or "").split(",") if x.strip()]
        bad = [x for x in listed if x not in names]
        if bad:
            raise SystemExit(f"error: unknown variant(s) {', '.join(bad)} in {opt}; known: {', '.join(names)}")
        if listed:
            keep = opt == "--variants"
            chosen = [v for v in chosen if (v.name in listed) == keep]
    return chosen


def run(args, argv=None, t0=None) -> int:
    """Run the suite; SIGTERM ends it like Ctrl-C (what was measured is written, exit status 130)."""
    t0 = time.monotonic() if t0 is None else t0
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    in_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, on_term) if in_main else None
    try:
        return Suite(args, argv, t0).run()
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old)
