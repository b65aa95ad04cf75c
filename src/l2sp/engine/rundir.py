"""A run directory: claiming it (a different config is refused, the same one needs ``--resume`` or
``--overwrite``), the resolved config, ``metrics.jsonl`` and ``checkpoints/last.pt``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from l2sp.engine.config import NON_SEMANTIC, differences
from l2sp.errors import L2SPError
from l2sp.io import atomic_write_text

#: the mark of a folder l2sp made for a run, written first; it lists what l2sp writes there
MANIFEST = ".l2sp-run.json"
#: what a run writes in its directory (``--overwrite`` deletes these, and only these)
WRITTEN = ("config.yaml", "split.json", "metrics.jsonl", "results.json", "model.safetensors", "checkpoints/last.pt")
TB_EVENTS = "tb/events.out.tfevents.*"  # TensorBoard's files, also l2sp's


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """The dotted path and values of the first place two JSON-like values differ, or None when equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
            if d is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{where}[{i}]"))),
                    None)
    if a == b:
        return None
    return f"{where or 'the record'}: {_short(a)} recorded, {_short(b)} now"


def _record(line: str) -> dict | None:
    """One ``metrics.jsonl`` line, or None for a blank line or one a kill cut short."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _short(v: Any) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


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

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST

    def claim(self, cfg: Any, *, resume: bool, overwrite: bool) -> dict | None:
        """Check the folder may hold this run, create it and mark it as l2sp's; returns the results of a finished
        run being resumed (nothing left to do), else None."""
        self._make_folder()
        self._check(cfg, resume, overwrite)
        if not self.manifest.is_file():
            atomic_write_text(self.manifest, json.dumps({"written_by": "l2sp", "files": [*WRITTEN, TB_EVENTS]}))
        self._remove_orphans()
        results = self.path / "results.json"
        if resume and results.is_file():
            return json.loads(results.read_text(encoding="utf-8"))
        return None

    def _make_folder(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:
            raise L2SPError(f"--out {self.path} is a file, not a folder; give a directory path") from exc
        except OSError as exc:  # PermissionError, read-only file system
            raise L2SPError(f"cannot create the run directory {self.path} ({exc.strerror}); "
                            "choose a writable --out") from exc
        if not os.access(self.path, os.W_OK):
            raise L2SPError(f"the run directory {self.path} is not writable; choose a writable --out")

    def started(self) -> bool:
        """Whether a run trained here (a checkpoint, metrics or results): a config alone is a failed start."""
        return any(p.is_file() for p in (self.checkpoint, self.metrics, self.path / "results.json"))

    def _check(self, cfg: Any, resume: bool, overwrite: bool) -> None:
        if overwrite:
            if not self.manifest.is_file() and any(self.path.iterdir()):
                raise L2SPError(f"{self.path} holds files l2sp did not write (no {MANIFEST}); --overwrite deletes "
                                "only what l2sp wrote in a folder it made: choose another --out")
            self._delete_own()
            return
        if not self.config.is_file():
            self._refuse_foreign_outputs()
            return
        old = self._saved_config()
        if not self.started():
            return  # a start that failed before training: the new config replaces it
        old.name, old.out = cfg.name, cfg.out
        diff = differences(old, cfg, NON_SEMANTIC)
        if diff:
            raise L2SPError(f"run directory {self.path} already holds a different config ({'; '.join(diff[:3])}); "
                            "choose another out directory (--out) or pass --overwrite")
        if not resume:
            raise L2SPError(f"run directory {self.path} already holds this run; pass --resume to continue it "
                            "or --overwrite to start again")

    def _saved_config(self) -> Any:
        """The saved config; one that is not an l2sp config of this task in a folder without the mark is not ours."""
        try:
            return self.read_config(str(self.config))
        except L2SPError as exc:
            if self.manifest.is_file():
                raise
            raise L2SPError(f"{self.path} holds a config.yaml l2sp did not write (no {MANIFEST}; {exc}); "
                            "choose another --out") from exc

    def _refuse_foreign_outputs(self) -> None:
        """A folder without the mark that already holds a file of a run's name is not l2sp's: a run would
        overwrite it (and ``--overwrite`` would later delete it)."""
        if self.manifest.is_file():
            return
        clash = [name for name in WRITTEN if (self.path / name).exists()]
        if clash or any(self.path.glob(TB_EVENTS)):
            raise L2SPError(f"{self.path} already holds {(clash or [TB_EVENTS])[0]}, which l2sp did not write "
                            f"there (no {MANIFEST}); choose another --out")

    def _delete_own(self) -> None:
        """Delete what a run writes (and TensorBoard's events, and orphaned temporary files), nothing else."""
        for name in WRITTEN:
            (self.path / name).unlink(missing_ok=True)
        for p in self.path.glob(TB_EVENTS):
            p.unlink()
        self._remove_orphans()
        for folder in ("checkpoints", "tb"):
            d = self.path / folder
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()

    def _remove_orphans(self) -> None:
        """Temporary files of atomic writes interrupted by a kill (``.NAME.*.tmp``, never renamed)."""
        for name in WRITTEN:
            target = self.path / name
            if target.parent.is_dir():
                for tmp in target.parent.glob(f".{target.name}.*.tmp"):
                    tmp.unlink(missing_ok=True)

    def check_split(self, split: Any) -> None:
        """On resume: the rebuilt data split must equal the recorded ``split.json`` (files, labels, indices)."""
        path = self.path / "split.json"
        if not path.is_file():
            return
        recorded = json.loads(path.read_text(encoding="utf-8"))
        diff = first_difference(recorded, json.loads(json.dumps(split)))
        if diff is not None:
            raise L2SPError(f"the data split differs from the one this run trained on ({diff}); resume with the "
                            "same data (data.root, the same files), or start again with --overwrite")

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
                if (record := _record(ln)) is not None and record.get("step", 0) <= step]
        atomic_write_text(self.metrics, "".join(ln + "\n" for ln in keep))

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
