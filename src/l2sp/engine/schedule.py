"""Iteration-based learning-rate schedules (a factor of the initial rate at each step, 0-based).

- step:     lr_t = lr · γ^{#(milestones ≤ t)}       (the paper: lr/10 from step 6000 of 9000)
- poly:     lr_t = lr · (1 − t/T)^power               (segmentation, DeepLab/PSPNet)
- constant: lr_t = lr
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch


@dataclass
class Schedule:
    """Picklable multiplicative factor for ``torch.optim.lr_scheduler.LambdaLR``."""

    kind: str = "step"
    total: int = 9000
    milestones: list[int] = field(default_factory=lambda: [6000])
    gamma: float = 0.1
    power: float = 0.9

    def __call__(self, step: int) -> float:
        if self.kind == "step":
            return self.gamma ** bisect.bisect_right(sorted(self.milestones), step)
        if self.kind == "poly":
            return max(0.0, 1.0 - step / self.total) ** self.power
        return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying ``schedule``: the optimizer step of iteration t uses lr·schedule(t)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
