"""Performance tools, run from the repository root: `python -m perf` (the step profiler),
`python -m perf.bench_kernels`, `python -m perf.bench_data`, and `pytest perf/ --benchmark-only`."""
