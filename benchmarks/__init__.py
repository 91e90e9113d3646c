"""Speed and memory measurements of roadseg, each run as ``python -m benchmarks.<name>``; figures in BENCHMARKS.md."""
