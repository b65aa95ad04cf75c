"""Per-tensor statistics of a Fisher dictionary (for the per-layer box plots and tables)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def summary(
    fisher: Mapping[str, Tensor], quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)
) -> list[dict[str, Any]]:
    """Per tensor: name, shape, numel, mean, min, max and the given quantiles ("q0.25", ...) of its values."""
    import numpy as np

    rows = []
    for n, t in fisher.items():
        v = t.detach().to("cpu", torch.float64).reshape(-1).numpy()
        row: dict[str, Any] = {"name": n, "shape": list(t.shape), "numel": int(v.size)}
        if v.size:
            row.update(mean=float(v.mean()), min=float(v.min()), max=float(v.max()))
            qs = np.quantile(v, list(quantiles))
            row.update({f"q{q:g}": float(x) for q, x in zip(quantiles, qs)})
        rows.append(row)
    return rows
