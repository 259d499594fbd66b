"""What perf/ measures with: stage clocks, the matmul ceiling, the FLOP count of one step.

A `StageClock` is installed as the timer of `densecl_fast.stages` (`with stages.timed(clock)`):
every stage the model and the engine open goes through `StageClock.stage`, which keeps the
profiler range and records a mark at both ends: a CUDA event on the GPU (no host sync; read after
the repeat's final synchronize), `time.perf_counter` on the CPU (where every op is synchronous),
or the running FLOP total of a `FlopCounterMode` (for the per-stage FLOP count).
"""
from __future__ import annotations

import contextlib
import time

import torch

from densecl_fast import kernels
from densecl_fast import stages
from densecl_fast.model import DenseCL

# The runner's own stage (waiting for the batch) and the step's, in the order they run. "other"
# (reported too) is the part of a step outside all of them: zero_grad, the queue clones, the loss
# combination and, on the GPU, launch gaps between stages.
STAGES = ("data_wait",) + stages.NAMES


# ---- marks ---------------------------------------------------------------------------------------

class WallMarks:
    """Host wall clock (seconds). Exact on the CPU, where ops run synchronously."""
    kind = "wall clock (time.perf_counter)"

    @staticmethod
    def mark():
        return time.perf_counter()

    @staticmethod
    def elapsed(a, b) -> float:
        return b - a


class CudaMarks:
    """CUDA events on the current stream (seconds between them on the device timeline)."""
    kind = "CUDA events (device timeline)"

    @staticmethod
    def mark():
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    @staticmethod
    def elapsed(a, b) -> float:
        return a.elapsed_time(b) / 1e3


class FlopMarks:
    """Running FLOP total of a FlopCounterMode (the 'elapsed' quantity is FLOPs)."""
    kind = "FLOPs"

    def __init__(self, counter):
        self.counter = counter

    def mark(self):
        return self.counter.get_total_flops()

    @staticmethod
    def elapsed(a, b) -> float:
        return float(b - a)


def marks_for(device: torch.device):
    return CudaMarks() if device.type == "cuda" else WallMarks()


class StageClock:
    """Per-step marks around the named stages. Only steps opened with begin_step are measured."""

    def __init__(self, marks):
        self.marks = marks
        self.steps = []          # (start mark, [(name, a, b, top_level)], end mark)
        self._open = None
        self._depth = 0

    @contextlib.contextmanager
    def stage(self, name: str):
        with torch.profiler.record_function(name):
            if self._open is None:
                yield
                return
            top = self._depth == 0
            self._depth += 1
            a = self.marks.mark()
            try:
                yield
            finally:
                b = self.marks.mark()
                self._depth -= 1
                if self._open is not None:
                    self._open.append((name, a, b, top))

    def begin_step(self):
        self._open, self._depth = [], 0
        self._start = self.marks.mark()

    def end_step(self):
        end = self.marks.mark()
        self.steps.append((self._start, self._open, end))
        self._open = None

    def reset(self):
        self.steps, self._open, self._depth = [], None, 0

    def summary(self) -> dict:
        """Mean per measured step of each stage and of the whole step (seconds, or FLOPs).
        On CUDA call it after a synchronize. Nested stages are reported but not summed."""
        n = len(self.steps)
        if n == 0:
            return {"n_steps": 0, "step": None, "stages": {}, "other": None, "nested": {}}
        total, stages, nested = 0.0, {}, {}
        for start, recs, end in self.steps:
            total += self.marks.elapsed(start, end)
            for name, a, b, top in recs:
                d = nested if not top else stages
                d[name] = d.get(name, 0.0) + self.marks.elapsed(a, b)
        stages = {k: v / n for k, v in stages.items()}
        step = total / n
        return {"n_steps": n, "step": step, "stages": stages, "other": step - sum(stages.values()),
                "nested": {k: v / n for k, v in nested.items()}}


# ---- the hardware's limit ------------------------------------------------------------------------

def measure_matmul_tflops(device: torch.device, max_seconds: float = 10.0) -> dict:
    """The achieved matmul ceiling of `device`, measured with a few large matmuls.

    CUDA: bf16 (and, for reference, TF32-off fp32 is not measured), square 8192 and 16384x8192x8192
    products, best of 3 trials of 20 back-to-back matmuls timed with CUDA events.
    CPU: bf16 and fp32 at 1024 (bf16 is emulated on many CPUs; the larger of the two is the ceiling).
    """
    t_end = time.perf_counter() + max_seconds
    results = {}
    if device.type == "cuda":
        shapes = [(8192, 8192, 8192), (16384, 8192, 8192)]
        dtypes = {"bf16": torch.bfloat16}
        iters, trials = 20, 3
    else:
        shapes = [(1024, 1024, 1024)]
        dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
        iters, trials = 3, 2
    for dname, dtype in dtypes.items():
        best = 0.0
        for (m, k, n) in shapes:
            if time.perf_counter() > t_end:
                break
            a = torch.randn(m, k, device=device, dtype=dtype)
            b = torch.randn(k, n, device=device, dtype=dtype)
            c = torch.empty(m, n, device=device, dtype=dtype)
            for _ in range(3):
                torch.matmul(a, b, out=c)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            for _ in range(trials):
                if device.type == "cuda":
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    for _ in range(iters):
                        torch.matmul(a, b, out=c)
                    e1.record()
                    e1.synchronize()
                    dt = e0.elapsed_time(e1) / 1e3
                else:
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        torch.matmul(a, b, out=c)
                    dt = time.perf_counter() - t0
                best = max(best, 2.0 * m * k * n * iters / dt / 1e12)
                if time.perf_counter() > t_end:
                    break
            del a, b, c
        results[dname] = best
    if device.type == "cuda":
        torch.cuda.empty_cache()
        tflops, what = results["bf16"], "bf16 matmul"
    else:
        what = "bf16" if results.get("bf16", 0) >= results.get("fp32", 0) else "fp32"
        tflops, what = results[what], f"{what} matmul (the larger of bf16 and fp32 on this CPU)"
    shape_txt = ", ".join("x".join(map(str, s)) for s in shapes)
    return {"tflops": tflops, "source": "measured", "what": what, "by_dtype": results,
            "method": f"best of {trials} trials x {iters} matmuls ({shape_txt})"}


# ---- FLOPs of one step ---------------------------------------------------------------------------

FLOP_INCLUDES = ("torch.utils.flop_counter.FlopCounterMode over one training step (forward + backward) "
                 "with the reference loss kernels; 2 FLOPs per multiply-accumulate; counts convolutions, "
                 "linear layers and matmuls and their backward: query encoder forward + backward (~3x "
                 "forward; the first conv has no input gradient), key encoder forward (1x), both neck "
                 "branches, the queue logits of both losses (forward + gradient to the queries), and the "
                 "dense matching (C5 similarity bmm). Not counted: elementwise ops, batch norm, "
                 "normalisation, softmax/logsumexp, the momentum update and SGD (all memory-bound; "
                 "together well under 1% of the total).")


def count_step_flops(model_cfg, batch: int, image_size: int, fallback_device=None) -> dict:
    """FLOPs of one training step of DenseCL, per image and per stage.

    Counted under FakeTensorMode (shapes only: no compute, no activation memory; the weights are
    uninitialised CPU tensors) at the configured batch; if that fails, by one real step of one
    image on `fallback_device` (per-image FLOPs do not depend on the batch). The model runs in eval
    mode (no BN grouping, no enqueue: neither has matmul FLOPs).
    """
    prev_backend = kernels.get_backend()
    kernels.set_backend("reference")
    attempts = [("fake", batch)] + ([(str(fallback_device), 1)] if fallback_device is not None else [])
    errors = []
    try:
        for how, n in attempts:
            try:
                return _count(model_cfg, how, n, image_size)
            except Exception as e:  # noqa: BLE001 -- try the next way, report all
                errors.append(f"{how}: {type(e).__name__}: {e}")
    finally:
        kernels.set_backend(prev_backend)
    raise RuntimeError("FLOP count failed: " + " | ".join(errors))


def _count(cfg, how, n, image_size):
    from torch.utils.flop_counter import FlopCounterMode
    fake = how == "fake"
    dev = torch.device("cpu" if fake else how)
    with torch.device("meta"):   # no initialisation cost; the values do not change the count
        model = DenseCL(cfg)
    model.to_empty(device=dev)
    if not fake:
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                if t.is_floating_point():
                    t.normal_(0.0, 0.02)
    model.eval()   # no enqueue (no matmul FLOPs; BN is not counted either way)
    params = [p for p in model.parameters() if p.requires_grad]
    counter = FlopCounterMode(display=False)
    clock = StageClock(FlopMarks(counter))
    mode = contextlib.nullcontext()
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode
        mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        x = torch.randn(n, 3, image_size, image_size, device=dev)
        with counter, stages.timed(clock):
            clock.begin_step()
            out = model(x, x.clone(), loss_lambda=0.5)
            with stages.stage("backward"):
                torch.autograd.grad(out["loss"], params)
            clock.end_step()
    s = clock.summary()
    total = counter.get_total_flops()
    per_stage = {k: v / n for k, v in s["stages"].items() if v}
    d, k_len = cfg.out_dim, cfg.queue_len
    s2 = (image_size // 32 + (image_size % 32 > 0)) ** 2  # C5 positions (ResNet stride 32)
    where = "under FakeTensorMode (no compute)" if fake else f"on the {dev.type} device"
    return {
        "per_image": total / n,
        "per_stage_per_image": per_stage,
        "method": f"FlopCounterMode, one step at batch {n} {where}",
        "includes": FLOP_INCLUDES,
        "analytic_check": {
            "queue_logits_forward_per_image": 2.0 * d * k_len * (1 + s2),
            "formula": f"2*D*K*(1+S^2) with D={d}, K={k_len}, S^2={s2} (global + dense queue logits, forward)",
        },
    }
