"""One search, as plain data that worker processes receive: the config, the space, where the study lives."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l2sp.engine.config import NON_SEMANTIC, Config, flatten, resolve
from l2sp.errors import L2SPError
from l2sp.search.space import SearchSpace

VALID_METRICS = ("val_acc", "val_mean_per_class")
SAMPLERS = ("grid", "tpe")
PRUNERS = ("none", "median", "wilcoxon")


@dataclass
class SearchSpec:
    """``config``: the user's resolved config as a dict (overrides applied); trials add their values to it.

    ``light``: no checkpoints (a killed trial restarts from step 0 instead of resuming); ``heartbeat``: seconds
    between a running trial's heartbeats, a trial silent for 3 heartbeats is failed and run again."""

    config: dict
    space: SearchSpace
    out: str
    storage: str
    study: str
    sampler: str = "grid"
    n_trials: int | None = None
    pruner: str = "none"
    metric: str = "val_acc"
    light: bool = False
    quiet: bool = True
    heartbeat: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.metric not in VALID_METRICS:
            raise L2SPError(
                f"search metric {self.metric!r} is not allowed: hyper-parameters are chosen on the validation "
                f"split; use one of {', '.join(VALID_METRICS)}"
            )
        if self.sampler not in SAMPLERS:
            raise L2SPError(f"unknown sampler {self.sampler!r}; use one of {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise L2SPError(f"unknown pruner {self.pruner!r}; use one of {', '.join(PRUNERS)}")
        if self.sampler == "grid":
            self.space.points()  # refuses ranges
            if self.n_trials is not None:
                raise L2SPError(f"--trials {self.n_trials} is for --sampler tpe; a grid runs each of its "
                                f"{self.space.size()} points once")
        elif self.n_trials is None:
            self.n_trials = self.space.size()
            if self.n_trials is None:
                raise L2SPError("--sampler tpe over a --range needs a number of trials; give --trials N")
        if self.n_trials is not None and self.n_trials < 1:
            raise L2SPError(f"--trials {self.n_trials} must be >= 1")
        if self.heartbeat < 1:
            raise L2SPError(f"heartbeat={self.heartbeat} must be >= 1 second")
        if self.pruner != "none" and resolve(self.config).train.eval_every <= 0:
            raise L2SPError(
                f"--pruner {self.pruner} prunes on the validation accuracy logged every train.eval_every steps; "
                "set train.eval_every (e.g. train.eval_every=100)"
            )

    def user_config(self) -> Config:
        return resolve(self.config)

    def run_overrides(self) -> dict[str, Any]:
        """What every trial changes in the user's config: validation only, no TensorBoard; with ``light`` no
        checkpoints; with a pruner a checkpoint at every evaluation (the trial runs from one to the next)."""
        ov: dict[str, Any] = {"eval.splits": ["val"], "train.tensorboard": False}
        if self.light:
            ov.update({"train.save_checkpoint": False, "train.ckpt_every": 0})
        if self.pruner != "none":
            ov.update({"train.save_checkpoint": True, "train.ckpt_every": self.user_config().train.eval_every})
        return ov

    def run_config(self) -> Config:
        return resolve(self.config, self.run_overrides())

    def fingerprint(self) -> str:
        """The settings a study's trials share (semantic keys not searched, and the searched keys' names)."""
        flat = flatten(self.run_config().to_dict())
        keep = {k: v for k, v in flat.items() if k not in NON_SEMANTIC and k not in self.space.keys and k != "name"}
        keys = sorted(self.space.keys)
        if self.sampler == "tpe":  # Optuna's categorical choices cannot change within a study
            keys += [f"{k} in {v}" for k, v in self.space.grid.items()]
        return json.dumps({"config": keep, "keys": keys, "metric": self.metric}, sort_keys=True, default=str)

    def trial_dir(self, params: dict) -> Path:
        return Path(self.out) / "trials" / self.space.label(params)


def check_values(spec: SearchSpec) -> None:
    """Every grid value and range bound applied to the config once, so a bad key or value fails before any
    trial runs."""
    base = spec.run_config()
    for key, values in spec.space.grid.items():
        for v in values:
            resolve(base, {key: v})
    for key, r in spec.space.ranges.items():
        resolve(base, {key: r.lo})
        resolve(base, {key: r.hi})
