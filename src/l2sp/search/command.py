"""``search(...)`` and the ``l2sp search`` command: an Optuna study in persistent storage that the same command
continues, run by K local worker processes and by any machine pointed at the same database."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l2sp.engine.config import flatten, parse_overrides, resolve
from l2sp.errors import L2SPError
from l2sp.search import study as st
from l2sp.search.report import write_report
from l2sp.search.space import SearchSpace, parse_grid, parse_ranges
from l2sp.search.spec import PRUNERS, SAMPLERS, VALID_METRICS, SearchSpec, check_values
from l2sp.search.workers import next_action, run_workers, work


@dataclass
class SearchResult:
    """``best``: the user's config with the best values (also ``OUT/best.yaml``); ``rows``: one per trial;
    ``table``: the Markdown table (``OUT/search.md``)."""

    best: Any
    rows: list[dict]
    table: str
    spec: SearchSpec
    ran: int = 0


def make_spec(config: Any, space: SearchSpace, overrides: list[str] | dict | None = None, *,
              out: str | Path | None = None, storage: str | None = None, study: str | None = None,
              **options: Any) -> SearchSpec:
    """A :class:`SearchSpec` with the defaults: ``out`` = ``runs/NAME-search``, SQLite in ``out``, study NAME."""
    ov = parse_overrides(overrides)
    if any(s == "test" for s in ov.get("eval.splits", None) or []):
        raise L2SPError("a search never evaluates the test split (hyper-parameters are chosen on validation); "
                        "drop eval.splits from the overrides")
    user = resolve(config, ov)
    out = Path(out) if out is not None else Path("runs") / f"{user.name}-search"
    spec = SearchSpec(user.to_dict(), space, str(out), storage or st.default_storage(out), study or user.name,
                      **options)
    check_values(spec)
    return spec


def search(config: Any, grid: dict[str, list] | None = None, overrides: list[str] | dict | None = None, *,
           ranges: dict | None = None, workers: int = 1, devices: str | None = None, threads: int = 1,
           task: Any = None, **options: Any) -> SearchResult:
    """Run (or continue) a search and write its table and ``best.yaml``.

    ``grid``: ``{"reg.alpha": [0.01, 0.1, 1]}``; ``ranges``: ``{"reg.alpha": Range(1e-4, 1, log=True)}`` (TPE);
    ``options``: ``out``, ``storage``, ``study``, ``sampler`` ("grid" | "tpe"), ``n_trials``, ``pruner``
    ("none" | "median" | "wilcoxon"), ``metric``, ``light``, ``quiet``, ``heartbeat``, ``seed``. ``workers`` > 1
    runs trials in that many processes (``task`` must then be None: each process builds the data)."""
    spec = make_spec(config, SearchSpace(dict(grid or {}), dict(ranges or {})), overrides, **options)
    Path(spec.out).mkdir(parents=True, exist_ok=True)
    study = st.open_study(spec)
    st.check_same_search(study, spec)
    queued = st.enqueue_grid(study, spec) if spec.sampler == "grid" else st.requeue_interrupted(study)
    c = st.counts(study)
    if not spec.quiet:
        print(f"search {spec.study!r}: {c['final']} trials done, {queued} queued, {c['running']} running elsewhere; "
              f"{workers} worker(s) -> {spec.out}", flush=True)
    ran = 0
    if next_action(spec, c) == "stop":
        pass  # nothing left to run: only the report
    elif workers == 1 and devices is None:
        ran = work(spec, task=task, study=study)
    elif task is not None:
        raise L2SPError("task= works with workers=1 only (each worker process builds its own data)")
    else:  # no more processes than trials left (at least one, to redo a trial that dies elsewhere)
        left = c["waiting"] + c["running"] if spec.sampler == "grid" else (spec.n_trials or 0) - c["final"]
        run_workers(spec, max(1, min(workers, left)), devices, threads)
    best, rows, table = write_report(study, spec)
    return SearchResult(best, rows, table, spec, ran)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``l2sp search``."""
    parser.add_argument("config", help="a preset name (see `l2sp presets`) or a YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.steps=500 (values parsed as YAML)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="values to try for one key (repeatable), e.g. --grid reg.alpha=0.01,0.1,1")
    parser.add_argument("--range", action="append", default=[], nargs="+", metavar="KEY=LO:HI [log]", dest="ranges",
                        help="an interval for --sampler tpe (repeatable), e.g. --range reg.alpha=1e-4:1 log")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None,
                        help="grid: every combination of --grid (default); tpe: Optuna's TPE over --grid and --range")
    parser.add_argument("--method", choices=["grid", "optuna"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--trials", type=int, default=None, help="number of TPE trials (default: the grid size)")
    parser.add_argument("--pruner", choices=PRUNERS, default="none",
                        help="stop poor trials early on the validation accuracy logged every train.eval_every steps")
    parser.add_argument("--metric", default="val_acc", choices=VALID_METRICS)
    parser.add_argument("--out", help="search directory: trials/, study.db, search.md/.csv, best.yaml "
                                      "(default runs/NAME-search)")
    parser.add_argument("--storage", help="an Optuna storage URL shared by several machines, e.g. "
                                          "postgresql://user:pass@host/db (default: sqlite:///OUT/study.db)")
    parser.add_argument("--study", help="study name in the storage (default: the config's name)")
    parser.add_argument("--workers", type=int, default=1, help="trials run at once on this machine (processes)")
    parser.add_argument("--devices", help="GPUs given round-robin to the workers, e.g. 0,1 "
                                          "(default: CUDA_VISIBLE_DEVICES, else every visible GPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of each worker process when --workers > 1 or --devices (default 1)")
    parser.add_argument("--light", action="store_true",
                        help="no checkpoints: a trial interrupted by a kill restarts from step 0")
    parser.add_argument("--heartbeat", type=int, default=20, metavar="S",
                        help="seconds between heartbeats; a trial silent for 3 is failed and run again")
    parser.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    parser.add_argument("-q", "--quiet", action="store_true")


def main(args: argparse.Namespace) -> int:
    """``l2sp search``: run or continue the study, print where the table and best config are."""
    sampler = args.sampler or ("tpe" if args.method == "optuna" else "grid")
    res = search(
        args.config, parse_grid(args.grid), args.overrides, ranges=parse_ranges(args.ranges),
        workers=args.workers, devices=args.devices, threads=args.threads, out=args.out, storage=args.storage,
        study=args.study, sampler=sampler, n_trials=args.trials, pruner=args.pruner, metric=args.metric,
        light=args.light, quiet=args.quiet, heartbeat=args.heartbeat, seed=args.seed,
    )
    m = res.spec.metric
    flat = flatten(res.best.to_dict())
    choice = " ".join(f"{k}={flat[k]}" for k in res.spec.space.keys)
    best_val = max(r[m] for r in res.rows if r[m] is not None)
    out = Path(res.spec.out)
    print(f"best on the validation split ({m} {100 * best_val:.2f}%): {choice}")
    print(f"table: {out / 'search.md'}; best config: {out / 'best.yaml'} "
          f"(run it with `l2sp finetune {out / 'best.yaml'} --seeds 5`)")
    return 0
