"""One trial: the config with the trial's values, run in a directory named by those values (so a trial run again
after a kill resumes from its checkpoint), scored on the validation split; with a pruner, run from one
evaluation to the next and reported to Optuna in between."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from l2sp.engine.config import Config, resolve
from l2sp.engine.run import build_task, finetune
from l2sp.errors import L2SPError
from l2sp.search.spec import SearchSpec
from l2sp.search.study import POINT_ATTR, NotQueued


def last_validation(metrics: Path, step: int) -> float | None:
    """The validation accuracy the engine logged at ``step`` (``val_top1`` in ``metrics.jsonl``), if any."""
    if not metrics.is_file():
        return None
    value = None
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # blank, or cut short by a kill
            continue
        if isinstance(rec, dict) and rec.get("step") == step and "val_top1" in rec:
            value = rec["val_top1"]
    return value


def _started(run_dir: Path) -> bool:
    """The directory holds this run already (resume it: from its checkpoint, or its results if it finished)."""
    return (run_dir / "config.yaml").is_file()


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``RUN_DIR/.lock`` (an OS lock, released when the process dies): a trial with the same values as one
    running in another process waits for it, then reads its results instead of writing the same directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(run_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class TrialRunner:
    """The objective of a search: ``runner(trial) -> validation metric``. ``task``: data shared by every trial
    (built once per process unless the search varies ``data.*``)."""

    def __init__(self, spec: SearchSpec, task: Any = None) -> None:
        self.spec, self.base, self._task = spec, spec.run_config(), task

    def task(self) -> Any:
        if self._task is None and not any(k.startswith("data.") for k in self.spec.space.keys):
            self._task = build_task(self.base.data)
            if len(self._task.val) == 0:
                raise L2SPError("the validation split is empty; set data.val_per_class > 0 to search hyper-parameters")
        return self._task

    def config(self, params: dict) -> Config:
        return resolve(self.base, {**params, "name": f"{self.base.name}[{self.spec.space.label(params)}]"})

    def params(self, trial: Any) -> dict:
        """TPE: the sampler's values; grid: the point the trial was queued with."""
        if self.spec.sampler != "grid":
            return self.spec.space.suggest(trial)
        point = trial.user_attrs.get(POINT_ATTR)
        if point is None:  # another worker took the last queued point in the same instant
            trial.set_user_attr("l2sp:spare", "no grid point was left; this trial ran nothing")
            raise NotQueued("no queued grid point left for this trial")
        return dict(point)

    def __call__(self, trial: Any) -> float:
        params = self.params(trial)
        run_dir = self.spec.trial_dir(params)
        trial.set_user_attr("run_dir", str(run_dir))
        t0 = time.perf_counter()
        try:
            with run_lock(run_dir):
                r = self.run(trial, self.config(params), run_dir)
        except L2SPError as exc:  # diverged, or a value this config cannot take: final for this trial
            trial.set_user_attr("error", str(exc))
            print(f"trial {trial.number} ({self.spec.space.label(params)}) failed: {exc}", file=sys.stderr)
            raise
        value = r.get(self.spec.metric)
        if value is None or math.isnan(value):
            raise L2SPError(f"the run in {run_dir} produced no {self.spec.metric}; check the validation split")
        if not self.spec.quiet:
            print(f"trial {trial.number} ({self.spec.space.label(params)}): {self.spec.metric} {100 * value:.2f}% "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
        return float(value)

    def run(self, trial: Any, cfg: Config, run_dir: Path) -> dict:
        """``finetune`` resuming whatever the directory holds; with a pruner, ``train.eval_every`` steps at a time,
        reporting the validation accuracy after each and stopping when the pruner says so."""
        if self.spec.pruner == "none":
            return finetune(cfg, task=self.task(), out=str(run_dir), quiet=True, resume=_started(run_dir))
        import optuna

        every, last = cfg.train.eval_every, -1
        while True:
            r = finetune(cfg, task=self.task(), out=str(run_dir), quiet=True, resume=_started(run_dir),
                         stop_after=every)
            if not r.get("interrupted"):
                return r
            step = int(r["step"])
            if step <= last:
                raise RuntimeError(f"the run in {run_dir} did not advance past step {step}")
            last = step
            val = last_validation(run_dir / "metrics.jsonl", step)
            if val is not None:
                trial.report(val, step)
                if trial.should_prune():
                    trial.set_user_attr("pruned_at", step)
                    if not self.spec.quiet:
                        print(f"trial {trial.number} ({run_dir.name}): pruned at step {step} "
                              f"(validation accuracy {100 * val:.2f}%)", flush=True)
                    raise optuna.TrialPruned(f"pruned at step {step} (validation accuracy {100 * val:.2f}%)")
