"""L2-SP as a PyTorch Lightning callback.

    w0 = l2sp.snapshot(lit_module)                  # keyed like the LightningModule: "model.fc.weight", ...
    lit_module.model.fc = nn.Linear(2048, num_classes)
    trainer = lightning.Trainer(callbacks=[L2SP(w0, "l2-sp", alpha=0.1, beta=0.01)])
    trainer.fit(lit_module, loader)                 # trains on J(w) + Ω(w)

- The regularizer ``Ω`` (``l2sp.regularizer(kind, lit_module, source, ...)``) is built in ``on_fit_start``, once the
  module is on its device; it is ``callback.regularizer``.
- ``mode="coupled"`` (default): ``g ← g + ∇Ω(w)`` in ``on_before_optimizer_step``, which Lightning runs after the
  closure's backward (after the last micro-batch when accumulating), after AMP's ``GradScaler.unscale_`` and
  before gradient clipping: the trajectory of ``loss + reg()`` with the penalty's gradient clipped along with the
  loss's. ``"decoupled"`` and ``"proximal"`` go through ``reg.attach(optimizer, mode)``.
- A batch whose ``training_step`` returned ``None`` (no backward) gets no penalty step either.
- ``Ω`` is logged as ``l2sp/penalty`` on the steps Lightning writes its logs (``log_every_n_steps``), so it costs
  one pass over the penalized tensors every ``log_every_n_steps`` steps, not every step.
- Checkpoints hold w0 (of S and of the free parameters) and F: resuming with ``ckpt_path=`` continues with the
  reference the run started with, whatever ``source`` the resumed script passes (even ``None``); the constructor
  still sets kind, α, β, include and mode (a one-line warning when they differ from the checkpoint's).
- Manual optimization: nothing is applied automatically (a one-line warning says so); call
  ``callback.regularizer.add_grad_()`` between ``self.manual_backward(loss)`` and ``opt.step()``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from l2sp.errors import L2SPError
from l2sp.integrations._common import PenaltyCallback, build, reference_state, require, value

_pl = require("lightning.pytorch", "lightning", "l2sp.integrations.lightning")
_utils = require("lightning.pytorch.utilities", "lightning", "l2sp.integrations.lightning")

__all__ = ["L2SP"]

_WHERE = "the LightningModule's own parameters (lit_module.named_parameters())"
_COMPARED = ("kind", "alpha", "beta", "include", "mode")


class L2SP(PenaltyCallback, _pl.Callback):
    """Train a LightningModule on J(w) + Ω(w), Ω the ``kind`` penalty toward ``source`` (see module docstring).

    Args:
        source: w0 keyed like the LightningModule's parameters (``l2sp.snapshot(lit_module)`` taken before the
            head is replaced), a module, or a checkpoint path; ``None`` for ``kind="l2"``.
        kind: ``l2, l2-sp, l2-sp-fisher, l1-sp, gl-sp, gl-sp-fisher``.
        alpha, beta: coefficients on S (shared with the source) and S̄ (new parameters).
        fisher: ``{name: F}`` or a file from ``l2sp.fisher.save`` (the ``-fisher`` kinds).
        include: ``"all"`` or ``"weights"`` (only conv/linear weights of S).
        mode: ``"coupled"`` (∇Ω added to the gradients), ``"decoupled"`` or ``"proximal"``.
        log_penalty: log Ω as ``l2sp/penalty``.
        **options: passed to ``l2sp.regularizer`` (``eps``).
    """

    def __init__(self, source: Mapping[str, torch.Tensor] | torch.nn.Module | str | os.PathLike | None,
                 kind: str, *, alpha: float, beta: float, fisher: Any = None, include: str = "all",
                 mode: str = "coupled", log_penalty: bool = True, **options: Any):
        super().__init__(source, kind, alpha=alpha, beta=beta, fisher=fisher, include=include, mode=mode,
                         log_penalty=log_penalty, **options)
        self._reference: dict[str, Any] = {}  # w0 and F of the current regularizer, taken when it was built
        self._restored: dict[str, Any] | None = None
        self._module: Any = None
        self._backward_seen = False

    # ------------------------------------------------------------------ building
    def _build(self, trainer: Any, pl_module: Any) -> None:
        source, fisher = self.source, self.fisher
        if self._restored:
            self._warn_if_changed(self._restored.get("settings", {}))
            if self._restored.get("w0") is not None:
                source = self._restored["w0"]
            if self._restored.get("fisher") is not None and self.needs_fisher:
                fisher = self._restored["fisher"]
        self._release()
        self.regularizer = build(pl_module, self.settings, source, fisher, _WHERE)
        self._reference = reference_state(self.regularizer, source, fisher)  # once: the source may change later
        if not pl_module.automatic_optimization:
            _utils.rank_zero_warn(
                "L2SP: manual optimization, so the penalty is not applied for you; call "
                "callback.regularizer.add_grad_() after self.manual_backward(loss) and before opt.step()")
        elif self.settings["mode"] != "coupled":
            if not trainer.optimizers:
                raise L2SPError(f"L2SP mode={self.settings['mode']!r} attaches to the optimizer, and "
                                "configure_optimizers returned none; return one, or use mode='coupled'")
            self._handle = self.regularizer.attach(trainer.optimizers[0], self.settings["mode"])

    def _warn_if_changed(self, saved: Mapping[str, Any]) -> None:
        changed = [f"{k}={self.settings[k]!r} (checkpoint: {saved[k]!r})"
                   for k in _COMPARED if k in saved and saved[k] != self.settings[k]]
        if changed:
            _utils.rank_zero_warn(f"L2SP: resuming with {', '.join(changed)}; w0 and F come from the checkpoint")

    def _release(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._module, self._backward_seen = pl_module, False
        self._build(trainer, pl_module)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Detach; the next fit starts from ``source`` again unless it resumes from a checkpoint."""
        self._release()
        self._module, self._restored = None, None

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        self._backward_seen = True

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        """g ← g + ∇Ω(w), after the backward and AMP unscaling, before clipping (coupled mode)."""
        reg = self.regularizer
        if reg is None or not pl_module.automatic_optimization or not self._backward_seen:
            return
        self._backward_seen = False
        if self.log_penalty and _should_log(trainer):
            pl_module.log("l2sp/penalty", value(reg), on_step=True, on_epoch=False, batch_size=1)
        if self.settings["mode"] == "coupled":
            reg.add_grad_(_grad_scale(trainer, optimizer))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The settings and the reference (w0 of S and of the free parameters, F of S), on the CPU."""
        if self.regularizer is None:
            return dict(self._restored or {})
        settings = {k: self.settings[k] for k in _COMPARED}
        return {"settings": settings, **self._reference}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's reference; rebuild at once if fitting already started (FSDP/DeepSpeed)."""
        if not state_dict:
            return
        self._restored = dict(state_dict)
        if self._module is not None and self.regularizer is not None:
            self._build(self._module.trainer, self._module)


def _should_log(trainer: Any) -> bool:
    """Whether Lightning writes its step logs at this step (its own ``log_every_n_steps`` cadence)."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def _grad_scale(trainer: Any, optimizer: torch.optim.Optimizer) -> float:
    """The factor the gradients still carry at ``on_before_optimizer_step``: Lightning unscales them first, except
    for an optimizer that unscales inside its own step (``fused=True``), whose gradients carry the loss scale."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    inner = getattr(optimizer, "_optimizer", optimizer)
    if scaler is None or not getattr(inner, "_step_supports_amp_scaling", False):
        return 1.0
    return float(scaler.get_scale())
