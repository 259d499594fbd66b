"""perf/budget.py alone: the time caps of `python -m perf`'s variants and the timed steps that fit
them (the runner under a fake clock is tests/test_perf.py)."""
import math

import pytest

from perf import budget
from perf.budget import Budget, fit_timed_steps


def test_fit_timed_steps_scales_repeats_then_steps():
    assert fit_timed_steps(0.1, 100.0, 10, 5) == (10, 5)          # fits
    assert fit_timed_steps(1.0, 30.0, 10, 5) == (10, 3)           # fewer repeats
    assert fit_timed_steps(1.0, 15.0, 10, 5) == (7, 2)            # then fewer steps, two repeats kept
    assert fit_timed_steps(1.0, 1.5, 10, 5) == (1, 1)
    assert fit_timed_steps(1.0, 0.5, 10, 5) is None               # not one step


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]

    class Clock:
        monotonic = perf_counter = staticmethod(lambda: now[0])

    monkeypatch.setattr(budget, "time", Clock)
    return now


def test_a_cap_is_the_one_off_work_and_an_equal_share_after_the_later_one_offs(clock):
    b = Budget(305.0, 1000.0, compile_s=60.0)        # 300 s once the output reserve is kept back
    assert b.left() == 300.0 and b.one_off_s(True, True) == 60.0 + budget.JIT_ESTIMATE_S
    # this variant compiles (60 s); two later ones: one more compile and one JIT set aside for them
    assert b.cap(60.0, 1, 1, 2) == 60.0 + (300.0 - 60.0 - 60.0 - budget.JIT_ESTIMATE_S) / 3
    # when the later one-offs do not fit beside this one's, nothing is set aside
    assert b.cap(60.0, 5, 0, 2) == 60.0 + (300.0 - 60.0) / 3
    clock[0] += 100.0
    assert b.spent() == 100.0 and b.left() == 200.0
    assert Budget(0, 1000.0, 60.0).cap(60.0, 1, 1, 2) == math.inf   # 0: unlimited


def test_the_estimates_follow_what_was_measured(clock):
    b = Budget(305.0, 1000.0, compile_s=60.0)
    assert b.one_off_measured(first_s=41.0, step_s=1.0, compiled=True) == 40.0 and b.compile_s == 40.0
    assert b.one_off_measured(first_s=0.5, step_s=1.0, compiled=False) == 0.0 and b.jit_s == 1.0   # floor 1 s
    b.step_measured(2.0, batch=4, fp32=True)        # an fp32 step counts half (bf16-equivalent)
    b.step_measured(1.0, batch=4, fp32=False)
    assert b.per_image_s == 0.25 and b.need_s(10.0, batch=8) == 10.0 + 2 * 0.25 * 8
    # the steady share holds past the cap, but not past the suite's budget
    assert b.steady_deadline(deadline=1010.0, steady_share=50.0) == 1050.0
    assert b.steady_deadline(deadline=1010.0, steady_share=500.0) == 1000.0 + 300.0
