"""``finetune_segmentation(config)``: the paper's segmentation protocol (Table 3) from a preset, in a run directory.

The backbone (matched by name and shape in w0 = ``backbone_state_dict`` of the source ResNet) is S, the heads
are S̄; the penalty is attached to the optimizer (weight decay 0 on what it penalizes). This module is the
segmentation *task* of the engine's one runner (:class:`l2sp.engine.runner.Runner`): data, network, w0, the
loss (cross-entropy over the pixels that are not ``ignore_index``) and the mIoU evaluation. The data stream,
training loop, NaN/Inf stop, schedules, checkpoints and optimizer are the runner's: a resumed run sees the same
batches, augmentations and dropout masks as an uninterrupted one and ends with the same weights.

Run directory: ``config.yaml`` (resolved), ``metrics.jsonl``, TensorBoard events (``tb/``),
``checkpoints/last.pt`` (model, optimizer, schedule, AMP scaler and RNG states, written atomically; w0 is
rebuilt from the source on resume), ``model.safetensors`` and ``results.json`` (validation mIoU, pixel
accuracy, per-class IoU).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from l2sp.engine import distributed
from l2sp.engine.config import expand_path
from l2sp.engine.rundir import RunDirectory
from l2sp.engine.runner import Task, configure, pick_device, run_task, seed_everything
from l2sp.errors import L2SPError
from l2sp.segmentation.config import (
    SegConfig,
    SegDataConfig,
    SegModelConfig,
    resolve_segmentation,
    to_yaml,
)
from l2sp.segmentation.data import DATASETS, IGNORE_INDEX, build_dataset
from l2sp.segmentation.metrics import evaluate_segmentation
from l2sp.segmentation.models import (
    backbone_state_dict,
    build_segmentation_model,
    freeze_bn_statistics,
    load_backbone,
    segmentation_logits,
)
from l2sp.segmentation.transforms import eval_transform, train_transform

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def cityscapes_classes() -> list[str]:
    """The 19 evaluated Cityscapes classes, in train-id order."""
    from torchvision.datasets import Cityscapes

    named = {c.train_id: c.name for c in Cityscapes.classes if 0 <= c.train_id < 19 and not c.ignore_in_eval}
    return [named[i] for i in range(19)]


class TrainPairs(Dataset):
    """A segmentation dataset's (image, mask) as plain tensors, the mask int64 (ignored pixels keep
    ``IGNORE_INDEX``, which :func:`pixel_cross_entropy` leaves out)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.dataset[i]
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


def pixel_cross_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The training loss: mean cross-entropy over the pixels whose label is not ``IGNORE_INDEX`` (255).

    Under DDP (N ranks) the mean is over the valid pixels of the *global* batch: rank r returns
    Σ_{its pixels} ℓ / (V/N), V the valid pixels of all ranks (one all-reduce), so that DDP's average of the ranks'
    gradients is the gradient of Σ ℓ / V, the one-process loss."""
    if not distributed.current().distributed:
        return F.cross_entropy(logits.float(), mask, ignore_index=IGNORE_INDEX)
    share = distributed.mean((mask != IGNORE_INDEX).sum().float())  # V / N
    total = F.cross_entropy(logits.float(), mask, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / share.clamp_min(1.0)


class MainLogits(nn.Module):
    """``model(x)["out"]``: the logits the training loss is computed on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return segmentation_logits(self.model(x))


def evaluation_set(d: SegDataConfig, root: str | Path, split: str) -> Dataset:
    """``split`` of ``data.dataset`` under ``root``, with the evaluation transform (no augmentation)."""
    return build_dataset(d.dataset, root, split, transforms=eval_transform(normalization=d.normalization))


def build_datasets(d: SegDataConfig) -> tuple[Dataset, Dataset, list[str]]:
    """(training set with the augmentation, validation set, class names) of ``data.dataset`` (a name of
    ``l2sp.segmentation.data.DATASETS``) under ``data.root``; inputs normalized by ``data.normalization``."""
    root = expand_path(d.root)
    if root is None:
        raise L2SPError(f"data.root is not set; give data.root=/path/to/{d.dataset} (its official layout, "
                        "see docs/segmentation.md)")
    scale = tuple(d.scale_range) if d.scale_range is not None else None
    train_tf = train_transform(d.crop, scale_range=scale, flip=d.flip, normalization=d.normalization)
    try:
        train = build_dataset(d.dataset, root, d.train_split, transforms=train_tf, mode=d.mode)
        val = evaluation_set(d, root, d.val_split)
    except L2SPError as exc:
        raise L2SPError(f"data.root={root}: {exc}") from exc
    return train, val, list(DATASETS[d.dataset].classes)


def _torchvision_state(backbone: str, name: str) -> dict[str, torch.Tensor]:
    """The ImageNet state dict of torchvision weights ``name`` of ``backbone`` (downloaded once, then cached)."""
    from torchvision import models as tvm

    members = tvm.get_model_weights(backbone).__members__
    key = name.split(".")[-1]  # "ResNet101_Weights.IMAGENET1K_V1" or "IMAGENET1K_V1"
    if key not in members:
        raise L2SPError(f"model.backbone_weights={name!r} is not a torchvision weights name of {backbone}; "
                        f"valid: {', '.join(members)}")
    try:
        return members[key].get_state_dict(progress=False)
    except (OSError, RuntimeError) as exc:
        raise L2SPError(f"cannot download the {backbone} weights {key} ({type(exc).__name__}); without network "
                        "set model.backbone_weights=null model.checkpoint=/path/to/resnet.pth") from exc


def source_weights(m: SegModelConfig) -> dict[str, torch.Tensor] | None:
    """w0 = ``backbone_state_dict`` of the source ResNet (``model.checkpoint`` or ``model.backbone_weights``),
    with the backbone's ``backbone.*`` names; None without a source (random initialization)."""
    if m.checkpoint is not None:
        path = expand_path(m.checkpoint)
        if not Path(path).is_file():
            raise L2SPError(f"model.checkpoint={path} does not exist; give a local ImageNet {m.backbone} file")
        try:
            return backbone_state_dict(path)
        except L2SPError as exc:
            raise L2SPError(f"model.checkpoint={path}: {exc}") from exc
    if m.backbone_weights is not None:
        return backbone_state_dict(_torchvision_state(m.backbone, m.backbone_weights))
    return None


_MODEL_KEYWORDS = inspect.signature(build_segmentation_model).parameters


def build_model(cfg: SegConfig, num_classes: int, w0: dict[str, torch.Tensor] | None) -> nn.Module:
    """The network with w0 loaded into its backbone; BatchNorm statistics frozen if ``train.freeze_bn_statistics``."""
    m = cfg.model
    extra = {"output_stride": m.output_stride} if "output_stride" in _MODEL_KEYWORDS else {}
    model = build_segmentation_model(m.name, num_classes, backbone=m.backbone, bins=tuple(m.bins), **extra)
    if w0 is not None:
        try:
            load_backbone(model, w0)
        except L2SPError as exc:
            where = (f"model.checkpoint={m.checkpoint}" if m.checkpoint
                     else f"model.backbone_weights={m.backbone_weights}")
            raise L2SPError(f"{where}: {exc}") from exc
    if cfg.train.freeze_bn_statistics:
        freeze_bn_statistics(model)
    return model


def build_regularizer(cfg: SegConfig, model: nn.Module, w0: dict[str, torch.Tensor] | None) -> Any:
    """``l2sp.regularizer(reg.kind, model, w0, ...)``: S = the backbone, S̄ = the heads (None for kind "none").

    The Fisher of the -fisher kinds (estimated on the ImageNet classifier) is renamed like w0."""
    from l2sp import fisher as fisher_io
    from l2sp.penalties import regularizer

    r = cfg.reg
    if r.kind == "none":
        return None
    fisher = None
    if r.kind.endswith("fisher"):
        path = expand_path(r.fisher)
        if path is None or not Path(path).is_file():
            raise L2SPError(f"reg.fisher file {path} does not exist; create it with `l2sp fisher` first")
        fisher = backbone_state_dict(fisher_io.load(path))
    return regularizer(r.kind, model, w0, alpha=r.alpha, beta=r.beta, fisher=fisher, include=r.include)


@dataclass
class SegmentationSetup:
    """Everything a run is made of, built identically for a fresh start and a resume."""

    cfg: SegConfig
    device: torch.device
    train: Dataset
    val: Dataset
    classes: list[str]
    model: nn.Module
    w0: dict[str, torch.Tensor] | None
    regularizer: Any


def setup_segmentation(cfg: SegConfig) -> SegmentationSetup:
    """Datasets, w0, then (seeded) the model, its device and memory format, and the regularizer."""
    device = pick_device(cfg.train.device)
    train, val, classes = build_datasets(cfg.data)
    w0 = source_weights(cfg.model)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, len(classes), w0).to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    reg = build_regularizer(cfg, model, w0)
    if reg is not None:
        reg.to(device)
    return SegmentationSetup(cfg, device, train, val, classes, model, w0, reg)


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def score(model: nn.Module, dataset: Dataset, classes: list[str], cfg: SegConfig, split: str,
          device: torch.device) -> dict:
    """mIoU, pixel accuracy and per-class IoU (in the order of ``classes``, the train ids; None for a class
    absent from labels and predictions) of ``model`` on ``dataset`` (the ``split`` images), with the test
    scales and flips of ``cfg.eval``."""
    e = cfg.eval
    loader = DataLoader(dataset, batch_size=1, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    r = evaluate_segmentation(model, loader, len(classes), scales=tuple(e.scales), flip=e.flip)
    return {"miou": _finite(r["miou"]), "pixel_acc": _finite(r["pixel_acc"]), "classes": list(classes),
            "per_class_iou": [_finite(v) for v in r["per_class_iou"]], "images": len(dataset), "split": split,
            "scales": list(e.scales), "flip": e.flip}


def evaluate_run(s: SegmentationSetup) -> dict:
    """The scores of :func:`score` on ``data.val_split``: ``miou`` (in [0, 1]) and ``val`` (every score)."""
    val = score(s.model, s.val, s.classes, s.cfg, s.cfg.data.val_split, s.device)
    return {"miou": val["miou"], "val": val, "val_miou": val["miou"], "val_pixel_acc": val["pixel_acc"]}


def _announce(s: SegmentationSetup) -> str:
    cfg, reg = s.cfg, s.regularizer
    pen = "no penalty" if reg is None else (f"{cfg.reg.kind} (alpha={cfg.reg.alpha:g}, beta={cfg.reg.beta:g}; "
                                            f"{len(reg.shared)} tensors in S, {len(reg.novel)} in S-bar)")
    bn = "frozen" if cfg.train.freeze_bn_statistics else "trained"
    return (f"{cfg.name}: {cfg.model.name} on {cfg.model.backbone}, {cfg.data.dataset} ({len(s.train)} training "
            f"images), {pen}, BN statistics {bn}, {cfg.optim.steps} steps on {s.device}")


def segmentation_task(s: SegmentationSetup) -> Task:
    """The runner's view of a segmentation set-up: main logits, pixel cross-entropy, mIoU on the validation split."""
    cfg, reg = s.cfg, s.regularizer
    return Task(
        model=s.model,
        train=TrainPairs(s.train),
        loss=pixel_cross_entropy,
        forward=MainLogits(s.model),
        regularizer=reg,
        evaluate=lambda: evaluate_run(s),
        describe={"model": cfg.model.name, "backbone": cfg.model.backbone, "dataset": cfg.data.dataset,
                  "regularizer": cfg.reg.kind, "alpha": cfg.reg.alpha, "beta": cfg.reg.beta,
                  "penalized": None if reg is None else {"S": len(reg.shared), "S_bar": len(reg.novel)},
                  "bn_statistics": "frozen" if cfg.train.freeze_bn_statistics else "trained"},
        announce=_announce(s),
        final_record=lambda r: {"val_miou": r["val_miou"], "val_pixel_acc": r["val_pixel_acc"]},
        model_metadata={"model": cfg.model.name, "backbone": cfg.model.backbone, "num_classes": len(s.classes)},
        checkpoint_regularizer=False,
    )


def finetune_segmentation(config: Any = None, overrides: list[str] | dict | None = None, *, out: str | None = None,
                          resume: bool = False, overwrite: bool = False, quiet: bool | None = None,
                          stop_after: int | None = None) -> dict:
    """Fine-tune a segmentation network from ``config`` (a segmentation preset name, YAML path, dict or
    SegConfig) with dotted ``overrides``; evaluate it on the validation split.

    ``resume``: continue the run in the run directory from its last checkpoint. ``stop_after``: stop after
    that many steps of this call, with a checkpoint (as if killed). Returns the results (also
    ``results.json``): ``miou`` (mIoU on ``data.val_split``, in [0, 1]; also ``val_miou``), ``val_pixel_acc`` and
    ``val["per_class_iou"]`` among others. :func:`l2sp.segmentation.score_segmentation_run` scores the finished
    run on another split.
    Under ``torchrun`` the run is data-parallel like :func:`l2sp.finetune` (see docs/scale.md).
    """
    cfg = configure(config, overrides, quiet=quiet, out=out, resolver=resolve_segmentation)

    def build() -> tuple[Task, torch.device]:
        s = setup_segmentation(cfg)
        return segmentation_task(s), s.device

    return run_task(cfg, RunDirectory(cfg.run_dir(), resolve_segmentation), build, resume=resume,
                    overwrite=overwrite, stop_after=stop_after, config_text=to_yaml(cfg))
