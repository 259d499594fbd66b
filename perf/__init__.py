"""Performance tools: perf/profile.py (the step profiler) and the pytest-benchmark micro-benchmarks."""
