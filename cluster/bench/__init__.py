"""Benchmarks behind `moemesh bench ...` and the writer of docs/benchmarks.md."""
