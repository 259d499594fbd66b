"""The time budget of `python -m perf`: what is left, each variant's cap, and the timed steps that fit it.

Before a variant starts it gets one cap: what is left divided among it and the variants still to
run, after the compile estimate of every model still to be compiled (and of the Triton JIT of each
fused kernel setting still to run) is set aside for the variant that pays it. A variant's cap is
that one-off allowance plus its share for steady steps; the share starts when the first step
(compile, JIT, autotuning) has ended, however long it took, so an underestimated compile costs the
variants after it, not this one's measurement. A variant with one-off work always takes MIN_STEADY
steady steps after it, any other variant one: its compile time is the first step minus a steady
one, never minus itself, and its timed steps are sized on steady ones. Warm-up, timed repeats and
the trace stop at the variant's deadline; a variant whose cap cannot hold its one-off work and two
steps is "skipped: budget". The estimates follow what was measured: the last compile and JIT, the
slowest seconds per image.
"""
from __future__ import annotations

import math
import time

OUTPUT_RESERVE_S = 5.0   # kept back from the budget for writing the JSON, markdown and plots
# Triton JIT (and autotuning) of the fused kernels in the first step of a fused variant, before one
# was measured: 15.8 s for the loss kernels on an H200 (perf/RESULTS.md), before the grouped-BN
# kernels added one specialisation per BN layer shape.
JIT_ESTIMATE_S = 30.0
# Steady steps after a first step with one-off work: the compile time is the first step minus
# their median, and the timed steps are sized on them.
MIN_STEADY = 2


class Budget:
    """The suite's clock and its estimates. `total_s` <= 0: unlimited; `t0`: when the suite started
    (time.monotonic); `compile_s`: the compile estimate until one was measured."""

    def __init__(self, total_s: float, t0: float, compile_s: float):
        self.total_s = total_s if total_s > 0 else math.inf
        self.t0 = t0
        self.compile_s = compile_s
        self.jit_s = JIT_ESTIMATE_S
        self.per_image_s = 0.0       # slowest seconds per image seen (bf16-equivalent), for the skip check

    def spent(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.total_s - self.spent() - OUTPUT_RESERVE_S

    def one_off_s(self, compiles: bool, jits: bool) -> float:
        """Expected seconds of one-off work (compile, Triton JIT) in a variant's first step."""
        return (self.compile_s if compiles else 0.0) + (self.jit_s if jits else 0.0)

    def cap(self, own_s: float, later_compiles: int, later_jits: int, later_variants: int) -> float:
        """A variant's time cap: its one-off work `own_s` and an equal share of what is left after the
        compiles and JITs of the variants after it are set aside (unless even that does not fit)."""
        left = self.left()
        if not math.isfinite(left):
            return math.inf
        reserve = self.compile_s * later_compiles + self.jit_s * later_jits
        reserve = reserve if own_s + reserve <= left else 0.0
        return own_s + max(0.0, left - own_s - reserve) / (1 + later_variants)

    def need_s(self, own_s: float, batch: int) -> float:
        """The least a cap must hold: the one-off work and two steps at the slowest speed seen."""
        return own_s + 2 * self.per_image_s * batch

    def steady_deadline(self, deadline: float, steady_share: float) -> float:
        """A variant's deadline once its first step has ended (time.perf_counter): its steady share
        holds from now, whatever the first step took; the suite's budget still ends it."""
        now = time.perf_counter()
        return min(max(deadline, now + steady_share), now + max(0.0, self.left()))

    def one_off_measured(self, first_s: float, step_s: float, compiled: bool) -> float:
        """The one-off seconds of a first step (compile, or else JIT) -> the estimate of the next."""
        extra = max(0.0, first_s - step_s)
        if compiled:   # with fused kernels new to this process, their JIT is in it too
            self.compile_s = max(1.0, extra)
        else:
            self.jit_s = max(1.0, extra)
        return extra

    def step_measured(self, step_s: float, batch: int, fp32: bool) -> None:
        self.per_image_s = max(self.per_image_s, step_s / batch / (2 if fp32 else 1))


def fit_timed_steps(step_s: float, avail_s: float, steps: int, repeats: int, min_repeats: int = 2):
    """Timed (steps, repeats) that fit `avail_s` seconds at `step_s` per step: the request when it fits;
    else fewer repeats (down to `min_repeats`), then fewer steps per repeat, then a single repeat.
    None when not even one step fits."""
    if step_s <= 0 or steps * repeats * step_s <= avail_s:
        return steps, repeats
    fits = int(avail_s // step_s)
    if fits < 1:
        return None
    reps = min(repeats, max(min_repeats, fits // steps))
    if steps * reps <= fits:
        return steps, reps
    reps = min(reps, min_repeats)
    return (fits // reps, reps) if fits // reps >= 1 else (1, fits)
