"""Segmentation evaluation: confusion matrix, per-class IoU, mIoU, pixel accuracy; multi-scale + flip test.

With the confusion matrix C (rows: true class, columns: predicted class, ignored pixels left out):
    IoU_k = C_kk / (Σ_j C_kj + Σ_i C_ik − C_kk),   mIoU = mean of IoU_k over classes with a non-empty union,
    pixel accuracy = Σ_k C_kk / Σ C.
Multi-scale test: p(x) = 1/(|scales|·(1+flip)) Σ_s Σ_f  up(softmax(f⁻¹ model(f(resize_s(x))))), the
prediction argmax_k p_k, with up the bilinear resize to the input size and f the horizontal flip.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from l2sp.errors import L2SPError
from l2sp.segmentation.models import segmentation_logits


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None = 255) -> torch.Tensor:
    """(K, K) int64 counts C[t, p] of pixels of true class t predicted p; ``ignore_index`` pixels skipped."""
    if pred.shape != target.shape:
        raise L2SPError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}; "
                        "upsample the logits to the label size")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        lo, hi = int(target.min()), int(target.max())
        raise L2SPError(f"labels outside 0..{num_classes - 1} (found {lo}..{hi}) "
                        f"that are not ignore_index={ignore_index}; map the labels to train ids first")
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise L2SPError(f"predictions outside 0..{num_classes - 1}; the model has the wrong class count")
    return torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def scores(confusion: torch.Tensor) -> dict:
    """``{"miou", "per_class_iou", "pixel_acc"}`` from a confusion matrix (IoU of an absent class: NaN)."""
    c = confusion.double()
    tp = c.diagonal()
    union = c.sum(0) + c.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    present = ~iou.isnan()
    return {
        "miou": float(iou[present].mean()) if present.any() else float("nan"),
        "per_class_iou": [float(v) for v in iou],
        "pixel_acc": float(tp.sum() / c.sum()) if c.sum() > 0 else float("nan"),
    }


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.inference_mode()
def predict_probabilities(model: nn.Module, images: torch.Tensor, scales: Sequence[float] = (1.0,),
                          flip: bool = False) -> torch.Tensor:
    """Class probabilities (N, K, H, W) averaged over ``scales`` (bilinear resizes) and optional h-flips."""
    if not scales or any(s <= 0 for s in scales):
        raise L2SPError(f"scales must be positive numbers, got {tuple(scales)}")
    size = images.shape[-2:]
    total = None
    n = 0
    for s in scales:
        x = images if s == 1.0 else F.interpolate(images, scale_factor=float(s), mode="bilinear",
                                                  align_corners=False)
        for flipped in (False, True) if flip else (False,):
            logits = segmentation_logits(model(x.flip(-1) if flipped else x))
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            p = logits.float().softmax(1)
            total = p if total is None else total + p
            n += 1
    return total / n


def evaluate_segmentation(model: nn.Module, loader: Iterable, num_classes: int, ignore_index: int = 255,
                          scales: Sequence[float] = (1.0,), flip: bool = False) -> dict:
    """mIoU, per-class IoU and pixel accuracy of ``model`` on (image, mask) batches, in eval mode.

    Predictions average softmax probabilities over ``scales`` and, with ``flip``, horizontal flips
    (the paper's multi-scale test for DeepLab/PSPNet). The confusion matrix is also returned.
    """
    was_training = model.training
    model.eval()
    device = _model_device(model)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    try:
        for images, masks in loader:
            images, masks = images.to(device), masks.to(device)
            if masks.dim() == 4 and masks.shape[1] == 1:
                masks = masks[:, 0]
            pred = predict_probabilities(model, images, scales, flip).argmax(1)
            confusion += confusion_matrix(pred, masks, num_classes, ignore_index)
    finally:
        model.train(was_training)
    out = scores(confusion.cpu())
    out["confusion"] = confusion.cpu()
    return out
