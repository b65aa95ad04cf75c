"""Source-task accuracy drop (the paper's Table 5): how much of the source task a fine-tuned network forgot.

The fine-tuned network gets the *original* source classifier back (its own head removed) and is evaluated
on the source test set; the drop is  acc(source model) − acc(fine-tuned body + source head), in points.
For segmentation (:func:`segmentation_source_drop`), the fine-tuned backbone goes back into the ImageNet
classifier it came from (its own strides, its classification layers) and is scored the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

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


@torch.no_grad()
def _top1(model: nn.Module, loader: Iterable, indices: torch.Tensor | None,
          device: torch.device) -> tuple[float, float | None]:
    """Top-1 % over all classes and, with ``indices``, over those classes only (argmax_{k ∈ indices} z_k)."""
    was_training = model.training
    model.eval()
    hits, hits_restricted, total = 0, 0, 0
    try:
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise L2SPError("the source loader must yield (images, labels); pass a labelled loader")
            x, y = batch[0].to(device), torch.as_tensor(batch[1]).to(device)
            z = model(x)
            hits += int((z.argmax(-1) == y).sum())
            if indices is not None:
                hits_restricted += int((indices[z.index_select(-1, indices).argmax(-1)] == y).sum())
            total += int(y.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise L2SPError("the source loader yielded no examples; pass a non-empty source test set")
    return 100.0 * hits / total, (100.0 * hits_restricted / total if indices is not None else None)


def segmentation_source_drop(
    finetuned: nn.Module,
    source_model: nn.Module,
    loader: Iterable,
    *,
    indices: Sequence[int] | None = None,
    source_bn_statistics: bool = False,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Source-task drop of a fine-tuned segmentation network (the paper's Table 5, for its backbone).

    The backbone tensors of ``finetuned`` (``backbone.*``) are put back into a copy of the ImageNet classifier
    ``source_model`` (``l2sp.segmentation.models.reattach_classifier``: the source's strides, without dilation,
    and its own classification layers: ResNet ``fc``, MobileNetV2 ``features.18`` + ``classifier``), and both
    networks score ``loader``'s (images, ImageNet labels):
    ``{"source_acc", "reattached_acc", "drop"}`` in percent, drop = source_acc − reattached_acc.
    ``indices`` (the classes present, e.g. Tiny ImageNet's 200): also ``"*_restricted"`` scores, argmax over
    those classes only. ``source_bn_statistics``: the re-attached network keeps the source's BatchNorm running
    statistics (only the learned parameters moved).
    """
    from l2sp.segmentation.models import reattach_classifier

    device = torch.device(device) if device is not None else next(source_model.parameters()).device
    model = reattach_classifier(finetuned, source_model)
    if source_bn_statistics:
        src = source_model.state_dict()
        model.load_state_dict({k: (src[k] if "running_" in k else v) for k, v in model.state_dict().items()})
    model.to(device)
    source = source_model if all(p.device == device for p in source_model.parameters()) else \
        copy.deepcopy(source_model).to(device)
    idx = None
    if indices is not None:
        if len(indices) == 0 or len(set(indices)) != len(indices):
            raise L2SPError("indices must be a non-empty list of distinct class indices (the classes present)")
        idx = torch.as_tensor(list(indices), dtype=torch.long, device=device)
    src_acc, src_r = _top1(source, loader, idx, device)
    new_acc, new_r = _top1(model, loader, idx, device)
    out = {"source_acc": src_acc, "reattached_acc": new_acc, "drop": src_acc - new_acc}
    if idx is not None:
        out.update(source_acc_restricted=src_r, reattached_acc_restricted=new_r, drop_restricted=src_r - new_r)
    return out
