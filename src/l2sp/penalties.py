"""The six penalties of the paper, on the shared set S (coefficient α) and the novel set S̄ (coefficient β).

With d = w − w0 on S (d = w for ``l2``, whose reference is 0), F the diagonal Fisher, g a group
(the fan-in of one output channel) and s_g = √p_g:

    l2            Ω = α/2 ‖w_S‖²                      + β/2 ‖w_S̄‖²     (1)
    l2-sp         Ω = α/2 ‖d‖²                        + β/2 ‖w_S̄‖²     (2), (3)
    l2-sp-fisher  Ω = α/2 Σ_j F_j d_j²                + β/2 ‖w_S̄‖²     (4)
    l1-sp         Ω = α Σ_j |d_j|                     + β/2 ‖w_S̄‖²     (5)
    gl-sp         Ω = α Σ_g s_g ‖d_g‖₂                + β/2 ‖w_S̄‖²     (6)
    gl-sp-fisher  Ω = α Σ_g s_g (Σ_{j∈g} F_j d_j²)^½  + β/2 ‖w_S̄‖²     (7)

L1-SP and GL-SP are not differentiable at w0, where fine-tuning starts. As in the authors' code, ``reg()`` and
``add_grad_()`` use the smoothed penalty, √(d² + ε) in place of |d| and √(‖d_g‖² + ε) in place of ‖d_g‖
(ε = 1e-16 by default, so the value is within α·(number of terms)·√ε of the exact one); ``reg.exact()`` is
the unsmoothed value, and ``mode="proximal"`` uses the exact proximal operators instead.

Every per-step computation is a handful of multi-tensor (``torch._foreach_*``) kernels, whatever the number
of parameter tensors. Memory: one copy of w_S (plus F for the Fisher kinds); the L1/GL kinds also keep two
work buffers of the size of S, reused at every step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from l2sp.errors import L2SPError
from l2sp.reference import Include, Source, load_source, partition, strip_prefix

KINDS = ("l2", "l2-sp", "l2-sp-fisher", "l1-sp", "gl-sp", "gl-sp-fisher")
PROXIMAL_KINDS = ("l2", "l2-sp", "l2-sp-fisher", "l1-sp", "gl-sp")
Mode = Literal["coupled", "decoupled", "proximal"]
Fisher = Mapping[str, Tensor] | str | os.PathLike


def _check_coefficient(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise L2SPError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < 0:
        raise L2SPError(f"{name} must be finite and >= 0, got {value}")
    return value


def _buffer_name(name: str) -> str:
    return name.replace(".", "/")


@dataclass
class _Block:
    """Aligned tensor lists for one set of parameters (all of S and S̄, or those of one optimizer group)."""

    shared: list[Tensor]            # parameters of S
    ref: list[Tensor] | None        # w0 for S (None: reference 0)
    fisher: list[Tensor] | None     # F for S (Fisher kinds)
    group_len: Tensor | None        # GL kinds: size p_g of every group, in order (G,)
    group_scale: Tensor | None      # GL kinds: s_g (G,)
    rows: list[int]                 # GL kinds: number of groups in each tensor of S
    row_shapes: list[tuple[int, ...]]  # GL kinds: shape that broadcasts a per-group value over a tensor
    novel: list[Tensor]             # parameters of S̄
    scratch: dict = field(default_factory=dict)  # L1/GL kinds: reused work buffers (see _work)


def _grads(params: list[Tensor]) -> list[Tensor]:
    """The ``.grad`` of each parameter, allocating zeros where missing."""
    grads = [p.grad for p in params]
    if any(g is None for g in grads):
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
    return grads


class Regularizer(nn.Module):
    """Ω(w) of one of the six kinds, bound to a model's parameters. Build it with :func:`regularizer`.

    ``reg()`` is Ω(w) (differentiable); ``reg.add_grad_()`` adds ∇Ω to the gradients in place;
    ``reg.attach(optimizer)`` does that before every optimizer step. w0 and F are buffers, so ``.to()`` and
    ``state_dict()`` work; the model's parameters are referenced, not owned.
    """

    def __init__(self, kind: str, model: nn.Module, source: Source | None = None, *, alpha: float,
                 beta: float, fisher: Fisher | None = None, include: Include = "all", eps: float = 1e-16):
        super().__init__()
        if kind not in KINDS:
            raise L2SPError(f"unknown regularizer kind {kind!r}; choose one of {', '.join(KINDS)}")
        self.kind = kind
        self.alpha = _check_coefficient("alpha", alpha)
        self.beta = _check_coefficient("beta", beta)
        self.eps = _check_coefficient("eps", eps)
        self.include = include
        if source is None and kind != "l2":
            raise L2SPError(f"kind {kind!r} needs the pre-trained weights: pass source=l2sp.snapshot(model) "
                            "taken before replacing the head, or a checkpoint path")
        part = partition(model, None if source is None else load_source(source), include)
        self.shared = [n for n, _, _ in part.shared]
        self.novel = [n for n, _ in part.novel]
        self.free = [n for n, _ in part.free]
        self._shared_params = [p for _, p, _ in part.shared]
        self._novel_params = [p for _, p in part.novel]
        self._free_params = [p for _, p in part.free]
        self._has_ref = source is not None and kind != "l2"
        self._is_fisher = kind.endswith("fisher")
        self._is_group = kind.startswith("gl")

        self.w0 = nn.Module()
        if self._has_ref:
            for name, p, ref in part.shared:
                self.w0.register_buffer(_buffer_name(name), ref.detach().to(p.device, p.dtype, copy=True))
        self.fisher = nn.Module()
        if self._is_fisher:
            self._load_fisher(fisher, part.shared)
        elif fisher is not None:
            raise L2SPError(f"fisher= is only used by the -fisher kinds, not by {kind!r}; drop it or pick "
                            "'l2-sp-fisher' / 'gl-sp-fisher'")

        rows, lengths, scales, shapes = [], [], [], []
        for p in self._shared_params:
            if p.dim() >= 2:
                r, size = p.shape[0], p[0].numel()
                shape = (r,) + (1,) * (p.dim() - 1)
            else:  # a vector: one group per element
                r, size, shape = p.numel(), 1, tuple(p.shape)
            rows.append(r)
            shapes.append(shape)
            lengths.append(torch.full((r,), size, dtype=torch.long))
            scales.append(torch.full((r,), math.sqrt(size), dtype=torch.float64))
        self._rows, self._row_shapes = rows, shapes
        if self._is_group and self._shared_params:
            self.register_buffer("group_len", torch.cat(lengths).to(self._shared_params[0].device), persistent=False)
            self.register_buffer("group_scale", torch.cat(scales).to(self._shared_params[0].device), persistent=False)
        else:
            self.group_len = self.group_scale = None
        self._version = 0
        self._block = self._make_block(range(len(self._shared_params)), range(len(self._novel_params)))

    # ------------------------------------------------------------------ set-up helpers
    def _load_fisher(self, fisher: Fisher | None, shared: list) -> None:
        if fisher is None:
            raise L2SPError(f"kind {self.kind!r} needs fisher= (a dict or file from l2sp.fisher.estimate/save)")
        if isinstance(fisher, str | os.PathLike):
            from l2sp import fisher as fisher_module

            fisher = fisher_module.load(fisher)
        table = {strip_prefix(k): v for k, v in fisher.items()}
        for name, p, _ in shared:
            f = table.get(strip_prefix(name))
            if f is None:
                raise L2SPError(f"the Fisher has no entry for shared parameter {strip_prefix(name)!r}; estimate it "
                                "on the source model of this architecture (l2sp.fisher.estimate)")
            if tuple(f.shape) != tuple(p.shape):
                raise L2SPError(f"the Fisher entry {strip_prefix(name)!r} has shape {tuple(f.shape)}, the parameter "
                                f"{tuple(p.shape)}: it was estimated for another architecture")
            f = f.detach().to(p.device, p.dtype, copy=True)
            if not torch.isfinite(f).all() or (f < 0).any():
                raise L2SPError(f"the Fisher entry {strip_prefix(name)!r} has negative or non-finite values; "
                                "re-estimate it")
            self.fisher.register_buffer(_buffer_name(name), f)

    def _make_block(self, shared_idx, novel_idx) -> _Block:
        shared_idx, novel_idx = list(shared_idx), list(novel_idx)
        refs = list(self.w0.buffers()) if self._has_ref else None
        fis = list(self.fisher.buffers()) if self._is_fisher else None
        group_len = group_scale = None
        if self._is_group and shared_idx:
            offsets = [0]
            for r in self._rows:
                offsets.append(offsets[-1] + r)
            sel = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in shared_idx]).to(self.group_len.device)
            group_len, group_scale = self.group_len[sel], self.group_scale[sel]
        return _Block(
            shared=[self._shared_params[i] for i in shared_idx],
            ref=None if refs is None else [refs[i] for i in shared_idx],
            fisher=None if fis is None else [fis[i] for i in shared_idx],
            group_len=group_len, group_scale=group_scale,
            rows=[self._rows[i] for i in shared_idx],
            row_shapes=[self._row_shapes[i] for i in shared_idx],
            novel=[self._novel_params[i] for i in novel_idx],
        )

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(): refresh the cached tensor lists
        super()._apply(fn, recurse)
        self._version += 1
        self._block = self._make_block(range(len(self._shared_params)), range(len(self._novel_params)))
        return self

    def _follow_model(self) -> None:
        """Move w0/F to the parameters' device if the model was moved after the regularizer was built."""
        ps = self._shared_params or self._novel_params
        refs = self._block.ref or self._block.fisher
        if ps and refs and refs[0].device != ps[0].device:
            self.to(ps[0].device)

    # ------------------------------------------------------------------ math shared by value and gradient
    def _diff(self, b: _Block) -> list[Tensor]:
        return torch._foreach_sub(b.shared, b.ref) if b.ref is not None else list(b.shared)

    def _work(self, b: _Block, slot: str) -> tuple[Tensor | None, list[Tensor]]:
        """A work buffer shaped like S, reused from step to step: (flat tensor, per-parameter views).

        The non-quadratic kinds need two temporaries of the size of S per step; allocating them afresh costs
        page faults on the CPU, and the flat layout lets the group sums skip a concatenation. A block whose
        parameters mix dtypes gets fresh tensors (flat None)."""
        if slot not in b.scratch:
            like = b.shared
            if len({t.dtype for t in like}) > 1 or len({t.device for t in like}) > 1:
                return None, [torch.empty_like(t) for t in like]
            flat = torch.empty(sum(t.numel() for t in like), dtype=like[0].dtype, device=like[0].device)
            views = [v.view(t.shape) for v, t in zip(torch.split(flat, [t.numel() for t in like]), like)]
            b.scratch[slot] = (flat, views)
        return b.scratch[slot]

    def _diff_into(self, b: _Block, slot: str) -> tuple[Tensor | None, list[Tensor]]:
        """d = w − w0 written into a work buffer."""
        flat, d = self._work(b, slot)
        torch._foreach_copy_(d, b.shared)
        if b.ref is not None:
            torch._foreach_sub_(d, b.ref)
        return flat, d

    def _group_sums(self, b: _Block, flat: Tensor | None, parts: list[Tensor]) -> Tensor:
        """Σ_{j∈g} of a work buffer, per group (no concatenation when the buffer is flat)."""
        if flat is None:
            return self._group_sq_norms(b, parts)
        return torch.segment_reduce(flat, "sum", lengths=b.group_len)

    def _group_sq_norms(self, b: _Block, weighted_sq: list[Tensor]) -> Tensor:
        """Σ_{j∈g} (F_j) d_j² for every group g, in order: one concatenation and one segment reduction."""
        flat = torch.cat([t.reshape(-1) for t in weighted_sq])
        return torch.segment_reduce(flat, "sum", lengths=b.group_len)

    def _per_tensor(self, b: _Block, per_group: Tensor) -> list[Tensor]:
        """Split a (G,) vector into views that broadcast over each tensor of S (one value per group)."""
        return [c.view(s) for c, s in zip(torch.split(per_group, b.rows), b.row_shapes)]

    def _acc_dtype(self) -> torch.dtype:
        ps = self._shared_params or self._novel_params
        return torch.float64 if ps and ps[0].dtype == torch.float64 else torch.float32

    def _norm_dtype(self, device: torch.device) -> torch.dtype:
        """Reductions accumulate in float64 on the CPU, whose float32 norm loses ~1e-4 on 10M-element tensors."""
        return torch.float64 if device.type == "cpu" else self._acc_dtype()

    def _value(self, b: _Block, eps: float | None) -> Tensor:
        """Ω on block b; eps=None gives the exact (unsmoothed) L1/GL value."""
        out_dtype = self._acc_dtype()
        device = (b.shared or b.novel)[0].device
        acc = self._norm_dtype(device)
        total = torch.zeros((), dtype=acc, device=device)
        if b.shared and self.alpha:
            d = self._diff(b)
            k = self.kind
            if k in ("l2", "l2-sp"):
                total = total + self.alpha / 2 * torch.stack(torch._foreach_norm(d, 2, dtype=acc)).square().sum()
            elif k == "l2-sp-fisher":
                sq = torch._foreach_mul(torch._foreach_mul(d, d), b.fisher)
                total = total + self.alpha / 2 * torch.stack(torch._foreach_norm(sq, 1, dtype=acc)).sum()
            elif k == "l1-sp":
                if eps is None:
                    s = torch._foreach_norm(d, 1, dtype=acc)
                else:
                    sq = torch._foreach_add(torch._foreach_mul(d, d), eps)
                    s = torch._foreach_norm(torch._foreach_sqrt(sq), 1, dtype=acc)
                total = total + self.alpha * torch.stack(s).sum()
            else:  # gl-sp, gl-sp-fisher
                sq = torch._foreach_mul(d, d)
                if b.fisher is not None:
                    sq = torch._foreach_mul(sq, b.fisher)
                g = self._group_sq_norms(b, sq).to(acc)
                norms = g.sqrt() if eps is None else (g + eps).sqrt()
                total = total + self.alpha * (b.group_scale.to(acc) * norms).sum()
        if b.novel and self.beta:
            total = total + self.beta / 2 * torch.stack(torch._foreach_norm(b.novel, 2, dtype=acc)).square().sum()
        return total.to(out_dtype)

    @torch.no_grad()
    def _add_scaled_grad(self, b: _Block, shared_out: list[Tensor], novel_out: list[Tensor], scale: float) -> None:
        """out += scale · ∇Ω(w) for block b, in place (smoothed gradient for L1/GL kinds)."""
        a, k = self.alpha * scale, self.kind
        if b.shared and self.alpha:
            if k == "l2":
                torch._foreach_add_(shared_out, b.shared, alpha=a)
            elif k == "l2-sp":  # α(w − w0) as two passes, no temporary
                torch._foreach_add_(shared_out, b.shared, alpha=a)
                torch._foreach_add_(shared_out, b.ref, alpha=-a)
            elif k == "l2-sp-fisher":  # αF(w − w0)
                torch._foreach_addcmul_(shared_out, b.fisher, b.shared, value=a)
                torch._foreach_addcmul_(shared_out, b.fisher, b.ref, value=-a)
            elif k == "l1-sp":  # α d / √(d² + ε)
                _, d = self._diff_into(b, "d")
                _, den = self._work(b, "t")
                torch._foreach_copy_(den, d)
                torch._foreach_mul_(den, d)
                torch._foreach_add_(den, self.eps)
                torch._foreach_sqrt_(den)
                torch._foreach_clamp_min_(den, torch.finfo(den[0].dtype).tiny)
                torch._foreach_addcdiv_(shared_out, d, den, value=a)
            else:  # α s_g (F) d / √(Σ_g (F) d² + ε)
                _, d = self._diff_into(b, "d")
                flat, t = self._work(b, "t")
                torch._foreach_copy_(t, d)
                torch._foreach_mul_(t, d)
                if b.fisher is not None:
                    torch._foreach_mul_(t, b.fisher)
                g = self._group_sums(b, flat, t)
                coef = a * b.group_scale.to(g.dtype) / (g + self.eps).sqrt().clamp_min(torch.finfo(g.dtype).tiny)
                if b.fisher is not None:  # the gradient direction is F·d: reuse the buffer
                    torch._foreach_copy_(t, d)
                    torch._foreach_mul_(t, b.fisher)
                    d = t
                torch._foreach_addcmul_(shared_out, d, self._per_tensor(b, coef.to(d[0].dtype)))
        if b.novel and self.beta:
            torch._foreach_add_(novel_out, b.novel, alpha=self.beta * scale)

    @torch.no_grad()
    def _prox(self, b: _Block, lr: float) -> None:
        """w ← argmin_u lr·Ω(u) + ½‖u − w‖², exactly (soft-thresholding toward w0 for L1-SP/GL-SP)."""
        t, k = lr * self.alpha, self.kind
        if b.shared and self.alpha:
            if k == "l2":
                torch._foreach_mul_(b.shared, 1.0 / (1.0 + t))
            elif k == "l2-sp":
                torch._foreach_lerp_(b.shared, b.ref, t / (1.0 + t))
            elif k == "l2-sp-fisher":
                tf = torch._foreach_mul(b.fisher, t)
                weight = torch._foreach_div(tf, torch._foreach_add(tf, 1.0))
                torch._foreach_lerp_(b.shared, b.ref, weight)
            elif k == "l1-sp":  # w0 + sign(d)·max(|d| − t, 0) = w − clamp(d, −t, t)
                _, d = self._diff_into(b, "d")
                torch._foreach_clamp_min_(d, -t)
                torch._foreach_clamp_max_(d, t)
                torch._foreach_sub_(b.shared, d)
            elif k == "gl-sp":  # w0 + d·max(0, 1 − t s_g/‖d_g‖) = w − d·min(1, t s_g/‖d_g‖)
                _, d = self._diff_into(b, "d")
                flat, sq = self._work(b, "t")
                torch._foreach_copy_(sq, d)
                torch._foreach_mul_(sq, d)
                norms = self._group_sums(b, flat, sq).sqrt()
                ratio = (t * b.group_scale.to(norms.dtype) / norms).clamp(max=1.0)
                shrink = torch.where(norms > 0, ratio, torch.zeros_like(norms))
                torch._foreach_addcmul_(b.shared, d, self._per_tensor(b, shrink.to(d[0].dtype)), value=-1.0)
            else:
                raise L2SPError(f"mode='proximal' has no closed form for {k!r}; use mode='coupled'")
        if b.novel and self.beta:
            torch._foreach_mul_(b.novel, 1.0 / (1.0 + lr * self.beta))

    # ------------------------------------------------------------------ public API
    def forward(self) -> Tensor:
        """Ω(w) as a differentiable scalar (float32, or float64 for float64 parameters); smoothed L1/GL."""
        self._follow_model()
        return self._value(self._block, None if self.kind not in ("l1-sp", "gl-sp", "gl-sp-fisher") else self.eps)

    @torch.no_grad()
    def exact(self) -> Tensor:
        """Ω(w) without smoothing (equals ``reg()`` for the quadratic kinds)."""
        self._follow_model()
        return self._value(self._block, None)

    @torch.no_grad()
    def add_grad_(self) -> None:
        """``p.grad += ∂Ω/∂p`` for every penalized parameter (missing gradients are allocated as zeros)."""
        self._follow_model()
        b = self._block
        self._add_scaled_grad(b, _grads(b.shared), _grads(b.novel), 1.0)

    def penalized_names(self) -> set[str]:
        """Names of the parameters this regularizer governs (S and S̄): give them no optimizer weight decay."""
        return set(self.shared) | set(self.novel)

    def attach(self, optimizer: torch.optim.Optimizer, mode: Mode = "coupled"):
        """Apply the penalty at every ``optimizer.step()``; returns a handle with ``.remove()``.

        - ``coupled``: adds ∇Ω to the gradients before the step: the trajectory of ``loss + reg()``
          (momentum and adaptive scaling included).
        - ``decoupled``: before the step, w ← w − lr·∇Ω(w) with each parameter group's lr (AdamW-style
          shrinkage toward w0, outside momentum and adaptive scaling).
        - ``proximal``: after the step, w ← prox_{lr·Ω}(w), exactly (forward-backward splitting).
        """
        from l2sp.optim import attach

        return attach(self, optimizer, mode)

    def summary(self) -> str:
        """A table of every trainable parameter: name, shape, set (S / S̄ / free) and its coefficient."""
        rows = [("parameter", "shape", "set", "penalty")]
        what = {"l2": "α/2‖w‖²", "l2-sp": "α/2‖w−w0‖²", "l2-sp-fisher": "α/2 ΣF(w−w0)²", "l1-sp": "α‖w−w0‖₁",
                "gl-sp": "α Σ_g s_g‖w_g−w0_g‖", "gl-sp-fisher": "α Σ_g s_g‖w_g−w0_g‖_F"}[self.kind]
        for n, p in zip(self.shared, self._shared_params):
            rows.append((n, "×".join(map(str, p.shape)), "S", f"{what}, α={self.alpha:g}"))
        for n, p in zip(self.novel, self._novel_params):
            rows.append((n, "×".join(map(str, p.shape)), "S̄", f"β/2‖w‖², β={self.beta:g}"))
        for n, p in zip(self.free, self._free_params):
            rows.append((n, "×".join(map(str, p.shape)), "free", "none (include='weights')"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        n_s = sum(p.numel() for p in self._shared_params)
        n_n = sum(p.numel() for p in self._novel_params)
        lines.append(f"{self.kind}: {len(self.shared)} tensors in S ({n_s:,} values), "
                     f"{len(self.novel)} in S̄ ({n_n:,}), {len(self.free)} free")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, alpha={self.alpha:g}, beta={self.beta:g}, include={self.include!r}, "
                f"shared={len(self.shared)}, novel={len(self.novel)}, free={len(self.free)}")


def regularizer(kind: str, model: nn.Module, source: Source | None = None, *, alpha: float, beta: float,
                fisher: Fisher | None = None, include: Include = "all", eps: float = 1e-16) -> Regularizer:
    """Build the penalty Ω of ``kind`` for ``model`` with reference ``source`` (see :class:`Regularizer`).

    Args:
        kind: one of ``l2, l2-sp, l2-sp-fisher, l1-sp, gl-sp, gl-sp-fisher``.
        model: any ``nn.Module`` (DDP / torch.compile wrappers are fine).
        source: the pre-trained weights w0: a state dict (e.g. ``l2sp.snapshot(model)``), a module, or a
            checkpoint path. Parameters matching it by name and shape form S; the others S̄.
        alpha, beta: coefficients on S and S̄.
        fisher: ``{name: F}`` or a file from ``l2sp.fisher.save`` (the ``-fisher`` kinds).
        include: ``"all"`` (the paper) or ``"weights"`` (only conv/linear weights of S, as the authors' code).
        eps: smoothing of L1/GL penalties, √(d² + ε).
    """
    return Regularizer(kind, model, source, alpha=alpha, beta=beta, fisher=fisher, include=include, eps=eps)
