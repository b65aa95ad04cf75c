"""Layer-wise R² between fine-tuned and pre-trained activations (the paper's Figure 4), streamed.

For a unit (channel) u of a layer, with x its pre-trained activations and y its fine-tuned activations on
the same inputs (every image and spatial position is one sample), the least-squares fit y ≈ a·x + b has

    R² = 1 − SS_res / SS_tot = C_xy² / (M2_x · M2_y)        (the squared Pearson correlation)

with M2_x = Σ(x − x̄)², M2_y = Σ(y − ȳ)², C_xy = Σ(x − x̄)(y − ȳ). These are accumulated per unit in
float64 and merged batch by batch (Chan et al.), so memory does not grow with the number of images.
A unit that is constant in either network (a dead ReLU channel) has no defined R²: NaN.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from l2sp.analysis.layers import check_layers, default_layers
from l2sp.errors import L2SPError


class StreamingR2:
    """Per-unit streaming statistics of pairs (x, y) of shape (units, samples); ``compute()`` gives R²."""

    def __init__(self) -> None:
        self.n = 0
        self.mean_x: torch.Tensor | None = None
        self.mean_y: torch.Tensor | None = None
        self.m2_x: torch.Tensor | None = None
        self.m2_y: torch.Tensor | None = None
        self.c_xy: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor, *, unit_dim: int = 0) -> None:
        """Add samples: pre-trained ``x`` and fine-tuned ``y`` activations of the same shape; units along
        ``unit_dim``, every other index a sample (e.g. (units, samples), or (B, C, H, W) with unit_dim=1)."""
        if x.shape != y.shape or x.dim() < 2:
            raise L2SPError(
                f"activations differ in shape ({tuple(x.shape)} vs {tuple(y.shape)}); "
                "the two models must share the analysed layers"
            )
        units = x.shape[unit_dim]
        if self.mean_x is not None and units != self.mean_x.shape[0]:
            raise L2SPError(f"got {units} units after {self.mean_x.shape[0]}; feed one layer per object")
        nb = x.numel() // units if units else 0
        if nb == 0:
            return
        dims = tuple(d for d in range(x.dim()) if d != unit_dim % x.dim())
        x = x.detach().to(torch.float64)
        y = y.detach().to(torch.float64)
        var_x, bx = torch.var_mean(x, dims, correction=0, keepdim=True)
        var_y, by = torch.var_mean(y, dims, correction=0, keepdim=True)
        b_cxy = ((x - bx) * (y - by)).sum(dims)
        b_m2x, b_m2y, bx, by = var_x.flatten() * nb, var_y.flatten() * nb, bx.flatten(), by.flatten()
        if self.mean_x is None:
            self.n, self.mean_x, self.mean_y = nb, bx, by
            self.m2_x, self.m2_y, self.c_xy = b_m2x, b_m2y, b_cxy
            return
        na, n = self.n, self.n + nb
        delta_x, delta_y = bx - self.mean_x, by - self.mean_y
        w = na * nb / n
        self.mean_x = self.mean_x + delta_x * (nb / n)
        self.mean_y = self.mean_y + delta_y * (nb / n)
        self.m2_x = self.m2_x + b_m2x + delta_x * delta_x * w
        self.m2_y = self.m2_y + b_m2y + delta_y * delta_y * w
        self.c_xy = self.c_xy + b_cxy + delta_x * delta_y * w
        self.n = n

    def compute(self) -> torch.Tensor:
        """R² per unit (float64); NaN for units constant in either model."""
        if self.mean_x is None or self.n < 2:
            raise L2SPError("R² needs at least two samples per unit; pass more images")
        denom = self.m2_x * self.m2_y
        r2 = self.c_xy * self.c_xy / denom
        return torch.where(denom > 0, r2.clamp(max=1.0), torch.full_like(r2, float("nan")))


def _activation(act: torch.Tensor) -> torch.Tensor:
    """A hooked output (B, C, *spatial): each image and spatial position is one sample of unit c."""
    if not isinstance(act, torch.Tensor):
        raise L2SPError(f"a hooked layer returned {type(act).__name__}, not a tensor; pick another layer")
    if act.dim() < 2:
        raise L2SPError(
            f"a hooked layer returned a {act.dim()}-D tensor; pick a layer with (batch, units, ...)"
        )
    return act


def _inputs(batch) -> torch.Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(x, dict) or not isinstance(x, torch.Tensor):
        raise L2SPError("loader items must be tensors or (inputs, targets) pairs")
    return x.flatten(0, 1) if x.dim() == 5 else x  # 10-crop batches: every crop is an image


def _same_shapes(a: nn.Module, b: nn.Module, name: str) -> bool:
    ma, mb = a.get_submodule(name), b.get_submodule(name)
    return {k: v.shape for k, v in ma.state_dict().items()} == {
        k: v.shape for k, v in mb.state_dict().items()
    }


def _check_same_shapes(a: nn.Module, b: nn.Module, layers: Sequence[str]) -> None:
    """Each analysed layer must hold tensors of the same names and shapes in both models."""
    for name in layers:
        if not _same_shapes(a, b, name):
            raise L2SPError(
                f"layer {name!r} differs between the fine-tuned and pre-trained models; the two "
                "models must share the analysed layers (pass the source model and leave out the head)"
            )


@torch.no_grad()
def layerwise_r2(
    finetuned: nn.Module,
    pretrained: nn.Module,
    loader: Iterable,
    layers: Sequence[str] | None = None,
    *,
    device: str | torch.device | None = None,
    max_images: int | None = None,
    channel_dim: int = 1,
) -> dict[str, torch.Tensor]:
    """R² of every unit of each layer: fine-tuned activations regressed on pre-trained ones.

    ``layers`` defaults to :func:`default_layers` (first conv and every residual block for ResNets), less
    the layers whose shapes differ between the two models (the new head);
    both models are run in eval mode on the loader's inputs (items ``x`` or ``(x, y)``; 5-D ``x``
    holds crops, all used). Returns ``{layer: tensor of R² per unit}`` (float64, NaN for constant units).
    """
    if layers is None:  # the defaults, less any layer replaced for the target task (the head)
        names = dict(pretrained.named_modules())
        layers = [
            n for n in default_layers(finetuned) if n in names and _same_shapes(finetuned, pretrained, n)
        ]
    check_layers(finetuned, layers, what="the fine-tuned model")
    check_layers(pretrained, layers, what="the pre-trained model")
    _check_same_shapes(finetuned, pretrained, layers)
    if device is None:
        device = next(finetuned.parameters(), torch.empty(0)).device
    stats = {name: StreamingR2() for name in layers}
    cache: dict[str, torch.Tensor] = {}
    phase = {"now": ""}  # which model is running, so that one model may be compared with itself

    def keep(name):
        def hook(_m, _i, out):
            if phase["now"] == "pretrained":
                cache[name] = _activation(out).detach().to(torch.float64, copy=True)  # safe from in-place ops

        return hook

    def accumulate(name):
        def hook(_m, _i, out):
            if phase["now"] == "finetuned":
                stats[name].update(cache.pop(name), _activation(out), unit_dim=channel_dim)

        return hook

    modes = (finetuned.training, pretrained.training)
    ft_modules, pt_modules = dict(finetuned.named_modules()), dict(pretrained.named_modules())
    handles = [pt_modules[n].register_forward_hook(keep(n)) for n in layers]
    handles += [ft_modules[n].register_forward_hook(accumulate(n)) for n in layers]
    seen = 0
    try:
        finetuned.eval()
        pretrained.eval()
        for batch in loader:
            x = _inputs(batch)
            if max_images is not None:
                x = x[: max_images - seen]
            if x.shape[0] == 0:
                break
            x = x.to(device)
            phase["now"] = "pretrained"
            pretrained(x)
            phase["now"] = "finetuned"
            finetuned(x)
            seen += x.shape[0]
            if max_images is not None and seen >= max_images:
                break
    finally:
        for h in handles:
            h.remove()
        finetuned.train(modes[0])
        pretrained.train(modes[1])
    if seen == 0:
        raise L2SPError("the loader yielded no images; pass a non-empty loader")
    return {name: s.compute().cpu() for name, s in stats.items()}


def r2_summary(r2: dict[str, torch.Tensor]) -> list[dict]:
    """Rows (layer, units, defined, median, q1, q3, mean) of a :func:`layerwise_r2` result, NaNs ignored."""
    rows = []
    for layer, values in r2.items():
        v = values[~torch.isnan(values)].to(torch.float64)
        q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)) if v.numel() else None
        rows.append(
            {
                "layer": layer,
                "units": int(values.numel()),
                "defined": int(v.numel()),
                "median": float(q[1]) if q is not None else float("nan"),
                "q1": float(q[0]) if q is not None else float("nan"),
                "q3": float(q[2]) if q is not None else float("nan"),
                "mean": float(v.mean()) if v.numel() else float("nan"),
            }
        )
    return rows
