"""Top-1 and per-class accuracy, centre crop (N×C×H×W batches) or 10-crop (N×10×C×H×W batches).

10-crop: p(y|x) = (1/10) Σ_c softmax(f(crop_c(x))), prediction argmax_y p(y|x).
Per-class accuracy a_k = #{correct, label k} / #{label k}; the mean per-class accuracy averages a_k over
the classes present in the split.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.data import DataLoader


def amp_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities; a 5-D batch is a batch of crops whose softmax outputs are averaged."""
    if x.dim() == 5:
        n, c = x.shape[:2]
        return model(x.flatten(0, 1)).float().softmax(-1).view(n, c, -1).mean(1)
    return model(x).float().softmax(-1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str,
    num_classes: int,
    *,
    amp: str = "none",
    channels_last: bool = False,
) -> dict:
    """{"top1", "mean_per_class", "per_class" (list), "n", "nll"} on ``loader`` (model put in eval mode,
    then restored)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = torch.zeros(num_classes, dtype=torch.long, device=device)
    count = torch.zeros(num_classes, dtype=torch.long, device=device)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.as_tensor(y).to(device, non_blocking=True)
            with amp_context(device, amp):
                p = predict(model, x)
            nll += -torch.log(p.gather(1, y[:, None]).clamp_min(1e-12)).sum().double()
            count += torch.bincount(y, minlength=num_classes)
            correct += torch.bincount(y[p.argmax(1) == y], minlength=num_classes)
    finally:
        model.train(was_training)
    n = int(count.sum())
    present = count > 0
    per_class = correct.double() / count.clamp_min(1).double()
    per_class[~present] = float("nan")
    return {
        "top1": float(correct.sum()) / max(n, 1),
        "mean_per_class": float(per_class[present].mean()) if n else float("nan"),
        "per_class": [float(a) for a in per_class.cpu()],
        "n": n,
        "nll": float(nll) / max(n, 1),
    }
