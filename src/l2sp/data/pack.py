"""Image packs: a task's image files in one safetensors file, to carry a dataset to a machine with little disk or
transfer (a GPU box), and back as an on-device task.

A pack holds groups (e.g. ``caltech_train``, ``caltech_test``); group g is three tensors: ``g.bytes`` (the
encoded files concatenated, uint8), ``g.offsets`` (n + 1 positions: file i is ``bytes[offsets[i]:offsets[i+1]]``)
and ``g.labels`` (int64), plus one JSON metadata record (classes, split, file lists).

    groups = {"train": pack_group(files, labels, quality=70, short_side=144), "test": pack_group(...)}
    write_pack("pack/images.safetensors", groups, {"classes": classes})
    task = pack_task("pack", train="train", test="test", crop=224, resize=256, device="cuda")
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from l2sp.data.device import DeviceImages, PaperAugment
from l2sp.data.stats import streaming_mean
from l2sp.data.task import TaskData
from l2sp.data.transforms import normalization_stats, resize_uint8
from l2sp.errors import L2SPError

PACK_FILE = "images.safetensors"
Group = dict[str, torch.Tensor]


def encode_jpeg(img: torch.Tensor, *, quality: int, short_side: int | None = None) -> bytes:
    """A uint8 RGB image (3, H, W) as JPEG bytes (4:2:0); shorter side reduced to ``short_side`` first
    (Lanczos, aspect kept, never enlarged)."""
    from PIL import Image

    im = Image.fromarray(img.permute(1, 2, 0).contiguous().numpy(), "RGB")
    if short_side is not None and min(im.size) > short_side:
        s = short_side / min(im.size)
        im = im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def pack_group(files: Sequence[str], labels: Sequence[int], *, quality: int | None = None,
               short_side: int | None = None) -> Group:
    """``{"bytes", "offsets", "labels"}``: the files byte for byte (``quality=None``) or decoded and re-encoded
    as JPEG at ``quality``."""
    from l2sp.data.folders import load_image

    if len(files) != len(labels):
        raise L2SPError(f"pack_group got {len(files)} files and {len(labels)} labels; give one label per file")
    chunks = [Path(f).read_bytes() if quality is None
              else encode_jpeg(load_image(f), quality=quality, short_side=short_side) for f in files]
    sizes = torch.tensor([len(c) for c in chunks], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    joined = bytearray(b"".join(chunks))
    data = torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.zeros(0, dtype=torch.uint8)
    return {"bytes": data, "offsets": offsets, "labels": torch.tensor(list(labels), dtype=torch.long)}


def write_pack(path: str | Path, groups: dict[str, Group], metadata: dict) -> Path:
    """One safetensors file: tensors ``<group>.<field>``, the metadata as JSON under ``"pack"``."""
    from l2sp.io import save_tensors

    flat = {f"{g}.{k}": v for g, fields in groups.items() for k, v in fields.items()}
    return save_tensors(path, flat, {"pack": metadata})


def read_pack(path: str | Path) -> tuple[dict[str, Group], dict]:
    """Inverse of :func:`write_pack` (``path``: the file, or a folder holding ``images.safetensors``)."""
    from l2sp.io import load_tensors

    path = Path(path)
    if path.is_dir():
        path = path / PACK_FILE
    if not path.is_file():
        raise L2SPError(f"no image pack at {path}; write one with write_pack (benchmarks: the 'pack' command)")
    tensors, meta = load_tensors(path)
    groups: dict[str, Group] = {}
    for key, t in tensors.items():
        g, _, k = key.rpartition(".")
        groups.setdefault(g, {})[k] = t
    return groups, json.loads(meta.get("pack", "{}"))


def group_item(group: Group, i: int) -> torch.Tensor:
    """The i-th encoded file of a group (uint8 view)."""
    o = group["offsets"]
    return group["bytes"][int(o[i]):int(o[i + 1])]


def _decode_pil(data: torch.Tensor) -> torch.Tensor:
    """Encoded bytes → uint8 RGB (3, H, W) with PIL, as :func:`l2sp.data.folders.load_image`."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


def _decode_chunk(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    if device.type != "cuda":
        return [_decode_pil(d) for d in datas]
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)  # CMYK and gray files as RGB, as PIL does
    except RuntimeError:  # a file nvJPEG cannot read: decode this chunk on the host
        return [_decode_pil(d).to(device) for d in datas]


def decode_group(group: Group, size: int | None, *, device: str | torch.device = "cpu",
                 chunk: int = 512) -> torch.Tensor:
    """Every image of a group decoded (RGB; grey repeated to 3 channels) and resized to size×size (antialiased
    bilinear, ``v2.Resize``) on ``device`` (CPU: PIL, the file datasets' decoder; CUDA: nvJPEG, close but not
    bit-equal): uint8 (N, 3, size, size). ``size=None`` keeps the images as they are (one size for all)."""
    device = torch.device(device)
    n = len(group["labels"])
    out = []
    for s in range(0, n, chunk):
        for img in _decode_chunk([group_item(group, i) for i in range(s, min(n, s + chunk))], device):
            img = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
            out.append(resize_uint8(img[None], size)[0])
    if not out:
        return torch.zeros(0, 3, size or 0, size or 0, dtype=torch.uint8, device=device)
    return torch.stack(out)


def carve_val(labels: torch.Tensor, val_per_class: int) -> torch.Tensor:
    """Boolean mask of the validation images: the last ``val_per_class`` of each class in pack order (the
    order of the seeded draw, as ``build_task(..., val_per_class=v)``)."""
    labels = labels.cpu()
    mask = torch.zeros(len(labels), dtype=torch.bool)
    if val_per_class <= 0:
        return mask
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        if len(idx) <= val_per_class:
            raise L2SPError(f"class {c} has {len(idx)} training images, not more than val_per_class="
                            f"{val_per_class}; lower it")
        mask[idx[-val_per_class:]] = True
    return mask


def images_task(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], *,
                classes: list[str], crop: int, val_per_class: int = 0, normalization: str = "half",
                blur: bool = True, ten_crop: bool = False, device: str | torch.device = "cpu",
                split: dict | None = None):
    """A :class:`~l2sp.data.TaskData` of on-device datasets from decoded uint8 images ``(x, labels)``: the last
    ``val_per_class`` training images of each class are the validation split (:func:`carve_val`); the paper's
    transforms (:class:`~l2sp.data.device.PaperAugment`); ``split`` is recorded with the settings added."""
    (xtr, ytr), (xte, yte) = train, test
    val = carve_val(ytr, val_per_class)
    keep = (~val).nonzero().squeeze(1).to(xtr.device)
    held = val.nonzero().squeeze(1).to(xtr.device)
    mean = None
    if normalization == "train-mean":
        kept = xtr.index_select(0, keep)
        mean = streaming_mean(len(kept), lambda i: kept[i].cpu(), kept.shape[1])
    stats = normalization_stats(normalization, xtr.shape[1], mean)
    m, s = (None, None) if stats is None else stats

    def part(x: torch.Tensor, y: torch.Tensor, train: bool, ten: bool = False) -> DeviceImages:
        tf = PaperAugment(train, crop, blur=blur, ten_crop=ten, mean=m, std=s)
        return DeviceImages(x, y, tf, device=device)

    ycpu = ytr.cpu()
    record = {**(split or {}), "val_per_class": val_per_class, "image_size": crop, "resize": xtr.shape[-1],
              "normalization": normalization, "blur": blur, "ten_crop": ten_crop, "train_mean": mean}
    return TaskData(train=part(xtr.index_select(0, keep), ycpu[~val], True),
                    val=part(xtr.index_select(0, held), ycpu[val], False),
                    test=part(xte, yte, False, ten_crop), num_classes=len(classes), classes=list(classes),
                    split=record)


def pack_task(pack: str | Path, *, train: str, test: str, crop: int, resize: int | None = None,
              device: str | torch.device = "cpu", decode_device: str | torch.device = "cpu", **settings):
    """The on-device task of two groups of a pack (images resized to ``resize``, default
    ``round(crop · 256/224)``), classes from the pack's metadata; ``settings`` as :func:`images_task`
    (val_per_class, normalization, blur, ten_crop)."""
    groups, meta = read_pack(pack)
    missing = [g for g in (train, test) if g not in groups]
    if missing:
        raise L2SPError(f"the pack {pack} has no group {missing[0]!r}; it holds {', '.join(sorted(groups))}")
    if "classes" not in meta:
        raise L2SPError(f"the pack {pack} records no classes; write it with metadata {{'classes': [...]}}")
    size = resize if resize is not None else round(crop * 256 / 224)
    parts = [(decode_group(groups[g], size, device=decode_device).to(device), groups[g]["labels"])
             for g in (train, test)]
    record = {"task": meta.get("task", "pack"), "pack": str(pack), "groups": [train, test],
              **{k: v for k, v in meta.items() if k not in ("classes",) and not k.endswith("_files")}}
    return images_task(parts[0], parts[1], classes=meta["classes"], crop=crop, device=device, split=record,
                       **settings)
