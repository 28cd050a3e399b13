"""Benchmark sweeps: python -m benchmarks."""
