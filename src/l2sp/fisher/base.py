"""What the per-example gradient engines share: their failure signal and the autocast context."""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from torch import Tensor

from l2sp.fisher.columns import Cotangents


class Unsupported(Exception):
    """The hooks engine cannot handle this model or this forward pass (the estimator falls back to func)."""


class Engine(Protocol):
    """Per-example gradient engine: ``forward`` gives the logits, ``accumulate`` adds Σ_j Σ_n g_{n,j}²."""

    def forward(self, x: Tensor) -> Tensor: ...

    def accumulate(self, x: Tensor, logits: Tensor, cot: Cotangents) -> None: ...


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
