"""Freezing the first k blocks of a network (the paper's Figure 3 baseline) and freezing BatchNorm statistics.

A frozen block has ``requires_grad=False`` on its parameters and its BatchNorm layers stay in eval mode
(running statistics used and never updated) even after ``model.train()``.
Blocks, input side first: ResNet (torchvision/timm) stem (conv1, bn1), layer1..layer4; the small ResNet
its ``block_names()``; MobileNet/EfficientNet/VGG ``features[i]``; otherwise the top-level children
except the classifier.
"""

from __future__ import annotations

import types

from torch import nn

from l2sp.errors import L2SPError

_BN = (nn.modules.batchnorm._BatchNorm,)


def blocks(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The freezable blocks, input side first, as (name, modules)."""
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "block_names"):
        return [(n, [model.get_submodule(n)]) for n in model.block_names()]
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)) and hasattr(model, "conv1"):
        stem = [m for n in ("conv1", "bn1") if (m := getattr(model, n, None)) is not None]
        return [("stem", stem)] + [(f"layer{i}", [getattr(model, f"layer{i}")]) for i in range(1, 5)]
    feats = getattr(model, "features", None)
    if isinstance(feats, nn.Sequential):
        return [(f"features.{i}", [m]) for i, m in enumerate(feats)]
    from l2sp.models.heads import find_head

    head = find_head(model).split(".")[0]
    return [(n, [m]) for n, m in model.named_children() if n != head and any(True for _ in m.parameters())]


def _stay_eval(module: nn.Module) -> None:
    """Keep a BatchNorm layer in eval mode whatever ``train()`` is called with."""
    module.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), module)
    nn.Module.train(module, False)


def freeze_bn_stats(model: nn.Module) -> int:
    """Every BatchNorm of ``model`` uses and keeps its running statistics (γ, β still trainable).

    Returns the number of BatchNorm layers."""
    n = 0
    for m in model.modules():
        if isinstance(m, _BN):
            _stay_eval(m)
            n += 1
    return n


def freeze_first(model: nn.Module, k: int) -> list[str]:
    """Freeze the first ``k`` blocks (parameters and BatchNorm statistics); returns the frozen block names."""
    if k <= 0:
        return []
    bl = blocks(model)
    if k > len(bl):
        raise L2SPError(
            f"train.freeze={k} but {type(model).__name__} has {len(bl)} blocks "
            f"({', '.join(n for n, _ in bl)}); use 0..{len(bl)}"
        )
    for _, mods in bl[:k]:
        for mod in mods:
            for p in mod.parameters():
                p.requires_grad_(False)
            freeze_bn_stats(mod)
    return [n for n, _ in bl[:k]]
