"""Benchmarks for verity_django: ``./scripts/bench [--quick]`` (see bench/README.md)."""
