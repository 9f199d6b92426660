"""Benchmarks: each reports ours against a baseline measured in the same run."""
