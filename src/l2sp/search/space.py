"""What a search varies: a grid of values per key (categorical) and numeric ranges (``lo:hi``, optionally on a log
scale), parsed from the command line, turned into Optuna suggestions and into run-directory names."""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from l2sp.errors import L2SPError

_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


@dataclass(frozen=True)
class Range:
    """A numeric interval [lo, hi]; ``log``: sampled uniformly in log(value) (needs lo > 0)."""

    lo: float
    hi: float
    log: bool = False

    @property
    def integer(self) -> bool:
        return isinstance(self.lo, int) and isinstance(self.hi, int)


@dataclass
class SearchSpace:
    """``grid``: ``{key: [v1, v2, ...]}`` (every combination, or TPE's categorical choices); ``ranges``:
    ``{key: Range}`` (TPE only)."""

    grid: dict[str, list] = field(default_factory=dict)
    ranges: dict[str, Range] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.grid and not self.ranges:
            raise L2SPError("empty search space; give e.g. --grid reg.alpha=0.01,0.1,1 or --range reg.alpha=1e-4:1 log")
        for key, values in self.grid.items():
            if not isinstance(values, list | tuple) or not values:
                raise L2SPError(f"grid key {key} has no values; give e.g. {key}=0.01,0.1,1")
            if len(set(map(repr, values))) != len(values):
                raise L2SPError(f"grid key {key} repeats a value ({values}); list each value once")
        both = set(self.grid) & set(self.ranges)
        if both:
            raise L2SPError(f"{', '.join(sorted(both))} given both as --grid and --range; keep one")

    @property
    def keys(self) -> list[str]:
        return [*self.grid, *self.ranges]

    def size(self) -> int | None:
        """Number of grid points (None when a range makes the space continuous)."""
        return None if self.ranges else math.prod(len(v) for v in self.grid.values())

    def points(self) -> list[dict]:
        """Every combination of the grid, in the order given (first key varies slowest)."""
        if self.ranges:
            raise L2SPError("--range needs --sampler tpe: a grid cannot enumerate a continuous interval")
        return [dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values())]

    def suggest(self, trial: Any) -> dict:
        """The trial's values: ``suggest_categorical`` for grid keys, ``suggest_float``/``suggest_int`` (with
        ``log``) for ranges. Values an enqueued or retried trial already holds are returned as they are."""
        params = {k: trial.suggest_categorical(k, list(v)) for k, v in self.grid.items()}
        for k, r in self.ranges.items():
            fn = trial.suggest_int if r.integer else trial.suggest_float
            params[k] = fn(k, r.lo, r.hi, log=r.log)
        return params

    def label(self, params: dict) -> str:
        """A directory name for ``params``: ``alpha=0.1,lr=0.01`` (the last part of each key unless two keys
        share it; floats written exactly; a hash when the name would be long)."""
        last = [k.rsplit(".", 1)[-1] for k in self.keys]
        names = last if len(set(last)) == len(last) else self.keys
        text = ",".join(f"{n}={params[k]!r}".replace("'", "") for n, k in zip(names, self.keys))
        text = _UNSAFE.sub("_", text)
        if len(text) > 120:
            text = text[:100] + "-" + hashlib.sha1(text.encode()).hexdigest()[:12]
        return text

    def describe(self) -> dict:
        """A JSON-ready description (stored with the study)."""
        return {
            "grid": {k: list(v) for k, v in self.grid.items()},
            "ranges": {k: [r.lo, r.hi, "log" if r.log else "linear"] for k, r in self.ranges.items()},
        }


def parse_grid(items: list[str] | None) -> dict[str, list]:
    """``["reg.alpha=0.01,0.1,1", "optim.lr=0.01,0.02"]`` -> ``{"reg.alpha": [0.01, 0.1, 1], ...}`` (YAML
    scalars)."""
    grid: dict[str, list] = {}
    for item in items or []:
        key, sep, values = item.partition("=")
        if not sep or not values.strip() or not key.strip():
            raise L2SPError(f"--grid {item!r} should be KEY=V1,V2,... e.g. reg.alpha=0.01,0.1,1")
        try:
            grid[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]
        except yaml.YAMLError as exc:
            raise L2SPError(f"--grid {item!r}: a value is not valid YAML; quote strings") from exc
    return grid


def parse_range(item: list[str] | str) -> tuple[str, Range]:
    """``["reg.alpha=1e-4:1", "log"]`` (or ``"reg.alpha=1e-4:1:log"``) -> ``("reg.alpha", Range(1e-4, 1, True))``."""
    words = item.split() if isinstance(item, str) else list(item)
    key, sep, text = words[0].partition("=")
    parts = text.split(":")
    scale = [*parts[2:], *words[1:]]
    example = "e.g. --range reg.alpha=1e-4:1 log"
    if not sep or len(parts) < 2 or len(scale) > 1 or any(s not in ("log", "linear") for s in scale):
        raise L2SPError(
            f"--range {' '.join(words)!r} should be KEY=LO:HI [log] ({example}); put overrides before the options"
        )
    try:
        lo, hi = (_number(p) for p in parts[:2])
    except ValueError as exc:
        raise L2SPError(f"--range {' '.join(words)!r}: LO and HI must be numbers ({example})") from exc
    log = scale == ["log"]
    if not lo < hi:
        raise L2SPError(f"--range {' '.join(words)!r}: need numbers LO < HI ({example})")
    if log and lo <= 0:
        raise L2SPError(f"--range {' '.join(words)!r}: a log scale needs LO > 0 ({example})")
    return key.strip(), Range(lo, hi, log)


def _number(text: str) -> int | float:
    """``"3"`` -> 3, ``"1e-4"`` -> 0.0001 (YAML would read ``1e-4`` as a string)."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_ranges(items: list[list[str]] | list[str] | None) -> dict[str, Range]:
    return dict(parse_range(i) for i in items or [])
