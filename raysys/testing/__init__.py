"""Helpers shared by the tests (tests/) and the benchmarks (benchmarks/), as numpy.testing is for numpy.

``rl_small``: config overrides for a tiny, fast RL run and a reader of a run's metrics.jsonl. ``faults``:
the fault matrix of bad inputs through the CLI. The library never imports this package, and importing it
does nothing but define names (no Ray, no torch, no files written).
"""
