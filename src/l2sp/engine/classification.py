"""The classification task of the runner: the data (``data.*`` or the user's), the network with its w0 and new
head (``model.*`` or the user's module), freezing, BatchNorm mode, Ω, and top-1 / per-class accuracy.

``task=``, the data of a run supplied by the user: any object with ``train``, ``val`` and ``test`` datasets of
``(input, label)`` items (``val``/``test`` may be empty; a dataset may also offer ``get_batch(indices) ->
(inputs, labels)``, and ``on_device = True`` when it already lives on the run's device), ``num_classes``, and
optionally ``in_channels`` (default 3) and ``split`` (a JSON-able dict written to ``split.json``, or None), for
example :class:`l2sp.data.TaskData`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from l2sp.engine.config import Config, expand_path
from l2sp.engine.evaluate import evaluate
from l2sp.engine.runner import Task, eval_loader, pick_device, seed_everything
from l2sp.engine.trainer import cross_entropy
from l2sp.errors import L2SPError


def build_task(data: Any, *, source: bool = False, device: torch.device | None = None) -> Any:
    """The target task (or, with ``source=True``, ``data.source_task``) of a DataConfig. The name
    "synthetic" builds :func:`l2sp.engine.synthetic.synthetic_task` (``data.options`` as its arguments;
    smoke tests without a dataset). ``device``: decode once and keep the images there (on-device data)."""
    from l2sp.data import build_task as _build

    name = data.source_task if source else data.task
    if name == "synthetic":
        return _synthetic(data)
    root = expand_path(data.root)
    on = {"device": device} if device is not None else {}
    if source:
        return _build(name, root=expand_path(data.source_root) or root, seed=data.split_seed,
                      normalization=data.normalization, image_size=data.image_size, resize=data.resize,
                      **on, **data.source_options)
    return _build(name, root=root, n_per_class=data.n_per_class, val_per_class=data.val_per_class,
                  seed=data.split_seed, image_size=data.image_size, resize=data.resize, keep_aspect=data.keep_aspect,
                  ten_crop=data.ten_crop, normalization=data.normalization, blur=data.blur, **on, **data.options)


def _synthetic(data: Any) -> Any:
    from l2sp.engine.synthetic import synthetic_task

    opts = dict(data.options)
    if "shape" in opts:
        opts["shape"] = tuple(opts["shape"])
    try:
        return synthetic_task(seed=data.split_seed, ten_crop=data.ten_crop, **opts)
    except TypeError as exc:
        raise L2SPError(f"data.options for the synthetic task: {exc}; valid: num_classes, n_train, n_val, "
                        "n_test, shape, noise") from exc


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


def _user_model(model: nn.Module, source: Any) -> Any:
    """A user's network as a BuiltModel: w0 = ``source`` (state dict, module or file), else the weights the
    module holds now (every parameter then in S)."""
    from l2sp.models.factory import BuiltModel
    from l2sp.models.heads import find_head
    from l2sp.reference import snapshot

    if not isinstance(model, nn.Module):
        raise L2SPError(f"model= must be a torch.nn.Module, got {type(model).__name__}")
    try:
        head = find_head(model)
    except (L2SPError, ValueError, AttributeError):
        head = ""
    return BuiltModel(model, snapshot(model) if source is None else source, head, None)


def _check_weights(weights: str | None) -> None:
    path = expand_path(weights)
    if path is not None and Path(path).is_dir():
        raise L2SPError(f"model.weights={path} is a directory; give a checkpoint file (.pt, .pth, .safetensors) "
                        "or a torchvision weights name (DEFAULT, IMAGENET1K_V1)")


def _build_regularizer(cfg: Config, model: nn.Module, built: Any, device: torch.device) -> Any:
    from l2sp.penalties import regularizer

    r = cfg.reg
    if r.kind == "none":
        return None
    if built.source_state is None and r.kind != "l2":
        raise L2SPError(f"reg.kind={r.kind} needs pre-trained weights but model.weights is empty; "
                        "set model.weights or use reg.kind=l2 / none")
    fisher = expand_path(r.fisher)
    if fisher is not None and not Path(fisher).is_file():
        raise L2SPError(f"reg.fisher file {fisher} does not exist; create it with `l2sp fisher` first")
    reg = regularizer(r.kind, model, built.penalty_source, alpha=r.alpha, beta=r.beta, fisher=fisher,
                      include=r.include)
    return reg.to(device)


def setup(cfg: Config, task: Any = None, device: torch.device | None = None, *, model: nn.Module | None = None,
          source: Any = None) -> Setup:
    """Seed, build the task and model (w0 snapshot, head surgery), freeze, BN mode, regularizer.

    ``model``: the user's network instead of ``model.*`` (w0: ``source``, else its weights as given)."""
    from l2sp.freeze import freeze_bn_stats, freeze_first
    from l2sp.models import from_config

    device = device or pick_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    if task is None:
        task = build_task(cfg.data, device=device if cfg.data.on_device else None)
    if model is not None:
        built = _user_model(model, source)
    else:
        _check_weights(cfg.model.weights)
        built = from_config(cfg.model, task.num_classes, getattr(task, "in_channels", 3))
    net = built.model
    frozen = freeze_first(net, cfg.train.freeze)
    if cfg.train.bn == "frozen":
        freeze_bn_stats(net)
    net.to(device)
    if cfg.train.channels_last:
        net.to(memory_format=torch.channels_last)
    reg = _build_regularizer(cfg, net, built, device)
    return Setup(cfg, device, task, net, built.source_state, built.head_name, built.source_head, reg, frozen)


def _announce(s: Setup) -> str:
    cfg, reg, r = s.cfg, s.regularizer, s.cfg.reg
    pen = "no penalty" if reg is None else (f"{r.kind} (alpha={r.alpha:g}, beta={r.beta:g}; {len(reg.shared)} "
                                            f"tensors in S, {len(reg.novel)} in S-bar)")
    frozen = f", frozen: {', '.join(s.frozen)}" if s.frozen else ""
    return (f"{cfg.name}: {cfg.model.arch} on {cfg.data.task} ({len(s.task.train)} training images), {pen}, "
            f"{cfg.optim.steps} steps on {s.device}{frozen}")


def _evaluate_splits(s: Setup) -> dict:
    """``eval.splits`` (val, test): the full result, top-1 (``SPLIT_acc``) and mean per-class accuracy."""
    cfg, t = s.cfg, s.cfg.train
    results: dict[str, Any] = {}
    for split in cfg.eval.splits:
        ds = getattr(s.task, split)
        if len(ds) == 0:
            results[split] = None
            continue
        r = evaluate(s.model, eval_loader(ds, cfg.eval.batch_size, cfg.data.num_workers, s.device), s.device,
                     s.task.num_classes, amp=t.amp, channels_last=t.channels_last)
        results[split] = r
        results[f"{split}_acc"] = r["top1"]
        results[f"{split}_mean_per_class"] = r["mean_per_class"]
    return results


def _validator(s: Setup) -> Any:
    """Validation top-1 during training (``train.eval_every``), or None without a validation split."""
    if not len(s.task.val):
        return None
    cfg, t = s.cfg, s.cfg.train
    loader = eval_loader(s.task.val, cfg.eval.batch_size, cfg.data.num_workers, s.device)

    def validate() -> dict:
        r = evaluate(s.model, loader, s.device, s.task.num_classes, amp=t.amp, channels_last=t.channels_last)
        return {"top1": r["top1"]}

    return validate


def classification_task(s: Setup, loss: Any = None, hooks: Any = ()) -> Task:
    """The runner's view of a classification set-up: ``loss(output, labels)`` (default cross-entropy)."""
    return Task(
        model=s.model,
        train=s.task.train,
        loss=loss if loss is not None else cross_entropy,
        regularizer=s.regularizer,
        validate=_validator(s),
        evaluate=lambda: _evaluate_splits(s),
        describe={"regularizer": s.cfg.reg.kind, "head": s.head_name, "frozen": s.frozen},
        announce=_announce(s),
        split=getattr(s.task, "split", None),
        final_record=lambda results: {k: v for k, v in results.items() if k.endswith("_acc")},
        model_metadata={"head": s.head_name},
        hooks=tuple(hooks),
    )
