"""Benchmarks (run on the GPU machine)."""
