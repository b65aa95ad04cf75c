"""A subset of ImageNet-1k classes as a task whose labels are the ImageNet-1k indices ("imagenet-subset").

Layout: ``root/imagenet_index.json`` (``{wnid: index 0..999}``, or ``index=PATH``) and either
``root/train/<wnid>/…`` + ``root/val/<wnid>/…`` (Tiny ImageNet: training images and the test set), or a single
``root/<wnid>/…`` folder split "n per class". Labels are ImageNet-1k indices, so a network's original
1000-way classifier scores them directly (the source-task accuracy drop, the source inputs of the Fisher);
``num_classes`` is 1000 and ``task.split["class_indices"]`` lists the indices present. A score restricted to
the present classes (e.g. 200-way on Tiny ImageNet) takes ``argmax_{k ∈ present} z_k``: see
:class:`RestrictLogits` and :func:`local_labels`.

Subsets are seeded per class: the files of class with index c are permuted with
``numpy.random.default_rng([seed, c, 0])`` (training) or ``[seed, c, 1]`` (test); the first ``n_per_class``
(``test_per_class``) are kept; validation images are the last ``val_per_class`` of the kept training images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from l2sp.data import folders
from l2sp.data.task import folder_task
from l2sp.errors import L2SPError

INDEX_FILE = "imagenet_index.json"
NUM_IMAGENET_CLASSES = 1000


def read_index(path: str | Path, num_classes: int = NUM_IMAGENET_CLASSES) -> dict[str, int]:
    """``{wnid: ImageNet index}`` from a JSON file; indices must be distinct integers in [0, num_classes)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise L2SPError(
            f"imagenet-subset: index file {path} does not exist; pass index= to a JSON "
            "{wnid: ImageNet-1k index} file (Tiny ImageNet's imagenet_index.json)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise L2SPError(
            f"imagenet-subset: {path} is not valid JSON ({exc.msg}); fix or regenerate it"
        ) from exc
    if not isinstance(data, dict) or not data:
        raise L2SPError(
            f'imagenet-subset: {path} should map wnids to ImageNet indices, e.g. {{"n01443537": 1}}'
        )
    bad = [
        w
        for w, i in data.items()
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_classes
    ]
    if bad:
        raise L2SPError(
            f"imagenet-subset: {path} maps {bad[0]!r} to {data[bad[0]]!r}, not an integer in "
            f"[0, {num_classes}); fix the index file"
        )
    if len(set(data.values())) != len(data):
        raise L2SPError(f"imagenet-subset: {path} maps two wnids to the same index; fix the index file")
    return {str(w): int(i) for w, i in data.items()}


def class_names(index: dict[str, int], num_classes: int = NUM_IMAGENET_CLASSES) -> list[str]:
    """The ``num_classes`` names in label order: the wnid where known, ``"imagenet-NNN"`` elsewhere."""
    names = [f"imagenet-{i:03d}" for i in range(num_classes)]
    for w, i in index.items():
        names[i] = w
    return names


def _seeded(files: Sequence[str], k: int | None, seed: int, label: int, stream: int) -> list[str]:
    files = sorted(files)
    perm = np.random.default_rng([seed, label, stream]).permutation(len(files))
    return [files[i] for i in (perm if k is None else perm[:k])]


def _scan(folder: Path, index: dict[str, int], what: str, check: str, strict: bool) -> dict[str, list[str]]:
    present = folders.class_folders(folder, what)
    unknown = sorted(set(present) - set(index))
    if unknown:
        raise L2SPError(
            f"{what}: {len(unknown)} folder(s) of {folder} are not in the index file "
            f"({', '.join(unknown[:5])}); add them to {INDEX_FILE} or remove them"
        )
    missing = sorted(set(index) - set(present))
    folders.check_class_count(
        f"{what} ({folder.name}/)", len(present), len(index) if missing else None, strict
    )
    per_class = folders.scan_classes(folder, present, check)
    return dict(zip(present, per_class))


def subset_split(root: str | None, *, n_per_class: int | None, val_per_class: int, seed: int,
                 test_per_class: int | None = None, index: str | None = None, check: str = "header",
                 strict: bool = True, num_classes: int = NUM_IMAGENET_CLASSES) -> tuple[folders.Split, list[int]]:
    """The split (labels = ImageNet indices) and the sorted list of the indices present."""
    what = "imagenet-subset"
    if root is None:
        raise L2SPError(
            f"{what} needs root=, a folder with {INDEX_FILE} and train/ + val/ (or <wnid>/) folders"
        )
    base = Path(root).expanduser()
    if not base.is_dir():
        raise L2SPError(f"{what}: folder {base} does not exist; pass root= to the dataset folder")
    idx = read_index(index if index is not None else base / INDEX_FILE, num_classes)
    if val_per_class < 0 or (n_per_class is not None and (n_per_class < 1 or val_per_class >= n_per_class)):
        raise L2SPError(
            f"{what}: need n_per_class >= 1 and 0 <= val_per_class < n_per_class, got "
            f"{n_per_class} and {val_per_class}"
        )
    if test_per_class is not None and test_per_class < 1:
        raise L2SPError(f"{what}: test_per_class={test_per_class} must be >= 1 (or None for all)")
    train: list[folders.Sample] = []
    val: list[folders.Sample] = []
    test: list[folders.Sample] = []

    def take_train(w: str, files: list[str], k: int | None) -> None:
        c = idx[w]
        if k is not None and len(files) < k or len(files) <= val_per_class:
            raise L2SPError(
                f"{what}: class {w} has {len(files)} training images, fewer than n_per_class="
                f"{k} (val_per_class={val_per_class}); lower them or complete the class"
            )
        kept = _seeded(files, k, seed, c, 0)
        cut = len(kept) - val_per_class
        train.extend((p, c) for p in kept[:cut])
        val.extend((p, c) for p in kept[cut:])

    if (base / "train").is_dir() and (base / "val").is_dir():
        tr = _scan(base / "train", idx, what, check, strict)
        te = _scan(base / "val", idx, what, check, strict)
        for w in sorted(tr, key=idx.__getitem__):
            take_train(w, tr[w], n_per_class)
        for w in sorted(te, key=idx.__getitem__):
            test.extend((p, idx[w]) for p in _seeded(te[w], test_per_class, seed, idx[w], 1))
        protocol = "train/ (seeded subset) + val/ as test; labels = ImageNet-1k indices"
    else:
        if n_per_class is None:
            raise L2SPError(
                f"{what}: {base} has no train/ + val/ folders, so the split is drawn per class "
                "from <wnid>/ folders; pass n_per_class="
            )
        flat = _scan(base, idx, what, check, strict)
        for w in sorted(flat, key=idx.__getitem__):
            files = _seeded(flat[w], None, seed, idx[w], 0)
            if len(files) <= n_per_class:
                raise L2SPError(
                    f"{what}: class {w} has {len(files)} images; n_per_class={n_per_class} leaves "
                    "none for test; lower n_per_class"
                )
            take_train(w, files[:n_per_class], n_per_class)
            rest = files[n_per_class:]
            test.extend((p, idx[w]) for p in (rest if test_per_class is None else rest[:test_per_class]))
        protocol = f"{n_per_class} per class from <wnid>/ folders, seeded; labels = ImageNet-1k indices"
    present = sorted({c for _, c in train} | {c for _, c in test})
    split = folders.Split(class_names(idx, num_classes), train, val, test, str(base), protocol)
    return split, present


def build(root: str | None, *, n_per_class: int | None, val_per_class: int, seed: int,
          test_per_class: int | None = None, index: str | None = None, check: str = "header", strict: bool = True,
          **settings):
    """The "imagenet-subset" :class:`~l2sp.data.TaskData` (``num_classes`` = 1000, labels = ImageNet
    indices); ``task.split["class_indices"]`` lists the indices present. ``settings``: the transform and
    loading arguments of :func:`l2sp.data.folder_task` (image_size, resize, ..., cache, device)."""
    split, present = subset_split(root, n_per_class=n_per_class, val_per_class=val_per_class, seed=seed,
                                  test_per_class=test_per_class, index=index, check=check, strict=strict)
    task = folder_task("imagenet-subset", split, n_per_class=n_per_class, val_per_class=val_per_class, seed=seed,
                       **settings)
    task.split["class_indices"] = present
    return task


def present_classes(task) -> list[int]:
    """The ImageNet indices present in an "imagenet-subset" task (its ``split["class_indices"]``)."""
    try:
        return list(task.split["class_indices"])
    except (AttributeError, KeyError, TypeError) as exc:
        raise L2SPError(
            "this task records no class_indices; build it with build_task('imagenet-subset', ...)"
        ) from exc


class RestrictLogits(nn.Module):
    """``model(x)[..., indices]``: the score restricted to the present classes (e.g. 200-way on Tiny
    ImageNet); pair with :func:`local_labels`, which maps an ImageNet index to its position in ``indices``."""

    def __init__(self, model: nn.Module, indices: Sequence[int]):
        super().__init__()
        if len(indices) == 0 or len(set(indices)) != len(indices):
            raise L2SPError("RestrictLogits needs a non-empty list of distinct class indices")
        self.model = model
        self.register_buffer("indices", torch.as_tensor(list(indices), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).index_select(-1, self.indices)


def local_labels(labels: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """Position of each ImageNet label in ``indices`` (a label outside ``indices`` raises L2SPError)."""
    ind = torch.as_tensor(list(indices), dtype=torch.long, device=labels.device)
    lookup = torch.full(
        (int(max(int(ind.max()), int(labels.max())) + 1),), -1, dtype=torch.long, device=labels.device
    )
    lookup[ind] = torch.arange(len(ind), device=labels.device)
    out = lookup[labels.long()]
    if bool((out < 0).any()):
        raise L2SPError("a label is not among the restricted class indices; pass the task's class_indices")
    return out
