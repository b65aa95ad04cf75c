"""Joint image + mask transforms (torchvision transforms v2 with ``tv_tensors.Mask``, so both stay aligned).

Training (the paper's PSPNet recipe): random scale s ~ U[a, b] of both sides (bilinear for the image,
nearest for the mask), horizontal flip with probability ½, ImageNet normalization, then a random crop padded
where the image is smaller than the crop (image with 0 = the mean after normalization, mask with the ignore
index, so padding never counts in the loss). Evaluation: normalization only (full image).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from l2sp.errors import L2SPError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (mean, std) per input convention: torchvision's ImageNet weights, or inputs in [-1, 1] (TensorFlow/TFLite
# models such as the shared MobileNetV2 file: (p/255 − 0.5)/0.5 = (p − 127.5)/127.5)
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def normalization_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of a named input normalization (``"imagenet"`` or ``"half"``)."""
    if name not in NORMALIZATIONS:
        raise L2SPError(f"unknown normalization {name!r}; use one of {', '.join(NORMALIZATIONS)} "
                        "(the convention the backbone's weights were trained with)")
    return NORMALIZATIONS[name]


class RandomScale(v2.Transform):
    """Resize image and mask by one random factor s ~ U[low, high] (both sides, aspect ratio kept)."""

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0), antialias: bool = True):
        super().__init__()
        low, high = (float(v) for v in scale_range)
        if not 0 < low <= high:
            raise L2SPError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.scale_range = (low, high)
        self.antialias = antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        sizes = [TF.get_size(i) for i in flat_inputs if isinstance(i, tv_tensors.Image | tv_tensors.Mask)]
        if not sizes:
            raise L2SPError("RandomScale needs a tv_tensors.Image or tv_tensors.Mask input")
        h, w = sizes[0]
        low, high = self.scale_range
        s = low + (high - low) * float(torch.rand(()))
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        # v2 dispatch: bilinear for images, nearest for masks
        return TF.resize(inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR,
                         antialias=self.antialias)


class MaskToLong(v2.Transform):
    """The mask as an int64 (H, W) tensor (what ``cross_entropy(ignore_index=...)`` expects)."""

    _transformed_types = (tv_tensors.Mask,)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        m = inpt.as_subclass(torch.Tensor).long()
        return tv_tensors.Mask(m[0] if m.dim() == 3 and m.shape[0] == 1 else m)


def _pair(crop: int | Sequence[int]) -> list[int]:
    size = [int(crop), int(crop)] if isinstance(crop, int) else [int(c) for c in crop]
    if len(size) != 2 or min(size) < 1:
        raise L2SPError(f"crop must be a positive int or (height, width), got {crop!r}")
    return size


def train_transform(crop: int | Sequence[int], *, scale_range: tuple[float, float] | None = (0.5, 2.0),
                    flip: bool = True, ignore_index: int = 255, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD, normalization: str | None = None) -> v2.Compose:
    """Random scale → h-flip → float + normalize ((x − mean)/std) → int64 mask → random crop.

    The crop pads where the image is smaller: 0 (the mean) in the image, ``ignore_index`` in the mask.
    ``normalization`` (``"imagenet"``, ``"half"``), when given, sets ``mean`` and ``std``.
    """
    if normalization is not None:
        mean, std = normalization_stats(normalization)
    steps: list[v2.Transform] = []
    if scale_range is not None:
        steps.append(RandomScale(scale_range))
    if flip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)), MaskToLong(),
              v2.RandomCrop(_pair(crop), pad_if_needed=True,
                            fill={tv_tensors.Image: 0.0, tv_tensors.Mask: ignore_index})]
    return v2.Compose(steps)


def eval_transform(*, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   normalization: str | None = None) -> v2.Compose:
    """Float + normalize, full image; the mask untouched but for int64 (``normalization`` as in train_transform)."""
    if normalization is not None:
        mean, std = normalization_stats(normalization)
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)),
                       MaskToLong()])
