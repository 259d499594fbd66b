"""`python -m perf`: the step profiler (options: `python -m perf --help`, code: perf/cli.py)."""
import sys

from .cli import main

sys.exit(main())
