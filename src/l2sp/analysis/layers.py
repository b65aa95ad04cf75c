"""Naming the layers of a network: look-ups by dotted name and the default layers of the analyses."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from l2sp.errors import L2SPError

_BLOCK_CLASSES = ("BasicBlock", "Bottleneck", "InvertedResidual")
_MAX_LISTED = 80


def _listing(names: Iterable[str]) -> str:
    names = [n for n in names if n]
    shown = ", ".join(names[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        shown += f", ... ({len(names) - _MAX_LISTED} more, see model.named_modules())"
    return shown


def get_module(model: nn.Module, name: str, *, what: str = "model") -> nn.Module:
    """The submodule at dotted path ``name`` (``"fc"``, ``"classifier.1"``); L2SPError listing valid names."""
    modules = dict(model.named_modules())
    if name not in modules or not name:
        raise L2SPError(f"{what} has no layer named {name!r}; valid names: {_listing(modules)}")
    return modules[name]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``module`` (works inside nn.Sequential too)."""
    get_module(model, name)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def check_layers(model: nn.Module, layers: Iterable[str], *, what: str = "model") -> list[str]:
    """Validate that every name in ``layers`` is a submodule of ``model``; returns them as a list."""
    layers = list(layers)
    if not layers:
        raise L2SPError("no layers given; pass at least one name from model.named_modules()")
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules or not n]
    if missing:
        raise L2SPError(
            f"{what} has no layer named {', '.join(map(repr, missing))}; valid names: {_listing(modules)}"
        )
    return layers


def default_layers(model: nn.Module) -> list[str]:
    """The layers the paper's Figure 4 inspects, by architecture.

    - residual networks (torchvision ResNet or any model with BasicBlock/Bottleneck blocks): the first
      convolution and the output of every residual block;
    - MobileNet-like models with a ``features`` nn.Sequential: every stage ``features.i``;
    - anything else: the top-level children.
    """
    named = list(model.named_modules())
    blocks = [n for n, m in named if type(m).__name__ in _BLOCK_CLASSES and n]
    blocks = [n for n in blocks if not any(n.startswith(b + ".") for b in blocks)]  # outermost only
    if blocks and not all(n.startswith("features.") for n in blocks):
        first_conv = next((n for n, m in named if isinstance(m, nn.Conv2d)), None)
        convs = [first_conv] if first_conv and not any(first_conv.startswith(b + ".") for b in blocks) else []
        return convs + blocks
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential) and len(features) > 0:
        return [f"features.{i}" for i in range(len(features))]
    children = [n for n, _ in model.named_children()]
    if not children:
        raise L2SPError(f"{type(model).__name__} has no submodules to analyse; pass layer names explicitly")
    return children
