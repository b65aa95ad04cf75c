"""Source-task accuracy drop (the paper's Table 5): how much of the source task a fine-tuned network forgot.

The fine-tuned network gets the *original* source classifier back (its own head removed) and is evaluated
on the source test set; the drop is  acc(source model) − acc(fine-tuned body + source head), in points.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from l2sp.analysis.layers import get_module, set_module
from l2sp.errors import L2SPError


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable, *, device: str | torch.device | None = None) -> float:
    """Top-1 accuracy in percent over ``loader`` items ``(x, y)``.

    A 5-D ``x`` of shape (B, crops, C, H, W) is a multi-crop batch: the softmax is averaged over the crops.
    """
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    correct, total = 0, 0
    try:
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise L2SPError("accuracy needs loader items (inputs, labels); pass a labelled loader")
            x, y = batch[0].to(device), torch.as_tensor(batch[1]).to(device)
            if x.dim() == 5:
                b, crops = x.shape[:2]
                prob = model(x.flatten(0, 1)).softmax(-1).view(b, crops, -1).mean(1)
            else:
                prob = model(x)
            correct += int((prob.argmax(-1) == y).sum())
            total += int(y.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise L2SPError("the loader yielded no examples; pass a non-empty source test set")
    return 100.0 * correct / total


def reattach_head(finetuned: nn.Module, source_model: nn.Module, head_name: str) -> nn.Module:
    """A deep copy of ``finetuned`` whose module ``head_name`` is a copy of ``source_model``'s."""
    source_head = get_module(source_model, head_name, what="the source model")
    get_module(finetuned, head_name, what="the fine-tuned model")
    body = {k: v for k, v in finetuned.state_dict().items() if not k.startswith(head_name + ".")}
    src = source_model.state_dict()
    shared = [k for k, v in body.items() if k in src and src[k].shape == v.shape]
    if not shared:
        raise L2SPError(
            "the fine-tuned model shares no parameter (name and shape) with the source model; "
            "pass the source model it was fine-tuned from"
        )
    model = copy.deepcopy(finetuned)
    set_module(model, head_name, copy.deepcopy(source_head))
    return model


def source_task_drop(
    finetuned: nn.Module,
    source_model: nn.Module,
    head_name: str,
    loader: Iterable,
    *,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Source-task accuracy of ``source_model`` and of ``finetuned`` with the source head re-attached.

    Returns ``{"source_acc", "reattached_acc", "drop"}`` in percent, drop = source_acc − reattached_acc.
    ``head_name`` is the dotted path of the classifier (``"fc"`` for ResNets, ``"classifier.1"``).
    """
    model = reattach_head(finetuned, source_model, head_name)
    if device is not None:
        device = torch.device(device)
        model.to(device)
        if any(p.device != device for p in source_model.parameters()):
            source_model = copy.deepcopy(source_model).to(device)
    source_acc = accuracy(source_model, loader, device=device)
    reattached_acc = accuracy(model, loader, device=device)
    return {"source_acc": source_acc, "reattached_acc": reattached_acc, "drop": source_acc - reattached_acc}
