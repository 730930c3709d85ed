"""Benchmarks: `python -m benchmarks.<name>`; numbers are medians of repeats from one run."""
