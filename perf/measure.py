"""What perf/ measures with: stage clocks, the matmul ceiling, the FLOP count of one step.

A `StageClock` is installed as the timer of `densecl_fast.stages` (`with stages.timed(clock)`) and
puts a mark at both ends of every stage: a CUDA event on the GPU (no host sync; read after the
repeat's final synchronize), `time.perf_counter` on the CPU (where ops run synchronously), or the
running total of a `FlopCounterMode` (the per-stage FLOP count).
"""
from __future__ import annotations

import contextlib
import time

import torch

from densecl_fast import kernels, stages
from densecl_fast.model import DenseCL

# The runner's own stage (waiting for the batch), then the step's. "other" (reported too) is the
# rest of a step: zero_grad, the queue clones, the loss sum and, on the GPU, launch gaps.
STAGES = ("data_wait",) + stages.NAMES


class Marks:
    """A mark is a number (`now` returns it, `elapsed` subtracts) or a CUDA event on the current stream."""

    def __init__(self, kind, now=None):
        self.kind, self.now = kind, now

    def mark(self):
        if self.now is not None:
            return self.now()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def elapsed(self, a, b) -> float:
        return float(b - a) if self.now is not None else a.elapsed_time(b) / 1e3


def marks_for(device: torch.device) -> Marks:
    if device.type == "cuda":
        return Marks("CUDA events (device timeline)")
    return Marks("wall clock (time.perf_counter)", time.perf_counter)


class StageClock:
    """Per-step marks around the named stages; only steps opened with begin_step are measured.
    Nested stages are reported apart and not summed into the step."""

    def __init__(self, marks):
        self.marks, self.steps, self._open, self._depth = marks, [], None, 0

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
                self._depth -= 1
                if self._open is not None:
                    self._open.append((name, a, self.marks.mark(), top))

    def begin_step(self):
        self._open, self._depth, self._start = [], 0, self.marks.mark()

    def end_step(self):
        self.steps.append((self._start, self._open, self.marks.mark()))
        self._open = None

    def summary(self) -> dict:
        """Mean per measured step of each stage and of the whole step (on CUDA: after a synchronize)."""
        n, el = max(1, len(self.steps)), self.marks.elapsed
        step, top, nested = 0.0, {}, {}
        for start, recs, end in self.steps:
            step += el(start, end) / n
            for name, a, b, is_top in recs:
                d = top if is_top else nested
                d[name] = d.get(name, 0.0) + el(a, b) / n
        return {"n_steps": len(self.steps), "step": step, "stages": top, "other": step - sum(top.values()),
                "nested": nested}


def _synced(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure_matmul_tflops(device: torch.device, max_seconds: float = 10.0) -> dict:
    """The achieved matmul ceiling, best of 3 trials of back-to-back matmuls (wall clock between
    synchronizes): bf16 at 8192^3 and 16384x8192x8192 on CUDA, fp32 at 1024^3 on the CPU (where
    bf16 is emulated on many chips)."""
    cuda = device.type == "cuda"
    shapes = [(8192, 8192, 8192), (16384, 8192, 8192)] if cuda else [(1024, 1024, 1024)]
    dtype, iters, trials = (torch.bfloat16, 20, 3) if cuda else (torch.float32, 3, 3)
    t_end, best = time.perf_counter() + max_seconds, 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        c = a @ b
        for trial in range(trials + 1):   # the first is a warm-up
            t0 = _synced(device)
            for _ in range(iters):
                torch.matmul(a, b, out=c)
            if trial:
                best = max(best, 2.0 * m * k * n * iters / (_synced(device) - t0) / 1e12)
        del a, b, c
        if time.perf_counter() > t_end:
            break
    if cuda:
        torch.cuda.empty_cache()
    return {"tflops": best, "source": "measured", "what": "bf16 matmul" if cuda else "fp32 matmul",
            "method": f"best of {trials} trials x {iters} matmuls ({', '.join('x'.join(map(str, s)) for s in shapes)})"}


FLOP_INCLUDES = ("FlopCounterMode over one training step with the reference loss kernels, 2 FLOPs per "
                 "multiply-accumulate: convolutions, linear layers and matmuls, forward and backward (query "
                 "encoder ~3x forward, key encoder 1x, both necks, both losses' queue logits, the dense "
                 "matching). Not counted: elementwise ops, BN, softmax, momentum update, SGD (memory-bound, "
                 "well under 1% together).")


def count_step_flops(cfg, batch: int, image_size: int) -> dict:
    """FLOPs of one training step of DenseCL, per image and per stage, counted under FakeTensorMode
    (shapes only: no compute, no memory). Eval mode: BN grouping and the enqueue have no matmul FLOPs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    prev = kernels.get_backend()
    kernels.set_backend("reference")
    try:
        with torch.device("meta"):
            model = DenseCL(cfg)
        model.to_empty(device="cpu").eval()
        params = [p for p in model.parameters() if p.requires_grad]
        counter = FlopCounterMode(display=False)
        clock = StageClock(Marks("FLOPs", counter.get_total_flops))
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.randn(batch, 3, image_size, image_size)
            with counter, stages.timed(clock):
                clock.begin_step()
                out = model(x, x.clone(), loss_lambda=0.5)
                with stages.stage("backward"):
                    torch.autograd.grad(out["loss"], params)
                clock.end_step()
    finally:
        kernels.set_backend(prev)
    d, k_len = cfg.out_dim, cfg.queue_len
    s2 = (image_size // 32 + (image_size % 32 > 0)) ** 2  # C5 positions (ResNet stride 32)
    return {"per_image": counter.get_total_flops() / batch,
            "per_stage_per_image": {k: v / batch for k, v in clock.summary()["stages"].items() if v},
            "method": f"FlopCounterMode, one step at batch {batch} under FakeTensorMode (no compute)",
            "includes": FLOP_INCLUDES,
            "analytic_check": {"queue_logits_forward_per_image": 2.0 * d * k_len * (1 + s2),
                               "formula": f"2*D*K*(1+S^2) with D={d}, K={k_len}, S^2={s2} (global + dense "
                                          "queue logits, forward)"}}
