"""The stages' record, OUT/state.json: loaded, checked field by field, written atomically."""
from __future__ import annotations

import json
import os
import time

from .errors import UsageError


class State:
    """OUT/state.json: the arguments, the plan, and the completed stages; written atomically."""

    def __init__(self, out: str):
        self.path = os.path.join(out, "state.json")
        self.data = {"version": 1, "args": {}, "plan": None, "stages": {}}
        if os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    self.data = json.load(f)
            except (OSError, ValueError) as e:
                raise UsageError(f"{self.path} is unreadable ({e}); move it away to start over") from None
            problem = state_problem(self.data)
            if problem:
                raise UsageError(f"{self.path} is not a reproduction's state: {problem}; repair it or move it "
                                 f"away to start over")

    def finished_any(self) -> bool:
        """Whether any stage finished: before that (a refused or stopped plan) nothing depends on the
        recorded arguments, so a corrected command may replace them."""
        return bool(self.data["stages"])

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def mark(self, stage: str, **info):
        self.data["stages"][stage] = {"finished": time.time(), **info}
        self.save()


_NUM = (int, float)
_PLAN_NUMBERS = ("epochs", "steps", "steps_per_epoch", "global_batch", "num_images", "nproc", "runs", "step_s",
                 "images_per_s", "startup_s", "epoch_s", "run_s", "pretrain_s", "expected_finish", "recipe_epochs",
                 "full_recipe_s_here", "full_recipe_s_in1k_here", "full_recipe_s_1_device",
                 "full_recipe_s_8_devices", "scaling_efficiency")
_ARG_TYPES = {"data": str, "val": str, "voc": str, "budget": str, "baseline": bool, "seeds": int, "config": str, "nproc": int,
              "probe_steps": int, "eval_image_size": int, "eval_max_train": int, "eval_max_val": int,
              "eval_workers": int, "no_random": bool}
_STAGE_FIELDS = {"pretrain": ("checkpoint", str), "export": ("files", dict), "eval": ("json", str),
                 "report": ("files", list)}


def _kind(v) -> str:
    return "null" if v is None else {dict: "an object", list: "a list", str: "a string"}.get(type(v), type(v).__name__)


def state_problem(data) -> str | None:
    """What makes `data` (a parsed state.json) unusable, in words; None when it is usable. Checks every
    field the reproduction and its report read, so a damaged file is one line, not a traceback."""
    if not isinstance(data, dict):
        return f"it holds {_kind(data)}, not an object"
    args, stages, plan = data.get("args"), data.get("stages"), data.get("plan")
    if not isinstance(args, dict):
        return f"'args' is {_kind(args)}, not an object"
    for k, v in args.items():
        want = _ARG_TYPES.get(k)
        if want and v is not None and not (isinstance(v, want) and (want is bool or not isinstance(v, bool))):
            return f"args.{k} is {_kind(v)}"
    ov = args.get("overrides", [])
    if not isinstance(ov, list) or not all(isinstance(o, str) for o in ov):
        return "args.overrides is not a list of strings"
    if not isinstance(stages, dict):
        return f"'stages' is {_kind(stages)}, not an object"
    for name, info in stages.items():
        if not isinstance(info, dict):
            return f"stage {name!r} is {_kind(info)}, not an object"
        field = None if name.endswith(":partial") else _STAGE_FIELDS.get(name.split(":")[0])
        if field and not isinstance(info.get(field[0]), field[1]):
            return f"stage {name!r} has no {field[0]!r}"
    if "plan" in stages or plan is not None:
        if not isinstance(plan, dict):
            return f"the plan stage is marked done but 'plan' is {_kind(plan)}" if "plan" in stages \
                else f"'plan' is {_kind(plan)}"
        bad = [k for k in _PLAN_NUMBERS if not isinstance(plan.get(k), _NUM) or isinstance(plan.get(k), bool)]
        if bad:
            return f"plan.{bad[0]} is missing or not a number"
        if not isinstance(plan.get("budget"), dict) or not isinstance(plan["budget"].get("text"), str):
            return "plan.budget is not a budget"
        for k in ("config", "probe"):
            if not isinstance(plan.get(k), dict):
                return f"plan.{k} is {_kind(plan.get(k))}, not an object"
    return None
