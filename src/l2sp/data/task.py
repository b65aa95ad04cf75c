"""A task's datasets (:class:`TaskData`) and the paper's transforms attached to a folder split
(:func:`folder_task`: file datasets, or on-device datasets with ``device=``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from l2sp.data import folders
from l2sp.data.device import decode_files, file_datasets
from l2sp.data.stats import cached_mean, streaming_mean
from l2sp.data.transforms import deterministic_transform, normalization_stats, paper_transform
from l2sp.errors import L2SPError


@dataclass
class TaskData:
    """One task's datasets. ``val`` may be empty (``val_per_class == 0``)."""

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    num_classes: int
    classes: list[str]
    split: dict
    in_channels: int = 3


class _Deterministic:
    """i ↦ the i-th file decoded and resized (the deterministic part of the pipeline); picklable."""

    def __init__(self, files: list[str], resize: int, keep_aspect: bool):
        self.files, self.transform = files, deterministic_transform(resize, keep_aspect)

    def __call__(self, i: int) -> torch.Tensor:
        return self.transform(folders.load_image(self.files[i])).as_subclass(torch.Tensor)


def _rel(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else rel


def folder_task(name: str, split: folders.Split, *, n_per_class: int | None, val_per_class: int, seed: int,
                image_size: int | None, resize: int | None, keep_aspect: bool, ten_crop: bool,
                normalization: str, blur: bool, cache: bool = True, mean_workers: int = 0,
                device: torch.device | str | None = None) -> TaskData:
    """Attach the paper's transforms (and the cached training mean) to a folder split; with ``device``, the
    on-device datasets of :mod:`l2sp.data.device` (``mean_workers`` processes decode the images)."""
    crop = 224 if image_size is None else image_size
    size = resize if resize is not None else (256 if image_size is None else round(crop * 256 / 224))
    if size < crop:
        raise L2SPError(f"resize={size} is smaller than image_size={crop}; use resize >= image_size")
    if not split.train or not split.test:
        raise L2SPError(f"{name}: the split has {len(split.train)} training and {len(split.test)} test "
                        "images; check root= and the per-class numbers")
    decoded = {}
    if device is not None:
        decoded["train"] = decode_files([p for p, _ in split.train], size, device=device, workers=mean_workers)
    mean, key = None, None
    if normalization == "train-mean":
        mean, key = _train_mean(split, size, keep_aspect, cache, mean_workers, decoded.get("train"))
    stats = normalization_stats(normalization, 3, mean)
    m, s = (None, None) if stats is None else stats
    parts = {"train": split.train, "val": split.val, "test": split.test}
    if device is not None:
        data = file_datasets(parts, size=size, crop=crop, blur=blur, ten_crop=ten_crop, mean=m, std=s,
                             device=device, workers=mean_workers, decoded=decoded)
    else:
        kw = {"crop": crop, "resize": size, "keep_aspect": keep_aspect, "mean": m, "std": s}
        tfs = {"train": paper_transform(True, blur=blur, **kw), "val": paper_transform(False, **kw),
               "test": paper_transform(False, ten_crop=ten_crop, **kw)}
        data = {part: folders.FileDataset(items, tfs[part]) for part, items in parts.items()}
    record = {
        "task": name, "protocol": split.protocol, "seed": seed, "root": split.root, "classes": split.classes,
        "n_per_class": n_per_class, "val_per_class": val_per_class, "image_size": crop, "resize": size,
        "keep_aspect": keep_aspect, "ten_crop": ten_crop, "normalization": normalization, "blur": blur,
        "train_mean": mean, "mean_cache_key": key,
        **{part: [[_rel(p, split.root), c] for p, c in items] for part, items in parts.items()},
    }
    return TaskData(train=data["train"], val=data["val"], test=data["test"], num_classes=len(split.classes),
                    classes=split.classes, split=record)


def _train_mean(split: folders.Split, size: int, keep_aspect: bool, cache: bool, workers: int,
                decoded: torch.Tensor | None) -> tuple[list[float], str]:
    """The cached per-channel training mean (from the decoded images when given, else from the files)."""
    files = [p for p, _ in split.train]

    def compute() -> list[float]:
        if decoded is not None:  # the same per-image float64 sums as from the files
            return streaming_mean(len(decoded), lambda i: decoded[i].cpu(), 3)
        return streaming_mean(len(files), _Deterministic(files, size, keep_aspect), 3, workers)

    payload = {"files": [_rel(p, split.root) for p in files], "root": str(Path(split.root).resolve()),
               "resize": size, "keep_aspect": keep_aspect}
    return cached_mean(payload, compute, cache=cache)
