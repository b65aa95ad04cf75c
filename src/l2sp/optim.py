"""Attaching a regularizer to any torch optimizer through its step hooks.

One step pre-hook per attachment (plus a post-hook for the proximal mode, and for the decoupled mode when the
step gets a closure). It works for every way of stepping:

- ``optimizer.step()``: coupled adds ∇Ω to the gradients, decoupled shrinks w ← w − lr·∇Ω(w), both before the
  update; proximal applies w ← prox_{lr·Ω}(w) after it.
- ``optimizer.step(closure)`` (LBFGS, Lightning's automatic optimization): the closure is replaced by one that
  runs it and then adds ∇Ω (coupled: at every evaluation, and the returned loss is loss + Ω, so LBFGS line
  searches see the real objective) or shrinks once per step after the first evaluation (decoupled: the loss
  gradient is taken at the un-shrunk w, as AdamW does).
- ``GradScaler.step(optimizer)``: the optimizer steps after unscaling, so the hooks see true gradients; a
  skipped step (inf/NaN) skips the penalty. Optimizers that unscale inside their step (``fused=True``) get
  ∇Ω multiplied by the loss scale, and no penalty on a step the scaler skips.

The per-step work is a few multi-tensor kernels per optimizer parameter group (never per parameter).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from l2sp.errors import L2SPError

MODES = ("coupled", "decoupled", "proximal")
Mode = Literal["coupled", "decoupled", "proximal"]


class Penalized(Protocol):
    """What :func:`attach` drives: the interface of :class:`l2sp.penalties.Regularizer`."""

    version: int

    def __call__(self) -> Tensor: ...
    def add_grad_(self, scale: float = 1.0) -> None: ...
    def follow_model(self) -> None: ...
    def check_mode(self, mode: str) -> None: ...
    def penalized_parameters(self) -> list[Tensor]: ...
    def block(self, params: list[Tensor]) -> Any: ...
    def shrink_(self, block: Any, lr: float) -> None: ...
    def prox_(self, block: Any, lr: float) -> None: ...


# optimizer -> ids of the regularizers attached to it (an optimizer that is collected drops its entry)
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _closure_index(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> int | str | None:
    """Where the step's closure is in the hook's (args, kwargs): args hold the optimizer itself first."""
    i = 1 if args and args[0] is optimizer else 0
    if len(args) > i and callable(args[i]):
        return i
    return "closure" if callable(kwargs.get("closure")) else None


def _with_closure(args: tuple, kwargs: dict, where: int | str, wrap: Callable[[Callable], Callable]) -> tuple:
    """(args, kwargs) with the closure replaced by ``wrap(closure)``."""
    if isinstance(where, int):
        return (*args[:where], wrap(args[where]), *args[where + 1:]), kwargs
    return args, {**kwargs, where: wrap(kwargs[where])}


def _amp_scale(optimizer: torch.optim.Optimizer) -> float | None:
    """The loss scale the gradients still carry (GradScaler stepping an optimizer that unscales them itself:
    1.0 when they are not scaled); None when the scaler found inf/NaN and the step is skipped."""
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is not None and float(found_inf) > 0:
        return None
    scale = getattr(optimizer, "grad_scale", None)
    return 1.0 if scale is None else float(scale)


def _plus_value(loss: Any, reg: Penalized) -> Any:
    """The closure's loss + Ω(w) (not differentiable: the gradient was already added)."""
    if loss is None:
        return None
    with torch.no_grad():
        value = reg()
    if isinstance(loss, Tensor):
        return loss.detach() + value.to(device=loss.device, dtype=loss.dtype)
    return loss + value.item()


class RegularizerHandle:
    """Returned by ``reg.attach(optimizer)``; ``remove()`` detaches the penalty from the optimizer."""

    def __init__(self, reg: Penalized, optimizer: torch.optim.Optimizer, mode: str):
        self.regularizer, self.optimizer, self.mode = reg, optimizer, mode
        self._blocks: list[tuple[dict, Any]] = []
        self._key: tuple = ()
        self._shrink_pending = False
        self._hooks = [optimizer.register_step_pre_hook(self._pre_step),
                       optimizer.register_step_post_hook(self._post_step)]
        _ATTACHED.setdefault(optimizer, set()).add(id(reg))

    def _group_blocks(self) -> list[tuple[dict, Any]]:
        """One block per optimizer parameter group (rebuilt after the regularizer moved, or groups changed)."""
        reg, groups = self.regularizer, self.optimizer.param_groups
        # add_param_group appends a group; load_state_dict replaces every group dict (their lr with them)
        key = (reg.version, *map(id, groups))
        if key != self._key:
            blocks = [(g, reg.block(g["params"])) for g in groups]
            self._blocks = [(g, b) for g, b in blocks if b is not None]
            self._key = key
        return self._blocks

    def _shrink(self) -> None:
        self.regularizer.follow_model()
        for group, block in self._group_blocks():
            self.regularizer.shrink_(block, float(group["lr"]))

    def _prox(self) -> None:
        self.regularizer.follow_model()
        for group, block in self._group_blocks():
            self.regularizer.prox_(block, float(group["lr"]))

    def _coupled_closure(self, closure: Callable, scale: float) -> Callable:
        def closure_with_penalty():
            loss = closure()
            self.regularizer.add_grad_(scale)
            return _plus_value(loss, self.regularizer)

        return closure_with_penalty

    def _decoupled_closure(self, closure: Callable) -> Callable:
        def closure_then_shrink():
            loss = closure()
            if self._shrink_pending:  # once per step, after the first gradient (taken at the un-shrunk w)
                self._shrink_pending = False
                self._shrink()
            return loss

        return closure_then_shrink

    def _pre_step(self, optimizer, args, kwargs):
        scale = _amp_scale(optimizer)
        self._shrink_pending = False
        if scale is None or self.mode == "proximal":
            return None
        where = _closure_index(optimizer, args, kwargs)
        if self.mode == "coupled":
            if where is None:
                self.regularizer.add_grad_(scale)
                return None
            return _with_closure(args, kwargs, where, lambda c: self._coupled_closure(c, scale))
        if where is None:
            self._shrink()
            return None
        self._shrink_pending = True
        return _with_closure(args, kwargs, where, self._decoupled_closure)

    def _post_step(self, optimizer, args, kwargs) -> None:
        if self._shrink_pending:  # the optimizer never called its closure: shrink all the same
            self._shrink_pending = False
            self._shrink()
        if self.mode == "proximal" and _amp_scale(optimizer) is not None:
            self._prox()

    def remove(self) -> None:
        """Stop applying the penalty (the regularizer may then be attached again)."""
        for h in self._hooks:
            h.remove()
        if self._hooks:
            _ATTACHED.get(self.optimizer, set()).discard(id(self.regularizer))
        self._hooks = []

    def __enter__(self) -> RegularizerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _check_attach(reg: Penalized, optimizer: torch.optim.Optimizer, mode: str) -> set[int]:
    reg.check_mode(mode)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise L2SPError(f"attach() takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if id(reg) in _ATTACHED.get(optimizer, ()):
        raise L2SPError("this regularizer is already attached to this optimizer (the penalty would be applied "
                        "twice); call .remove() on the first handle before attaching again")
    governed = {id(p) for p in reg.penalized_parameters()}
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if not governed & in_optimizer:
        raise L2SPError("none of the regularizer's parameters is in this optimizer; build both from the same model")
    return governed


def attach(reg: Penalized, optimizer: torch.optim.Optimizer, mode: Mode = "coupled") -> RegularizerHandle:
    """Hook ``reg`` into ``optimizer`` (see :meth:`l2sp.penalties.Regularizer.attach`)."""
    governed = _check_attach(reg, optimizer, mode)
    for group in optimizer.param_groups:
        if group.get("weight_decay", 0) and any(id(p) in governed for p in group["params"]):
            warnings.warn(
                f"an optimizer group has weight_decay={group['weight_decay']} on parameters the regularizer "
                "already penalizes: the decay is applied twice; set weight_decay=0 for them",
                stacklevel=3,
            )
            break
    return RegularizerHandle(reg, optimizer, mode)
