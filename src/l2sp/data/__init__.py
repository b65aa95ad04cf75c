"""Datasets, the paper's split protocols and preprocessing, and the built-in Fashion-MNIST benchmark.

``build_task(name, ...)`` returns a :class:`TaskData`: train / val / test datasets of ``(image, label)``
items (test items are ``(10, C, H, W)`` with ``ten_crop=True``) and a JSON-serialisable ``split`` record
(seed, file lists or indices, training mean) that each run saves. With ``device=...`` the datasets decode every
image once and keep it on that device, augmenting whole batches there (:mod:`l2sp.data.device`); image packs
(:mod:`l2sp.data.pack`) carry a task's files in one file to another machine.
"""

from __future__ import annotations

import os

import torch

from l2sp.data import fashion_mnist, folders, imagenet_subset
from l2sp.data.device import DeviceImages, PaperAugment, to_device
from l2sp.data.task import TaskData, folder_task
from l2sp.data.transforms import NORMALIZATIONS
from l2sp.errors import L2SPError

TASKS = ("fashion-mnist-source", "fashion-mnist-target", "imagefolder", "caltech101", "caltech256",
         "indoor67", "dogs120", "food101", "imagenet-subset")

_COMMON = {"check", "cache", "mean_workers"}
_OPTIONS = {
    "fashion-mnist-source": set(), "fashion-mnist-target": set(),
    "imagefolder": _COMMON | {"test_per_class", "recursive"},
    "caltech101": _COMMON | {"test_per_class", "strict"},
    "caltech256": _COMMON | {"test_per_class", "strict"},
    "indoor67": _COMMON | {"strict"},
    "food101": _COMMON | {"strict"},
    "dogs120": _COMMON | {"strict", "test_per_class", "imagenet_val", "imagenet_val_labels"},
    "imagenet-subset": _COMMON | {"strict", "test_per_class", "index"},
}


def build_task(name: str, *, root: str | None = None, n_per_class: int | None = None,
               val_per_class: int | None = None, seed: int = 0, image_size: int | None = None,
               resize: int | None = None, keep_aspect: bool = False, ten_crop: bool = False,
               normalization: str = "train-mean", blur: bool = True, device: torch.device | str | None = None,
               **options) -> TaskData:
    """Build a task by name (see ``TASKS``).

    ``device``: None keeps the datasets on the host (files decoded by DataLoader workers at every epoch);
    a device decodes every image once, keeps it there as uint8 and transforms whole batches on it
    (:mod:`l2sp.data.device`: ``get_batch(indices)``, ``on_device = True``), with the same random draws.

    Folder tasks take ``root`` (the downloaded dataset) and the extra options ``check`` ("header" | "full" |
    "none": how unreadable files are detected), ``cache`` (cache the training mean, default True),
    ``mean_workers``, ``strict`` (the protocol's class count is required), ``test_per_class``, and for
    dogs120 ``imagenet_val`` / ``imagenet_val_labels``. Defaults: crop 224 after resize 256 (28 after 32 for
    Fashion-MNIST); ``val_per_class`` 0 for folder tasks (carved from the n training images), 100 for
    Fashion-MNIST (drawn from the remaining training images).
    """
    if name not in TASKS:
        raise L2SPError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    unknown = sorted(set(options) - _OPTIONS[name])
    if unknown:
        allowed = ", ".join(sorted(_OPTIONS[name])) or "none"
        raise L2SPError(f"unknown option(s) {', '.join(unknown)} for task {name!r}; "
                        f"allowed extras: {allowed}")
    if normalization not in NORMALIZATIONS:
        raise L2SPError(f"unknown normalization {normalization!r}; use one of {', '.join(NORMALIZATIONS)}")
    if device is not None and keep_aspect:
        raise L2SPError("an on-device task needs images of one size: use keep_aspect=False or device=None")
    if name.startswith("fashion-mnist"):
        task = fashion_mnist.build(name.rsplit("-", 1)[1], root=root, n_per_class=n_per_class,
                                   val_per_class=val_per_class, seed=seed, image_size=image_size,
                                   resize=resize, ten_crop=ten_crop, normalization=normalization, blur=blur)
        if device is not None:
            task.train, task.val, task.test = (to_device(d, device) for d in (task.train, task.val, task.test))
        return task

    v = 0 if val_per_class is None else val_per_class
    if name == "imagenet-subset":  # labels = ImageNet-1k indices (l2sp.data.imagenet_subset)
        return imagenet_subset.build(root, n_per_class=n_per_class, val_per_class=v, seed=seed,
                                     image_size=image_size, resize=resize, keep_aspect=keep_aspect,
                                     ten_crop=ten_crop, normalization=normalization, blur=blur, device=device,
                                     **options)
    check = options.get("check", "header")
    strict = options.get("strict", True)
    common = {"n_per_class": n_per_class, "val_per_class": v, "seed": seed, "check": check}
    if name == "imagefolder":
        split = folders.imagefolder(root, test_per_class=options.get("test_per_class"),
                                    recursive=options.get("recursive", True), **common)
    elif name in ("caltech101", "caltech256"):
        split = folders.caltech(name, root, test_per_class=options.get("test_per_class"), strict=strict,
                                **common)
    elif name == "indoor67":
        split = folders.indoor67(root, strict=strict, **common)
    elif name == "food101":
        split = folders.food101(root, strict=strict, **common)
    else:
        split = folders.dogs120(root, imagenet_val=options.get("imagenet_val"),
                                imagenet_val_labels=options.get("imagenet_val_labels"),
                                test_per_class=options.get("test_per_class"), strict=strict, **common)
    return folder_task(name, split, n_per_class=n_per_class, val_per_class=v, seed=seed,
                       image_size=image_size, resize=resize, keep_aspect=keep_aspect, ten_crop=ten_crop,
                       normalization=normalization, blur=blur, cache=options.get("cache", True),
                       mean_workers=options.get("mean_workers", 0), device=device)


_TRANSFORM_KEYS = ("image_size", "resize", "ten_crop", "normalization", "blur")


def task_from_split(split: dict, *, root: str | None = None, device: torch.device | str | None = None,
                    **overrides) -> TaskData:
    """Rebuild the task a run recorded in ``split`` (e.g. its saved ``split.json``), with the same files
    (on ``device`` when given, as :func:`build_task`).

    ``root`` relocates a folder dataset (default: the recorded root); ``overrides`` change transform settings
    (``ten_crop``, ``normalization``, ...). Fashion-MNIST splits are rebuilt from their seed and checked
    against the recorded indices (or their sha256); a mismatch raises L2SPError.
    """
    name = split.get("task")
    if name not in TASKS:
        raise L2SPError(f"the split record names task {name!r}, not one of {', '.join(TASKS)}; "
                        "pass the split dict a run saved")
    settings = {k: split[k] for k in _TRANSFORM_KEYS if k in split}
    unknown = sorted(set(overrides) - set(_TRANSFORM_KEYS) - {"keep_aspect"})
    if unknown:
        raise L2SPError(f"cannot override {', '.join(unknown)} of a recorded split; only "
                        f"{', '.join(_TRANSFORM_KEYS)}, keep_aspect")
    settings.update(overrides)
    if name.startswith("fashion-mnist"):
        task = build_task(name, root=root, n_per_class=split["n_per_class"],
                          val_per_class=split["val_per_class"], seed=split["seed"], device=device, **settings)
        for part in ("train", "val", "test"):
            if task.split[part] != split[part]:
                raise L2SPError(f"the {part} indices rebuilt from seed {split['seed']} differ from the "
                                "record; the Fashion-MNIST files are not the recorded ones")
        return task
    base = root if root is not None else split["root"]

    def absolute(items: list) -> list[folders.Sample]:
        return [(p if os.path.isabs(p) else os.path.join(base, p), int(c)) for p, c in items]

    parts = {part: absolute(split[part]) for part in ("train", "val", "test")}
    missing = [p for items in parts.values() for p, _ in items if not os.path.isfile(p)]
    if missing:
        raise L2SPError(f"{len(missing)} recorded file(s) are missing, e.g. {missing[0]}; pass root= to "
                        "where the dataset now lives")
    rebuilt = folders.Split(list(split["classes"]), parts["train"], parts["val"], parts["test"], str(base),
                            split.get("protocol", "recorded split"))
    return folder_task(name, rebuilt, n_per_class=split.get("n_per_class"),
                       val_per_class=split.get("val_per_class", 0), seed=split.get("seed", 0),
                       keep_aspect=settings.pop("keep_aspect", split.get("keep_aspect", False)), device=device,
                       **settings)


__all__ = ["TASKS", "DeviceImages", "PaperAugment", "TaskData", "build_task", "folder_task", "task_from_split"]
