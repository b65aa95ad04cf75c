"""The Optuna study a search lives in: storage with heartbeats (a trial whose process died is failed and queued
again), the check that a resumed study is the same search, the grid queue, and the state counts workers read."""

from __future__ import annotations

import inspect
import json
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from l2sp.errors import L2SPError
from l2sp.search.spec import SearchSpec

CONFIG_ATTR = "l2sp:config"
SPACE_ATTR = "l2sp:space"
POINT_ATTR = "l2sp:point"  # a grid trial's values (user attribute): any YAML value, and the grid may grow later
STARTED_ATTR = "l2sp:started"  # host:pid, set right after a trial's first heartbeat


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as exc:
        raise L2SPError("l2sp search needs optuna; pip install 'l2sp[search]' (or pip install optuna)") from exc
    import warnings

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # heartbeats, stale-trial failing and their retry are marked experimental; they are what resuming relies on
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def default_storage(out: str | Path) -> str:
    """``sqlite:///OUT/study.db`` (absolute path)."""
    return f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def open_storage(url: str, heartbeat: int) -> Any:
    """An RDB storage for ``url`` (any SQLAlchemy URL Optuna takes) with heartbeats every ``heartbeat`` s; a
    running trial without a heartbeat for 3 intervals is failed and queued again with its parameters."""
    optuna = _optuna()
    params = inspect.signature(optuna.storages.RDBStorage).parameters
    key = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        storage = _storage_class()(
            url, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=3 * heartbeat, **{key: requeue}
        )
    except ImportError as exc:
        raise L2SPError(f"the storage {url.split(':', 1)[0]} needs its database driver: {exc}; "
                        "for PostgreSQL pip install psycopg2-binary") from exc
    except Exception as exc:  # SQLAlchemy's errors: bad URL, server down, authentication
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise L2SPError(f"cannot open the search storage {_safe(url)}: {first}; check --storage") from exc
    if url.startswith("sqlite"):
        _serialize_sqlite(storage.engine)
    return storage


def _storage_class() -> type:
    """Optuna's RDB storage that marks a trial ``l2sp:started`` (host:pid) once its first heartbeat is stored:
    a running trial without the mark has no heartbeat, so Optuna would never find it stale (:func:`fail_orphans`)."""
    import os
    import socket

    optuna = _optuna()

    class Storage(optuna.storages.RDBStorage):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.l2sp_marked: set[int] = set()

        def record_heartbeat(self, trial_id: int) -> None:
            super().record_heartbeat(trial_id)
            if trial_id not in self.l2sp_marked:
                try:
                    self.set_trial_user_attr(trial_id, STARTED_ATTR, f"{socket.gethostname()}:{os.getpid()}")
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass
                self.l2sp_marked.add(trial_id)

    return Storage


def _serialize_sqlite(engine: Any) -> None:
    """Every SQLite transaction starts with ``BEGIN IMMEDIATE`` (the write lock, waited for up to the busy
    timeout): Optuna reads a queued trial's state and then marks it running; without the lock, two processes
    could both read "waiting" and run the same trial. (PostgreSQL and MySQL lock the row instead.)"""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners are dropped


def _safe(url: str) -> str:
    """``url`` without its password."""
    head, at, tail = url.rpartition("@")
    if not at or "://" not in head:
        return url
    scheme, _, cred = head.partition("://")
    return f"{scheme}://{cred.split(':')[0]}:***@{tail}"


def make_sampler(spec: SearchSpec, worker: int = 0, start: int = 0) -> Any:
    """TPE (with the constant liar for parallel workers), seeded by (seed, worker, trials already in the study)
    so that workers and resumed searches do not draw the same values; a grid samples nothing: its trials take
    their values from the queue."""
    optuna = _optuna()
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=hash((spec.seed, worker, start)) % 2**31, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=spec.seed)


class NotQueued(Exception):
    """A grid trial created after another worker took the last queued point (it fails, and is not a row)."""


def make_pruner(spec: SearchSpec) -> Any:
    optuna = _optuna()
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if spec.pruner == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=2)
    return optuna.pruners.NopPruner()


def open_study(spec: SearchSpec, worker: int = 0) -> Any:
    """Create the study, or load it if it exists (several processes and machines may do this at once)."""
    optuna = _optuna()
    study = optuna.create_study(
        storage=open_storage(spec.storage, spec.heartbeat),
        study_name=spec.study,
        direction="maximize",
        sampler=make_sampler(spec, worker),
        pruner=make_pruner(spec),
        load_if_exists=True,
    )
    if spec.sampler == "tpe":
        study.sampler = make_sampler(spec, worker, len(study.get_trials(deepcopy=False)))
    return study


def check_same_search(study: Any, spec: SearchSpec) -> None:
    """Refuse to continue a study made with another config, other searched keys or another metric."""
    mine = spec.fingerprint()
    theirs = study.user_attrs.get(CONFIG_ATTR)
    if theirs is None:
        if study.get_trials(deepcopy=False):
            raise L2SPError(
                f"study {spec.study!r} in {_safe(spec.storage)} already has trials not made by l2sp search; "
                "choose another --study name"
            )
        study.set_user_attr(CONFIG_ATTR, mine)
        study.set_user_attr(SPACE_ATTR, json.dumps(spec.space.describe(), default=str))
        return
    if theirs != mine:
        a, b = json.loads(theirs), json.loads(mine)
        diff = [k for k in sorted(set(a["config"]) | set(b["config"])) if a["config"].get(k) != b["config"].get(k)]
        diff += ["searched keys"] * (a["keys"] != b["keys"]) + ["metric"] * (a["metric"] != b["metric"])
        shown = "; ".join(
            f"{k}: {a['config'].get(k)!r} != {b['config'].get(k)!r}" if k in a["config"] or k in b["config"] else k
            for k in diff[:3]
        )
        raise L2SPError(
            f"study {spec.study!r} in {_safe(spec.storage)} was started with other settings ({shown}); "
            "give another --study name or --out directory, or the same settings to continue it"
        )


def trial_params(trial: Any) -> dict:
    """The values a trial runs with: its grid point, or its Optuna parameters (TPE)."""
    return dict(trial.user_attrs.get(POINT_ATTR) or trial.params)


def is_final(trial: Any) -> bool:
    """Complete, pruned, or failed for a reason of its own (an error recorded on it): never run again.
    A failure without a recorded error (a killed process, a crash) is run again."""
    name = trial.state.name
    return name in ("COMPLETE", "PRUNED") or (name == "FAIL" and "error" in trial.user_attrs)


def enqueue_grid(study: Any, spec: SearchSpec) -> int:
    """Queue every grid point no trial holds yet (waiting, running, or final); returns how many."""
    trials = study.get_trials(deepcopy=False)
    holders = [trial_params(t) for t in trials if t.state.name in ("WAITING", "RUNNING") or is_final(t)]
    queued = 0
    for point in spec.space.points():
        if not any(_same(h, point) for h in holders):
            study.enqueue_trial({}, user_attrs={POINT_ATTR: point})
            queued += 1
    return queued


def requeue(study: Any, trial: Any) -> None:
    """Queue a failed trial again with its values (its grid point, or its sampled parameters) and its run
    directory; ``system_attrs`` keep ``failed_trial`` (the first try) and ``retry_history``. Also Optuna's
    callback for trials failed for lack of heartbeats."""
    optuna = _optuna()
    if not trial.params and POINT_ATTR not in trial.user_attrs:
        return  # nothing chosen yet: a new trial takes its place
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    attrs = {k: v for k, v in trial.user_attrs.items() if k != STARTED_ATTR}
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs=attrs, system_attrs={"failed_trial": history[0], "retry_history": history},
    ))


def requeue_interrupted(study: Any) -> int:
    """Queue again every trial with values that failed without an error of its own (Ctrl-C, a crash) and was
    not retried yet (TPE; a grid queues its missing points instead); returns how many."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    todo = [t for t in trials if t.state.name == "FAIL" and "error" not in t.user_attrs and t.params
            and t.number not in retried]
    for t in todo:
        requeue(study, t)
    return len(todo)


def fail_orphans(study: Any, grace: float) -> int:
    """Optuna fails a running trial once its heartbeats stop, but a trial whose process died after taking it
    and before its first heartbeat has none and would stay "running" forever. A running trial without a
    heartbeat (no ``l2sp:started``) for ``grace`` seconds is failed and queued again here."""
    optuna = _optuna()
    now, failed = datetime.now(), 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if STARTED_ATTR in t.user_attrs or t.datetime_start is None or (now - t.datetime_start).total_seconds() < grace:
            continue
        try:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=False)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # finished meanwhile, or failed by another worker (which queues it again)
        requeue(study, t)
        failed += 1
    return failed


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def counts(study: Any) -> Counter:
    """``{"final": n, "running": n, "waiting": n}`` over the study's trials."""
    c: Counter = Counter()
    for t in study.get_trials(deepcopy=False):
        if is_final(t):
            c["final"] += 1
        elif t.state.name in ("RUNNING", "WAITING"):
            c[t.state.name.lower()] += 1
    return c
