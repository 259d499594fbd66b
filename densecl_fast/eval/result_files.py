"""Results out: DIR/<mode>.json (everything), DIR/<mode>.md (a table), one summary line."""
from __future__ import annotations

import json
import math
import os


def _clean(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if hasattr(o, "item"):
        return _clean(o.item())
    return o


def write(out_dir: str, mode: str, result: dict, rows: list[tuple[str, str]]) -> tuple[str, str]:
    """rows: (metric, value) lines of the markdown table."""
    os.makedirs(out_dir, exist_ok=True)
    jpath, mpath = os.path.join(out_dir, f"{mode}.json"), os.path.join(out_dir, f"{mode}.md")
    with open(jpath, "w") as f:
        json.dump(_clean(result), f, indent=1, sort_keys=True)  # NaN -> null: strict JSON
    lines = [f"# {mode}: {result.get('checkpoint')}", "",
             f"arch {result.get('arch')}, data `{result.get('data')}`, image size {result.get('image_size')}, "
             f"{result.get('num_train')} train / {result.get('num_eval')} eval images", "",
             "| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    with open(mpath, "w") as f:
        f.write("\n".join(lines) + "\n")
    return jpath, mpath
