"""Benchmark scripts (each prints a table and writes JSON; see BENCHMARKS.md) and the generality tasks."""
