"""Benchmark suites. Each module exposes `run(data, *, limit, seed, options) -> dict`."""
