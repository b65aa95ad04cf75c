"""``finetune(config)``: one run of the paper's protocol, in a run directory; ``load_run(dir)`` rebuilds it.

Run directory: ``config.yaml`` (resolved), ``split.json`` (the data split), ``metrics.jsonl``, TensorBoard
events (``tb/``), ``checkpoints/last.pt`` (full training state, atomic), ``model.safetensors`` (final
weights), ``results.json``.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from l2sp.engine import checkpoint
from l2sp.engine.config import Config, differences, expand_path, resolve, to_yaml
from l2sp.engine.evaluate import evaluate
from l2sp.engine.schedule import Schedule, make_scheduler
from l2sp.engine.trainer import Trainer, train_loader
from l2sp.errors import L2SPError
from l2sp.io import atomic_write_json, atomic_write_text, save_tensors


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global RNG user code draws from)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise L2SPError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
    return dev


def build_task(data: Any, *, source: bool = False) -> Any:
    """The target task (or, with ``source=True``, ``data.source_task``) of a DataConfig. The name
    "synthetic" builds :func:`l2sp.engine.synthetic.synthetic_task` (``data.options`` as its arguments;
    smoke tests without a dataset)."""
    from l2sp.data import build_task as _build

    name = data.source_task if source else data.task
    if name == "synthetic":
        from l2sp.engine.synthetic import synthetic_task

        opts = dict(data.options)
        if "shape" in opts:
            opts["shape"] = tuple(opts["shape"])
        try:
            return synthetic_task(seed=data.split_seed, ten_crop=data.ten_crop, **opts)
        except TypeError as exc:
            raise L2SPError(
                f"data.options for the synthetic task: {exc}; valid: num_classes, n_train, n_val, "
                "n_test, shape, noise"
            ) from exc
    root = expand_path(data.root)
    if source:
        return _build(name, root=expand_path(data.source_root) or root, seed=data.split_seed,
                      normalization=data.normalization, image_size=data.image_size, resize=data.resize,
                      **data.source_options)
    return _build(
        name,
        root=root,
        n_per_class=data.n_per_class,
        val_per_class=data.val_per_class,
        seed=data.split_seed,
        image_size=data.image_size,
        resize=data.resize,
        keep_aspect=data.keep_aspect,
        ten_crop=data.ten_crop,
        normalization=data.normalization,
        blur=data.blur,
        **data.options,
    )


def build_optimizer(model: nn.Module, cfg: Config, penalized: set[str]) -> torch.optim.SGD:
    """SGD over the trainable parameters; those the regularizer penalizes get weight_decay = 0 (Ω replaces
    the optimizer's decay, never adds to it), the others ``optim.weight_decay``."""
    from l2sp.reference import strip_prefix

    pen, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (pen if strip_prefix(name) in penalized else rest).append(p)
    o = cfg.optim
    groups = [
        g
        for g in ({"params": pen, "weight_decay": 0.0}, {"params": rest, "weight_decay": o.weight_decay})
        if g["params"]
    ]
    if not groups:
        raise L2SPError(
            "no trainable parameter left (train.freeze covers the whole network); lower train.freeze"
        )
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, foreach=True)


def _check_run_dir(run_dir: Path, cfg: Config, resume: bool, overwrite: bool) -> None:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    if overwrite:
        for name in ("checkpoints", "tb", "metrics.jsonl", "results.json", "model.safetensors", "split.json"):
            p = run_dir / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return
    old = resolve(str(saved))
    old.name, old.out = cfg.name, cfg.out
    diff = differences(old, cfg)
    if diff:
        raise L2SPError(
            f"run directory {run_dir} already holds a different config ({'; '.join(diff[:3])}); "
            "choose another out= directory or pass --overwrite"
        )
    if not resume:
        raise L2SPError(
            f"run directory {run_dir} already holds this run; pass --resume to continue it "
            "or --overwrite to start again"
        )


@dataclass
class Setup:
    """Everything a run is made of (built identically for a fresh start, a resume and ``load_run``)."""

    cfg: Config
    device: torch.device
    task: Any
    model: nn.Module
    source_state: dict | None
    head_name: str
    source_head: nn.Module | None
    regularizer: Any
    frozen: list = field(default_factory=list)


def setup(cfg: Config, task: Any = None, device: torch.device | None = None) -> Setup:
    """Seed, build the task and model (w0 snapshot, head surgery), freeze, BN mode, regularizer."""
    from l2sp.freeze import freeze_bn_stats, freeze_first
    from l2sp.models import from_config
    from l2sp.penalties import regularizer

    device = device or pick_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    task = task if task is not None else build_task(cfg.data)
    built = from_config(cfg.model, task.num_classes, getattr(task, "in_channels", 3))
    model = built.model
    frozen = freeze_first(model, cfg.train.freeze)
    if cfg.train.bn == "frozen":
        freeze_bn_stats(model)
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    reg = None
    r = cfg.reg
    if r.kind != "none":
        if built.source_state is None and r.kind != "l2":
            raise L2SPError(
                f"reg.kind={r.kind} needs pre-trained weights but model.weights is empty; "
                "set model.weights or use reg.kind=l2 / none"
            )
        fisher = expand_path(r.fisher)
        if fisher is not None and not Path(fisher).is_file():
            raise L2SPError(f"reg.fisher file {fisher} does not exist; create it with `l2sp fisher` first")
        reg = regularizer(
            r.kind, model, built.penalty_source, alpha=r.alpha, beta=r.beta, fisher=fisher, include=r.include
        )
        reg.to(device)
    return Setup(
        cfg, device, task, model, built.source_state, built.head_name, built.source_head, reg, frozen
    )


def _loader(ds: Any, cfg: Config, device: torch.device) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=cfg.eval.batch_size,
        shuffle=False,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
    )


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = [
        ln
        for ln in path.read_text(encoding="utf-8").splitlines()
        if ln and json.loads(ln).get("step", 0) <= step
    ]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def finetune(
    config: Any = None,
    overrides: list[str] | dict | None = None,
    *,
    task: Any = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool | None = None,
    out: str | None = None,
    stop_after: int | None = None,
) -> dict:
    """Fine-tune from ``config`` (preset name, YAML path, dict or Config) with dotted ``overrides``.

    ``task``: a TaskData to use instead of building ``config.data`` (tests, custom data). ``resume``:
    continue the run in the run directory from its last checkpoint. ``stop_after``: stop after that many
    steps of this call, with a checkpoint (as if killed). Returns the results dict (also ``results.json``).
    """
    cfg = resolve(config, overrides)
    if quiet is not None:
        cfg.train.quiet = quiet
    if out is not None:
        cfg.out = str(out)
    run_dir = cfg.run_dir()
    _check_run_dir(run_dir, cfg, resume, overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and (run_dir / "results.json").is_file():
        return json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))

    s = setup(cfg, task)
    model, device, t = s.model, s.device, cfg.train
    if not t.quiet:
        r = cfg.reg
        pen = (
            "no penalty"
            if s.regularizer is None
            else (
                f"{r.kind} (alpha={r.alpha:g}, beta={r.beta:g}; {len(s.regularizer.shared)} tensors in S, "
                f"{len(s.regularizer.novel)} in S-bar)"
            )
        )
        frozen = f", frozen: {', '.join(s.frozen)}" if s.frozen else ""
        print(
            f"{cfg.name}: {cfg.model.arch} on {cfg.data.task} ({len(s.task.train)} training images), {pen}, "
            f"{cfg.optim.steps} steps on {device}{frozen} -> {run_dir}",
            flush=True,
        )
    if s.task.split is not None:
        atomic_write_json(run_dir / "split.json", s.task.split)
    optimizer = build_optimizer(model, cfg, s.regularizer.penalized_names() if s.regularizer else set())
    handle = s.regularizer.attach(optimizer, mode=cfg.reg.mode) if s.regularizer is not None else None
    o = cfg.optim
    scheduler = make_scheduler(optimizer, Schedule(o.schedule, o.steps, list(o.milestones), o.gamma, o.power))
    forward = model
    if t.compile and device.type == "cuda":
        forward = torch.compile(model)

    ckpt_path = run_dir / "checkpoints" / "last.pt"
    metrics = run_dir / "metrics.jsonl"
    trainer: Trainer

    def save_ckpt(step: int) -> None:
        if not t.save_checkpoint:
            return
        checkpoint.save(
            ckpt_path,
            step=step,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=trainer.scaler.state_dict() if trainer.scaler is not None else {},
            regularizer=s.regularizer.state_dict() if s.regularizer is not None else {},
        )

    start = 0
    if resume and ckpt_path.is_file():
        state = checkpoint.load(ckpt_path, map_location=device)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if s.regularizer is not None and state.get("regularizer"):
                s.regularizer.load_state_dict(state["regularizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise L2SPError(
                f"checkpoint {ckpt_path} does not match this run's model ({exc}); "
                "start the run again with --overwrite"
            ) from exc
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["step"])
        checkpoint.set_rng_state(state["rng"])
        _truncate_metrics(metrics, start)
    elif metrics.exists():
        metrics.unlink()

    writer = None
    if t.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"), purge_step=start if start else None)
    val_loader = _loader(s.task.val, cfg, device) if len(s.task.val) else None
    validate = (
        (
            lambda: evaluate(
                model, val_loader, device, s.task.num_classes, amp=t.amp, channels_last=t.channels_last
            )
        )
        if val_loader is not None
        else None
    )
    trainer = Trainer(
        model,
        optimizer,
        scheduler,
        device=device,
        amp=t.amp,
        channels_last=t.channels_last,
        forward=forward,
        regularizer=s.regularizer,
        log_every=t.log_every,
        ckpt_every=t.ckpt_every if t.save_checkpoint else 0,
        eval_every=t.eval_every,
        metrics_path=metrics,
        writer=writer,
        quiet=t.quiet,
        save_checkpoint=save_ckpt,
        validate=validate,
    )
    if trainer.scaler is not None and resume and ckpt_path.is_file() and state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    loader = train_loader(
        s.task.train,
        o.batch_size,
        t.seed,
        start,
        o.steps,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
    )
    try:
        loop = trainer.run(loader, start, o.steps, stop_after=stop_after)
    finally:
        if writer is not None:
            writer.close()
    if loop.step < o.steps:  # interrupted on purpose (stop_after)
        return {"interrupted": True, "step": loop.step, "run_dir": str(run_dir)}
    if t.save_checkpoint and (not ckpt_path.is_file() or t.ckpt_every == 0 or o.steps % t.ckpt_every):
        save_ckpt(o.steps)
    if handle is not None:
        handle.remove()

    results: dict[str, Any] = {
        "name": cfg.name,
        "seed": t.seed,
        "steps": o.steps,
        "run_dir": str(run_dir),
        "regularizer": cfg.reg.kind,
        "head": s.head_name,
        "frozen": s.frozen,
        "train_time_s": loop.train_time,
        "final_loss": loop.last_loss,
        "images_per_s": loop.steps_this_call * o.batch_size / max(loop.train_time, 1e-9),
    }
    for split in cfg.eval.splits:
        ds = getattr(s.task, split)
        if len(ds) == 0:
            results[split] = None
            continue
        r = evaluate(
            model,
            _loader(ds, cfg, device),
            device,
            s.task.num_classes,
            amp=t.amp,
            channels_last=t.channels_last,
        )
        results[split] = r
        results[f"{split}_acc"] = r["top1"]
        results[f"{split}_mean_per_class"] = r["mean_per_class"]
    if t.save_model:
        save_tensors(run_dir / "model.safetensors", model.state_dict(), {"head": s.head_name})
    atomic_write_json(run_dir / "results.json", results)
    with open(metrics, "a", encoding="utf-8") as f:
        f.write(
            json.dumps({"step": o.steps, **{k: v for k, v in results.items() if k.endswith("_acc")}}) + "\n"
        )
    return results


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

        torch.manual_seed(self.config.train.seed)
        return from_config(self.config.model, self.task.num_classes, getattr(self.task, "in_channels", 3))

    @property
    def head_name(self) -> str:
        return self._built.head_name

    @cached_property
    def model(self) -> nn.Module:
        from l2sp.io import load_tensors

        path = self.run_dir / "model.safetensors"
        if path.is_file():
            state = load_tensors(path)[0]
        else:
            ckpt = self.run_dir / "checkpoints" / "last.pt"
            if not ckpt.is_file():
                raise L2SPError(
                    f"{self.run_dir} holds no weights (model.safetensors or checkpoints/last.pt); "
                    "re-run it with train.save_model=true"
                )
            state = checkpoint.load(ckpt)["model"]
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
