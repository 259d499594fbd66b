"""The named stages of a training step, and the one hook that times them.

The model and the engines open each stage of a step with `stage(name)`. By default that is a
`torch.profiler.record_function` range: near-free when no profiler runs, visible in traces, and
traced by Dynamo like any record_function (a compiled model keeps its graph). A measuring tool
(perf/) installs a timer for the duration of a measurement instead of patching module globals:

    with stages.timed(timer):      # timer.stage(name) -> a context manager around that stage
        train_step(...)

While installed, the timer's `stage(name)` replaces the default range (open one inside it to keep
the trace). `timed` restores the previous timer on exit, so timers nest like context managers.
Code that runs a stage must call `stage(...)` at run time, not hold on to a range object, so that
an installed timer sees it.
"""
from __future__ import annotations

import contextlib

import torch

# Every stage of one step, in the order they run (model forward, then the engine's step).
NAMES = ("query_forward", "momentum_update", "key_forward", "loss_global", "matching", "loss_dense",
         "enqueue", "backward", "optimizer")

_timer = None


def stage(name: str):
    """A context manager around the stage `name`: the installed timer's, else a profiler range."""
    timer = _timer
    if timer is None:
        return torch.profiler.record_function(name)
    return timer.stage(name)


@contextlib.contextmanager
def timed(timer):
    """Route every `stage(...)` through `timer.stage(...)` until the block ends."""
    global _timer
    previous, _timer = _timer, timer
    try:
        yield timer
    finally:
        _timer = previous
