"""Runs the variants of `python -m perf` one after the other, each under one time cap.

Every variant runs the trainer's own `train_step` on a `DenseCL` built from the config, so what is
timed is what `launch/pretrain.py` runs. Variants fail soft: an exception is recorded with its
message and the suite moves on. The caps, and the timed steps that fit them, are budget.py's.
"""
from __future__ import annotations

import copy
import datetime
import gc
import math
import os
import shlex
import signal
import statistics
import sys
import time
import traceback

import torch

from densecl_fast import stages, trainer
from densecl_fast.config import load_config, scaled_lr, validate
from densecl_fast.data import build_loader, dali_available
from densecl_fast.distributed import DistInfo
from densecl_fast.engines.compiling import CompileSettings
from densecl_fast.engines.single import SingleEngine
from densecl_fast.engines import train_step

from . import results
from .budget import MIN_STEADY, Budget, fit_timed_steps
from .environment import environment, process_peak_rss_bytes
from .jpegs import ensure_jpeg_folder
from .measure import StageClock, count_step_flops, marks_for, measure_matmul_tflops
from .sources import LoaderSource, Skip, SyntheticSource, fused_kernels_status, kernels_backend
from .variants import default_variants


class Suite:
    def __init__(self, args, argv, t0):
        self.args = args
        self.say = (lambda *x: None) if args.quiet else (lambda *x: print("[perf]", *x, flush=True))
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA device is visible")
        self.device = torch.device(args.device if args.device != "auto"
                                   else "cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.cfg_name = args.config or ("densecl_r50_200e_in1k" if self.cuda else "smoke")
        self.cfg = load_config(self.cfg_name, list(args.overrides))
        self.batch, self.image_size = self.cfg.optim.batch_size, self.cfg.data.image_size
        self.marks = marks_for(self.device)
        self.workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
        self.variants = select_variants(args)
        self.records = []
        self.model = None            # (key, model, engine), reused by the next variant with the same key
        self.jpegs = None
        self.compile_failed = {}     # model key -> (variant, error): a failed compile is not retried
        self.budget = Budget(args.budget_seconds, t0, args.compile_estimate_s if args.compile_estimate_s is not None
                             else (120.0 if self.cuda else 90.0))
        self.jitted = set()          # jit_key of the fused settings whose kernels were built in this process
        os.makedirs(args.out, exist_ok=True)
        m = self.cfg.model
        self.results = {"meta": {
            "tool": "python -m perf",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m perf " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "config": self.cfg_name, "arch": m.arch, "batch": self.batch, "image_size": self.image_size,
            "queue_len": m.queue_len, "bn_group_size": m.bn_group_size, "timing": self.marks.kind,
            "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats, "budget_seconds": args.budget_seconds,
            "workers": self.workers, "fused_kernels": fused_kernels_status(self.device), "data": None,
            "cuda": self.cuda, "compile_scope": args.compile_scope, "cudnn_benchmark": bool(args.cudnn_benchmark),
            "note": None if self.cuda else "CPU run: small shapes, CUDA-only variants skipped; not a GPU speed claim"},
            "environment": {}, "peak": None, "flops": None, "variants": [], "projection": None, "ratios": None,
            "goal": None}

    def now(self):
        """The wall clock after the device has caught up."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def save(self, plots=False):
        res, args = self.results, self.args
        res["variants"] = self.records
        res["projection"] = results.projection(self.records, args.gpus, args.scaling_efficiency, args.dataset_images,
                                               args.epochs)
        res["ratios"] = results.baseline_ratios(self.records)
        res["goal"] = results.goal_verdict(self.records, res["environment"].get("device_name", ""), self.batch,
                                           self.image_size)
        res["meta"]["seconds"] = self.budget.spent()
        if plots and not args.no_plots:
            try:
                res["plots"] = results.write_plots(res, args.out)
            except Exception as e:  # noqa: BLE001 -- plots are a convenience; the JSON is the record
                res["plots_error"] = f"{type(e).__name__}: {e}"
                self.say(f"plots failed: {res['plots_error']}")
        results.write_json(os.path.join(args.out, "results.json"), res)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(results.markdown(res))

    def measure_setup(self):
        res, args = self.results, self.args
        res["environment"] = environment(self.device)
        try:
            res["peak"] = ({"tflops": args.peak_tflops, "source": "given (--peak-tflops)", "what": "bf16 matmul",
                            "method": None} if args.peak_tflops
                           else measure_matmul_tflops(self.device, min(15.0, max(1.0, self.budget.left() / 20))))
        except Exception as e:  # noqa: BLE001 -- the variants still run; MFU is then left out
            res["peak"] = {"tflops": None, "source": "failed", "what": "", "method": f"{type(e).__name__}: {e}"}
        try:
            res["flops"] = count_step_flops(self.cfg.model, self.batch, self.image_size)
        except Exception as e:  # noqa: BLE001 -- TFLOP/s and MFU are then left out
            res["flops"] = {"per_image": None, "error": f"{type(e).__name__}: {e}"}
        self.say(f"{res['environment']['device_name']} | {self.cfg_name} ({self.cfg.model.arch}, batch {self.batch}, "
                 f"{self.image_size} px) | ceiling {results.tflops_text(res['peak']['tflops'])} TFLOP/s | budget "
                 f"{args.budget_seconds or 'unlimited'} s | out {args.out}")

    # -- the model, reused while the key stays the same (a compiled one keeps its graphs)
    def model_key(self, settings):
        return (*(settings[k] for k in ("batch", "bn_group_size", "precision", "channels_last", "compile",
                                        "compile_mode")), self.args.compile_scope)

    def drop_model(self):
        if self.model is not None and self.model[0][4]:
            torch._dynamo.reset()   # fresh models would otherwise pile up recompiles
        self.model = None
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def get_model(self, settings):
        key = self.model_key(settings)
        if self.model is not None and self.model[0] == key:
            return self.model[1:], True
        self.drop_model()
        cfg = copy.deepcopy(self.cfg)
        cfg.optim.batch_size, cfg.model.bn_group_size = settings["batch"], settings["bn_group_size"]
        compiled = CompileSettings(self.args.compile_scope, settings["compile_mode"]) if settings["compile"] else None
        self.model = (key, *build_model(cfg, self.device, settings["precision"], settings["channels_last"], compiled,
                                        self.args.seed))
        return self.model[1:], False

    # -- settings, step counts, cap
    def settings_for(self, v):
        settings = {"batch": v.batch or self.batch,
                    "bn_group_size": self.cfg.model.bn_group_size if v.bn_group_size is None else v.bn_group_size,
                    "precision": v.precision, "channels_last": v.channels_last, "compile": v.compile,
                    "fused": v.fused, "data": v.data, "compile_mode": v.compile_mode or self.args.compile_mode}
        if v.inherit:
            # The recipe's BN only: a plain-BN baseline may be faster but is not what training runs.
            done = [r for r in self.records if r["status"] == "ok" and r["settings"]["data"] == "synthetic"
                    and r["settings"]["batch"] == self.batch
                    and r["settings"]["bn_group_size"] == self.cfg.model.bn_group_size]
            if done:
                best = max(done, key=lambda r: r["images_per_s"]["median"])
                settings.update({k: best["settings"][k] for k in ("precision", "channels_last", "compile", "fused",
                                                                 "bn_group_size", "compile_mode")},
                                settings_from=best["name"])
            else:
                settings.update(precision="bf16", channels_last=True, compile=True, fused=self.cuda,
                                settings_from="default full stack (no model-only variant at this batch succeeded "
                                              "in this run)")
        return settings

    def compiles(self, settings):
        return settings["compile"] and not (self.model is not None and self.model[0] == self.model_key(settings))

    def jit_key(self, settings):
        """What the fused kernels specialise on: dtype, memory format, BN groups and batch (shapes)."""
        return settings["batch"], settings["bn_group_size"], settings["precision"], settings["channels_last"]

    def jits(self, settings):
        return bool(settings["fused"]) and self.cuda and self.jit_key(settings) not in self.jitted

    def one_off_s(self, settings):
        """Expected seconds of one-off work (compile, Triton JIT) in the variant's first step."""
        return self.budget.one_off_s(self.compiles(settings), self.jits(settings))

    def step_counts(self, settings):
        """(warm-up steps, timed steps per repeat, repeats): torchvision workers deliver in bursts (one
        round to fill, two per repeat); DALI and compile need a few steps to settle."""
        args = self.args
        warm, steps, repeats = args.warmup, args.steps, args.repeats
        if settings["data"] == "torch":
            warm, steps, repeats = max(warm, self.workers + 1), max(steps, 2 * self.workers), min(repeats, 3)
        elif settings["data"] == "dali":
            warm = max(warm, 3)
        return (max(warm, 2) if settings["compile"] else warm), steps, repeats

    def time_cap(self, index, settings):
        rest = [self.settings_for(v) for v in self.variants[index + 1:]
                if (self.cuda or not v.cuda_only) and (v.data != "dali" or dali_available())]
        later = {self.model_key(r) for r in rest if r["compile"] and self.compiles(r)} - {self.model_key(settings)}
        later_jit = ({self.jit_key(r) for r in rest if self.jits(r)}
                     - ({self.jit_key(settings)} if settings["fused"] else set()))
        return self.budget.cap(self.one_off_s(settings), len(later), len(later_jit), len(rest))

    def input_dtype(self, settings):
        """What the trainer feeds: DALI emits bf16 on CUDA for a bf16 run (and is the default loader on
        CUDA when installed); torchvision emits float32."""
        bf16 = self.cuda and settings["precision"] == "bf16" and settings["data"] != "torch"
        return torch.bfloat16 if bf16 and (settings["data"] == "dali" or dali_available()) else torch.float32

    def make_source(self, settings, notes):
        if settings["data"] == "synthetic":
            return SyntheticSource(settings["batch"], self.image_size, self.device, settings["channels_last"],
                                   self.args.seed, self.input_dtype(settings))
        args, folder = self.args, self.args.data_dir
        if not folder:   # one folder for every data variant: enough that the timed steps stay in one epoch
            need = args.data_images or max(
                (w + n * r + args.trace_steps + 4) * settings["batch"] for w, n, r in
                (self.step_counts({**settings, "data": v.data}) for v in self.variants if v.data != "synthetic"))
            if self.jpegs is None or self.jpegs["count"] < need:
                self.jpegs = ensure_jpeg_folder(args.data_cache, need, *args.data_resolution,
                                                workers=max(1, self.workers))
            folder = self.jpegs["path"]
        self.results["meta"]["data"] = f"{folder}, {self.workers} workers/threads"
        dcfg = copy.deepcopy(self.cfg.data)
        dcfg.source, dcfg.backend, dcfg.num_workers = folder, settings["data"], self.workers
        loader = build_loader(dcfg, batch_size=settings["batch"], rank=0, world_size=1, device=self.device,
                              seed=args.seed, channels_last=settings["channels_last"], dtype=self.input_dtype(settings))
        notes.append(f"{len(loader)} steps per epoch")
        return LoaderSource(loader)

    # -- one variant
    def run_variant(self, index, v):
        tag = f"{index + 1}/{len(self.variants)} {v.name}"
        settings = self.settings_for(v)
        rec = {"name": v.name, "title": v.title, "status": None, "settings": settings, "data": settings["data"],
               "notes": []}
        t_start = time.monotonic()
        try:
            if (v.cuda_only or settings["fused"]) and not self.cuda:
                raise Skip("needs CUDA (not run on the CPU)" if v.cuda_only else "fused Triton kernels need CUDA")
            failed = self.compile_failed.get(self.model_key(settings)) if settings["compile"] else None
            if failed:
                raise Skip(f"not retried: compiling this model failed in {failed[0]} ({failed[1][:200]})")
            if settings["data"] == "dali" and not dali_available():
                raise Skip("NVIDIA DALI is not installed (pip install -e .[dali])")
            cap, left, own = self.time_cap(index, settings), self.budget.left(), self.one_off_s(settings)
            need = self.budget.need_s(own, settings["batch"])
            if left <= 0 or cap < need:
                raise Skip(f"budget (needs ~{need:.0f} s, a cap of {max(0.0, cap):.0f} s of {max(0.0, left):.0f} s left)")
            self.say(f"{tag}: {results.settings_text(rec)} | cap {cap:.0f} s of {left:.0f} s left"
                     + (f" ({own:.0f} s of it for compile/JIT, apart from the steady steps)" if own else ""))
            with kernels_backend(settings["fused"], self.device) as active:
                rec["kernels_active"] = active
                self.measure(v, settings, rec, time.perf_counter() + cap, cap - own, own > 0)
            rec["status"] = "ok"
            self.say(f"{tag}: {rec['images_per_s']['median']:,.1f} images/s [{time.monotonic() - t_start:.0f} s]")
        except Skip as e:
            rec.update(status="skipped", reason=str(e))
            self.say(f"{tag}: skipped: {e}")
        except KeyboardInterrupt:
            self.drop_model()
            raise
        except Exception as e:  # noqa: BLE001 -- fail soft: record and go on
            rec.update(status="failed", error=f"{type(e).__name__}: {e}".strip()[:2000],
                       traceback=traceback.format_exc(limit=12)[-4000:])
            self.say(f"{tag}: FAILED: {rec['error'].splitlines()[0][:300]}")
            if settings["compile"] and rec.get("phase") in ("build", "first step"):
                self.compile_failed[self.model_key(settings)] = (v.name, rec["error"])
            self.drop_model()   # its state may be broken (OOM mid-step, failed compile)
        rec["seconds"] = time.monotonic() - t_start
        return rec

    def measure(self, v, settings, rec, deadline, steady_share, one_off):
        """`deadline`: when this variant's cap ends; `steady_share`: the seconds its steady steps get
        at least from the end of its first step (compile, JIT, cuDNN autotuning: a first step longer
        than planned does not eat them); `one_off`: the first step compiles or JITs."""
        args = self.args
        if self.cuda:   # what the previous variant left unreferenced must not count in this one's peak
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        compiling, jitting = self.compiles(settings), self.jits(settings)
        rec["phase"] = "build"
        (model, engine), rec["model_reused"] = self.get_model(settings)
        rec["phase"] = "data set-up"
        source = self.make_source(settings, rec["notes"])
        rec["input_dtype"] = str(self.input_dtype(settings)).replace("torch.", "")
        lr, lam = scaled_lr(self.cfg.optim, settings["batch"]), self.cfg.model.loss_lambda
        clock, host_wait, out = StageClock(self.marks), [], None

        def one_step(measure):
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
            t = self.now()
            one_step(False)
            return self.now() - t

        try:
            with stages.timed(clock):
                warm, steps, repeats = self.step_counts(settings)
                rec["phase"] = "first step" if compiling else "warm-up"   # a failure in "first step" is the compile's
                first = rec["first_step_s"] = timed_step()
                rec["phase"] = "warm-up"
                deadline = self.budget.steady_deadline(deadline, steady_share)
                # At least one steady step (two after a compile/JIT): the first step never stands for a steady one.
                min_steady = MIN_STEADY if one_off else 1
                times = []
                while len(times) < min_steady or (len(times) + 1 < warm and deadline - time.perf_counter() > times[-1]):
                    times.append(timed_step())
                step_s = statistics.median(times[-3:])
                rec["warmup_steps"] = 1 + len(times)
                if rec["warmup_steps"] < warm:
                    rec["notes"].append(f"warm-up cut to {rec['warmup_steps']} steps (budget)")
                if compiling or jitting:
                    rec["compile_s" if compiling else "jit_s"] = self.budget.one_off_measured(first, step_s, compiling)
                if settings["fused"]:
                    self.jitted.add(self.jit_key(settings))
                self.budget.step_measured(step_s, settings["batch"], settings["precision"] == "fp32")
                fit = fit_timed_steps(step_s, deadline - time.perf_counter(), steps, repeats)
                if fit is None:
                    raise Skip(f"budget (a step takes {step_s:.1f} s, beyond this variant's cap; first step {first:.1f} s"
                               + (f", {first - step_s:.1f} s of it compile/JIT, recorded" if compiling or jitting else "")
                               + ")")
                if fit != (args.steps, args.repeats):
                    rec["notes"].append(f"timed {fit[0]} steps x {fit[1]} repeats, warm-up {warm}"
                                        + (" (budget)" if fit != (steps, repeats) else " (the loader's bursts)"))
                steps, repeats = fit
                rec["phase"] = "timed"
                wraps0, per_repeat = source.wraps, []
                for _ in range(repeats):
                    t = self.now()
                    for _ in range(steps):
                        one_step(True)
                    per_repeat.append(steps * settings["batch"] / (self.now() - t))
                if source.wraps > wraps0:
                    rec["notes"].append(f"the loader crossed {source.wraps - wraps0} epoch boundaries while timed")
                rec["final_loss"] = loss = float(out["loss"].detach().float())
                if not math.isfinite(loss):
                    rec["notes"].append(f"loss is {loss} (timing is still valid; the run would have stopped)")
                summ = clock.summary()
                if args.trace and args.trace_steps > 0 and (not args.trace_variants
                                                            or v.name in args.trace_variants.split(",")):
                    if deadline - time.perf_counter() < step_s * args.trace_steps * 4:
                        rec["notes"].append("trace skipped (budget)")
                    else:
                        self.trace(v, one_step, rec)
        finally:
            source.close()
        rec["steps"] = steps
        self.record(settings, rec, per_repeat, summ, host_wait)

    def record(self, settings, rec, per_repeat, summ, host_wait):
        med = statistics.median(per_repeat)
        lo, hi, n = min(per_repeat), max(per_repeat), len(per_repeat)
        rec.update(repeats_images_per_s=per_repeat, repeats=n, step_ms=1e3 * settings["batch"] / med,
                   images_per_s={"median": med, "min": lo, "max": hi, "spread_pct": 50.0 * (hi - lo) / med,
                                 "stdev": statistics.stdev(per_repeat) if n > 1 else 0.0, "repeats": n},
                   stages_ms={k: 1e3 * x for k, x in {**summ["stages"], "other": summ["other"]}.items()},
                   stage_step_ms=1e3 * summ["step"], nested_stages_ms={k: 1e3 * x for k, x in summ["nested"].items()})
        rec["data_wait_host_ms"] = 1e3 * statistics.mean(host_wait) if host_wait else None
        if self.cuda:
            rec.update(peak_memory_gib=torch.cuda.max_memory_allocated(self.device) / 2**30,
                       peak_reserved_gib=torch.cuda.max_memory_reserved(self.device) / 2**30)
        else:
            rec.update(peak_memory_gib=None, process_peak_rss_gib=process_peak_rss_bytes() / 2**30)
        fl, peak = (self.results["flops"] or {}).get("per_image"), (self.results["peak"] or {}).get("tflops")
        if fl:
            rec["tflops"] = fl * med / 1e12
            rec["mfu"] = rec["tflops"] / peak if peak else None
            if rec["mfu"] and rec["mfu"] > 1.0:
                rec["notes"].append("MFU above 100%: the measured ceiling is too low; pass --peak-tflops")

    def trace(self, v, one_step, rec):
        from torch.profiler import ProfilerActivity, profile
        try:
            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])) as prof:
                for _ in range(self.args.trace_steps):
                    one_step(False)
                self.now()
            rec["trace"] = os.path.join(self.args.out, f"trace_{v.name}.json.gz")
            prof.export_chrome_trace(rec["trace"])
        except Exception as e:  # noqa: BLE001 -- a trace is an extra; the figures stand without it
            rec["notes"].append(f"trace failed: {type(e).__name__}: {e}")

    def run(self):
        interrupted = False
        try:
            self.measure_setup()
        except KeyboardInterrupt:
            interrupted = True
        self.save()
        for i, v in enumerate(self.variants):
            try:
                rec = {"status": "skipped", "reason": "interrupted"} if interrupted else self.run_variant(i, v)
            except KeyboardInterrupt:
                interrupted, rec = True, {"status": "failed", "error": "interrupted"}
            if "name" not in rec:
                rec = {"name": v.name, "title": v.title, **rec, "settings": self.settings_for(v), "data": v.data,
                       "notes": []}
            self.records.append(rec)
            self.save()
        self.drop_model()
        self.save(plots=True)
        if not self.args.quiet:
            print("\n" + results.markdown(self.results), flush=True)
            print(f"[perf] wrote {self.args.out}/results.json, results.md"
                  + ("" if self.args.no_plots else ", throughput.png, stages.png") + f" in {self.budget.spent():.0f} s")
        return 130 if interrupted else 0 if any(r["status"] == "ok" for r in self.records) else 1


def build_model(cfg, device, precision, channels_last, compile=None, seed=0):
    """DenseCL (the trainer's `build_model`, from `seed`) and the trainer's one-process engine (optimizer,
    autocast, step body) as a training run has them; `compile`: a CompileSettings (as train.compile builds it) or None."""
    validate(cfg)
    cfg = copy.deepcopy(cfg)
    cfg.train.seed, cfg.train.channels_last = seed, channels_last
    model = trainer.build_model(cfg, DistInfo(), device, None, print)
    engine = SingleEngine(device, precision)
    engine.setup(model, cfg.optim, scaled_lr(cfg.optim), compile=compile)
    return model.train(), engine


def select_variants(args):
    chosen = default_variants(args.baseline_batch)
    names = [v.name for v in chosen]
    for opt, text in (("--variants", args.variants), ("--skip", args.skip)):
        listed = [x.strip() for x in (text or "").split(",") if x.strip()]
        bad = [x for x in listed if x not in names]
        if bad:
            raise SystemExit(f"error: unknown variant(s) {', '.join(bad)} in {opt}; known: {', '.join(names)}")
        if listed:
            chosen = [v for v in chosen if (v.name in listed) == (opt == "--variants")]
    return chosen


def run(args, argv=None, t0=None):
    """Run the suite; SIGTERM ends it like Ctrl-C (what was measured is written, exit status 130)."""
    t0 = time.monotonic() if t0 is None else t0
    # As the trainer: cuDNN autotuning on CUDA unless --no-cudnn-benchmark (trainer.cudnn_benchmark_for).
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark) and torch.cuda.is_available()

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        return Suite(args, argv, t0).run()
    finally:
        signal.signal(signal.SIGTERM, old)
