"""The contract of a penalty kind, the registry of kinds, and the tensor lists a penalty works on.

A kind is a subclass of :class:`Penalty` registered under a name with :func:`register_penalty`. It holds
everything about the penalty on the shared set S: its flags, its value, its fused gradient, its proximal step
and its summary text. The β/2‖w_S̄‖² term on the novel set S̄ is the same for every kind and lives in the
:class:`~l2sp.penalties.regularizer.Regularizer`, which binds a model to one kind.
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from l2sp.errors import L2SPError

_REGISTRY: dict[str, type[Penalty]] = {}


def check_coefficient(name: str, value: Any) -> float:
    """``float(value)`` if it is a finite number >= 0, else a one-line :class:`L2SPError` naming ``name``.

    A bool or a string is refused rather than converted (``alpha=True`` or ``alpha="0.1"`` is a mistake)."""
    is_scalar_tensor = isinstance(value, torch.Tensor) and value.numel() == 1
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or is_scalar_tensor):
        hint = f"; write {name}={value.strip()}" if isinstance(value, str) else ""
        raise L2SPError(f"{name} must be a number, got {value!r} ({type(value).__name__}){hint}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise L2SPError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < 0:
        raise L2SPError(f"{name} must be finite and >= 0, got {value}")
    return value


@dataclass
class Block:
    """Aligned tensor lists for one set of parameters (all of S and S̄, or those of one optimizer group).

    A penalty reads ``shared`` (w on S), ``ref`` (w0, None when the kind has ``needs_w0 = False``), ``fisher``
    (F, for ``needs_fisher`` kinds) and, for ``grouped`` kinds, the group layout: one group per index of dim 0
    of a tensor of ≥ 2 dims (its fan-in), one per element of a vector.
    """

    shared: list[Tensor]            # parameters of S
    ref: list[Tensor] | None        # w0 for S (None: reference 0)
    fisher: list[Tensor] | None     # F for S (Fisher kinds)
    group_len: Tensor | None        # grouped kinds: size p_g of every group, in order (G,)
    group_scale: Tensor | None      # grouped kinds: s_g = √p_g (G,)
    rows: list[int]                 # number of groups in each tensor of S
    row_shapes: list[tuple[int, ...]]  # shape that broadcasts a per-group value over each tensor of S
    novel: list[Tensor]             # parameters of S̄
    scratch: dict = field(default_factory=dict)  # reused work buffers (see work)

    def diff(self) -> list[Tensor]:
        """d = w − w0 as new tensors (differentiable; d = w itself when there is no reference)."""
        return torch._foreach_sub(self.shared, self.ref) if self.ref is not None else list(self.shared)

    def work(self, slot: str) -> tuple[Tensor | None, list[Tensor]]:
        """A work buffer shaped like S, reused from step to step: (flat tensor, per-parameter views).

        Allocating temporaries of the size of S afresh at every step costs page faults on the CPU, and the flat
        layout lets group sums skip a concatenation. A block whose parameters mix dtypes or devices gets fresh
        tensors (flat None)."""
        if slot not in self.scratch:
            like = self.shared
            if len({t.dtype for t in like}) > 1 or len({t.device for t in like}) > 1:
                return None, [torch.empty_like(t) for t in like]
            flat = torch.empty(sum(t.numel() for t in like), dtype=like[0].dtype, device=like[0].device)
            views = [v.view(t.shape) for v, t in zip(torch.split(flat, [t.numel() for t in like]), like)]
            self.scratch[slot] = (flat, views)
        return self.scratch[slot]

    def diff_into(self, slot: str) -> tuple[Tensor | None, list[Tensor]]:
        """d = w − w0 written into the work buffer ``slot`` (no autograd)."""
        flat, d = self.work(slot)
        torch._foreach_copy_(d, self.shared)
        if self.ref is not None:
            torch._foreach_sub_(d, self.ref)
        return flat, d

    def group_sq_norms(self, weighted_sq: list[Tensor]) -> Tensor:
        """Σ_{j∈g} x_j for every group g, in order: one concatenation and one segment reduction."""
        flat = torch.cat([t.reshape(-1) for t in weighted_sq])
        return torch.segment_reduce(flat, "sum", lengths=self.group_len)

    def group_sums(self, flat: Tensor | None, parts: list[Tensor]) -> Tensor:
        """Σ_{j∈g} of a work buffer, per group (no concatenation when the buffer is flat)."""
        if flat is None:
            return self.group_sq_norms(parts)
        return torch.segment_reduce(flat, "sum", lengths=self.group_len)

    def per_tensor(self, per_group: Tensor) -> list[Tensor]:
        """Split a (G,) vector into views that broadcast over each tensor of S (one value per group)."""
        return [c.view(s) for c, s in zip(torch.split(per_group, self.rows), self.row_shapes)]


class Penalty:
    """One kind of penalty on the shared set S: Ω_S(w) with coefficient α (and the kind's own options).

    Subclass it and decorate with ``@l2sp.register_penalty("name")``. Class attributes:

    - ``label``: display name ("L2-SP"); ``formula``: the summary text ("α/2‖w−w0‖²").
    - ``needs_w0``: the penalty pulls toward the pre-trained weights (``Block.ref`` is w0; False: reference 0).
    - ``needs_fisher``: ``Block.fisher`` holds the diagonal Fisher F (``fisher=`` is required).
    - ``grouped``: ``Block.group_len`` / ``group_scale`` describe the groups.
    - ``smoothed``: ``value`` differs between ``exact=True`` and ``exact=False`` (√(d² + ε) for |d|).
    - ``has_prox``: :meth:`prox_` is the exact proximal step (``mode="proximal"``).

    Methods (``b`` is a :class:`Block` with at least one tensor in S, called unless :meth:`is_zero`):

    - ``value(b, acc, exact)`` -> Ω_S as a differentiable scalar of dtype ``acc`` (reductions in ``acc``).
    - ``add_grad_(b, out, scale)``: ``out += scale · ∇Ω_S(w)`` in place, with multi-tensor kernels.
    - ``prox_(b, lr)``: ``w ← argmin_u lr·Ω_S(u) + ½‖u − w‖²`` in place.

    Extra keyword-only arguments of ``__init__`` are the kind's options, passed through
    ``l2sp.regularizer(kind, ..., **options)``.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    formula: ClassVar[str] = ""
    needs_w0: ClassVar[bool] = True
    needs_fisher: ClassVar[bool] = False
    grouped: ClassVar[bool] = False
    smoothed: ClassVar[bool] = False
    has_prox: ClassVar[bool] = False

    def __init__(self, alpha: float, eps: float = 1e-16):
        self.alpha = check_coefficient("alpha", alpha)
        self.eps = check_coefficient("eps", eps)

    def value(self, b: Block, acc: torch.dtype, exact: bool) -> Tensor:
        """Ω_S(w) on block b, reduced in dtype ``acc``; ``exact=False`` gives the smoothed value."""
        raise NotImplementedError

    def add_grad_(self, b: Block, out: list[Tensor], scale: float) -> None:
        """``out += scale · ∇Ω_S(w)`` (the smoothed gradient for ``smoothed`` kinds), in place."""
        raise NotImplementedError

    def prox_(self, b: Block, lr: float) -> None:
        """w ← prox_{lr·Ω_S}(w) in place (only kinds with ``has_prox``)."""
        raise L2SPError(f"mode='proximal' has no closed form for {self.name!r}; use mode='coupled'")

    def is_zero(self) -> bool:
        """True when the coefficients make Ω_S ≡ 0 (then the regularizer skips it); override with more options."""
        return not self.alpha

    def describe(self) -> str:
        """The summary text of the penalty on S, with its coefficients."""
        return f"{self.formula}, α={self.alpha:g}"

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """Names of the kind's own keyword options (keyword-only arguments of ``__init__``)."""
        params = inspect.signature(cls.__init__).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def register_penalty(name: str):
    """Class decorator: register a :class:`Penalty` subclass as the kind ``name``.

    ``@l2sp.register_penalty("elastic-sp")`` over ``class ElasticSP(l2sp.Penalty): ...`` makes
    ``l2sp.regularizer("elastic-sp", ...)`` build it. A name can be registered once.
    """
    if not isinstance(name, str) or not name:
        raise L2SPError(f"register_penalty() takes a non-empty kind name, got {name!r}")

    def decorator(cls: type[Penalty]) -> type[Penalty]:
        if not (isinstance(cls, type) and issubclass(cls, Penalty)):
            raise L2SPError(f"register_penalty({name!r}) decorates a subclass of l2sp.Penalty, got {cls!r}")
        old = _REGISTRY.get(name)
        same = old is not None and (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)
        if old is not None and not same:  # (the same class defined again, a notebook cell run twice, replaces it)
            raise L2SPError(f"penalty kind {name!r} is already registered (by {_REGISTRY[name].__qualname__}); "
                            "choose another name")
        for method in ("value", "add_grad_") + (("prox_",) if cls.has_prox else ()):
            if getattr(cls, method) is getattr(Penalty, method):
                raise L2SPError(f"penalty {cls.__qualname__} ({name!r}) must define {method}()")
        cls.name = name
        if not cls.__dict__.get("label"):
            cls.label = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def penalty_names() -> tuple[str, ...]:
    """The registered kinds, in registration order (the six built-ins first)."""
    return tuple(_REGISTRY)


def get_penalty(name: str) -> type[Penalty]:
    """The :class:`Penalty` class registered as ``name``; a one-line :class:`L2SPError` for an unknown name."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise L2SPError(f"unknown regularizer kind {name!r}; choose one of {', '.join(_REGISTRY)}") from None
