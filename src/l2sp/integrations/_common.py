"""What the framework callbacks share: building the regularizer and the reference state they checkpoint."""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from l2sp import fisher as fisher_io
from l2sp.errors import L2SPError
from l2sp.optim import MODES
from l2sp.penalties import Regularizer, get_penalty, regularizer
from l2sp.reference import load_source, strip_prefix


def require(module: str, extra: str, what: str) -> Any:
    """Import ``module`` or raise one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise L2SPError(f"{what} needs {module.split('.')[0]}; pip install 'l2sp[{extra}]'") from exc


def check_settings(kind: str, mode: str) -> None:
    """Fail at construction (not when training starts) on an unknown kind or mode."""
    get_penalty(kind)  # one line listing the known kinds, for an unknown one
    if mode not in MODES:
        raise L2SPError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")


class PenaltyCallback:
    """The constructor the framework callbacks share: what Ω is, checked at once (not when training starts)."""

    def __init__(self, source: Any, kind: str, *, alpha: float, beta: float, fisher: Any = None,
                 include: str = "all", mode: str = "coupled", log_penalty: bool = True, **options: Any):
        check_settings(kind, mode)
        self.source, self.fisher = source, fisher
        self.settings = {"kind": kind, "alpha": alpha, "beta": beta, "include": include, "mode": mode,
                         "options": options}
        self.log_penalty = log_penalty
        self.regularizer: Regularizer | None = None
        self._handle: Any = None

    @property
    def needs_fisher(self) -> bool:
        return get_penalty(self.settings["kind"]).needs_fisher


def build(model: nn.Module, settings: Mapping[str, Any], source: Any, fisher: Any, where: str) -> Regularizer:
    """``l2sp.regularizer(kind, model, source, ...)`` with a hint on where the source names must come from."""
    try:
        return regularizer(settings["kind"], model, source, alpha=settings["alpha"], beta=settings["beta"],
                           fisher=fisher, include=settings["include"], **settings["options"])
    except L2SPError as exc:
        if "no parameter of the model matches" not in str(exc):
            raise
        raise L2SPError(f"{exc}; the source must be keyed like {where} (take l2sp.snapshot of it before "
                        "replacing the head, or rename the checkpoint's keys)") from None


def reference_state(reg: Regularizer, source: Any, fisher: Any) -> dict[str, Any]:
    """The tensors that define Ω besides the live weights: w0 of S and of the free parameters, F of S.

    Keyed by unwrapped parameter name, on the CPU, so a checkpoint restores the same partition and the same
    penalty whatever source the resumed script passes."""
    if source is None:
        return {"w0": None, "fisher": None}
    table = load_source(source)
    names = [strip_prefix(n) for n in reg.shared + reg.free]
    w0 = {n: table[n].detach().to("cpu", copy=True) for n in names}  # a copy: the source may change later
    fis = None
    if fisher is not None:
        if isinstance(fisher, str | os.PathLike):
            fisher = fisher_io.load(fisher)
        ftable = {strip_prefix(k): v for k, v in fisher.items()}
        fis = {strip_prefix(n): ftable[strip_prefix(n)].detach().to("cpu", copy=True) for n in reg.shared}
    return {"w0": w0, "fisher": fis}


def value(reg: Regularizer) -> torch.Tensor:
    """Ω(w) without building an autograd graph (one pass over the penalized tensors)."""
    with torch.no_grad():
        return reg().detach()
