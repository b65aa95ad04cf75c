"""The poly learning rate of DeepLab/PSPNet: lr_t = base_lr · (1 − t/T)^power (the engine's "poly")."""

from __future__ import annotations

from l2sp.engine.schedule import Schedule
from l2sp.errors import L2SPError


def poly_lr(base_lr: float, step: int, total: int, power: float = 0.9) -> float:
    """lr at 0-based ``step`` of ``total``: base_lr · max(0, 1 − step/total)^power (0 from ``total`` on)."""
    if total <= 0:
        raise L2SPError(f"poly_lr needs total > 0 iterations, got {total}")
    if step < 0:
        raise L2SPError(f"poly_lr needs step >= 0, got {step}")
    return float(base_lr) * Schedule(kind="poly", total=int(total), power=float(power))(int(step))
