"""The built-in offline benchmark: Fashion-MNIST split into a source task and a target task.

Source task: the 5 even labels {0 T-shirt/top, 2 Pullover, 4 Coat, 6 Shirt, 8 Bag}, all their training images
(minus a carved validation part); target task: the 5 odd labels {1 Trouser, 3 Dress, 5 Sandal, 7 Sneaker,
9 Ankle boot}, re-indexed 0..4, ``n_per_class`` training images and ``val_per_class`` validation images drawn
from the remaining *training* images; both use the official test images of their classes.

Splits: for each class, one permutation of its training indices drawn from ``numpy.random.default_rng([seed,
label])``; training = its first n, validation = its last v. So the split of a class does not depend on the
other classes, training sets are nested in n (n=10 ⊂ n=30 ⊂ n=100) and the validation set does not depend
on n.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from l2sp.data.stats import cache_dir, tensor_mean
from l2sp.data.task import TaskData
from l2sp.data.transforms import BatchAugment, normalization_stats, resize_uint8
from l2sp.errors import L2SPError

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
SOURCE_LABELS = (0, 2, 4, 6, 8)
TARGET_LABELS = (1, 3, 5, 7, 9)
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "L2SP_FASHION_MNIST"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
#: explicit index lists longer than this are recorded as (count, sha256) in the split record
MAX_LISTED = 5000


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped): bytes ``00 00 08 ndim``, ndim big-endian uint32 sizes, data."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise L2SPError(f"{path} is not a uint8 IDX file; re-download Fashion-MNIST")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise L2SPError(f"{path} holds {data.size} bytes for shape {tuple(dims)}; the file is truncated")
    return data.reshape(tuple(int(d) for d in dims))


def _find(folder: Path, stem: str) -> Path | None:
    for sub in (folder, folder / "FashionMNIST" / "raw", folder / "raw"):
        for name in (stem, stem + ".gz"):
            if (sub / name).is_file():
                return sub / name
    return None


def _folder_files(folder: Path) -> dict[str, tuple[Path, Path]] | None:
    found = {}
    for part, (img, lab) in FILES.items():
        a, b = _find(folder, img), _find(folder, lab)
        if a is None or b is None:
            return None
        found[part] = (a, b)
    return found


def locate(root: str | os.PathLike | None = None) -> dict[str, tuple[Path, Path]] | None:
    """IDX files from ``root`` / ``$L2SP_FASHION_MNIST``, else Debian's folder; None if neither has them."""
    explicit = root if root is not None else os.environ.get(ENV_VAR)
    if explicit is not None:
        files = _folder_files(Path(explicit))
        if files is None:
            raise L2SPError(f"no Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz] ...) in {explicit}; "
                            "pass the folder holding them")
        return files
    return _folder_files(DEBIAN_DIR)


@lru_cache(maxsize=4)
def _load_cached(root: str | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    files = locate(root)
    if files is not None:
        out = {}
        for part, (img, lab) in files.items():
            x, y = read_idx(img), read_idx(lab)
            if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
                raise L2SPError(f"{img} and {lab} do not match (shapes {x.shape}, {y.shape}); "
                                "re-download them")
            out[part] = (torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64)))
        return out
    return _download()


def _download() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from torchvision.datasets import FashionMNIST

    target = cache_dir() / "fashion-mnist"
    try:
        parts = {p: FashionMNIST(str(target), train=(p == "train"), download=True) for p in ("train", "test")}
    except Exception as exc:  # offline: URLError / OSError / RuntimeError from torchvision
        raise L2SPError(
            f"Fashion-MNIST not found ({type(exc).__name__} downloading it); run `apt-get install "
            f"dataset-fashion-mnist` or pass root= (or set {ENV_VAR}) to a folder with its IDX files"
        ) from exc
    return {p: (d.data.clone(), d.targets.clone().long()) for p, d in parts.items()}


def load(root: str | os.PathLike | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train": (uint8 N×28×28, int64 N), "test": (...)} from the first source that has the files."""
    return _load_cached(_key(root))


def _key(root: str | os.PathLike | None) -> str | None:
    root = root if root is not None else os.environ.get(ENV_VAR)
    return None if root is None else str(Path(root).resolve())


@lru_cache(maxsize=4)
def _resized(root: str | None, part: str, size: int) -> torch.Tensor:
    """The images of one part as (N, 1, size, size) uint8, resized once per process."""
    return resize_uint8(_load_cached(root)[part][0][:, None], size)


def class_permutation(indices: np.ndarray, seed: int, label: int) -> np.ndarray:
    """The seeded permutation of one class's training indices."""
    return np.random.default_rng([seed, label]).permutation(indices)


def _record(idx: np.ndarray) -> dict | list[int]:
    idx = np.asarray(idx, dtype=np.int64)
    if len(idx) <= MAX_LISTED:
        return idx.tolist()
    return {"count": len(idx), "sha256": hashlib.sha256(idx.tobytes()).hexdigest()}


class InMemoryImages(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) held in memory with a batched transform; ``__getitems__`` lets the
    DataLoader transform a whole batch in one call (each image still draws its own random parameters)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: BatchAugment):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i:i + 1])[0], int(self.labels[i])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.transform(self.images[idx])
        return list(zip(x.unbind(0), self.labels[idx].tolist()))


def build(which: str, *, root: str | None = None, n_per_class: int | None = None,
          val_per_class: int | None = None, seed: int = 0, image_size: int | None = None,
          resize: int | None = None, ten_crop: bool = False, normalization: str = "train-mean",
          blur: bool = True):
    """Build the "source" or "target" task as a :class:`l2sp.data.TaskData`."""
    labels_kept = SOURCE_LABELS if which == "source" else TARGET_LABELS
    n_default = None if which == "source" else 30
    n = n_default if n_per_class is None else n_per_class
    v = 100 if val_per_class is None else val_per_class
    crop = 28 if image_size is None else image_size
    size = resize if resize is not None else (32 if image_size is None else round(crop * 256 / 224))
    if size < crop:
        raise L2SPError(f"resize={size} is smaller than image_size={crop}; use resize >= image_size")
    normalization_stats(normalization, 1, [0.0])  # fail fast on an unusable normalization
    if (n is not None and n < 1) or v < 0:
        raise L2SPError(f"n_per_class={n} and val_per_class={v} must be >= 1 and >= 0")

    data = load(root)
    key = _key(root)
    xtr, ytr = data["train"]
    xte, yte = data["test"]
    train_idx, val_idx, test_idx = [], [], []
    ytr_np, yte_np = ytr.numpy(), yte.numpy()
    for label in labels_kept:
        perm = class_permutation(np.flatnonzero(ytr_np == label), seed, label)
        avail = len(perm) - v
        take = avail if n is None else n
        if take > avail or take < 1:
            raise L2SPError(f"class {CLASSES[label]!r} has {len(perm)} training images, fewer than "
                            f"n_per_class={'all' if n is None else n} + val_per_class={v}; lower them")
        train_idx.append(perm[:take])
        val_idx.append(perm[len(perm) - v:])
        test_idx.append(np.flatnonzero(yte_np == label))
    train_idx, val_idx, test_idx = (np.sort(np.concatenate(i)) for i in (train_idx, val_idx, test_idx))

    remap = torch.full((10,), -1, dtype=torch.long)
    remap[list(labels_kept)] = torch.arange(len(labels_kept))
    all_train, all_test = _resized(key, "train", size), _resized(key, "test", size)
    tr_x = all_train[torch.from_numpy(train_idx)]
    mean = tensor_mean(tr_x)
    stats = normalization_stats(normalization, 1, mean)
    m, s = (None, None) if stats is None else stats
    train_tf = BatchAugment(True, crop, blur=blur, mean=m, std=s)
    eval_tf = BatchAugment(False, crop, mean=m, std=s)
    test_tf = BatchAugment(False, crop, ten_crop=ten_crop, mean=m, std=s)

    def subset(x: torch.Tensor, y: torch.Tensor, idx: np.ndarray, tf: BatchAugment) -> InMemoryImages:
        t = torch.from_numpy(idx)
        return InMemoryImages(x[t].contiguous(), remap[y[t]], tf)

    split = {
        "task": f"fashion-mnist-{which}", "seed": seed, "labels": list(labels_kept),
        "n_per_class": n, "val_per_class": v, "image_size": crop, "resize": size, "ten_crop": ten_crop,
        "normalization": normalization, "blur": blur, "train_mean": mean,
        "train": _record(train_idx), "val": _record(val_idx), "test": _record(test_idx),
        "indices": "into the official training / test IDX files (train and val: training file)",
    }
    return TaskData(
        train=InMemoryImages(tr_x.contiguous(), remap[ytr[torch.from_numpy(train_idx)]], train_tf),
        val=subset(all_train, ytr, val_idx, eval_tf), test=subset(all_test, yte, test_idx, test_tf),
        num_classes=len(labels_kept), classes=[CLASSES[i] for i in labels_kept], split=split, in_channels=1)


def source_inputs(n: int, seed: int = 0, root: str | None = None, *, val_per_class: int | None = None
                  ) -> torch.Tensor:
    """n normalized source-task training inputs (evaluation transform, N×1×28×28) for the Fisher, drawn
    with ``torch.Generator().manual_seed(seed)`` from the source training split."""
    task = build("source", root=root, seed=seed, val_per_class=val_per_class)
    ds = task.train
    if not 1 <= n <= len(ds):
        raise L2SPError(f"n={n} source inputs requested; choose 1 <= n <= {len(ds)}")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return task.val.transform(ds.images[idx])
