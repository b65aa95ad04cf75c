"""One runner for every task: the run directory, optimizer + penalty + schedule, resume, the training loop (NaN
guard, logging, evaluation schedule, checkpoints), the final checkpoint, weights and results.

A task (:class:`Task`: classification in :mod:`l2sp.engine.classification`, segmentation in
:mod:`l2sp.segmentation.run`) supplies what is specific to it: the model, the training data, the loss, the metrics
and the words of its announcement. :meth:`Runner.fit` is the same sequence of named steps for all of them:

    write config -> announce -> optimizer (+ attach Ω) -> scheduler -> trainer -> restore? -> loop -> final
    checkpoint -> evaluate -> model.safetensors, results.json, metrics.jsonl

Run directory: ``config.yaml`` (resolved, written once set-up has succeeded), ``split.json`` (when the task has
a split), ``metrics.jsonl``, TensorBoard events (``tb/``), ``checkpoints/last.pt`` (training state, atomic),
``model.safetensors`` (final weights), ``results.json``.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from l2sp.engine import distributed
from l2sp.engine.checkpoint import load as load_checkpoint
from l2sp.engine.checkpoint import rng_state, set_rng_state
from l2sp.engine.checkpoint import save as save_checkpoint
from l2sp.engine.config import resolve
from l2sp.engine.rundir import RunDirectory
from l2sp.engine.schedule import Schedule, make_scheduler
from l2sp.engine.trainer import Hook, LoopState, Trainer, batch_seed, cross_entropy, train_loader
from l2sp.errors import L2SPError
from l2sp.io import atomic_write_json, save_tensors


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's (legacy global) and torch's RNGs with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global RNG user code draws from)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an unavailable CUDA device is a one-line error. Under DDP,
    ``cuda`` is the GPU of the process's local rank."""
    if name == "auto":
        return distributed.device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise L2SPError(f"train.device={name} is not a device; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise L2SPError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
    return distributed.device(dev)


def configure(config: Any, overrides: list[str] | dict | None, *, quiet: bool | None, out: str | None,
              resolver: Any = resolve) -> Any:
    """The resolved config with the call's ``quiet`` and ``out`` applied."""
    cfg = resolver(config, overrides)
    if quiet is not None:
        cfg.train.quiet = quiet
    if out is not None:
        cfg.out = str(out)
    return cfg


def loader_options(dataset: Dataset, num_workers: int, device: torch.device) -> dict:
    """DataLoader workers and pinning: none for a dataset already on the device (``dataset.on_device``)."""
    if getattr(dataset, "on_device", False):
        return {"num_workers": 0, "pin_memory": False}
    return {"num_workers": num_workers, "pin_memory": device.type == "cuda"}


def build_optimizer(model: nn.Module, cfg: Any, penalized: set[str]) -> torch.optim.Optimizer:
    """``optim.name`` (SGD with momentum, or AdamW) over the trainable parameters, in two groups: those Ω
    penalizes get weight_decay = 0 (Ω replaces the optimizer's decay, never adds to it), the others
    ``optim.weight_decay``."""
    from l2sp.reference import strip_prefix

    pen, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (pen if strip_prefix(name) in penalized else rest).append(p)
    o = cfg.optim
    groups = [g for g in ({"params": pen, "weight_decay": 0.0}, {"params": rest, "weight_decay": o.weight_decay})
              if g["params"]]
    if not groups:
        raise L2SPError("no trainable parameter left (train.freeze covers the whole network); lower train.freeze")
    if getattr(o, "name", "sgd") == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=True)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, foreach=True)


@dataclass
class Task:
    """What a task supplies to the :class:`Runner` (built after seeding, on the run's device).

    ``model``: the network trained and checkpointed; ``train``: a dataset of (input, target) items (or with
    ``get_batch(indices) -> (inputs, targets)``); ``loss(output, target) -> scalar``; ``forward``: what maps
    the inputs to ``output`` (default ``model``); ``regularizer``: Ω or None; ``validate() -> {name: value}``:
    metrics during training (``train.eval_every``); ``evaluate() -> dict``: the final metrics, merged into
    ``results.json``; ``describe``: entries of ``results.json`` known before training; ``announce``: the line
    printed at the start; ``split``: written to ``split.json``; ``final_record(results)``: the last line of
    ``metrics.jsonl``; ``model_metadata``: stored in ``model.safetensors``; ``checkpoint_regularizer``: keep Ω's
    buffers in the checkpoint (False where w0 is rebuilt from its source on resume); ``hooks``: the user's
    :class:`~l2sp.engine.trainer.Hook` callbacks; ``ddp_find_unused``: some trainable parameters get no gradient
    in a step (DDP's ``find_unused_parameters``).
    """

    model: nn.Module
    train: Dataset
    loss: Callable[[Any, torch.Tensor], torch.Tensor] = cross_entropy
    forward: nn.Module | None = None
    regularizer: Any = None
    validate: Callable[[], dict] | None = None
    evaluate: Callable[[], dict] = dict
    describe: dict = field(default_factory=dict)
    announce: str = ""
    split: dict | None = None
    final_record: Callable[[dict], dict] = lambda results: {}
    model_metadata: dict = field(default_factory=dict)
    checkpoint_regularizer: bool = True
    hooks: Sequence[Hook] = ()
    ddp_find_unused: bool = False


class Runner:
    """Fits one :class:`Task` under a run config (``optim``, ``reg.mode``, ``train``, ``data.num_workers``) in
    one :class:`~l2sp.engine.rundir.RunDirectory`: :meth:`fit` is the whole run, each step a method."""

    def __init__(self, cfg: Any, run: RunDirectory, task: Task, device: torch.device) -> None:
        self.cfg, self.run, self.task, self.device = cfg, run, task, device
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.trainer: Trainer | None = None

    def fit(self, *, resume: bool = False, stop_after: int | None = None, config_text: str = "") -> dict:
        """The run: returns ``results.json``'s dict, or ``{"interrupted": True, ...}`` after ``stop_after``.
        Under DDP every rank trains; rank 0 alone writes the run directory and evaluates."""
        cfg = self.cfg
        resuming = distributed.on_main(lambda: self.prepare(resume, config_text))
        handle = self.build_optimizer()
        self.trainer = self.build_trainer()
        distributed.seed_rank(batch_seed(cfg.train.seed, -(2**41)))
        start = self.restore() if resuming else 0
        loop = self.train(start, stop_after)
        if loop.step < cfg.optim.steps:  # interrupted on purpose (stop_after)
            return {"interrupted": True, "step": loop.step, "run_dir": str(self.run.path)}
        self.final_checkpoint()
        if handle is not None:
            handle.remove()
        return distributed.on_main(lambda: self.finish(loop))

    @property
    def main(self) -> bool:
        """Whether this process writes the run directory (rank 0; always in one process)."""
        return distributed.current().main

    def prepare(self, resume: bool, config_text: str) -> bool:
        """Write the config (and ``split.json``), announce, and say whether a checkpoint is resumed (rank 0)."""
        task = self.task
        self.run.commit_config(config_text)
        if not self.cfg.train.quiet:
            print(f"{task.announce} -> {self.run.path}", flush=True)
        resuming = resume and self.run.checkpoint.is_file()
        if resume and not resuming:
            print(f"l2sp: notice: {self.run.path} has no checkpoint to resume from; starting at step 0",
                  file=sys.stderr, flush=True)
        if task.split is not None:
            if resuming:
                self.run.check_split(task.split)
            atomic_write_json(self.run.path / "split.json", task.split)
        if not resuming:
            self.run.reset_metrics()
        return resuming

    def build_optimizer(self) -> Any:
        """Optimizer (penalized parameters at weight decay 0), Ω attached (``reg.mode``), LR scheduler."""
        reg, o = self.task.regularizer, self.cfg.optim
        self.optimizer = build_optimizer(self.task.model, self.cfg, reg.penalized_names() if reg else set())
        handle = reg.attach(self.optimizer, mode=self.cfg.reg.mode) if reg is not None else None
        self.scheduler = make_scheduler(self.optimizer,
                                        Schedule(o.schedule, o.steps, list(o.milestones), o.gamma, o.power))
        return handle

    def build_trainer(self) -> Trainer:
        """The loop; under DDP the forward is wrapped in DistributedDataParallel (after Ω was built on the bare
        model) and ranks other than 0 neither log, validate nor print."""
        t, task, main = self.cfg.train, self.task, self.main
        forward = distributed.wrap(task.forward or task.model, task.model, self.device,
                                   find_unused=task.ddp_find_unused)
        if t.compile and self.device.type == "cuda":
            forward = torch.compile(forward)
        return Trainer(task.model, self.optimizer, self.scheduler, device=self.device, amp=t.amp,
                       channels_last=t.channels_last, forward=forward, regularizer=task.regularizer,
                       log_every=t.log_every, ckpt_every=t.ckpt_every if t.save_checkpoint else 0,
                       eval_every=getattr(t, "eval_every", 0), metrics_path=self.run.metrics if main else None,
                       quiet=t.quiet or not main, save_checkpoint=self.save, validate=self.validator(),
                       loss_fn=task.loss, hooks=task.hooks)

    def validator(self) -> Callable[[], dict] | None:
        """The task's validation on rank 0; on the other ranks a no-op called at the same steps (the log lines of
        every rank, and the all-reduce of their losses, fall on the same steps)."""
        validate = self.task.validate
        if validate is None or self.main:
            return validate
        return dict

    def save(self, step: int) -> None:
        """The training state at ``step`` (model, optimizer, schedule, AMP scaler, Ω, RNG states), atomically;
        rank 0 writes it (the ranks hold the same state; under DDP each rank's RNG states go in ``rng_ranks``)."""
        if not self.cfg.train.save_checkpoint:
            return
        rngs = distributed.gather(rng_state()) if distributed.current().distributed else None
        if not self.main:
            return
        reg, scaler = self.task.regularizer, self.trainer.scaler
        extra = ({"regularizer": reg.state_dict() if reg is not None else {}}
                 if self.task.checkpoint_regularizer else {})
        if rngs is not None:
            extra["rng_ranks"] = rngs
        save_checkpoint(self.run.checkpoint, step=step, model=self.task.model.state_dict(),
                        optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                        scaler=scaler.state_dict() if scaler is not None else {}, **extra)

    def restore(self) -> int:
        """Load the last checkpoint into the run (RNG states last); returns its step. Every rank reads the file
        rank 0 wrote (several machines: the run directory on a shared filesystem)."""
        path, reg, scaler = self.run.checkpoint, self.task.regularizer, self.trainer.scaler
        state = load_checkpoint(path, map_location="cpu")  # load_state_dict moves each tensor to its place
        try:
            self.task.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if reg is not None and state.get("regularizer"):
                reg.load_state_dict(state["regularizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise L2SPError(f"checkpoint {path} does not match this run's model ({str(exc).splitlines()[0]}); "
                            "start the run again with --overwrite") from exc
        ranks, r = state.get("rng_ranks"), distributed.current()
        set_rng_state(ranks[r.rank] if ranks is not None and len(ranks) == r.world else state["rng"])
        start = int(state["step"])
        if self.main:
            self.run.truncate_metrics(start)
        return start

    def train(self, start: int, stop_after: int | None) -> LoopState:
        """The loop over the seeded, resumable batch stream of steps ``start .. optim.steps-1``."""
        cfg, trainer = self.cfg, self.trainer
        r = distributed.current()
        if cfg.train.tensorboard and r.main:
            from torch.utils.tensorboard import SummaryWriter

            trainer.writer = SummaryWriter(str(self.run.path / "tb"), purge_step=start or None)
        ds = self.task.train
        distributed.local_batch(cfg.optim.batch_size)
        loader = train_loader(ds, cfg.optim.batch_size, cfg.train.seed, start, cfg.optim.steps,
                              shard=(r.rank, r.world), **loader_options(ds, cfg.data.num_workers, self.device))
        try:
            return trainer.run(loader, start, cfg.optim.steps, stop_after=stop_after)
        finally:
            if trainer.writer is not None:
                trainer.writer.close()

    def final_checkpoint(self) -> None:
        """The state at the last step, unless the periodic checkpoint already wrote it (every rank takes part)."""
        t, steps = self.cfg.train, self.cfg.optim.steps
        written = distributed.agree(self.main and self.run.checkpoint.is_file())
        if t.save_checkpoint and (not written or t.ckpt_every == 0 or steps % t.ckpt_every):
            self.save(steps)

    def finish(self, loop: LoopState) -> dict:
        """Evaluate, then write ``model.safetensors``, ``results.json`` and the last line of ``metrics.jsonl``
        (rank 0 alone under DDP; the other ranks receive the results)."""
        cfg = self.cfg
        results = {"name": cfg.name, "seed": cfg.train.seed, "steps": cfg.optim.steps, "run_dir": str(self.run.path),
                   **self.task.describe, "train_time_s": loop.train_time, "final_loss": loop.last_loss,
                   "images_per_s": loop.steps_this_call * cfg.optim.batch_size / max(loop.train_time, 1e-9)}
        results.update(self.task.evaluate())
        if cfg.train.save_model:
            save_tensors(self.run.path / "model.safetensors", self.task.model.state_dict(), self.task.model_metadata)
        atomic_write_json(self.run.path / "results.json", results)
        self.run.append_metrics({"step": cfg.optim.steps, **self.task.final_record(results)})
        return results


def run_task(cfg: Any, run: RunDirectory, build: Callable[[], tuple[Task, torch.device]], *, resume: bool,
             overwrite: bool, stop_after: int | None, config_text: str) -> dict:
    """Claim the run directory, build the task (``build() -> (task, device)``) and fit it: the steps every
    ``finetune_X`` shares. Under torchrun, inside the job's process group: rank 0 claims the directory (its
    error or a finished run's results reach every rank), every rank builds the same task and trains."""
    with distributed.process_group(cfg.train.device):
        distributed.local_batch(cfg.optim.batch_size)
        finished = distributed.on_main(lambda: run.claim(cfg, resume=resume, overwrite=overwrite))
        if finished is not None:
            return finished
        task, device = build()
        return Runner(cfg, run, task, device).fit(resume=resume, stop_after=stop_after, config_text=config_text)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """An unshuffled DataLoader for evaluation."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False,
                      **loader_options(dataset, num_workers, device))


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
