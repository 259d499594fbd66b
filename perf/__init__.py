"""Performance tools: `python -m perf` (the step profiler), perf/bench_kernels.py and perf/bench_data.py
(`python -m perf.bench_kernels`, `python -m perf.bench_data`), and the pytest-benchmark cases of perf/bench_cases.py."""
