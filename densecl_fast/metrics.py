"""A run's metrics: metrics.jsonl (one JSON record per log step; TensorBoard beside it when asked),
written by the trainer on rank 0 and read back by reproduce/; and its warnings, on stderr."""
from __future__ import annotations

import contextlib
import json
import os
import sys

METRICS_FILE = "metrics.jsonl"


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class MetricsLog:
    """metrics.jsonl (always) and TensorBoard (optional) in the run directory; rank 0 only."""

    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.f = open(os.path.join(out_dir, METRICS_FILE), "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))

    def write(self, rec: dict):
        if not self.enabled:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])

    def close(self):
        if self.f:
            self.f.close()
        if self.tb:
            self.tb.close()


def read_metrics(run_dir: str) -> list[dict]:
    """The records of a run's metrics.jsonl ([] when it has none)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_metrics_so_far(run_dir: str) -> list[dict]:
    """The records of the metrics.jsonl of a run that may have been killed: its last line may be cut
    off, so lines that are not whole JSON records are left out (and no file is no records)."""
    recs = []
    with contextlib.suppress(OSError), open(os.path.join(run_dir, METRICS_FILE)) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    recs.append(rec)
    return recs
