"""``finetune(config)``: one classification run in a run directory; ``load_run(dir)`` rebuilds a finished one.

``finetune`` is a composition of named steps: resolve the config -> claim the run directory -> set up the task
(:mod:`l2sp.engine.classification`) -> :meth:`l2sp.engine.runner.Runner.fit` (the runner shared by every task).
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from l2sp.engine.checkpoint import final_weights
from l2sp.engine.classification import Setup, build_task, classification_task, setup
from l2sp.engine.config import expand_path, resolve, to_yaml
from l2sp.engine.rundir import RunDirectory
from l2sp.engine.runner import Task, build_optimizer, configure, pick_device, run_task, seed_everything
from l2sp.errors import L2SPError

__all__ = ["RunArtifacts", "Setup", "build_optimizer", "build_task", "finetune", "load_run", "pick_device",
           "seed_everything", "setup"]


USER_MODEL = "module:"  # model.arch of a run given model= (the class name follows)


def finetune(
    config: Any = None,
    overrides: list[str] | dict | None = None,
    *,
    task: Any = None,
    model: nn.Module | None = None,
    loss: Any = None,
    source: Any = None,
    hooks: Any = (),
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool | None = None,
    out: str | None = None,
    stop_after: int | None = None,
) -> dict:
    """Fine-tune from ``config`` (preset name, YAML path, dict or Config) with dotted ``overrides``.

    ``task``: the data of the run (an object with ``train``, ``val``, ``test`` datasets of (input, label) items,
    ``num_classes``, optionally ``in_channels`` and ``split``; see :mod:`l2sp.engine.classification`) instead of
    building ``config.data``. ``model``: your own ``nn.Module`` instead of ``config.model`` (already sized for
    the target; w0 = ``source``, a state dict, module or checkpoint file, else its weights as given).
    ``loss(output, labels) -> scalar``: instead of cross-entropy. ``hooks``: :class:`l2sp.engine.trainer.Hook`
    callbacks of the training loop (``before_train``, ``after_step``, ``after_train``). ``resume``: continue
    the run in the run directory from its last checkpoint. ``stop_after``: stop after that many steps of this
    call, with a checkpoint (as if killed). Returns the results dict (also ``results.json``).

    Under ``torchrun --nproc_per_node=N`` the run is data-parallel (:mod:`l2sp.engine.distributed`):
    ``optim.batch_size`` is the global batch, rank 0 writes the run directory, every rank returns the results.
    """
    cfg = configure(config, overrides, quiet=quiet, out=out)
    if model is not None:  # the saved config says the network was the caller's, not model.*
        cfg.model.arch, cfg.model.weights = f"{USER_MODEL}{type(model).__qualname__}", None

    def build() -> tuple[Task, torch.device]:
        s = setup(cfg, task, model=model, source=source)
        return classification_task(s, loss, hooks), s.device

    return run_task(cfg, RunDirectory(cfg.run_dir(), resolve), build, resume=resume, overwrite=overwrite,
                    stop_after=stop_after, config_text=to_yaml(cfg))


class RunArtifacts:
    """A finished run rebuilt for analyses: ``.model`` (fine-tuned, eval mode), ``.source_model`` (the
    pre-trained network with its original head, or None), ``.head_name``, ``.config``, ``.task``,
    ``.source_task`` (None unless ``data.source_task`` is set), ``.regularizer_kind``, ``.results``."""

    def __init__(self, run_dir: str | Path, task: Any = None, device: str | torch.device = "cpu") -> None:
        self.run_dir = Path(run_dir)
        if not (self.run_dir / "config.yaml").is_file():
            raise L2SPError(f"{self.run_dir} is not a run directory (no config.yaml); give the out= of a run")
        self.config = resolve(str(self.run_dir / "config.yaml"))
        self.device = torch.device(device)
        self._task = task
        res = self.run_dir / "results.json"
        self.results = json.loads(res.read_text(encoding="utf-8")) if res.is_file() else None
        self.regularizer_kind = self.config.reg.kind

    @cached_property
    def task(self) -> Any:
        return self._task if self._task is not None else build_task(self.config.data)

    @cached_property
    def source_task(self) -> Any:
        return build_task(self.config.data, source=True) if self.config.data.source_task else None

    @cached_property
    def _built(self) -> Any:
        from l2sp.models import from_config

        if self.config.model.arch.startswith(USER_MODEL):
            raise L2SPError(f"{self.run_dir} trained your own network ({self.config.model.arch}); build it and "
                            "load model.safetensors into it (l2sp.io.load_tensors)")
        torch.manual_seed(self.config.train.seed)
        return from_config(self.config.model, self.task.num_classes, getattr(self.task, "in_channels", 3))

    @property
    def head_name(self) -> str:
        return self._built.head_name

    @cached_property
    def model(self) -> nn.Module:
        state = final_weights(self.run_dir, "re-run it with train.save_model=true")
        import copy

        model = copy.deepcopy(self._built.model)
        model.load_state_dict(state)
        return model.to(self.device).eval()

    @cached_property
    def source_model(self) -> nn.Module | None:
        from l2sp.models import pretrained

        m = self.config.model
        if m.weights is None:
            return None
        model = pretrained(
            m.arch,
            expand_path(m.weights),
            self.task.num_classes,
            getattr(self.task, "in_channels", 3),
            m.options,
        )
        return model.to(self.device).eval()


def load_run(run_dir: str | Path, task: Any = None, device: str | torch.device = "cpu") -> RunArtifacts:
    """Rebuild a run from its directory (lazily: the task and models are built on first access)."""
    return RunArtifacts(run_dir, task, device)
