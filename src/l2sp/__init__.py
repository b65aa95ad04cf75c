"""l2sp: fine-tune with an explicit inductive bias toward the pre-trained model (L2-SP and its family).

    w0 = l2sp.snapshot(model)                       # before replacing the head
    reg = l2sp.regularizer("l2-sp", model, w0, alpha=0.1, beta=0.01)
    loss = criterion(model(x), y) + reg()           # or: reg.attach(optimizer)
"""

from __future__ import annotations

from typing import Any

from l2sp import fisher
from l2sp.errors import L2SPError
from l2sp.penalties import KINDS, Penalty, Regularizer, register_penalty, regularizer
from l2sp.reference import snapshot

__version__ = "0.1.0"
__all__ = ["KINDS", "L2SPError", "Penalty", "Regularizer", "finetune", "fisher", "register_penalty", "regularizer",
           "snapshot"]


def finetune(config: Any, **overrides: Any) -> dict:
    """Run the paper's fine-tuning protocol from a config (dataclass, dict, YAML path or preset name)."""
    from l2sp.engine.run import finetune as _finetune

    return _finetune(config, **overrides)
