"""Short-budget reproduction of the 200-epoch recipe (`python launch/reproduce.py`; see cli.py and docs/reproduce.md).

Modules, each importing only those above it:
  errors  the three ways a reproduction stops (bad input, a failed run, a signal)
  plan    budget and plan arithmetic, durations
  state   OUT/state.json: the arguments, the plan, the finished stages
  runs    the runs the stages start: pretraining, the export and eval CLIs
  probe   the throughput probe (a timed child process) -> the plan
  plots   loss.png, knn.png, throughput.png, eval.png
  report  report.md and report.json
  cli     the arguments and the stage runner (`main`)
"""
from .cli import main

__all__ = ["main"]
