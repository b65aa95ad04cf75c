"""Label columns: for each example, which class labels its gradient is taken for, and with which weight.

The estimate of example n is Σ_j weight[n, j] · (∂ log p_{index[n, j]}(x_n) / ∂w)². Since
∂ log p_c / ∂z = e_c − p on the logits z, one backward of the cotangent √weight[n, j] (e_c − p_n) gives the
weighted gradient of column j: the engines square and sum those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from l2sp.errors import L2SPError

METHODS = ("exact", "mc", "empirical")


def class_weights(p: Tensor) -> Tensor:
    """w_c = p_c (1 − 2 p_c + Σ_k p_k²) = p_c ‖e_c − p‖²: predicts class c's share of the example's Fisher."""
    return p * (1 - 2 * p + (p * p).sum(-1, keepdim=True))


def _tiny(p: Tensor) -> float:
    return torch.finfo(p.dtype).tiny


def _tail_columns(
    p: Tensor, w: Tensor, top: Tensor, tail_samples: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """``tail_samples`` classes outside ``top`` drawn ∝ w (uniformly when the tail is empty), weighted p_c / (r q_c).

    The importance weight p_c / (r q_c) makes Σ_draws weight · g_c² unbiased for the tail sum Σ_{c ∉ top} p_c g_c².
    """
    K = p.shape[1]
    tail = w.scatter(1, top, 0.0)
    mass = tail.sum(-1, keepdim=True)
    has_tail = mass.squeeze(-1) > 0
    q = torch.where(has_tail[:, None], tail / mass.clamp_min(_tiny(p)), torch.full_like(tail, 1.0 / K))
    draw = torch.multinomial(q, tail_samples, replacement=True, generator=generator)
    qd = q.gather(1, draw)
    iw = torch.where(
        has_tail[:, None], p.gather(1, draw) / (tail_samples * qd.clamp_min(1e-300)), torch.zeros_like(qd)
    )
    return draw, iw


@dataclass(frozen=True)
class LabelSpec:
    """How labels are chosen per example: ``method`` (one of :data:`METHODS`) and its options."""

    method: str = "exact"
    samples: int = 1
    classes: int | None = None
    tail_samples: int = 1
    generator: torch.Generator | None = None

    def columns(self, p: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(class index (B, m), weight (B, m), predicted captured share (B,) or None) for probabilities p."""
        B, K = p.shape
        if self.method == "empirical":
            return y.view(B, 1), torch.ones(B, 1, dtype=p.dtype, device=p.device), None
        if self.method == "mc":
            idx = torch.multinomial(p, self.samples, replacement=True, generator=self.generator)
            return idx, torch.full((B, self.samples), 1.0 / self.samples, dtype=p.dtype, device=p.device), None
        if self.classes is None or self.classes >= K:
            return torch.arange(K, device=p.device).expand(B, K), p, None
        # the c classes of largest w_c = p_c ‖e_c − p‖² exactly, the rest importance-sampled
        w = class_weights(p).clamp_min(0)
        top = w.topk(self.classes, dim=-1).indices
        total = w.sum(-1)
        kept = w.gather(1, top).sum(-1)
        share = torch.where(total > 0, kept / total.clamp_min(_tiny(p)), torch.ones_like(total))
        if self.tail_samples <= 0:
            return top, p.gather(1, top), share
        draw, iw = _tail_columns(p, w, top, self.tail_samples, self.generator)
        return torch.cat([top, draw], 1), torch.cat([p.gather(1, top), iw], 1), share

    def cotangents(
        self, logits: Tensor, y: Tensor | None, batch_index: int, dtype: torch.dtype
    ) -> tuple[Cotangents, Tensor | None]:
        """Cotangents √w_j (e_{c_j} − p) on the logits, and the predicted captured share (or None)."""
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise L2SPError(
                "the model must return logits of shape (batch, classes); wrap it to select its output"
            )
        z = logits.detach().to(dtype)
        if not torch.isfinite(z).all():
            raise L2SPError(
                f"the model produced NaN/Inf logits on batch {batch_index}; check that batch's inputs "
                "and the model's weights"
            )
        p = torch.softmax(z, -1)
        if y is not None and self.method == "empirical":
            y = _check_labels(y, p.shape, batch_index)
        idx, w, share = self.columns(p, y)
        return Cotangents(idx, w.clamp_min(0).sqrt(), p), share


def _check_labels(y: Tensor, shape: torch.Size, batch_index: int) -> Tensor:
    """``y`` as a flat long tensor of B class indices in [0, K), else L2SPError."""
    B, K = shape
    y = y.long().view(-1)
    if y.numel() != B or bool(((y < 0) | (y >= K)).any()):
        raise L2SPError(
            f"labels of batch {batch_index} are not class indices in [0, {K}); "
            "pass integer labels of the source task"
        )
    return y


class Cotangents:
    """Cotangents √w_j (e_{c_j} − p) on the logits, built per label column (never all m·B·K at once)."""

    def __init__(self, idx: Tensor, sw: Tensor, p: Tensor):
        self.idx, self.sw, self.p = idx, sw, p
        self.columns = idx.shape[1]

    def column(self, j: int) -> Tensor:
        """(B, K) for column j."""
        c = self.p * -self.sw[:, j : j + 1]
        return c.scatter_add_(1, self.idx[:, j : j + 1], self.sw[:, j : j + 1])

    def rows(self, start: int, stop: int) -> Tensor:
        """(b, m, K) for examples start..stop, every column."""
        sw, idx = self.sw[start:stop], self.idx[start:stop]
        c = self.p[start:stop, None, :] * -sw[..., None]
        return c.scatter_add_(2, idx[..., None], sw[..., None])
