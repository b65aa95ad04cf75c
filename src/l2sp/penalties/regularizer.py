"""The regularizer: one penalty kind bound to a model's parameters, with w0 and F kept as buffers.

    Ω(w) = Ω_S(w_S) + β/2 ‖w_S̄‖²

Ω_S is the kind's (:mod:`l2sp.penalties.builtin`, or any registered :class:`~l2sp.penalties.base.Penalty`);
the novel set S̄ always gets β/2‖w‖². Memory: one copy of w_S (plus F for the Fisher kinds); the L1/GL kinds
also keep two work buffers of the size of S, reused at every step.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

import l2sp.fisher as fisher_io
from l2sp.errors import L2SPError
from l2sp.optim import MODES, Mode, RegularizerHandle, attach
from l2sp.penalties.base import Block, Penalty, check_coefficient, get_penalty, penalty_names
from l2sp.reference import Include, Source, load_source, partition, strip_prefix

Fisher = Mapping[str, Tensor] | str | os.PathLike


def _buffer_name(name: str) -> str:
    return name.replace(".", "/")


def _grads(params: list[Tensor]) -> list[Tensor]:
    """The ``.grad`` of each parameter, allocating zeros where missing."""
    grads = [p.grad for p in params]
    if any(g is None for g in grads):
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
    return grads


def _groups(params: list[Tensor]) -> tuple[list[int], list[tuple[int, ...]], list[Tensor], list[Tensor]]:
    """Group layout of S: per tensor its number of groups and broadcast shape; per group p_g and s_g = √p_g."""
    rows, shapes, lengths, scales = [], [], [], []
    for p in params:
        if p.dim() >= 2:
            r, size = p.shape[0], p[0].numel()
            shape = (r,) + (1,) * (p.dim() - 1)
        else:  # a vector: one group per element
            r, size, shape = p.numel(), 1, tuple(p.shape)
        rows.append(r)
        shapes.append(shape)
        lengths.append(torch.full((r,), size, dtype=torch.long))
        scales.append(torch.full((r,), math.sqrt(size), dtype=torch.float64))
    return rows, shapes, lengths, scales


def build_penalty(kind: str, alpha: float, eps: float, options: Mapping[str, Any]) -> Penalty:
    """An instance of the kind registered as ``kind``, its options checked against its ``__init__``."""
    cls = get_penalty(kind)
    known = cls.options()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise L2SPError(f"kind {kind!r} has no option {', '.join(unknown)}; its options: "
                        f"{', '.join(known) or 'none'}")
    return cls(alpha, eps, **options)


def _kinds_with(flag: str) -> str:
    return ", ".join(repr(n) for n in penalty_names() if getattr(get_penalty(n), flag))


class Regularizer(nn.Module):
    """Ω(w) = Ω_S(w_S) + β/2‖w_S̄‖² of one registered kind, bound to a model's parameters.

    Build it with :func:`regularizer`. ``reg()`` is Ω(w) (differentiable); ``reg.add_grad_()`` adds ∇Ω to
    the gradients in place; ``reg.attach(optimizer)`` applies the penalty at every optimizer step. w0 and F
    are buffers, so ``.to()`` and ``state_dict()`` work; the model's parameters are referenced, not owned.
    ``reg.penalty`` is the kind's :class:`~l2sp.penalties.base.Penalty` instance.
    """

    def __init__(self, kind: str, model: nn.Module, source: Source | None = None, *, alpha: float,
                 beta: float, fisher: Fisher | None = None, include: Include = "all", eps: float = 1e-16,
                 **options: Any):
        super().__init__()
        self.penalty = build_penalty(kind, alpha, eps, options)
        self.kind = kind
        self.beta = check_coefficient("beta", beta)
        self.include = include
        needs_w0 = self.penalty.needs_w0
        if source is None and needs_w0:
            raise L2SPError(f"kind {kind!r} needs the pre-trained weights: pass source=l2sp.snapshot(model) "
                            "taken before replacing the head, or a checkpoint path")
        part = partition(model, None if source is None else load_source(source), include)
        self._model = weakref.ref(model)
        self._model_checked = False
        self.shared = [n for n, _, _ in part.shared]
        self.novel = [n for n, _ in part.novel]
        self.free = [n for n, _ in part.free]
        self._shared_params = [p for _, p, _ in part.shared]
        self._novel_params = [p for _, p in part.novel]
        self._free_params = [p for _, p in part.free]
        self._has_ref = source is not None and needs_w0
        self.w0 = nn.Module()
        if self._has_ref:
            for name, p, ref in part.shared:
                self.w0.register_buffer(_buffer_name(name), ref.detach().to(p.device, p.dtype, copy=True))
        self.fisher = nn.Module()
        if self.penalty.needs_fisher:
            self._load_fisher(fisher, part.shared)
        elif fisher is not None:
            raise L2SPError(f"fisher= is only used by the kinds {_kinds_with('needs_fisher')}, not by {kind!r}; "
                            "drop it or pick one of those")
        self._init_groups()
        self.version = 0
        self._block = self._make_block(range(len(self._shared_params)), range(len(self._novel_params)))

    # ------------------------------------------------------------------ coefficients
    @property
    def alpha(self) -> float:
        """α, the coefficient on S (the penalty's)."""
        return self.penalty.alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self.penalty.alpha = check_coefficient("alpha", value)

    @property
    def eps(self) -> float:
        """ε, the smoothing of the non-differentiable kinds."""
        return self.penalty.eps

    @eps.setter
    def eps(self, value: float) -> None:
        self.penalty.eps = check_coefficient("eps", value)

    # ------------------------------------------------------------------ set-up helpers
    def _load_fisher(self, fisher: Fisher | None, shared: list) -> None:
        if fisher is None:
            raise L2SPError(f"kind {self.kind!r} needs fisher= (a dict or file from l2sp.fisher.estimate/save)")
        if isinstance(fisher, str | os.PathLike):
            fisher = fisher_io.load(fisher)
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

    def _init_groups(self) -> None:
        rows, shapes, lengths, scales = _groups(self._shared_params)
        self._rows, self._row_shapes = rows, shapes
        if self.penalty.grouped and self._shared_params:
            device = self._shared_params[0].device
            self.register_buffer("group_len", torch.cat(lengths).to(device), persistent=False)
            self.register_buffer("group_scale", torch.cat(scales).to(device), persistent=False)
        else:
            self.group_len = self.group_scale = None

    def _make_block(self, shared_idx: Iterable[int], novel_idx: Iterable[int]) -> Block:
        shared_idx, novel_idx = list(shared_idx), list(novel_idx)
        refs = list(self.w0.buffers()) if self._has_ref else None
        fis = list(self.fisher.buffers()) if self.penalty.needs_fisher else None
        group_len = group_scale = None
        if self.penalty.grouped and shared_idx:
            offsets = [0]
            for r in self._rows:
                offsets.append(offsets[-1] + r)
            sel = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in shared_idx]).to(self.group_len.device)
            group_len, group_scale = self.group_len[sel], self.group_scale[sel]
        return Block(
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
        self.version += 1
        self._block = self._make_block(range(len(self._shared_params)), range(len(self._novel_params)))
        return self

    def _acc_dtype(self) -> torch.dtype:
        ps = self._shared_params or self._novel_params
        return torch.float64 if ps and ps[0].dtype == torch.float64 else torch.float32

    def _norm_dtype(self, device: torch.device) -> torch.dtype:
        """Reductions accumulate in float64 on the CPU, whose float32 norm loses ~1e-4 on 10M-element tensors."""
        return torch.float64 if device.type == "cpu" else self._acc_dtype()

    def _value(self, b: Block, exact: bool) -> Tensor:
        """Ω on block b (``exact``: the unsmoothed value)."""
        out_dtype = self._acc_dtype()
        device = (b.shared or b.novel)[0].device
        acc = self._norm_dtype(device)
        total = torch.zeros((), dtype=acc, device=device)
        if b.shared and not self.penalty.is_zero():
            total = total + self.penalty.value(b, acc, exact)
        if b.novel and self.beta:
            total = total + self.beta / 2 * torch.stack(torch._foreach_norm(b.novel, 2, dtype=acc)).square().sum()
        return total.to(out_dtype)

    @torch.no_grad()
    def _add_scaled_grad(self, b: Block, shared_out: list[Tensor], novel_out: list[Tensor], scale: float) -> None:
        """out += scale · ∇Ω(w) for block b, in place (smoothed gradient for smoothed kinds)."""
        if b.shared and not self.penalty.is_zero():
            self.penalty.add_grad_(b, shared_out, scale)
        if b.novel and self.beta:
            torch._foreach_add_(novel_out, b.novel, alpha=self.beta * scale)

    # ------------------------------------------------------------------ public API
    def forward(self) -> Tensor:
        """Ω(w) as a differentiable scalar (float32, or float64 for float64 parameters); smoothed L1/GL."""
        self.check_model()
        self.follow_model()
        return self._value(self._block, exact=not self.penalty.smoothed)

    @torch.no_grad()
    def exact(self) -> Tensor:
        """Ω(w) without smoothing (equals ``reg()`` for the quadratic kinds)."""
        self.follow_model()
        return self._value(self._block, exact=True)

    @torch.no_grad()
    def add_grad_(self, scale: float = 1.0) -> None:
        """``p.grad += scale · ∂Ω/∂p`` for every penalized parameter (missing gradients are allocated as zeros).

        ``scale`` is for gradients that carry a factor (a loss scale, 1/accumulation steps)."""
        self.check_model()
        self.follow_model()
        b = self._block
        self._add_scaled_grad(b, _grads(b.shared), _grads(b.novel), float(scale))

    def penalized_names(self) -> set[str]:
        """Names of the parameters this regularizer governs (S and S̄): give them no optimizer weight decay."""
        return set(self.shared) | set(self.novel)

    def penalized_parameters(self) -> list[Tensor]:
        """The parameters this regularizer governs: those of S, then those of S̄."""
        return self._shared_params + self._novel_params

    def attach(self, optimizer: torch.optim.Optimizer, mode: Mode = "coupled") -> RegularizerHandle:
        """Apply the penalty at every ``optimizer.step()``; returns a handle with ``.remove()``.

        - ``coupled``: adds ∇Ω to the gradients before the step (after the closure's backward when the step
          is given a closure, which then returns loss + Ω): the trajectory of ``loss + reg()``, momentum and
          adaptive scaling included.
        - ``decoupled``: w ← w − lr·∇Ω(w) with each parameter group's lr, after the gradient of the loss was
          computed and before the optimizer's update (AdamW-style shrinkage toward w0, outside momentum and
          adaptive scaling).
        - ``proximal``: after the step, w ← prox_{lr·Ω}(w), exactly (forward-backward splitting).

        Works with ``optimizer.step()``, ``optimizer.step(closure)`` (LBFGS too) and ``GradScaler.step``
        (skipped steps skip the penalty). Attaching one regularizer twice to one optimizer is an error.
        """
        self._model_checked = False
        self.check_model()
        return attach(self, optimizer, mode)

    def check_model(self) -> None:
        """Once (at ``attach`` and at the first use): a one-line warning when the model's trainable parameters
        are no longer those partitioned at build time, e.g. a head replaced after the regularizer was built
        (the old head would stay in S̄ and the new one would go unpenalized)."""
        model = None if self._model_checked else self._model()
        self._model_checked = True
        if model is None:
            return
        known = {id(p) for p in self._shared_params + self._novel_params + self._free_params}
        named = list(model.named_parameters())
        new = [strip_prefix(n) for n, p in named if p.requires_grad and id(p) not in known]
        present = {id(p) for _, p in named}
        gone = [n for n, p in zip(self.shared + self.novel, self.penalized_parameters()) if id(p) not in present]
        if new or gone:
            what = "; ".join(part for part in (
                f"not governed: {', '.join(new[:3])}{' ...' if len(new) > 3 else ''}" if new else "",
                f"no longer in the model: {', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''}" if gone else "",
            ) if part)
            warnings.warn(f"the model's parameters changed after l2sp.regularizer(...) was built ({what}); build "
                          "the regularizer after replacing the head (and after unfreezing)", stacklevel=3)

    # ------------------------------------------------------------------ driven by l2sp.optim
    def follow_model(self) -> None:
        """Move w0/F to the parameters' device if the model was moved after the regularizer was built."""
        ps = self._shared_params or self._novel_params
        refs = self._block.ref or self._block.fisher
        if ps and refs and refs[0].device != ps[0].device:
            self.to(ps[0].device)

    def check_mode(self, mode: str) -> None:
        """A one-line error if this kind cannot be applied in ``mode``."""
        if mode not in MODES:
            raise L2SPError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode == "proximal" and not self.penalty.has_prox:
            raise L2SPError(f"mode='proximal' has no closed-form proximal operator for {self.kind!r}; "
                            f"use mode='coupled' (proximal works for {_kinds_with('has_prox')})")

    def block(self, params: Iterable[Tensor]) -> Block | None:
        """The tensor lists of the penalized parameters among ``params`` (in their order); None if there are none.

        Valid until ``version`` changes (the regularizer moved device or dtype)."""
        index_s = {id(p): i for i, p in enumerate(self._shared_params)}
        index_n = {id(p): i for i, p in enumerate(self._novel_params)}
        params = list(params)
        s = [index_s[id(p)] for p in params if id(p) in index_s]
        n = [index_n[id(p)] for p in params if id(p) in index_n]
        return self._make_block(s, n) if s or n else None

    def shrink_(self, block: Block, lr: float) -> None:
        """w ← w − lr·∇Ω(w) on the parameters of ``block`` (a decoupled step)."""
        self._add_scaled_grad(block, block.shared, block.novel, -float(lr))

    @torch.no_grad()
    def prox_(self, block: Block, lr: float) -> None:
        """w ← argmin_u lr·Ω(u) + ½‖u − w‖², exactly, on the parameters of ``block``."""
        lr = float(lr)
        if block.shared and not self.penalty.is_zero():
            self.penalty.prox_(block, lr)
        if block.novel and self.beta:
            torch._foreach_mul_(block.novel, 1.0 / (1.0 + lr * self.beta))

    # ------------------------------------------------------------------ display
    def summary(self) -> str:
        """A table of every trainable parameter: name, shape, set (S / S̄ / free) and its coefficient."""
        rows = [("parameter", "shape", "set", "penalty")]
        what = self.penalty.describe()
        for n, p in zip(self.shared, self._shared_params):
            rows.append((n, "×".join(map(str, p.shape)), "S", what))
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
                fisher: Fisher | None = None, include: Include = "all", eps: float = 1e-16,
                **options: Any) -> Regularizer:
    """Build Ω(w) = Ω_S(w_S) + β/2‖w_S̄‖² of ``kind`` for ``model`` with reference ``source``.

    Args:
        kind: a registered kind (``l2sp.penalties.penalty_names()``): ``l2, l2-sp, l2-sp-fisher, l1-sp,
            gl-sp, gl-sp-fisher``, or one added with ``l2sp.register_penalty``.
        model: any ``nn.Module`` (DDP / torch.compile wrappers are fine).
        source: the pre-trained weights w0: a state dict (e.g. ``l2sp.snapshot(model)``), a module, or a
            checkpoint path. Parameters matching it by name and shape form S; the others S̄.
        alpha, beta: coefficients on S and S̄.
        fisher: ``{name: F}`` or a file from ``l2sp.fisher.save`` (the ``-fisher`` kinds).
        include: ``"all"`` (the paper) or ``"weights"`` (only conv/linear weights of S, as the authors' code).
        eps: smoothing of L1/GL penalties, √(d² + ε).
        **options: the kind's own options (keyword-only arguments of its ``__init__``).
    """
    return Regularizer(kind, model, source, alpha=alpha, beta=beta, fisher=fisher, include=include, eps=eps,
                       **options)
