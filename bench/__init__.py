"""Benchmark: the provider's documented polling loop against smsbat-tracker, same workload.

``python -m bench`` (or ``make bench``) runs every available mode on the same simulated
workload and prints a table; ``python -m bench --help`` lists the options. See
``bench/RESULTS.md`` for the latest numbers and how to read them.

Modules: :mod:`bench.cli` (options and the run), :mod:`bench.modes` (the mode registry and
the modes), :mod:`bench.doc_loop` (mode a's child process), :mod:`bench.webhook_host`
(mode c's webhook receiver process), :mod:`bench.workload` (the sandbox mix),
:mod:`bench.sampling` (CPU, RSS and Redis memory), :mod:`bench.metrics` (the figures),
:mod:`bench.report` (table and JSON) and :mod:`bench.probe` (``--probe-throughput``).
"""
