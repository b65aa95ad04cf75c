"""Attaching a regularizer to any torch optimizer through its step hooks.

The per-step work is a few multi-tensor kernels per optimizer parameter group (never per parameter).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from l2sp.errors import L2SPError

if TYPE_CHECKING:
    from l2sp.penalties import Mode, Regularizer, _Block

MODES = ("coupled", "decoupled", "proximal")


class RegularizerHandle:
    """Returned by ``reg.attach(optimizer)``; ``remove()`` detaches the penalty from the optimizer."""

    def __init__(self, reg: Regularizer, optimizer: torch.optim.Optimizer, mode: str):
        self.regularizer, self.optimizer, self.mode = reg, optimizer, mode
        self._blocks: list[tuple[dict, _Block]] = []
        self._version = -1
        if mode == "coupled":
            self._hooks = [optimizer.register_step_pre_hook(self._coupled)]
        elif mode == "decoupled":
            self._hooks = [optimizer.register_step_pre_hook(self._decoupled)]
        else:
            self._hooks = [optimizer.register_step_post_hook(self._proximal)]

    def _group_blocks(self) -> list[tuple[dict, _Block]]:
        """One block per optimizer parameter group (rebuilt after the regularizer moved device)."""
        reg = self.regularizer
        if self._version != reg._version:
            index_s = {id(p): i for i, p in enumerate(reg._shared_params)}
            index_n = {id(p): i for i, p in enumerate(reg._novel_params)}
            self._blocks = []
            for group in self.optimizer.param_groups:
                s = [index_s[id(p)] for p in group["params"] if id(p) in index_s]
                n = [index_n[id(p)] for p in group["params"] if id(p) in index_n]
                if s or n:
                    self._blocks.append((group, reg._make_block(s, n)))
            self._version = reg._version
        return self._blocks

    def _coupled(self, optimizer, args, kwargs) -> None:
        self.regularizer.add_grad_()

    def _decoupled(self, optimizer, args, kwargs) -> None:
        reg = self.regularizer
        reg._follow_model()
        for group, block in self._group_blocks():
            reg._add_scaled_grad(block, block.shared, block.novel, -float(group["lr"]))

    def _proximal(self, optimizer, args, kwargs) -> None:
        reg = self.regularizer
        reg._follow_model()
        for group, block in self._group_blocks():
            reg._prox(block, float(group["lr"]))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> RegularizerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach(reg: Regularizer, optimizer: torch.optim.Optimizer, mode: Mode = "coupled") -> RegularizerHandle:
    """Hook ``reg`` into ``optimizer`` (see :meth:`l2sp.penalties.Regularizer.attach`)."""
    from l2sp.penalties import PROXIMAL_KINDS

    if mode not in MODES:
        raise L2SPError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "proximal" and reg.kind not in PROXIMAL_KINDS:
        raise L2SPError(f"mode='proximal' has no closed-form proximal operator for {reg.kind!r}; "
                        f"use mode='coupled' (proximal works for {', '.join(PROXIMAL_KINDS)})")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise L2SPError(f"attach() takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    governed = {id(p) for p in reg._shared_params + reg._novel_params}
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if not governed & in_optimizer:
        raise L2SPError("none of the regularizer's parameters is in this optimizer; build both from the same model")
    for group in optimizer.param_groups:
        if group.get("weight_decay", 0) and any(id(p) in governed for p in group["params"]):
            warnings.warn(
                f"an optimizer group has weight_decay={group['weight_decay']} on parameters the regularizer "
                "already penalizes: the decay is applied twice; set weight_decay=0 for them",
                stacklevel=3,
            )
            break
    return RegularizerHandle(reg, optimizer, mode)
