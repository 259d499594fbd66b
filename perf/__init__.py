"""Performance tools, run from the repository root: `python -m perf` (the step profiler),
`python -m perf.bench_kernels`, `python -m perf.bench_data`, `python -m perf.aot` (the kernels' compile
table for sm_90/sm_80), and `pytest perf/ --benchmark-only`."""
