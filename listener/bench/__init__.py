"""Benchmarks: standalone commands that print measured ratios against the project's limits."""
