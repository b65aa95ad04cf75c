"""L2-SP as a 🤗 ``transformers.TrainerCallback``.

    w0 = l2sp.snapshot(model)                        # keyed like the model the Trainer trains
    model.classifier = nn.Linear(hidden, num_labels)
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[L2SPCallback(w0, "l2-sp", alpha=0.1, beta=0.01)])

- The regularizer ``Ω`` (``l2sp.regularizer(kind, model, source, ...)``) is built in ``on_train_begin`` on the
  model the Trainer trains (already on its device); it is ``callback.regularizer``.
- ``mode="coupled"`` (default): ``g ← g + ∇Ω(w)`` in ``on_pre_optimizer_step``, once per optimizer step, after
  the last micro-batch of gradient accumulation and after AMP unscaling. The Trainer clips gradients
  (``max_grad_norm``, 1.0 by default) *before* that event, so the clipped quantity is ∇J alone and the step uses
  ``clip(∇J) + ∇Ω`` (as weight decay escapes clipping); with ``max_grad_norm=0`` it is exactly the trajectory of
  ``loss + reg()``. ``"decoupled"`` and ``"proximal"`` go through ``reg.attach(optimizer, mode)`` on the optimizer
  the Trainer built (the one inside accelerate's wrapper).
- ``Ω`` is added to the training logs as ``l2sp_penalty`` (one pass over the penalized tensors per log, never
  per step). The reporters of ``report_to`` run before user callbacks, so they do not see it; to send it to
  TensorBoard or W&B, set ``report_to=[]`` and list the reporter's callback after this one.
- Resuming (``trainer.train(resume_from_checkpoint=...)``) rebuilds Ω from the ``source`` the script passes: pass
  the pre-trained weights again, not the checkpoint (the Trainer saves no tensors for callbacks).
- Only trainable parameters are governed (PEFT/LoRA: see docs/integrations.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from l2sp.errors import L2SPError
from l2sp.integrations._common import PenaltyCallback, build, require, value

_tf = require("transformers", "transformers", "l2sp.integrations.transformers")
if not hasattr(_tf.TrainerCallback, "on_pre_optimizer_step"):
    raise L2SPError(f"l2sp.integrations.transformers needs the on_pre_optimizer_step event, which transformers "
                    f"{_tf.__version__} lacks; pip install -U 'l2sp[transformers]'")

__all__ = ["L2SPCallback"]

_WHERE = "the model the Trainer trains (model.named_parameters())"


class L2SPCallback(PenaltyCallback, _tf.TrainerCallback):
    """Train with ``transformers.Trainer`` on J(w) + Ω(w), Ω the ``kind`` penalty toward ``source``.

    Args:
        source: w0 keyed like the model given to the Trainer (``l2sp.snapshot(model)`` taken before the head is
            replaced), a module, or a checkpoint path; ``None`` for ``kind="l2"``.
        kind: ``l2, l2-sp, l2-sp-fisher, l1-sp, gl-sp, gl-sp-fisher``.
        alpha, beta: coefficients on S (shared with the source) and S̄ (new parameters).
        fisher: ``{name: F}`` or a file from ``l2sp.fisher.save`` (the ``-fisher`` kinds).
        include: ``"all"`` or ``"weights"`` (only conv/linear weights of S).
        mode: ``"coupled"`` (∇Ω added to the gradients), ``"decoupled"`` or ``"proximal"``.
        log_penalty: add Ω to the training logs as ``l2sp_penalty``.
        **options: passed to ``l2sp.regularizer`` (``eps``).
    """

    def __init__(self, source: Mapping[str, torch.Tensor] | torch.nn.Module | str | os.PathLike | None,
                 kind: str, *, alpha: float, beta: float, fisher: Any = None, include: str = "all",
                 mode: str = "coupled", log_penalty: bool = True, **options: Any):
        super().__init__(source, kind, alpha=alpha, beta=beta, fisher=fisher, include=include, mode=mode,
                         log_penalty=log_penalty, **options)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise RuntimeError("the Trainer passed no model to L2SPCallback.on_train_begin")
        self._release()
        self.regularizer = build(model, self.settings, self.source, self.fisher, _WHERE)
        if self.settings["mode"] != "coupled":
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
            self._handle = self.regularizer.attach(inner, self.settings["mode"])

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                              **kwargs: Any) -> None:
        """g ← g + ∇Ω(w) after accumulation, unscaling and clipping, before the optimizer steps (coupled mode)."""
        if self.regularizer is not None and self.settings["mode"] == "coupled":
            _unscale(optimizer)
            self.regularizer.add_grad_()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        """Add Ω(w) to a training log (one holding ``loss``), and to ``state.log_history``."""
        if not self.log_penalty or self.regularizer is None or logs is None or "loss" not in logs:
            return
        omega = round(value(self.regularizer).item(), 8)
        logs["l2sp_penalty"] = omega
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1]["l2sp_penalty"] = omega

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._release()

    def _release(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _unscale(optimizer: Any) -> None:
    """Unscale fp16 gradients now if the Trainer has not (it does when it clips or measures the gradient norm;
    versions that skip this without clipping would otherwise divide ∇Ω by the loss scale in ``scaler.step``)."""
    scaler, inner = getattr(optimizer, "scaler", None), getattr(optimizer, "optimizer", None)
    if scaler is None or inner is None or not scaler.is_enabled():
        return
    try:
        scaler.unscale_(inner)
    except RuntimeError as exc:  # already unscaled since the last update(): nothing to do
        if "already been called" not in str(exc):
            raise
