"""The paper's preprocessing (torchvision transforms v2) and a batched fast path for in-memory tensors.

Training: resize (``size×size`` ignoring aspect, or shorter side ``size`` with ``keep_aspect``), random
``crop×crop`` crop, random mirror, random Gaussian blur, then ``x ← x/255 − μ`` (``/σ``) per channel.
Testing: the same resize, then the centre crop, or the 10 crops (centre, 4 corners, and their mirrors) stacked
as a ``(10, C, crop, crop)`` tensor whose predictions the engine averages.
Sizes are parameters: the paper uses resize 256 / crop 224; the built-in benchmark uses 32 / 28 (same ratio).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from l2sp.errors import L2SPError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("train-mean", "imagenet", "half", "none")
#: random blur: applied with probability BLUR_P, σ ~ U(BLUR_SIGMA) pixels, kernel 2⌈2σ_max⌉+1
BLUR_P = 0.5
BLUR_SIGMA = (0.1, 1.0)


def blur_kernel_size(sigma_max: float) -> int:
    """Odd kernel covering ±2σ_max."""
    return 2 * math.ceil(2 * sigma_max) + 1


def normalization_stats(normalization: str, channels: int, train_mean: Sequence[float] | None = None
                        ) -> tuple[list[float], list[float]] | None:
    """(mean, std) applied to images scaled to [0, 1], or None for "none".

    "train-mean": μ = per-channel training mean, σ = 1 (the paper); "imagenet": torchvision's statistics;
    "half": μ = σ = 0.5 (inputs in [−1, 1]).
    """
    if normalization == "none":
        return None
    if normalization == "train-mean":
        if train_mean is None or len(train_mean) != channels:
            raise L2SPError(f"normalization='train-mean' needs {channels} channel means; compute them first")
        return [float(m) for m in train_mean], [1.0] * channels
    if normalization == "imagenet":
        if channels != 3:
            raise L2SPError(f"normalization='imagenet' needs 3-channel images, got {channels}; "
                            "use 'train-mean'")
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    if normalization == "half":
        return [0.5] * channels, [0.5] * channels
    raise L2SPError(f"unknown normalization {normalization!r}; use one of {', '.join(NORMALIZATIONS)}")


class TenCrop(torch.nn.Module):
    """The 10 crops of torchvision's ``TenCrop`` (same order) stacked as a ``(10, C, crop, crop)`` tensor."""

    def __init__(self, crop: int):
        super().__init__()
        self.crop = crop

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return ten_crops(img.as_subclass(torch.Tensor)[None], self.crop)[0]


class ToFloatNormalized(torch.nn.Module):
    """uint8 → float32 ``(x/255 − μ)/σ`` per channel in one pass (= ToDtype(scale=True) + Normalize)."""

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        m = torch.tensor([0.0] if mean is None else list(mean), dtype=torch.float32)
        s = torch.tensor([1.0] * len(m) if std is None else list(std), dtype=torch.float32)
        self.scale = (1.0 / (255.0 * s))[:, None, None]
        self.shift = (m / s)[:, None, None]

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = img.as_subclass(torch.Tensor)
        if x.dtype != torch.uint8:
            raise L2SPError(f"expected a uint8 image, got {x.dtype}; decode images to uint8 first")
        return x.to(torch.float32).mul_(self.scale).sub_(self.shift)


def _resize(resize: int, keep_aspect: bool) -> v2.Transform:
    size = resize if keep_aspect else (resize, resize)
    return v2.Resize(size, antialias=True)


def deterministic_transform(resize: int | None, keep_aspect: bool = False) -> v2.Compose:
    """The deterministic part of the pipeline (uint8 image → resized uint8), used for the training mean."""
    steps: list = [v2.ToImage()]
    if resize is not None:
        steps.append(_resize(resize, keep_aspect))
    return v2.Compose(steps)


def paper_transform(train: bool, *, crop: int = 224, resize: int | None = 256, keep_aspect: bool = False,
                    ten_crop: bool = False, blur: bool = True, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None) -> v2.Compose:
    """The paper's pipeline on a uint8 ``C×H×W`` image (grayscale already expanded to 3 channels on decode).

    ``mean``/``std`` (None: no normalization) act on ``x/255``; see :func:`normalization_stats`.
    """
    if resize is not None and resize < crop:
        raise L2SPError(f"resize={resize} is smaller than the crop {crop}; use resize >= image_size")
    steps: list = [v2.ToImage()]
    if resize is not None:
        steps.append(_resize(resize, keep_aspect))
    to_float = ToFloatNormalized(mean, std)
    if train:
        steps += [v2.RandomCrop(crop, pad_if_needed=True), v2.RandomHorizontalFlip(), to_float]
        if blur:
            steps.append(RandomBlur())
    elif ten_crop:  # normalize before cropping: pointwise, so equal, and 10x less work
        steps += [to_float, TenCrop(crop)]
    else:
        steps += [v2.CenterCrop(crop), to_float]
    return v2.Compose(steps)


# ---- batched fast path for uint8 tensors held in memory (one call per DataLoader batch) ----

def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Normalized 1-D Gaussian kernels ``k_b(t) ∝ exp(−t²/2σ_b²)``, t = −(size−1)/2 … (size−1)/2: (B, size)"""
    t = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    return k / k.sum(1, keepdim=True)


def batch_gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Separable blur of each image ``x[b]`` (float B×C×H×W) with its own σ_b, reflect padding
    (torchvision's ``gaussian_blur`` with kernel ``size`` and σ = σ_b, batched). Shifted multiply-adds: on CPU
    they are several times faster than a depthwise ``conv2d``."""
    h, w = x.shape[-2:]
    # kernels computed on the CPU: the same numbers whatever x's device
    k = gaussian_kernels(sigma.cpu(), size).to(x.device, x.dtype, non_blocking=True)[:, :, None, None, None]
    p = size // 2
    y = F.pad(x, (p, p, p, p), mode="reflect")
    rows = y[..., 0:w] * k[:, 0]
    for i in range(1, size):
        rows.addcmul_(y[..., i:i + w], k[:, i])
    out = rows[..., 0:h, :] * k[:, 0]
    for i in range(1, size):
        out.addcmul_(rows[..., i:i + h, :], k[:, i])
    return out


class RandomBlur(torch.nn.Module):
    """With probability ``p``, blur a float image (C×H×W or B×C×H×W, one σ for all) with σ ~ U(sigma)."""

    def __init__(self, p: float = BLUR_P, sigma: tuple[float, float] = BLUR_SIGMA):
        super().__init__()
        self.p, self.sigma, self.size = p, sigma, blur_kernel_size(sigma[1])

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return img
        lo, hi = self.sigma
        sigma = lo + (hi - lo) * torch.rand(1)
        x = img.as_subclass(torch.Tensor)
        flat = x.reshape(-1, *x.shape[-3:])
        return batch_gaussian_blur(flat, sigma.expand(flat.shape[0]), self.size).reshape(x.shape)


def batch_crops(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, crop: int) -> torch.Tensor:
    """``out[b] = x[b, :, top_b:top_b+crop, left_b:left_b+crop]``: one gather from the strided view of all
    crop windows."""
    windows = x.unfold(2, crop, 1).unfold(3, crop, 1)  # (B, C, H-crop+1, W-crop+1, crop, crop), no copy
    dev = x.device
    top, left = top.to(dev, non_blocking=True), left.to(dev, non_blocking=True)  # no host sync on a GPU
    return windows[torch.arange(x.shape[0], device=dev), :, top, left]


def flip_where(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror ``x[b]`` (in place) where the host-side flag ``flip[b]`` is set (no device sync)."""
    idx = flip.cpu().nonzero().squeeze(1)
    if len(idx):
        idx = idx.to(x.device, non_blocking=True)
        x[idx] = x[idx].flip(-1)
    return x


def blur_where(x: torch.Tensor, blur: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur ``x[b]`` (float, in place) with σ_b where the host-side flag ``blur[b]`` is set."""
    idx = blur.cpu().nonzero().squeeze(1)
    if len(idx):
        sig = sigma.cpu()[idx]
        idx = idx.to(x.device, non_blocking=True)
        x[idx] = batch_gaussian_blur(x[idx], sig, blur_kernel_size(BLUR_SIGMA[1]))
    return x


def ten_crops(x: torch.Tensor, crop: int) -> torch.Tensor:
    """(B, C, H, W) → (B, 10, C, crop, crop) in torchvision's TenCrop order:
    top-left, top-right, bottom-left, bottom-right, centre, then the same five of the mirrored image."""
    h, w = x.shape[-2:]
    ct, cl = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    boxes = [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop), (ct, cl)]
    m = x.flip(-1)
    crops = [x[..., t:t + crop, left:left + crop] for t, left in boxes]
    crops += [m[..., t:t + crop, left:left + crop] for t, left in boxes]
    return torch.stack(crops, 1)


class BatchAugment:
    """The paper's train/eval transform for in-memory uint8 images already resized to ``H×W``:
    random crop, random mirror, random blur (train) or centre / 10 crops (eval), then ``(x/255 − μ)/σ``.
    Each image draws its own random parameters; the result equals the v2 pipeline applied per image."""

    def __init__(self, train: bool, crop: int, *, blur: bool = True, ten_crop: bool = False,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        self.train, self.crop, self.blur, self.ten_crop = train, crop, blur, ten_crop
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = None if mean is None else torch.tensor(
            std if std is not None else [1.0] * len(mean), dtype=torch.float32)[:, None, None]

    def sample(self, b: int, h: int, w: int, generator: torch.Generator | None = None
               ) -> dict[str, torch.Tensor]:
        """Random parameters of b training images: crop offsets, mirror flags, blur flags and σ."""
        lo, hi = BLUR_SIGMA
        return {"top": torch.randint(0, h - self.crop + 1, (b,), generator=generator),
                "left": torch.randint(0, w - self.crop + 1, (b,), generator=generator),
                "flip": torch.rand(b, generator=generator) < 0.5,
                "blur": (torch.rand(b, generator=generator) < BLUR_P) & self.blur,
                "sigma": lo + (hi - lo) * torch.rand(b, generator=generator)}

    def apply(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training transform of a uint8 batch with the given parameters."""
        x = flip_where(batch_crops(x, p["top"], p["left"], self.crop), p["flip"])
        return self.normalize(blur_where(x.float().div_(255), p["blur"], p["sigma"]))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        return (x - self.mean.to(x.device, non_blocking=True)) / self.std.to(x.device, non_blocking=True)

    def to_float(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 crops → normalized float."""
        return self.normalize(x.float().div_(255))

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        crop = self.crop
        if self.train:
            return self.apply(x, self.sample(b, h, w, generator))
        if self.ten_crop:
            return self.to_float(ten_crops(x, crop))
        t, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
        return self.to_float(x[..., t:t + crop, left:left + crop])


def resize_uint8(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resize a uint8 batch (B, C, H, W) to size×size with antialiased bilinear (as v2.Resize), uint8 out."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    return TF.resize(x, [size, size], antialias=True)
