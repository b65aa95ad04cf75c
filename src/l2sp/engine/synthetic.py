"""Small synthetic classification tasks held in memory (tests, benchmarks, examples without a dataset).

Class k has a fixed random mean image μ_k; an example is μ_k + σ·noise, so a small CNN learns it within a
few dozen steps and accuracy above chance shows that training happened.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class TensorImages(Dataset):
    """(image, label) pairs from in-memory tensors, with a batched ``__getitems__``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])

    def get_batch(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of ``idx`` as two tensors (the trainer's fast path)."""
        t = torch.as_tensor(idx, dtype=torch.long)
        return self.x[t], self.y[t]

    def __getitems__(self, idx: list[int]) -> list[tuple[torch.Tensor, int]]:
        t = torch.as_tensor(idx, dtype=torch.long)
        return list(zip(self.x[t].unbind(0), self.y[t].tolist()))


def synthetic_task(
    num_classes: int = 5,
    n_train: int = 128,
    n_val: int = 64,
    n_test: int = 64,
    shape: tuple[int, int, int] = (1, 28, 28),
    noise: float = 1.0,
    seed: int = 0,
    ten_crop: bool = False,
):
    """A :class:`l2sp.data.TaskData` of Gaussian blobs around per-class mean images (test items are
    (10, C, H, W) copies with ``ten_crop=True``)."""
    from l2sp.data import TaskData

    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, *shape, generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        return means[y] + noise * torch.randn(n, *shape, generator=g), y

    (xtr, ytr), (xva, yva), (xte, yte) = draw(n_train), draw(n_val), draw(n_test)
    if ten_crop:
        xte = xte[:, None].expand(-1, 10, *shape).clone()
    return TaskData(
        train=TensorImages(xtr, ytr),
        val=TensorImages(xva, yva),
        test=TensorImages(xte, yte),
        num_classes=num_classes,
        classes=[f"class{k}" for k in range(num_classes)],
        split={"synthetic": True, "seed": seed, "n_train": n_train},
        in_channels=shape[0],
    )
