"""Build a network by name with its pre-trained weights, snapshot w0, then replace the classifier.

``arch``: "small_resnet" (the built-in benchmark), any torchvision classification model name
("resnet101", "mobilenet_v2", ...), or "timm:NAME" (needs timm). ``weights``: None (random
initialisation, for pre-training from scratch), a torchvision weights name ("DEFAULT", "IMAGENET1K_V2"),
"pretrained" (timm), or a local checkpoint file (``.safetensors``, or ``.pt``/``.pth`` loaded with
``weights_only=True``) whose head size is read from the file. A pre-trained network is built with its
original head (timm included), so that w0 and the source head are snapshotted before the head is replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from l2sp.errors import L2SPError
from l2sp.models.heads import find_head, head_classes, replace_head
from l2sp.models.small_resnet import small_resnet

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass
class BuiltModel:
    """The target network, w0 (``l2sp.snapshot`` of the pre-trained network, original head included),
    the head's dotted name, the original head module (None without pre-trained weights)."""

    model: nn.Module
    source_state: dict[str, torch.Tensor] | None
    head_name: str
    source_head: nn.Module | None

    @property
    def penalty_source(self) -> dict[str, torch.Tensor] | None:
        """w0 for the regularizer: the source state without the replaced head, so that the new head is in
        S̄ even when it has the old head's shape (as many target classes as source classes)."""
        if self.source_state is None or self.source_head is None:
            return self.source_state
        prefix = self.head_name + "."
        return {k: v for k, v in self.source_state.items() if not k.startswith(prefix)}


def is_checkpoint_path(weights: str | None) -> bool:
    return weights is not None and (
        Path(weights).expanduser().suffix in CHECKPOINT_SUFFIXES or Path(weights).expanduser().is_file()
    )


def create(
    arch: str, num_classes: int, in_channels: int = 3, weights: str | None = None, options: dict | None = None
) -> nn.Module:
    """The bare architecture (``weights`` only for torchvision names / timm "pretrained")."""
    options = dict(options or {})
    if arch == "small_resnet":
        if weights is not None:
            raise L2SPError(
                "small_resnet has no downloadable weights; give model.weights as a checkpoint file"
            )
        return small_resnet(num_classes=num_classes, in_channels=in_channels, **options)
    if arch.startswith("timm:"):
        return create_timm(arch, num_classes, in_channels, weights, options)
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise L2SPError(
            f"unknown model.arch {arch!r}; use small_resnet, timm:NAME, or a torchvision model "
            f"such as {', '.join(n for n in names if n.startswith(('resnet', 'mobilenet')))}"
        )
    if weights is not None:
        try:
            return torchvision.models.get_model(arch, weights=weights, **options)
        except (ValueError, KeyError) as exc:
            valid = [w.name for w in torchvision.models.get_model_weights(arch)]
            raise L2SPError(
                f"model.weights={weights!r} is not a weights name of {arch}; valid: "
                f"DEFAULT, {', '.join(valid)}, or a checkpoint file path"
            ) from exc
    return torchvision.models.get_model(arch, num_classes=num_classes, **options)


def create_timm(
    arch: str, num_classes: int, in_channels: int = 3, weights: str | None = None, options: dict | None = None
) -> nn.Module:
    """``timm:NAME``: random with ``num_classes`` outputs, or (``weights="pretrained"``) with timm's weights
    *and their original head*, so that w0 and the source head are taken before the head is replaced.

    Pre-trained weights come from timm's hub, or from a local file with
    ``options={"pretrained_cfg_overlay": {"file": PATH}}`` (add ``"num_classes": N`` for a head other than
    the model's default).
    """
    try:
        import timm
    except ImportError as exc:
        raise L2SPError(f"model.arch={arch} needs timm; pip install 'l2sp[timm]'") from exc
    options = dict(options or {})
    if weights == "pretrained":  # no num_classes: timm would drop the pre-trained head
        return timm.create_model(arch[5:], pretrained=True, in_chans=in_channels, **options)
    if weights is not None:
        raise L2SPError(
            f"model.weights={weights!r} is not understood for {arch}; use 'pretrained' (timm's weights), "
            "a checkpoint file path, or nothing (random initialisation)"
        )
    return timm.create_model(arch[5:], pretrained=False, num_classes=num_classes, in_chans=in_channels, **options)


def load_checkpoint_into(
    arch: str, path: str, in_channels: int, options: dict | None, fallback_classes: int
) -> nn.Module:
    """The architecture sized to the checkpoint's head, loaded strictly from ``path``."""
    from l2sp.io import load_state_dict
    from l2sp.reference import strip_prefix

    state = {strip_prefix(k): v for k, v in load_state_dict(Path(path).expanduser()).items()}
    probe = create(arch, fallback_classes, in_channels, None, options)
    n_src = head_classes(state, find_head(probe)) or fallback_classes
    model = probe if n_src == fallback_classes else create(arch, n_src, in_channels, None, options)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
        detail = "; ".join(
            f"{label} {len(v)} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
            for label, v in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", sorted(shapes)))
            if v
        )
        raise L2SPError(
            f"checkpoint {path} does not fit model.arch={arch}: {detail}; "
            "check model.arch and model.options against the file"
        ) from exc
    return model


def pretrained(
    arch: str, weights: str | None, num_classes: int, in_channels: int = 3, options: dict | None = None
) -> nn.Module:
    """The source network as it was pre-trained (its original head), or a random one if weights is None.

    ``num_classes`` sizes the head of a random network only; a pre-trained one keeps its own head (a checkpoint
    file's size, torchvision's or timm's).
    """
    if is_checkpoint_path(weights):
        return load_checkpoint_into(arch, weights, in_channels, options, num_classes)
    return create(arch, num_classes, in_channels, weights, options)


def build_model(
    arch: str,
    num_classes: int,
    *,
    weights: str | None = None,
    in_channels: int = 3,
    options: dict | None = None,
    replace: bool = True,
    head_std: float = 0.01,
) -> BuiltModel:
    """Pre-trained network -> w0 = l2sp.snapshot(network) -> new head for ``num_classes`` (S̄ by shape)."""
    from l2sp.reference import snapshot

    model = pretrained(arch, weights, num_classes, in_channels, options)
    if weights is None:
        return BuiltModel(model, None, find_head(model), None)
    w0 = snapshot(model)
    if replace:
        name, old = replace_head(model, num_classes, head_std)
    else:
        name, old = find_head(model), None
        n = model.get_submodule(name).out_features
        if n != num_classes:
            raise L2SPError(
                f"model.replace_head=false but the head has {n} outputs for {num_classes} classes; "
                "set model.replace_head=true"
            )
    return BuiltModel(model, w0, name, old)


def from_config(cfg: Any, num_classes: int, in_channels: int = 3) -> BuiltModel:
    """:func:`build_model` from a :class:`~l2sp.engine.config.ModelConfig` (``{cache}``, ``~``, ``$VAR``
    expanded in ``weights``)."""
    from l2sp.engine.config import expand_path

    return build_model(
        cfg.arch,
        num_classes,
        weights=expand_path(cfg.weights),
        in_channels=in_channels,
        options=cfg.options,
        replace=cfg.replace_head,
        head_std=cfg.head_std,
    )
