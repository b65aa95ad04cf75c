"""Finding and replacing a network's classifier layer (head surgery).

The new head is ``nn.Linear(in_features, num_classes)`` with weight ~ N(0, std²) (std = 0.01 by default)
and bias = 0, so that the fine-tuned network starts from the pre-trained features with near-zero logits.
"""

from __future__ import annotations

import torch
from torch import nn

from l2sp.errors import L2SPError


def find_head(model: nn.Module) -> str:
    """Dotted name of the classifier: ``fc`` (ResNets), ``classifier[-1]`` (MobileNet, EfficientNet, VGG),
    timm's ``get_classifier()``, ``head``, or else the last ``nn.Linear``."""
    if hasattr(model, "get_classifier") and callable(model.get_classifier):
        head = model.get_classifier()
        for name, mod in model.named_modules():
            if mod is head and name:
                return name
    if isinstance(getattr(model, "fc", None), nn.Linear):
        return "fc"
    cls = getattr(model, "classifier", None)
    if isinstance(cls, nn.Linear):
        return "classifier"
    if isinstance(cls, nn.Sequential):
        idx = [i for i, m in enumerate(cls) if isinstance(m, nn.Linear)]
        if idx:
            return f"classifier.{idx[-1]}"
    if isinstance(getattr(model, "head", None), nn.Linear):
        return "head"
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise L2SPError(f"{type(model).__name__} has no nn.Linear classifier; set model.replace_head=false")
    return linears[-1]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def new_head(in_features: int, num_classes: int, std: float = 0.01) -> nn.Linear:
    """nn.Linear with weight ~ N(0, std²), bias = 0."""
    head = nn.Linear(in_features, num_classes)
    nn.init.normal_(head.weight, 0.0, std)
    nn.init.zeros_(head.bias)
    return head


def replace_head(
    model: nn.Module, num_classes: int, std: float = 0.01, name: str | None = None
) -> tuple[str, nn.Module]:
    """Replace the classifier by :func:`new_head`; returns (its dotted name, the old head).

    A classifier that is not an ``nn.Linear`` (a 1x1 convolution, ...) is replaced by the model's own
    ``reset_classifier(num_classes)`` when it has one (timm models), with that method's initialisation.
    """
    name = name or find_head(model)
    old = model.get_submodule(name)
    if not isinstance(old, nn.Linear):
        if callable(getattr(model, "reset_classifier", None)):
            model.reset_classifier(num_classes)
            return name, old
        raise L2SPError(f"classifier {name} is a {type(old).__name__}, not nn.Linear; replace it yourself")
    head = new_head(old.in_features, num_classes, std).to(device=old.weight.device, dtype=old.weight.dtype)
    set_submodule(model, name, head)
    return name, old


def head_classes(state: dict[str, torch.Tensor], head_name: str) -> int | None:
    """Number of outputs of the head in a state dict (None when the entry is missing)."""
    w = state.get(f"{head_name}.weight")
    return int(w.shape[0]) if w is not None else None
