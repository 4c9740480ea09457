"""carnet's benchmarks: ``python -m bench [module ...]`` (``make bench``).

Each module ``bench/bench_<name>.py`` exposes ``run() -> list[dict]``; each
dict is a row ``{name, baseline, value, ratio, unit, notes}`` comparing carnet
(``value``) with a baseline measured side by side in the same run. The runner
prints the rows and rewrites that module's section of docs/performance.md.
Helpers shared by the modules live in :mod:`bench.common`.
"""
