"""A run directory: claiming it (a different config is refused, the same one needs ``--resume`` or
``--overwrite``), the resolved config, ``metrics.jsonl`` and ``checkpoints/last.pt``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from l2sp.engine.config import NON_SEMANTIC, differences
from l2sp.errors import L2SPError
from l2sp.io import atomic_write_text

#: what a run writes in its directory (``--overwrite`` deletes these, and only these)
WRITTEN = ("checkpoints", "tb", "metrics.jsonl", "results.json", "model.safetensors", "split.json")


class RunDirectory:
    """The folder of one run. ``read_config(path)`` resolves a saved ``config.yaml`` (the task's resolver)."""

    def __init__(self, path: str | Path, read_config: Callable[[str], Any]) -> None:
        self.path = Path(path)
        self.read_config = read_config

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    def claim(self, cfg: Any, *, resume: bool, overwrite: bool) -> dict | None:
        """Check the folder may hold this run and create it; returns the results of a finished run being
        resumed (nothing left to do), else None."""
        self._check(cfg, resume, overwrite)
        self.path.mkdir(parents=True, exist_ok=True)
        results = self.path / "results.json"
        if resume and results.is_file():
            return json.loads(results.read_text(encoding="utf-8"))
        return None

    def _check(self, cfg: Any, resume: bool, overwrite: bool) -> None:
        if not self.config.is_file():
            return
        if overwrite:
            for name in WRITTEN:
                p = self.path / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            return
        old = self.read_config(str(self.config))
        old.name, old.out = cfg.name, cfg.out
        diff = differences(old, cfg, NON_SEMANTIC)
        if diff:
            raise L2SPError(f"run directory {self.path} already holds a different config ({'; '.join(diff[:3])}); "
                            "choose another out directory (--out) or pass --overwrite")
        if not resume:
            raise L2SPError(f"run directory {self.path} already holds this run; pass --resume to continue it "
                            "or --overwrite to start again")

    def commit_config(self, text: str) -> None:
        """Write the resolved config (once the run's set-up has succeeded)."""
        atomic_write_text(self.config, text)

    def reset_metrics(self) -> int:
        """A fresh start: no metrics from an earlier attempt. Returns the first step, 0."""
        self.metrics.unlink(missing_ok=True)
        return 0

    def truncate_metrics(self, step: int) -> None:
        """Keep the lines of steps ≤ ``step`` (a resumed run logs the later ones again)."""
        if not self.metrics.is_file():
            return
        keep = [ln for ln in self.metrics.read_text(encoding="utf-8").splitlines()
                if ln and json.loads(ln).get("step", 0) <= step]
        atomic_write_text(self.metrics, "".join(ln + "\n" for ln in keep))

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
