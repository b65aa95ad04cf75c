"""Hyper-parameter search on the validation split (never the test split): a full grid, or Optuna's TPE
over the same choices when Optuna is installed. Each point is one short run; the table is written as
``search.md`` / ``search.csv`` in the output directory."""

from __future__ import annotations

import csv
import io
import itertools
import math
from pathlib import Path
from typing import Any

from l2sp.engine.config import Config, resolve
from l2sp.engine.run import build_task, finetune
from l2sp.errors import L2SPError
from l2sp.experiments.seeds import light_overrides
from l2sp.io import atomic_write_text

VALID_METRICS = ("val_acc", "val_mean_per_class")


def _label(point: dict) -> str:
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())


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
) -> tuple[Config, list[dict]]:
    """Run every point of ``grid`` (``{"reg.alpha": [...], "optim.lr": [...]}``) and return
    (the config with the best ``metric`` on the validation split, one row per point)."""
    if metric not in VALID_METRICS:
        raise L2SPError(
            f"search metric {metric!r} is not allowed: hyper-parameters are chosen on the validation "
            f"split; use one of {', '.join(VALID_METRICS)}"
        )
    if not grid:
        raise L2SPError("empty search grid; give e.g. reg.alpha=0.01,0.1,1")
    ov = light_overrides(overrides, light)
    ov.setdefault("eval.splits", ["val"])
    base = resolve(config, ov)
    for key in grid:
        resolve(base, {key: grid[key][0]})  # unknown keys fail before any run
    if task is None and not any(k.startswith("data.") for k in grid):
        task = build_task(base.data)
    if task is not None and len(task.val) == 0:
        raise L2SPError(
            "the validation split is empty; set data.val_per_class > 0 to search hyper-parameters"
        )
    out = Path(out) if out is not None else Path("runs") / f"{base.name}-search"
    keys = list(grid)
    rows: list[dict] = []

    def run_point(point: dict) -> float:
        label = _label(point)
        cfg = resolve(base, {**point, "name": f"{base.name}[{label}]"})
        r = finetune(cfg, task=task, out=str(out / f"point{len(rows):03d}"), quiet=quiet, overwrite=True)
        value = r.get(metric)
        rows.append({**point, metric: value, "run_dir": r["run_dir"]})
        return value if value is not None else float("nan")

    if method == "optuna":
        try:
            import optuna
        except ImportError as exc:
            raise L2SPError("method=optuna needs optuna; pip install optuna, or use the grid") from exc
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
        study.optimize(
            lambda tr: run_point({k: tr.suggest_categorical(k, grid[k]) for k in keys}),
            n_trials=n_trials or math.prod(len(v) for v in grid.values()),
        )
    elif method == "grid":
        for values in itertools.product(*(grid[k] for k in keys)):
            run_point(dict(zip(keys, values)))
    else:
        raise L2SPError(f"unknown search method {method!r}; use grid or optuna")
    scored = [r for r in rows if r[metric] is not None and not math.isnan(r[metric])]
    if not scored:
        raise L2SPError(f"no search point produced {metric}; check the validation split")
    best = max(scored, key=lambda r: r[metric])
    write_table(rows, keys, metric, out / "search")
    return resolve(base, {k: best[k] for k in keys}), rows


def write_table(rows: list[dict], keys: list[str], metric: str, path: Path) -> str:
    """Markdown (``PATH.md``) and CSV (``PATH.csv``) of a search, best first."""
    ordered = sorted(rows, key=lambda r: -(r[metric] if r[metric] is not None else -math.inf))
    md = ["| " + " | ".join([*keys, metric]) + " |", "|" + "---|" * (len(keys) + 1)]
    md += ["| " + " | ".join([*(str(r[k]) for k in keys), f"{100 * r[metric]:.2f}"]) + " |" for r in ordered]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*keys, metric, "run_dir"])
    w.writeheader()
    w.writerows(ordered)
    text = "\n".join(md) + "\n"
    atomic_write_text(path.with_suffix(".md"), text)
    atomic_write_text(path.with_suffix(".csv"), buf.getvalue())
    return text
