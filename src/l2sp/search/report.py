"""What a search leaves: ``search.md`` / ``search.csv`` (one row per trial, best first) and ``best.yaml`` (the
user's config with the best values, ready for ``l2sp finetune OUT/best.yaml --seeds 5``)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from l2sp.engine.config import Config, resolve, to_yaml
from l2sp.errors import L2SPError
from l2sp.io import atomic_write_text
from l2sp.search import study as st
from l2sp.search.spec import SearchSpec


def _state(t: Any) -> str:
    name = t.state.name.lower()
    if name == "pruned" and "pruned_at" in t.user_attrs:
        return f"pruned at step {t.user_attrs['pruned_at']}"
    if name == "fail":
        return "failed: " + t.user_attrs.get("error", "").split(";")[0][:80]
    return name


def trial_rows(study: Any, spec: SearchSpec) -> list[dict]:
    """One row per trial that holds values of this search's keys: complete, pruned, failed with an error, or
    still running elsewhere (a trial failed by a kill and run again appears once, as its rerun)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        params = st.trial_params(t)
        if set(params) != set(spec.space.keys) or not (st.is_final(t) or t.state.name == "RUNNING"):
            continue
        value = t.value if t.state.name == "COMPLETE" else None
        rows.append({**{k: params[k] for k in spec.space.keys}, spec.metric: value, "state": _state(t),
                     "trial": t.number, "run_dir": t.user_attrs.get("run_dir", str(spec.trial_dir(params)))})
    return rows


def _value(r: dict, metric: str) -> float:
    v = r.get(metric)
    return v if v is not None and not math.isnan(v) else -math.inf


def write_table(rows: list[dict], keys: list[str], metric: str, path: Path) -> str:
    """Markdown (``PATH.md``, the metric in %) and CSV (``PATH.csv``) of a search, best first."""
    ordered = sorted(rows, key=lambda r: -_value(r, metric))
    extra = [c for c in ("state", "trial") if any(c in r for r in rows)]
    md = ["| " + " | ".join([*keys, f"{metric} %", *extra]) + " |", "|" + "---|" * (len(keys) + 1 + len(extra))]
    for r in ordered:
        shown = f"{100 * r[metric]:.2f}" if _value(r, metric) > -math.inf else "-"
        md.append("| " + " | ".join([*(str(r[k]) for k in keys), shown, *(str(r.get(c, "")) for c in extra)]) + " |")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*keys, metric, *extra, "run_dir"], extrasaction="ignore")
    w.writeheader()
    w.writerows(ordered)
    text = "\n".join(md) + "\n"
    path = Path(path)
    atomic_write_text(path.with_suffix(".md"), text)
    atomic_write_text(path.with_suffix(".csv"), buf.getvalue())
    return text


def best_row(rows: list[dict], metric: str) -> dict:
    scored = [r for r in rows if _value(r, metric) > -math.inf]
    if not scored:
        raise L2SPError(
            f"no trial of the search produced {metric}; see the state column of search.md and the validation split"
        )
    return max(scored, key=lambda r: _value(r, metric))


def write_report(study: Any, spec: SearchSpec) -> tuple[Config, list[dict], str]:
    """Table and ``best.yaml`` in ``spec.out``; returns (best config, rows, Markdown table)."""
    rows = trial_rows(study, spec)
    keys = spec.space.keys
    text = write_table(rows, keys, spec.metric, Path(spec.out) / "search")
    best = resolve(spec.user_config(), {k: best_row(rows, spec.metric)[k] for k in keys})
    atomic_write_text(Path(spec.out) / "best.yaml", to_yaml(best))
    return best, rows, text
