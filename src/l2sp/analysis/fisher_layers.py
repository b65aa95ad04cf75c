"""The diagonal Fisher information grouped by layer (the paper's Figure 5)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from l2sp.errors import L2SPError


def fisher_by_layer(
    fisher: Mapping[str, torch.Tensor], *, layers: Sequence[str] | None = None, weights_only: bool = True
) -> dict[str, torch.Tensor]:
    """``{layer: flat tensor of F_j}`` for the parameters of each layer, in the order of ``fisher``.

    ``layers``: module-name prefixes (e.g. ``default_layers(model)``); default: the module owning each
    tensor (``"layer1.0.conv1.weight"`` -> ``"layer1.0.conv1"``). ``weights_only`` keeps tensors of
    ≥ 2 dims (conv and linear kernels), as the figure does; biases and normalization scales are left out.
    """
    items = [(k, v) for k, v in fisher.items() if not weights_only or v.dim() >= 2]
    if not items:
        raise L2SPError(
            "the Fisher dictionary holds no tensor of >= 2 dims; pass weights_only=False "
            "or a Fisher estimated for the whole model"
        )
    bad = [k for k, v in items if (v < 0).any()]
    if bad:
        raise L2SPError(
            f"Fisher entries must be >= 0, but {bad[0]!r} has negative values; "
            "pass a diagonal Fisher (l2sp.fisher.estimate)"
        )
    groups: dict[str, list[torch.Tensor]] = {}
    if layers is None:
        for k, v in items:
            groups.setdefault(k.rpartition(".")[0] or k, []).append(v.detach().flatten())
    else:
        for layer in layers:
            members = [v.detach().flatten() for k, v in items if k == layer or k.startswith(layer + ".")]
            if not members:
                raise L2SPError(
                    f"the Fisher has no entry under layer {layer!r}; its layers: "
                    f"{', '.join(dict.fromkeys(k.rpartition('.')[0] for k, _ in items))}"
                )
            groups[layer] = members
    return {k: torch.cat(v) for k, v in groups.items()}


def fisher_summary(by_layer: Mapping[str, torch.Tensor]) -> list[dict]:
    """Rows (layer, n, median, q1, q3, mean, max) of the per-layer Fisher values (quantiles in float64)."""
    rows = []
    for layer, v in by_layer.items():
        v = v.detach().cpu().to(torch.float64)
        q = np.quantile(v.numpy(), [0.25, 0.5, 0.75])
        rows.append(
            {
                "layer": layer,
                "n": int(v.numel()),
                "median": float(q[1]),
                "q1": float(q[0]),
                "q3": float(q[2]),
                "mean": float(v.mean()),
                "max": float(v.max()),
            }
        )
    return rows
