"""The fault matrix: bad inputs and misuse through the real ``raysys`` CLI, each with the exit code and the
message a user must see, and the promise that nothing already on disk changes.

A case builds its bad input inside a fresh world folder (``World``), then runs ``raysys.cli.main`` in this
process. ``run_case`` returns what happened; ``tests/unit/test_fault_matrix.py`` asserts it for every case
and ``benchmarks/reliability.py`` counts the outcomes. Ray never starts here: a case that would reach
``ray.init`` fails with "Ray would start", so every check here happens before Ray (faults during a Ray run
are in the reliability benchmark and in tests/ray and tests/e2e).

``classify`` names the outcome: ``clear``, ``silent`` or ``data_loss`` (defined in ``harness``).

Layout: ``harness.py`` (Case, Outcome, World, snapshot, run_case, classify), ``builders.py`` (input builders
that several classes of fault share), then one module of cases per class of fault, each with its own builders
and a ``CASES`` list: ``config_cases`` (config values, config files, the command line), ``data_cases``
(dataset folders and manifests), ``checkpoint_cases``, ``run_cases`` (run folders, resume, locks, pipeline
and tune arguments, interrupts), ``output_cases`` (a standalone command's output folder: results never
replaced unasked, the run lock, failures midway) and ``security_cases``. A case goes in the module of the class of fault it
exercises (its ``category`` may differ: a path escaping a dataset folder is a data case of category
``security``). ``CASES`` below joins the modules in a fixed order, so case ids and their order (the test ids,
the benchmark's rows) stay stable.
"""

from __future__ import annotations

from raysys.testing.faults import (
    checkpoint_cases,
    config_cases,
    data_cases,
    output_cases,
    run_cases,
    security_cases,
)
from raysys.testing.faults.harness import FAST, Case, Outcome, World, classify, run_case, snapshot

CASES: list[Case] = [
    *config_cases.CASES,
    *data_cases.CASES,
    *checkpoint_cases.CASES,
    *run_cases.CASES,
    *output_cases.CASES,
    *security_cases.CASES,
]
"""Every case, in a fixed order: config, data, checkpoints, runs, outputs, security."""

__all__ = ["CASES", "FAST", "Case", "Outcome", "World", "classify", "run_case", "snapshot"]
