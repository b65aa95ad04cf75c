"""Per-channel training mean ``μ_c = Σ_images Σ_pixels x_c / (255 · #pixels)``, computed once and cached.

The mean is taken after the deterministic part of the pipeline (decode, grayscale → 3 channels, resize), so
it is the mean of what the network sees before the random crop. The cache key hashes the file list and the
resize settings, so a different split or resize never reuses a stale mean.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from l2sp.io import atomic_write_json


def cache_dir() -> Path:
    """``$L2SP_CACHE`` or ``~/.cache/l2sp``."""
    return Path(os.environ.get("L2SP_CACHE", Path.home() / ".cache" / "l2sp"))


def split_key(payload: object) -> str:
    """sha256 of a JSON-serialisable description of the split and preprocessing (first 16 hex digits)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def tensor_mean(images: torch.Tensor) -> list[float]:
    """Per-channel mean of a uint8 batch (N, C, H, W), scaled to [0, 1]; float64 accumulation."""
    sums = images.to(torch.float64).sum(dim=(0, 2, 3))
    return (sums / (255.0 * images.shape[0] * images.shape[2] * images.shape[3])).tolist()


def streaming_mean(n: int, load: Callable[[int], torch.Tensor], channels: int = 3,
                   num_workers: int = 0) -> list[float]:
    """Pixel-weighted per-channel mean of ``load(i)`` (uint8 C×H×W) for i < n, scaled to [0, 1]."""
    sums = torch.zeros(channels, dtype=torch.float64)
    count = 0
    if num_workers > 0:
        loader = torch.utils.data.DataLoader(_Indexed(n, load), batch_size=None, num_workers=num_workers)
    else:
        loader = (load(i) for i in range(n))
    for img in loader:
        sums += img.to(torch.float64).sum(dim=(1, 2))
        count += img.shape[1] * img.shape[2]
    return (sums / (255.0 * max(count, 1))).tolist()


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, n: int, load: Callable[[int], torch.Tensor]):
        self.n, self.load = n, load

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.load(i)


def cached_mean(key_payload: object, compute: Callable[[], Sequence[float]], *, cache: bool = True,
                directory: str | os.PathLike | None = None) -> tuple[list[float], str]:
    """Return (mean, key): read ``<cache>/means/<key>.json`` if present, else compute and store it."""
    key = split_key(key_payload)
    path = Path(directory or cache_dir()) / "means" / f"{key}.json"
    if cache and path.is_file():
        try:
            record = json.loads(path.read_text())
            return [float(m) for m in record["mean"]], key
        except (ValueError, KeyError):
            pass  # corrupt cache entry: recompute and overwrite
    mean = [float(m) for m in compute()]
    if cache:
        try:
            atomic_write_json(path, {"mean": mean, "key": key})
        except OSError:
            pass  # a read-only cache only costs a recomputation next time
    return mean, key
