"""Repeated runs of one configuration over seeds, and mean ± std tables (Markdown and CSV).

The paper reports the best configuration run 5 times (new head initialisation and SGD noise each time):
mean ± sample standard deviation (ddof = 1; 0 for a single run), accuracies in %.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from l2sp.engine.config import resolve
from l2sp.engine.run import build_task, finetune
from l2sp.io import atomic_write_text

LIGHT = {"train.tensorboard": False, "train.save_checkpoint": False, "train.ckpt_every": 0}
METRICS = ("test_acc", "test_mean_per_class", "val_acc")


def light_overrides(overrides: list[str] | dict | None, light: bool) -> dict:
    """Overrides as a dict, plus small-run settings (no checkpoints, no TensorBoard) if ``light``."""
    from l2sp.engine.config import parse_overrides

    out = dict(LIGHT) if light else {}
    out.update(parse_overrides(overrides))
    return out


def run_seeds(
    config: Any,
    seeds: Sequence[int] | int,
    overrides: list[str] | dict | None = None,
    *,
    task: Any = None,
    out: str | Path | None = None,
    quiet: bool = True,
    light: bool = False,
    resume: bool = False,
    overwrite: bool = False,
) -> list[dict]:
    """Run ``config`` once per seed (``train.seed``); ``seeds`` an int N means 0..N-1. Run directories:
    ``OUT/seedS`` (default ``runs/NAME/seedS``). Returns the results dicts in seed order."""
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    ov = light_overrides(overrides, light)
    base = resolve(config, ov)
    if task is None:
        task = build_task(base.data)
    results = []
    for s in seeds:
        run_out = str(Path(out) / f"seed{s}") if out is not None else None
        results.append(
            finetune(
                base,
                {"train.seed": s},
                task=task,
                out=run_out,
                quiet=quiet,
                resume=resume,
                overwrite=overwrite,
            )
        )
    return results


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return float("nan"), float("nan"), 0
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, s, len(v)


def summarize(results: dict[str, list[dict]] | list[dict], path: str | Path | None = None,
              metrics: Sequence[str] = METRICS, scale: float = 100.0) -> str:
    """A mean ± std table, one row per configuration (``{name: [results]}``, or one list grouped by
    ``name``); accuracies × ``scale`` (%). Writes ``PATH.md`` and ``PATH.csv`` when ``path`` is given."""
    from l2sp.analysis import tables

    if isinstance(results, list):
        groups: dict[str, list[dict]] = {}
        for r in results:
            groups.setdefault(r.get("name", "run"), []).append(r)
    else:
        groups = results
    metrics = [m for m in metrics if any(m in r for rs in groups.values() for r in rs)]
    shown, numbers = [], []
    for name, rs in groups.items():
        row, num = {"config": name, "n": len(rs)}, {"config": name, "n": len(rs)}
        for m in metrics:
            mu, sd, _ = mean_std(r.get(m) for r in rs)
            row[m] = f"{mu * scale:.2f} ± {sd * scale:.2f}"
            num[f"{m}_mean"], num[f"{m}_std"] = mu * scale, sd * scale
        shown.append(row)
        numbers.append(num)
    text = tables.markdown_table(shown)
    if path is not None:
        path = Path(path)
        atomic_write_text(path.with_suffix(".md"), text)
        tables.write_csv(path.with_suffix(".csv"), numbers)
    return text


def pair_by_seed(a: Sequence[dict], b: Sequence[dict], value: Any = "test_acc", *, scale: float = 100.0):
    """The paired comparison a − b of two methods' results over the seeds both ran
    (:func:`l2sp.analysis.paired.paired` on ``scale · value``, matched by ``result["seed"]``).

    ``value``: a results key, or a function of a result. Seeds only one side ran are left out."""
    from l2sp.analysis.paired import paired

    get = value if callable(value) else (lambda r: r[value])
    by_seed = {r["seed"]: r for r in b}
    pairs = [(scale * get(r), scale * get(by_seed[r["seed"]])) for r in sorted(a, key=lambda r: r["seed"])
             if r["seed"] in by_seed]
    return paired([x for x, _ in pairs], [y for _, y in pairs])
