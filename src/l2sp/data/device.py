"""On-device datasets: every image decoded and resized once, kept as uint8 on a device (a GPU), and the paper's
transforms applied to whole batches there.

Training batch of images x_b (uint8, resized): random ``crop×crop`` window at (top_b, left_b), mirrored where
flip_b, ``x ← (x/255 − μ)/σ`` per channel, blurred with σ_b where blur_b (the paper's pipeline,
:func:`l2sp.data.transforms.paper_transform`). Evaluation: the centre crop, or the 10 crops.

The random parameters are drawn on the CPU from torch's default generator, image after image and in the order
the per-image v2 pipeline draws them (crop offsets, mirror, blur, σ), so a batch depends only on the RNG state
(which the engine seeds per (seed, step)), never on the device, and on the CPU it equals, bit for bit, the
file-based dataset's items under the same seed. The host never waits for the device: no value is read back.

Example::

    import torch
    from l2sp.data import build_task

    task = build_task("caltech101", root="data/caltech101", n_per_class=30, normalization="half",
                      device=torch.device("cuda"))          # decoded once: 3,030 + 2,945 images, uint8
    torch.manual_seed(0)
    x, y = task.train.get_batch([0, 17, 42])                 # float (3, 3, 224, 224) and labels, on the GPU
    x10, y = task.test.get_batch([0, 1])                     # ten_crop=True: (2, 10, 3, 224, 224)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from l2sp.data.transforms import (
    BLUR_P,
    BLUR_SIGMA,
    BatchAugment,
    ToFloatNormalized,
    batch_crops,
    blur_where,
    deterministic_transform,
    flip_where,
)
from l2sp.errors import L2SPError

Device = torch.device | str


class PaperAugment(BatchAugment):
    """The paper's train / eval transform of a uint8 batch, equal to :func:`paper_transform` applied image by
    image: random parameters drawn like v2's ``RandomCrop``, ``RandomHorizontalFlip`` and ``RandomBlur``
    (per image, in that order) and ``(x/255 − μ)/σ`` computed as :class:`ToFloatNormalized` does."""

    def __init__(self, train: bool, crop: int, *, blur: bool = True, ten_crop: bool = False,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__(train, crop, blur=blur, ten_crop=ten_crop, mean=mean, std=std)
        ref = ToFloatNormalized(mean, std)
        self.scale, self.shift = ref.scale, ref.shift
        self._consts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def sample(self, b: int, h: int, w: int, generator: torch.Generator | None = None
               ) -> dict[str, torch.Tensor]:
        """Per-image parameters (CPU tensors); an offset is drawn only where the image is larger than the crop,
        σ only where the blur is applied (as v2 does)."""
        c, (lo, hi), kw = self.crop, BLUR_SIGMA, {"generator": generator}
        top, left, flip, blur, sigma = [0] * b, [0] * b, [False] * b, [False] * b, [0.0] * b
        for i in range(b):
            if h > c:
                top[i] = int(torch.randint(0, h - c + 1, size=(), **kw))
            if w > c:
                left[i] = int(torch.randint(0, w - c + 1, size=(), **kw))
            flip[i] = not bool(torch.rand(1, **kw) >= 0.5)
            if self.blur and not bool(torch.rand((), **kw) >= BLUR_P):
                blur[i], sigma[i] = True, float(lo + (hi - lo) * torch.rand(1, **kw))
        return {"top": torch.tensor(top), "left": torch.tensor(left), "flip": torch.tensor(flip),
                "blur": torch.tensor(blur), "sigma": torch.tensor(sigma, dtype=torch.float32)}

    def apply(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """crop → mirror → ``(x/255 − μ)/σ`` → blur, in the per-image pipeline's order."""
        x = flip_where(batch_crops(x, p["top"], p["left"], self.crop), p["flip"])
        return blur_where(self.to_float(x), p["blur"], p["sigma"])

    def to_float(self, x: torch.Tensor) -> torch.Tensor:
        """``x · 1/(255σ) − μ/σ`` (float32), the arithmetic of :class:`ToFloatNormalized`."""
        dev = x.device
        if dev not in self._consts:  # copied once per device
            self._consts[dev] = (self.scale.to(dev), self.shift.to(dev))
        scale, shift = self._consts[dev]
        return x.to(torch.float32).mul_(scale).sub_(shift)


def _check_images(images: torch.Tensor, labels: torch.Tensor, crop: int | None) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise L2SPError(f"images must be a uint8 tensor (N, C, H, W), got {got}; decode to uint8 first")
    if labels.dim() != 1 or len(labels) != len(images):
        raise L2SPError(f"labels must be 1-D with one label per image: {tuple(labels.shape)} labels for "
                        f"{len(images)} images")
    if crop is not None and min(images.shape[-2:]) < crop:
        raise L2SPError(f"images are {images.shape[-2]}×{images.shape[-1]}, smaller than the crop {crop}; "
                        "resize them to at least the crop size")


class DeviceImages(Dataset):
    """uint8 images ``(N, C, H, W)`` and labels held on ``device``; ``transform`` (a :class:`PaperAugment` or
    :class:`BatchAugment`) turns a uint8 batch into the network's input there.

    ``get_batch(indices) -> (images, labels)`` is the engine's batch path (one gather, one transform, tensors on
    the device); ``ds[i]`` and ``ds.__getitems__`` serve DataLoaders (``num_workers=0``, no ``pin_memory``:
    the tensors already live on the device).
    """

    on_device = True

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | Sequence[int],
                 transform: Callable[[torch.Tensor], torch.Tensor], *, device: Device | None = None):
        labels = torch.as_tensor(labels)
        _check_images(images, labels, getattr(transform, "crop", None))
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise L2SPError(f"labels must be integers, got {labels.dtype}")
        self.device = torch.device(device) if device is not None else images.device
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.long)
        self._labels = labels.cpu().long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self._labels)

    def _index(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(indices, dtype=torch.long).cpu().reshape(-1)
        if len(idx) and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise L2SPError(f"index out of range for a dataset of {len(self)} images: "
                            f"{int(idx.min())}..{int(idx.max())}")
        return idx.remainder(max(len(self), 1))

    def get_batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(transformed images, labels) of ``indices``, both on the device."""
        idx = self._index(indices).to(self.device, non_blocking=True)
        return self.transform(self.images.index_select(0, idx)), self.labels.index_select(0, idx)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive batches ``(images, labels)`` in dataset order (evaluation loops, Fisher inputs)."""
        if batch_size < 1:
            raise L2SPError(f"batch_size={batch_size}; use a positive batch size")
        for s in range(0, len(self), batch_size):
            yield self.get_batch(range(s, min(len(self), s + batch_size)))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, _ = self.get_batch([i])
        return x[0], int(self._labels[i])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        x, _ = self.get_batch(indices)
        return list(zip(x.unbind(0), self._labels[self._index(indices)].tolist(), strict=True))


class _Decoded(Dataset):
    """i ↦ file i decoded (RGB) and resized to size×size, uint8 (picklable, for DataLoader workers)."""

    def __init__(self, files: Sequence[str], size: int):
        self.files, self.transform = list(files), deterministic_transform(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from l2sp.data.folders import load_image

        return self.transform(load_image(self.files[i])).as_subclass(torch.Tensor)


def decode_files(files: Sequence[str], size: int, *, device: Device = "cpu", workers: int = 0) -> torch.Tensor:
    """Decode image files with PIL (as the file-based datasets do), resize each to size×size (antialiased
    bilinear, ``v2.Resize``) and write them into one uint8 ``(N, 3, size, size)`` tensor on ``device``;
    ``workers`` DataLoader processes decode in parallel."""
    out = torch.empty(len(files), 3, size, size, dtype=torch.uint8, device=device)
    decoded = _Decoded(files, size)
    # workers: a loader with its own generator (starting one must not draw from the global RNG)
    loader = (DataLoader(decoded, batch_size=None, num_workers=workers, generator=torch.Generator())
              if workers > 0 else (decoded[i] for i in range(len(decoded))))
    for i, img in enumerate(loader):
        out[i].copy_(img, non_blocking=False)
    return out


def file_datasets(parts: dict[str, Sequence[tuple[str, int]]], *, size: int, crop: int, blur: bool,
                  ten_crop: bool, mean: Sequence[float] | None, std: Sequence[float] | None, device: Device,
                  workers: int = 0, decoded: dict[str, torch.Tensor] | None = None) -> dict[str, DeviceImages]:
    """``{"train", "val", "test"}`` on-device datasets of (path, label) samples: the folder tasks' transforms
    (train: random crop / mirror / blur; val: centre crop; test: centre or 10 crops). ``decoded`` holds parts
    already decoded by :func:`decode_files`."""
    tfs = {"train": PaperAugment(True, crop, blur=blur, mean=mean, std=std),
           "val": PaperAugment(False, crop, mean=mean, std=std),
           "test": PaperAugment(False, crop, ten_crop=ten_crop, mean=mean, std=std)}
    out = {}
    for part, samples in parts.items():
        x = (decoded or {}).get(part)
        if x is None:
            x = decode_files([p for p, _ in samples], size, device=device, workers=workers)
        out[part] = DeviceImages(x, [c for _, c in samples], tfs[part], device=device)
    return out


def to_device(dataset: Dataset, device: Device) -> DeviceImages:
    """An in-memory dataset with ``images``, ``labels`` and a batched ``transform`` (Fashion-MNIST's
    ``InMemoryImages``) moved to ``device``; batches keep the same random draws."""
    if not all(hasattr(dataset, a) for a in ("images", "labels", "transform")):
        raise L2SPError(f"{type(dataset).__name__} holds no uint8 images, labels and batched transform; "
                        "build the task with device=None")
    return DeviceImages(dataset.images, dataset.labels, dataset.transform, device=device)
