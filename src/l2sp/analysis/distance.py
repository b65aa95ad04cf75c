"""How far fine-tuning moved the parameters from the starting point: ‖w − w0‖ / ‖w0‖ per tensor and layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from l2sp.errors import L2SPError
from l2sp.reference import strip_prefix


def _pairs(model: nn.Module, w0: Mapping[str, torch.Tensor]) -> tuple[list[str], list, list]:
    """Parameters of ``model`` present in ``w0`` under the same (unwrapped) name and shape."""
    ref = {strip_prefix(k): v for k, v in w0.items()}
    names, ws, w0s = [], [], []
    for name, p in model.named_parameters():
        key = strip_prefix(name)
        if key in ref and ref[key].shape == p.shape:
            names.append(key)
            ws.append(p.detach())
            w0s.append(ref[key].detach().to(device=p.device, dtype=p.dtype))
    if not names:
        raise L2SPError(
            "no parameter of the model matches w0 by name and shape; pass the source state dict "
            "(l2sp.snapshot(source_model)) the model was fine-tuned from"
        )
    return names, ws, w0s


def _squared_norms(
    model: nn.Module, w0: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[float], list[float]]:
    """Per shared tensor: ‖w − w0‖² and ‖w0‖² (norms accumulated in float64, multi-tensor kernels)."""
    names, ws, w0s = _pairs(model, w0)
    diff = torch._foreach_sub(ws, w0s)
    d2 = torch.stack(torch._foreach_norm(diff, 2, dtype=torch.float64)).pow(2).tolist()
    r2 = torch.stack(torch._foreach_norm(w0s, 2, dtype=torch.float64)).pow(2).tolist()
    return names, d2, r2


def _ratio(d2: float, r2: float) -> float:
    if r2 > 0:
        return (d2 / r2) ** 0.5
    return 0.0 if d2 == 0 else float("inf")


def parameter_distance(model: nn.Module, w0: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``{name: ‖w − w0‖₂ / ‖w0‖₂}`` for every parameter shared with ``w0`` (inf when w0 = 0 ≠ w)."""
    names, d2, r2 = _squared_norms(model, w0)
    return {n: _ratio(a, b) for n, a, b in zip(names, d2, r2)}


def layer_distance(
    model: nn.Module, w0: Mapping[str, torch.Tensor], layers: Sequence[str] | None = None
) -> dict[str, float]:
    """Relative distance per layer: sqrt(Σ‖w_j − w0_j‖²) / sqrt(Σ‖w0_j‖²) over the layer's shared tensors.

    ``layers``: module names (prefixes, e.g. ``["conv1", "layer1.0"]`` from ``default_layers``); every
    shared tensor under one of them counts toward it. Default: one entry per module owning parameters.
    """
    names, d2, r2 = _squared_norms(model, w0)
    groups: dict[str, list[float]] = {}
    if layers is None:
        for n, a, b in zip(names, d2, r2):
            g = groups.setdefault(n.rpartition(".")[0] or n, [0.0, 0.0])
            g[0] += a
            g[1] += b
    else:
        for layer in layers:
            members = [(a, b) for n, a, b in zip(names, d2, r2) if n == layer or n.startswith(layer + ".")]
            if not members:
                raise L2SPError(
                    f"layer {layer!r} holds no parameter shared with w0; shared parameters: "
                    f"{', '.join(names[:40])}{', ...' if len(names) > 40 else ''}"
                )
            groups[layer] = [sum(a for a, _ in members), sum(b for _, b in members)]
    return {k: _ratio(a, b) for k, (a, b) in groups.items()}
