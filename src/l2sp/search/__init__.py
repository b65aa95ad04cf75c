"""Hyper-parameter searches on Optuna storages, on the validation split only.

``l2sp search CONFIG --grid reg.alpha=0.01,0.1,1 [--sampler tpe --range reg.alpha=1e-4:1 log --trials N]
[--storage URL] [--study NAME] [--workers K] [--pruner median]``: the study lives in ``OUT/study.db`` (or any
Optuna storage URL), the same command continues it (completed trials are never rerun; a trial whose process
died is failed and run again, resuming its run directory ``OUT/trials/<values>``), and it writes
``search.md`` / ``search.csv`` and ``best.yaml``.
"""

from l2sp.search.command import SearchResult, add_arguments, main, make_spec, search
from l2sp.search.report import trial_rows, write_table
from l2sp.search.space import Range, SearchSpace, parse_grid, parse_range, parse_ranges
from l2sp.search.spec import PRUNERS, SAMPLERS, VALID_METRICS, SearchSpec
from l2sp.search.workers import worker_devices

__all__ = [
    "PRUNERS",
    "SAMPLERS",
    "VALID_METRICS",
    "Range",
    "SearchResult",
    "SearchSpace",
    "SearchSpec",
    "add_arguments",
    "main",
    "make_spec",
    "parse_grid",
    "parse_range",
    "parse_ranges",
    "search",
    "trial_rows",
    "worker_devices",
    "write_table",
]
