"""Typed configuration of a segmentation run: a small dataclass tree read with the engine's machinery.

Presets are the shipped YAML files whose top-level key is ``task: segmentation`` (``l2sp segment --list``);
``base:`` inheritance, dotted ``key=value`` overrides and the one-line errors naming the valid keys are those
of :mod:`l2sp.engine.config`. The penalty (``reg``) and the optimizer (``optim``) sections are the
classification ones.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from l2sp.engine.config import (
    OptimConfig,
    RegConfig,
    RunConfig,
    RunTrainConfig,
    _deep_merge,
    _read_yaml,
    apply_overrides,
    from_dict,
    parse_overrides,
    preset_matrix,
    preset_names,
    validate_run,
)
from l2sp.errors import L2SPError
from l2sp.penalties import get_penalty
from l2sp.segmentation.data import DATASETS
from l2sp.segmentation.models import BACKBONES, HEADS, OUTPUT_STRIDES


@dataclass
class SegModelConfig:
    """The network (``build_segmentation_model``) and its source weights, which are also w0.

    ``backbone_weights``: a torchvision weights name of the ResNet ("IMAGENET1K_V1", "DEFAULT"; downloaded
    once); ``checkpoint``: a local ImageNet ResNet file (.pth/.pt with weights_only, .safetensors).
    """

    name: str = "fcn"  # l2sp.segmentation.models.HEADS
    backbone: str = "resnet101"  # l2sp.segmentation.models.BACKBONES
    backbone_weights: str | None = None
    checkpoint: str | None = None
    bins: list = field(default_factory=lambda: [1, 2, 3, 6])  # PSPNet pyramid pooling
    output_stride: int = 8  # the dilated backbone's output stride


@dataclass
class SegDataConfig:
    """The dataset in its official layout under ``root`` and the training augmentation."""

    dataset: str = "cityscapes"  # l2sp.segmentation.data.DATASETS (cityscapes, sbd)
    root: str | None = None
    train_split: str = "train"  # cityscapes: train (fine) | train_extra (coarse); sbd: train | train_noval
    val_split: str = "val"
    mode: Literal["fine", "coarse"] = "fine"  # cityscapes training labels (validation: always fine)
    crop: int | list = 800  # side or [height, width]
    scale_range: list | None = None  # random scale [low, high] (PSPNet: [0.5, 2.0]); null: none
    flip: bool = False  # random horizontal flip
    normalization: str | None = None  # input normalization of the backbone's weights: imagenet (default) | half
    num_workers: int = 0


@dataclass
class SegTrainConfig(RunTrainConfig):
    """How the run executes: device, precision, BatchNorm statistics, logging and checkpoints."""

    log_every: int = 20
    freeze_bn_statistics: bool = True  # running statistics fixed, γ/β trained (FCN, ResNet, DeepLab)


@dataclass
class SegEvalConfig:
    """The test on ``data.val_split``: softmax averaged over ``scales`` and, with ``flip``, mirrored inputs."""

    scales: list = field(default_factory=lambda: [1.0])
    flip: bool = False


@dataclass
class SegConfig(RunConfig):
    task: Literal["segmentation"] = "segmentation"
    name: str = "segmentation"
    out: str | None = None  # run directory (default runs/NAME/seedSEED)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    reg: RegConfig = field(default_factory=lambda: RegConfig(alpha=1e-4, beta=1e-3))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(batch_size=2, steps=90000, schedule="poly"))
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)


def segmentation_presets() -> list[str]:
    """Names of the shipped segmentation presets (``l2sp segment --list``)."""
    return preset_names("segmentation")


def _read(source: str | Path) -> dict:
    """A preset or YAML file with ``base:`` resolved; refuses classification configs with a one-line error."""
    path = Path(str(source)).expanduser()
    is_file = path.suffix in (".yaml", ".yml") or path.is_file()
    if is_file and not path.is_file():
        raise L2SPError(f"config file {path} does not exist; give a segmentation preset "
                        f"({', '.join(segmentation_presets())}) or a YAML path")
    shipped = (resources.files("l2sp") / "configs" / f"{source}.yaml").is_file() or str(source) in preset_matrix()
    if not is_file and not shipped:
        raise L2SPError(f"unknown segmentation preset {str(source)!r}; valid presets: "
                        f"{', '.join(segmentation_presets())} (or give a YAML path)")
    data = _read_yaml(source)
    if data.get("task") == "segmentation":
        return data
    if not is_file:
        raise L2SPError(f"{source} is a classification preset; run it with `l2sp finetune {source}`, "
                        "or give a segmentation preset (see `l2sp segment --list`)")
    raise L2SPError(f"{source} is not a segmentation config (it has no top-level `task: segmentation`); "
                    "run classification configs with `l2sp finetune`")


def _to_data(config: Any) -> dict:
    if config is None:
        return {}
    if isinstance(config, SegConfig):
        return config.to_dict()
    if isinstance(config, dict):
        data = copy.deepcopy(config)
        base = data.pop("base", None)
        return _deep_merge(_read(base), data) if base is not None else data
    if isinstance(config, str | Path):
        data = _read(config)
        data.setdefault("name", Path(str(config)).stem)
        return data
    raise L2SPError(f"cannot read a segmentation config from {type(config).__name__}; "
                    "pass a preset name, YAML path, dict or SegConfig")


def resolve_segmentation(config: Any = None, overrides: list[str] | dict | None = None) -> SegConfig:
    """A :class:`SegConfig` from a segmentation preset name, YAML path, dict or SegConfig, with dotted
    ``overrides`` (``optim.lr=0.01``) applied; unknown keys raise an L2SPError naming the valid ones."""
    data = apply_overrides(_to_data(config), parse_overrides(overrides), root=SegConfig)
    cfg = from_dict(SegConfig, data)
    validate_segmentation(cfg)
    return cfg


def _positive_pair(key: str, value: Any) -> None:
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int | float) for v in value)
            and 0 < value[0] <= value[1]):
        raise L2SPError(f"{key}={value!r} must be [low, high] with 0 < low <= high, e.g. [0.5, 2.0]")


def _check_crop(crop: int | list) -> None:
    sides = [crop] if isinstance(crop, int) else crop
    if not (1 <= len(sides) <= 2 and all(isinstance(s, int) and s >= 1 for s in sides)):
        raise L2SPError(f"data.crop={crop!r} must be a positive side or [height, width], e.g. 800")


def _check_source(cfg: SegConfig) -> None:
    m, r = cfg.model, cfg.reg
    if m.backbone_weights is not None and m.checkpoint is not None:
        raise L2SPError("set model.backbone_weights (torchvision download) or model.checkpoint (local file), "
                        "not both; the other one =null")
    penalty = None if r.kind == "none" else get_penalty(r.kind)
    if penalty is not None and penalty.needs_w0 and m.backbone_weights is None and m.checkpoint is None:
        raise L2SPError(f"reg.kind={r.kind} pulls toward the pre-trained weights but neither "
                        "model.backbone_weights nor model.checkpoint is set; set one, or use reg.kind=l2 / none")
    if penalty is not None and penalty.needs_fisher and not r.fisher:
        raise L2SPError(f"reg.kind={r.kind} needs reg.fisher=FILE (the source network's Fisher, `l2sp fisher`)")


def _check_registries(cfg: SegConfig) -> None:
    m = cfg.model
    for key, value, choices in (
        ("data.dataset", cfg.data.dataset, tuple(DATASETS)),
        ("model.name", m.name, HEADS),
        ("model.backbone", m.backbone, BACKBONES),
    ):
        if value not in choices:
            raise L2SPError(f"{key}={value!r} is not valid; choose one of {', '.join(choices)}")
    if m.output_stride not in OUTPUT_STRIDES:
        raise L2SPError(f"model.output_stride={m.output_stride} is not valid; choose one of "
                        f"{', '.join(map(str, OUTPUT_STRIDES))}")


def validate_segmentation(cfg: SegConfig) -> None:
    """Cross-field checks the types alone cannot express."""
    o, t = cfg.optim, cfg.train
    validate_run(cfg)
    _check_registries(cfg)
    _check_crop(cfg.data.crop)
    if cfg.data.scale_range is not None:
        _positive_pair("data.scale_range", cfg.data.scale_range)
    s = cfg.eval.scales
    if not s or not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in s):
        raise L2SPError(f"eval.scales={s!r} must be a non-empty list of positive factors, e.g. [1.0]")
    if not cfg.model.bins or not all(isinstance(b, int) and b >= 1 for b in cfg.model.bins):
        raise L2SPError(f"model.bins={cfg.model.bins!r} must be positive pooling sizes, e.g. [1, 2, 3, 6]")
    if cfg.model.name == "pspnet" and not t.freeze_bn_statistics and o.batch_size < 2:
        raise L2SPError("pspnet with trained BatchNorm statistics needs optim.batch_size >= 2 (its 1×1 pooling "
                        "branch has one value per channel and image)")
    _check_source(cfg)


def to_yaml(cfg: SegConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
