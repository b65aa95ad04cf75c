"""The six penalties of the paper on the shared set S (the β/2‖w_S̄‖² term is the regularizer's).

With d = w − w0 on S (d = w for ``l2``, whose reference is 0), F the diagonal Fisher, g a group
(the fan-in of one output channel) and s_g = √p_g:

    l2            Ω_S = α/2 ‖w_S‖²                      (1)
    l2-sp         Ω_S = α/2 ‖d‖²                        (2), (3)
    l2-sp-fisher  Ω_S = α/2 Σ_j F_j d_j²                (4)
    l1-sp         Ω_S = α Σ_j |d_j|                     (5)
    gl-sp         Ω_S = α Σ_g s_g ‖d_g‖₂                (6)
    gl-sp-fisher  Ω_S = α Σ_g s_g (Σ_{j∈g} F_j d_j²)^½  (7)

L1-SP and GL-SP are smoothed as in the authors' code: √(d² + ε) in place of |d| and √(‖d_g‖² + ε) in place of
‖d_g‖. Every computation is a handful of multi-tensor (``torch._foreach_*``) kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from l2sp.penalties.base import Block, Penalty, register_penalty


def _sq_norm(d: list[Tensor], acc: torch.dtype) -> Tensor:
    """Σ ‖d_i‖², each norm reduced in ``acc``."""
    return torch.stack(torch._foreach_norm(d, 2, dtype=acc)).square().sum()


@register_penalty("l2")
class L2(Penalty):
    """Ω_S = α/2 ‖w_S‖² (weight decay toward 0), eq. (1)."""

    label, formula = "L2", "α/2‖w‖²"
    needs_w0, has_prox = False, True

    def value(self, b: Block, acc: torch.dtype, exact: bool) -> Tensor:
        return self.alpha / 2 * _sq_norm(b.diff(), acc)

    def add_grad_(self, b: Block, out: list[Tensor], scale: float) -> None:
        torch._foreach_add_(out, b.shared, alpha=self.alpha * scale)

    def prox_(self, b: Block, lr: float) -> None:  # w / (1 + lr α)
        torch._foreach_mul_(b.shared, 1.0 / (1.0 + lr * self.alpha))


@register_penalty("l2-sp")
class L2SP(Penalty):
    """Ω_S = α/2 ‖w_S − w0_S‖², eqs. (2), (3)."""

    label, formula = "L2-SP", "α/2‖w−w0‖²"
    has_prox = True

    def value(self, b: Block, acc: torch.dtype, exact: bool) -> Tensor:
        return self.alpha / 2 * _sq_norm(b.diff(), acc)

    def add_grad_(self, b: Block, out: list[Tensor], scale: float) -> None:
        a = self.alpha * scale  # α(w − w0) as two passes, no temporary
        torch._foreach_add_(out, b.shared, alpha=a)
        torch._foreach_add_(out, b.ref, alpha=-a)

    def prox_(self, b: Block, lr: float) -> None:  # w0 + (w − w0) / (1 + t)
        t = lr * self.alpha
        torch._foreach_lerp_(b.shared, b.ref, t / (1.0 + t))


@register_penalty("l2-sp-fisher")
class L2SPFisher(Penalty):
    """Ω_S = α/2 Σ_j F_j (w_j − w0_j)², eq. (4)."""

    label, formula = "L2-SP-Fisher", "α/2 ΣF(w−w0)²"
    needs_fisher, has_prox = True, True

    def value(self, b: Block, acc: torch.dtype, exact: bool) -> Tensor:
        d = b.diff()
        sq = torch._foreach_mul(torch._foreach_mul(d, d), b.fisher)
        return self.alpha / 2 * torch.stack(torch._foreach_norm(sq, 1, dtype=acc)).sum()

    def add_grad_(self, b: Block, out: list[Tensor], scale: float) -> None:
        a = self.alpha * scale  # αF(w − w0)
        torch._foreach_addcmul_(out, b.fisher, b.shared, value=a)
        torch._foreach_addcmul_(out, b.fisher, b.ref, value=-a)

    def prox_(self, b: Block, lr: float) -> None:  # w0 + (w − w0) / (1 + tF)
        tf = torch._foreach_mul(b.fisher, lr * self.alpha)
        weight = torch._foreach_div(tf, torch._foreach_add(tf, 1.0))
        torch._foreach_lerp_(b.shared, b.ref, weight)


@register_penalty("l1-sp")
class L1SP(Penalty):
    """Ω_S = α Σ_j |w_j − w0_j| (smoothed: √(d² + ε)), eq. (5)."""

    label, formula = "L1-SP", "α‖w−w0‖₁"
    smoothed, has_prox = True, True

    def value(self, b: Block, acc: torch.dtype, exact: bool) -> Tensor:
        d = b.diff()
        if exact:
            s = torch._foreach_norm(d, 1, dtype=acc)
        else:
            sq = torch._foreach_add(torch._foreach_mul(d, d), self.eps)
            s = torch._foreach_norm(torch._foreach_sqrt(sq), 1, dtype=acc)
        return self.alpha * torch.stack(s).sum()

    def add_grad_(self, b: Block, out: list[Tensor], scale: float) -> None:  # α d / √(d² + ε)
        _, d = b.diff_into("d")
        _, den = b.work("t")
        torch._foreach_copy_(den, d)
        torch._foreach_mul_(den, d)
        torch._foreach_add_(den, self.eps)
        torch._foreach_sqrt_(den)
        torch._foreach_clamp_min_(den, torch.finfo(den[0].dtype).tiny)
        torch._foreach_addcdiv_(out, d, den, value=self.alpha * scale)

    def prox_(self, b: Block, lr: float) -> None:  # w0 + sign(d)·max(|d| − t, 0) = w − clamp(d, −t, t)
        t = lr * self.alpha
        _, d = b.diff_into("d")
        torch._foreach_clamp_min_(d, -t)
        torch._foreach_clamp_max_(d, t)
        torch._foreach_sub_(b.shared, d)


@register_penalty("gl-sp")
class GLSP(Penalty):
    """Ω_S = α Σ_g s_g ‖w_g − w0_g‖₂ (smoothed: √(‖d_g‖² + ε)), eq. (6)."""

    label, formula = "GL-SP", "α Σ_g s_g‖w_g−w0_g‖"
    grouped, smoothed, has_prox = True, True, True

    def value(self, b: Block, acc: torch.dtype, exact: bool) -> Tensor:
        d = b.diff()
        sq = torch._foreach_mul(d, d)
        if b.fisher is not None:
            sq = torch._foreach_mul(sq, b.fisher)
        g = b.group_sq_norms(sq).to(acc)
        norms = g.sqrt() if exact else (g + self.eps).sqrt()
        return self.alpha * (b.group_scale.to(acc) * norms).sum()

    def add_grad_(self, b: Block, out: list[Tensor], scale: float) -> None:  # α s_g (F) d / √(Σ_g (F) d² + ε)
        _, d = b.diff_into("d")
        flat, t = b.work("t")
        torch._foreach_copy_(t, d)
        torch._foreach_mul_(t, d)
        if b.fisher is not None:
            torch._foreach_mul_(t, b.fisher)
        g = b.group_sums(flat, t)
        coef = self.alpha * scale * b.group_scale.to(g.dtype) / (g + self.eps).sqrt().clamp_min(
            torch.finfo(g.dtype).tiny)
        if b.fisher is not None:  # the gradient direction is F·d: reuse the buffer
            torch._foreach_copy_(t, d)
            torch._foreach_mul_(t, b.fisher)
            d = t
        torch._foreach_addcmul_(out, d, b.per_tensor(coef.to(d[0].dtype)))

    def prox_(self, b: Block, lr: float) -> None:  # w0 + d·max(0, 1 − t s_g/‖d_g‖) = w − d·min(1, t s_g/‖d_g‖)
        t = lr * self.alpha
        _, d = b.diff_into("d")
        flat, sq = b.work("t")
        torch._foreach_copy_(sq, d)
        torch._foreach_mul_(sq, d)
        norms = b.group_sums(flat, sq).sqrt()
        ratio = (t * b.group_scale.to(norms.dtype) / norms).clamp(max=1.0)
        shrink = torch.where(norms > 0, ratio, torch.zeros_like(norms))
        torch._foreach_addcmul_(b.shared, d, b.per_tensor(shrink.to(d[0].dtype)), value=-1.0)


@register_penalty("gl-sp-fisher")
class GLSPFisher(GLSP):
    """Ω_S = α Σ_g s_g (Σ_{j∈g} F_j (w_j − w0_j)²)^½ (smoothed), eq. (7). No closed-form prox."""

    label, formula = "GL-SP-Fisher", "α Σ_g s_g‖w_g−w0_g‖_F"
    needs_fisher, has_prox = True, False
    prox_ = Penalty.prox_
