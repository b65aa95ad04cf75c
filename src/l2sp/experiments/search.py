"""Hyper-parameter search on the validation split (never the test split): the import point of
:mod:`l2sp.search` (Optuna studies in persistent storage, resumable, several workers and machines), plus
``grid_search``, the earlier in-process API, now a thin call of :func:`l2sp.search.search`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from l2sp.engine.config import Config
from l2sp.search import (
    VALID_METRICS,
    Range,
    SearchResult,
    SearchSpace,
    add_arguments,
    main,
    search,
    write_table,
)

__all__ = [
    "VALID_METRICS",
    "Range",
    "SearchResult",
    "SearchSpace",
    "add_arguments",
    "grid_search",
    "main",
    "search",
    "write_table",
]


def grid_search(
    config: Any,
    grid: dict[str, list],
    overrides: list[str] | dict | None = None,
    *,
    metric: str = "val_acc",
    task: Any = None,
    out: str | Path | None = None,
    quiet: bool = True,
    light: bool = True,
    method: str = "grid",
    n_trials: int | None = None,
    **options: Any,
) -> tuple[Config, list[dict]]:
    """Every point of ``grid`` (``{"reg.alpha": [...], "optim.lr": [...]}``), or ``method="optuna"``: TPE over
    the same choices; returns (the best config on the validation ``metric``, one row per trial). The study is
    kept in ``OUT/study.db``: calling again with the same arguments continues it. ``options``: as
    :func:`l2sp.search.search` (``storage``, ``study``, ``workers``, ``pruner``, ...)."""
    from l2sp.errors import L2SPError

    if method not in ("grid", "optuna"):
        raise L2SPError(f"unknown search method {method!r}; use grid or optuna")
    sampler = "tpe" if method == "optuna" else "grid"
    res = search(config, grid, overrides, metric=metric, task=task, out=out, quiet=quiet, light=light,
                 sampler=sampler, n_trials=n_trials, **options)
    return res.best, res.rows
