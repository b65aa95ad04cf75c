"""Data-loading throughput (images/s) with the paper's transforms.

1. Fashion-MNIST source task, training transform on uint8 tensors in memory (batched fast path), against the
   same transform applied image by image with torchvision transforms v2.
2. Caltech-101 JPEG decode + the paper's training transform at 224 (resize 256×256, random crop, mirror, blur)
   for 0, 1 and 2 DataLoader workers, plus the 10-crop test transform, on a subset of ``--root``.
3. The same images as an on-device dataset (``l2sp.data.device``: decoded and resized once, uint8 on
   ``--device``, the training transform on whole batches there): the one-time decode, then ``get_batch``.

Usage: python benchmarks/data_loading.py [--root ../shared/data/caltech101] [--images 192] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from l2sp.data import build_task
from l2sp.data.device import DeviceImages, PaperAugment, decode_files
from l2sp.data.transforms import IMAGENET_MEAN, IMAGENET_STD, paper_transform


def rate(loader: DataLoader, epochs: int = 1) -> float:
    """images/s over ``epochs`` passes (after one untimed warm-up batch that starts the workers)."""
    next(iter(loader))
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _ in loader:
            n += x.shape[0]
    return n / (time.perf_counter() - t0)


def fashion(args: argparse.Namespace) -> None:
    task = build_task("fashion-mnist-source", root=args.fashion_root)
    batched = rate(DataLoader(task.train, batch_size=64, shuffle=True))
    m = task.split["train_mean"]
    per_image = paper_transform(True, crop=28, resize=None, mean=m)
    imgs = task.train.images[:4000]
    t0 = time.perf_counter()
    for i in range(len(imgs)):
        per_image(imgs[i])
    v2_rate = len(imgs) / (time.perf_counter() - t0)
    print("fashion-mnist source train transform (28x28, in memory, 1 process): "
          f"{batched:,.0f} images/s batched; "
          f"{v2_rate:,.0f} images/s with v2 per image ({batched / v2_rate:.1f}x)")


def caltech(args: argparse.Namespace) -> None:
    root = Path(args.root)
    if not root.is_dir():
        print(f"caltech101: {root} not found, skipped (pass --root)")
        return
    task = build_task("caltech101", root=str(root), normalization="imagenet", ten_crop=True, check="none")
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(task.train), generator=g)[: args.images].tolist()
    train = Subset(task.train, idx)
    print(f"caltech101 train transform (decode JPEG ~160px, resize 256x256, crop 224, mirror, blur), "
          f"{len(idx)} images, batch 32:")
    rates = {}
    for workers in (0, 1, 2):
        loader = DataLoader(train, batch_size=32, num_workers=workers, persistent_workers=workers > 0)
        rates[workers] = rate(loader)
        print(f"  num_workers={workers}: {rates[workers]:,.0f} images/s")
    test_idx = torch.randperm(len(task.test), generator=g)[: args.images // 2].tolist()
    test = Subset(task.test, test_idx)
    loader = DataLoader(test, batch_size=16, num_workers=0)
    print(f"  10-crop test transform, num_workers=0: {rate(loader):,.0f} images/s (x10 crops each)")
    on_device(args, [task.train.samples[i] for i in idx], rates[0])


def on_device(args: argparse.Namespace, samples: list, file_rate: float) -> None:
    """Decode once into a DeviceImages, then time ``get_batch`` (batch 32) against the file path's rate."""
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    x = decode_files([p for p, _ in samples], 256, device=device)
    decode_s = time.perf_counter() - t0
    ds = DeviceImages(x, [c for _, c in samples], PaperAugment(True, 224, std=IMAGENET_STD,
                                                                mean=IMAGENET_MEAN), device=device)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1)).tolist()
    batches = [order[s:s + 32] for s in range(0, len(order) - 31, 32)]
    ds.get_batch(batches[0])
    sync()
    t0 = time.perf_counter()
    for _ in range(3):
        for b in batches:
            ds.get_batch(b)
    sync()
    n = 3 * 32 * len(batches)
    r = n / (time.perf_counter() - t0)
    print(f"on-device dataset on {device} ({len(ds)} images decoded once in {decode_s:.1f} s, uint8 "
          f"{x.numel() / 2**20:.0f} MiB): training transform {r:,.0f} images/s, "
          f"{r / file_rate:.1f}x the file path with num_workers=0 ({file_rate:,.0f} images/s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = Path(__file__).resolve().parents[2] / "shared"
    p.add_argument("--root", default=str(shared / "data" / "caltech101"))
    p.add_argument("--fashion-root", default=None)
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU(s), {args.threads} torch thread(s)")
    try:
        fashion(args)
    except Exception as exc:  # e.g. the dataset is not installed
        print(f"fashion-mnist skipped: {exc}")
    caltech(args)


if __name__ == "__main__":
    main()
