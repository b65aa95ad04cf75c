"""On-device datasets (l2sp.data.device), on the CPU: batches equal the per-image v2 pipeline bit for bit (same
random draws), determinism per (seed, step), uint8 storage, build_task(device=...), one-line errors."""

import gzip
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from l2sp.data import build_task, task_from_split
from l2sp.data.device import DeviceImages, PaperAugment, decode_files, to_device
from l2sp.data.folders import FileDataset, load_image
from l2sp.data.transforms import BatchAugment, paper_transform
from l2sp.engine.trainer import Collated, SeededBatches, batch_seed
from l2sp.errors import L2SPError

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("L2SP_CACHE", str(tmp_path / "cache"))


def _images(n=6, h=20, w=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


def _reference(x, tf, indices, seed):
    torch.manual_seed(seed)
    return torch.stack([tf(x[i]).as_subclass(torch.Tensor) for i in indices])


@pytest.mark.parametrize("size", [(20, 23), (16, 23), (16, 16)])
def test_train_batch_equals_per_image_pipeline(size):
    """crop, mirror, normalization and blur as paper_transform draws them image by image: bit for bit; when
    the image is as tall (wide) as the crop no offset is drawn, as in v2.RandomCrop."""
    x = _images(8, *size)
    ds = DeviceImages(x, torch.arange(8) % 3, PaperAugment(True, 16, mean=MEAN, std=STD), device="cpu")
    ref_tf = paper_transform(True, crop=16, resize=None, mean=MEAN, std=STD)
    idx = [3, 0, 7, 7, 2, 5, 1, 6, 4, 0]
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        out, y = ds.get_batch(idx)
        assert torch.equal(out, _reference(x, ref_tf, idx, seed))
        assert y.tolist() == [i % 3 for i in idx] and y.dtype == torch.long
    torch.manual_seed(0)
    p = ds.transform.sample(10, *size)
    assert bool(p["blur"].any()) and not bool(p["blur"].all())  # both branches are exercised
    assert bool(p["flip"].any()) and not bool(p["flip"].all())


def test_train_batch_against_manual_slices_and_torchvision_blur():
    """The same batch recomputed independently: slicing, flip, float64 normalization, TF.gaussian_blur."""
    x = _images(12)
    aug = PaperAugment(True, 16, mean=MEAN, std=STD)
    torch.manual_seed(5)
    p = aug.sample(12, 20, 23)
    assert 0 < int(p["blur"].sum()) < 12
    out = aug.apply(x.clone(), p)
    m = torch.tensor(MEAN, dtype=torch.float64)[:, None, None]
    s = torch.tensor(STD, dtype=torch.float64)[:, None, None]
    for b in range(12):
        t, left = int(p["top"][b]), int(p["left"][b])
        crop = x[b, :, t:t + 16, left:left + 16]
        crop = crop.flip(-1) if p["flip"][b] else crop
        ref = (crop.double() / 255 - m) / s
        if p["blur"][b]:
            ref = TF.gaussian_blur(ref, [5, 5], [float(p["sigma"][b])] * 2)
        torch.testing.assert_close(out[b].double(), ref, rtol=0, atol=1e-5)
    assert 0.1 <= float(p["sigma"][p["blur"]].min()) and float(p["sigma"].max()) <= 1.0
    assert int(p["top"].max()) <= 4 and int(p["left"].max()) <= 7


def test_eval_centre_and_ten_crop_equal_pipeline():
    x = _images(4, 20, 23)
    for ten in (False, True):
        ds = DeviceImages(x, [0, 1, 2, 3], PaperAugment(False, 16, ten_crop=ten, mean=MEAN, std=STD))
        ref = _reference(x, paper_transform(False, crop=16, resize=None, ten_crop=ten, mean=MEAN, std=STD),
                         [2, 0], 0)
        out, _ = ds.get_batch([2, 0])
        assert out.shape == ((2, 10, 3, 16, 16) if ten else (2, 3, 16, 16)) and torch.equal(out, ref)
    centre = DeviceImages(x, [0, 1, 2, 3], PaperAugment(False, 16))[1][0]  # no normalization: x/255
    torch.testing.assert_close(centre.double(), x[1, :, 2:18, 4:20].double() / 255, rtol=0, atol=1e-7)


def test_storage_items_and_determinism_per_seed_and_step():
    x = _images(10)
    ds = DeviceImages(x, torch.arange(10), PaperAugment(True, 16), device=torch.device("cpu"))
    assert ds.on_device and ds.images.dtype == torch.uint8 and ds.images.shape == (10, 3, 20, 23)
    assert ds.images.data_ptr() == x.data_ptr()  # already on the device: no copy
    wrapped = SeededBatches(ds)

    def batch(seed, step):
        out = wrapped.__getitems__([(i, batch_seed(seed, step)) for i in (4, 1, 9)])
        assert isinstance(out, Collated)
        return out[0]

    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = batch(0, 7)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    assert torch.equal(a, batch(0, 7)) and not torch.equal(a, batch(0, 8)) and not torch.equal(a, batch(1, 7))
    torch.manual_seed(3)
    item, label = ds[4]
    items = ds.__getitems__([4, 1])
    assert item.shape == (3, 16, 16) and label == 4 and [lab for _, lab in items] == [4, 1]
    assert ds[-1][1] == 9 and len(ds) == 10


def _write_folder(root, classes=3, per_class=6):
    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            size = (int(rng.integers(18, 40)), int(rng.integers(18, 40)))
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            (root / f"class{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr if i else arr[..., 0], "RGB" if i else "L").save(root / f"class{c}" / f"{i}.jpg")
    return root


def test_build_task_on_device_equals_file_task(tmp_path):
    """build_task(device=cpu): the same split, training mean and items as the file-based task, uint8 storage;
    through the engine's SeededBatches, the same batches as the file path."""
    root = _write_folder(tmp_path / "imgs")
    kw = {"root": str(root), "n_per_class": 4, "val_per_class": 1, "test_per_class": 2, "image_size": 16,
          "resize": 20, "ten_crop": True, "check": "none"}
    files = build_task("imagefolder", **kw)
    state = torch.get_rng_state()
    dev = build_task("imagefolder", device="cpu", **kw)
    assert torch.equal(torch.get_rng_state(), state)  # building draws nothing from the global RNG
    assert dev.split == files.split and dev.split["train_mean"] is not None
    assert [len(d) for d in (dev.train, dev.val, dev.test)] == [9, 3, 6]
    assert dev.train.images.dtype == torch.uint8 and dev.train.images.shape == (9, 3, 20, 20)
    assert isinstance(files.train, FileDataset) and dev.train.on_device
    path = files.train.samples[0][0]
    assert torch.equal(dev.train.images[0], TF.resize(load_image(path), [20, 20], antialias=True))
    items = [(i, batch_seed(4, 11)) for i in (0, 8, 3, 3)]
    ref = torch.stack([x for x, _ in SeededBatches(files.train).__getitems__(items)])
    x, y = SeededBatches(dev.train).__getitems__(items)
    assert torch.equal(x, ref) and y.tolist() == [files.train.samples[i][1] for i in (0, 8, 3, 3)]
    for part in ("val", "test"):
        a, b = getattr(files, part), getattr(dev, part)
        assert torch.equal(torch.stack([a[i][0] for i in range(len(a))]), b.get_batch(range(len(b)))[0])
    again = task_from_split(dev.split, device="cpu")
    assert torch.equal(again.test.images, dev.test.images)
    test_files = [p for p, _ in files.test.samples]
    assert torch.equal(decode_files(test_files, 20, workers=1), dev.test.images)
    assert torch.equal(torch.get_rng_state(), state)


def _fashion_root(tmp_path):
    rng = np.random.default_rng(0)
    for part, per in (("train", 12), ("t10k", 4)):
        labels = np.repeat(np.arange(10), per).astype(np.uint8)
        images = rng.integers(0, 256, (len(labels), 28, 28)).astype(np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            raw = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
            (tmp_path / f"{part}-{kind}-ubyte.gz").write_bytes(gzip.compress(raw))
    return tmp_path


def test_fashion_mnist_on_device_keeps_its_batches(tmp_path):
    root = str(_fashion_root(tmp_path))
    host = build_task("fashion-mnist-target", root=root, n_per_class=5, val_per_class=2)
    dev = build_task("fashion-mnist-target", root=root, n_per_class=5, val_per_class=2, device="cpu")
    assert isinstance(dev.train.transform, BatchAugment) and dev.train.on_device
    items = [(i, batch_seed(0, 3)) for i in range(8)]
    ref = torch.stack([x for x, _ in SeededBatches(host.train).__getitems__(items)])
    assert torch.equal(SeededBatches(dev.train).__getitems__(items)[0], ref)
    assert torch.equal(dev.test.get_batch([0, 1])[0], torch.stack([host.test[0][0], host.test[1][0]]))


def test_errors_are_one_line(tmp_path):
    x = _images(4)
    aug = PaperAugment(True, 16)
    cases = [
        (lambda: DeviceImages(x.float(), [0] * 4, aug), "uint8"),
        (lambda: DeviceImages(x[0], [0], aug), "uint8"),
        (lambda: DeviceImages(x, [0, 1], aug), "one label per image"),
        (lambda: DeviceImages(x, torch.zeros(4), aug), "integers"),
        (lambda: DeviceImages(x, [0] * 4, PaperAugment(True, 24)), "smaller than the crop 24"),
        (lambda: DeviceImages(x, [0] * 4, aug).get_batch([0, 4]), "out of range"),
        (lambda: to_device(FileDataset([("a.jpg", 0)]), "cpu"), "device=None"),
        (lambda: build_task("imagefolder", root=str(tmp_path), keep_aspect=True, device="cpu"), "keep_aspect"),
        (lambda: decode_files([str(tmp_path / "missing.jpg")], 8), "cannot decode"),
    ]
    for make, match in cases:
        with pytest.raises(L2SPError, match=match) as info:
            make()
        assert "\n" not in str(info.value)


def test_finetune_with_data_on_device_follows_the_file_run(tmp_path):
    """``data.on_device=true`` (device = the CPU here) trains exactly the run the file datasets train: same
    batches, same losses, same weights."""
    from l2sp.engine.config import resolve
    from l2sp.engine.run import finetune
    from l2sp.io import load_tensors

    root = _write_folder(tmp_path / "imgs")
    cfg = {"model": {"arch": "small_resnet", "options": {"widths": [4, 8, 8]}},
           "data": {"task": "imagefolder", "root": str(root), "n_per_class": 4, "val_per_class": 1,
                    "image_size": 16, "resize": 20, "normalization": "train-mean",
                    "options": {"test_per_class": 2, "check": "none"}},
           "reg": {"kind": "l2", "alpha": 0.01, "beta": 0.01},
           "optim": {"lr": 0.05, "batch_size": 4, "steps": 6, "milestones": [4]},
           "train": {"device": "cpu", "quiet": True, "tensorboard": False, "channels_last": False, "log_every": 1,
                     "save_checkpoint": False}}
    runs = {}
    for on in (False, True):
        out = tmp_path / f"run-{on}"
        runs[on] = finetune(resolve(cfg, {"data.on_device": on}), out=str(out))
        runs[on]["weights"] = load_tensors(out / "model.safetensors")[0]
        runs[on]["losses"] = [json.loads(ln).get("loss") for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert runs[True]["losses"] == runs[False]["losses"] and runs[True]["test_acc"] == runs[False]["test_acc"]
    assert all(torch.equal(v, runs[False]["weights"][k]) for k, v in runs[True]["weights"].items())
