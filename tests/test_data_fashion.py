"""The built-in Fashion-MNIST benchmark: IDX reading, source/target splits, determinism, the training mean."""

import gzip
import struct

import numpy as np
import pytest
import torch

from l2sp.data import build_task, fashion_mnist
from l2sp.errors import L2SPError


def write_idx(path, array, gz=True):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.fixture
def fake_root(tmp_path):
    """10 classes x 12 training images, 10 x 4 test images of 28x28, class-dependent pixel values."""
    rng = np.random.default_rng(0)
    for part, per in (("train", 12), ("t10k", 4)):
        labels = np.repeat(np.arange(10), per)
        rng.shuffle(labels)
        images = rng.integers(0, 256, (len(labels), 28, 28))
        write_idx(tmp_path / f"{part}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{part}-labels-idx1-ubyte.gz", labels)
    return tmp_path


def test_read_idx_gz_and_raw(tmp_path):
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    write_idx(tmp_path / "b", a, gz=False)
    np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "a.gz"), a)
    np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "b"), a)
    (tmp_path / "c").write_bytes((tmp_path / "b").read_bytes()[:-3])
    with pytest.raises(L2SPError, match="truncated"):
        fashion_mnist.read_idx(tmp_path / "c")
    (tmp_path / "d").write_bytes(b"\x00\x00\x0d\x01abcd")
    with pytest.raises(L2SPError, match="not a uint8 IDX"):
        fashion_mnist.read_idx(tmp_path / "d")


def test_target_split_sizes_labels_and_disjointness(fake_root):
    task = build_task("fashion-mnist-target", root=str(fake_root), n_per_class=3, val_per_class=2)
    assert (len(task.train), len(task.val), len(task.test)) == (15, 10, 20)
    assert task.num_classes == 5 and task.in_channels == 1
    assert task.classes == ["Trouser", "Dress", "Sandal", "Sneaker", "Ankle boot"]
    data = fashion_mnist.load(fake_root)
    ytr, yte = data["train"][1].numpy(), data["test"][1].numpy()
    sp = task.split
    assert not set(sp["train"]) & set(sp["val"])
    for part, y in (("train", ytr), ("val", ytr), ("test", yte)):
        assert set(y[sp[part]]) == {1, 3, 5, 7, 9}
    assert sorted(sp["test"]) == sorted(np.flatnonzero(yte % 2 == 1).tolist())
    # labels re-indexed 0..4 in the order of the odd labels
    np.testing.assert_array_equal(task.train.labels.numpy(), (ytr[sp["train"]] - 1) // 2)
    np.testing.assert_array_equal(task.test.labels.numpy(), (yte[sp["test"]] - 1) // 2)
    for k in range(5):
        assert (task.train.labels == k).sum() == 3 and (task.val.labels == k).sum() == 2


def test_splits_deterministic_nested_and_seeded(fake_root):
    a = build_task("fashion-mnist-target", root=str(fake_root), n_per_class=3, val_per_class=2, seed=5)
    b = build_task("fashion-mnist-target", root=str(fake_root), n_per_class=3, val_per_class=2, seed=5)
    c = build_task("fashion-mnist-target", root=str(fake_root), n_per_class=3, val_per_class=2, seed=6)
    small = build_task("fashion-mnist-target", root=str(fake_root), n_per_class=2, val_per_class=2, seed=5)
    assert a.split == b.split and a.split["train"] != c.split["train"]
    assert set(small.split["train"]) < set(a.split["train"]) and small.split["val"] == a.split["val"]
    torch.testing.assert_close(a.train.images, b.train.images)


def test_source_task_uses_all_training_images_of_even_classes(fake_root):
    task = build_task("fashion-mnist-source", root=str(fake_root), val_per_class=2)
    ytr = fashion_mnist.load(fake_root)["train"][1].numpy()
    sp = task.split
    assert sorted(sp["train"] + sp["val"]) == np.flatnonzero(ytr % 2 == 0).tolist()
    assert (len(task.train), len(task.val), len(task.test)) == (50, 10, 20)
    assert task.classes == ["T-shirt/top", "Pullover", "Coat", "Shirt", "Bag"]
    assert set(task.train.labels.tolist()) == set(range(5))


def test_train_mean_and_eval_transform(fake_root):
    task = build_task("fashion-mnist-target", root=str(fake_root), n_per_class=4, val_per_class=3,
                      image_size=28, resize=28)
    raw = fashion_mnist.load(fake_root)["train"][0].numpy().astype(np.float64)
    mean = raw[task.split["train"]].mean() / 255
    assert task.split["train_mean"] == pytest.approx([mean], abs=1e-12)
    x, y = task.val[0]
    ref = raw[task.split["val"][0]] / 255 - mean
    np.testing.assert_allclose(x[0].numpy(), ref, atol=1e-6)
    half = build_task("fashion-mnist-target", root=str(fake_root), n_per_class=4, image_size=28, resize=28,
                      normalization="half", val_per_class=3)
    np.testing.assert_allclose(half.val[0][0][0].numpy(), (raw[task.split["val"][0]] / 255 - 0.5) / 0.5,
                               atol=1e-6)


def test_train_items_and_dataloader_batches(fake_root):
    task = build_task("fashion-mnist-target", root=str(fake_root), n_per_class=4, val_per_class=2)
    x, y = task.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    loader = torch.utils.data.DataLoader(task.train, batch_size=8, shuffle=True)
    xs, ys = next(iter(loader))
    assert xs.shape == (8, 1, 28, 28) and ys.dtype == torch.int64 and set(ys.tolist()) <= set(range(5))
    ten = build_task("fashion-mnist-target", root=str(fake_root), n_per_class=4, val_per_class=2,
                     ten_crop=True)
    assert ten.test[0][0].shape == (10, 1, 28, 28)


def test_source_inputs(fake_root):
    x = fashion_mnist.source_inputs(7, seed=1, root=str(fake_root), val_per_class=2)
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32
    again = fashion_mnist.source_inputs(7, seed=1, root=str(fake_root), val_per_class=2)
    torch.testing.assert_close(x, again)
    with pytest.raises(L2SPError, match="source inputs"):
        fashion_mnist.source_inputs(10**6, root=str(fake_root), val_per_class=2)


def test_errors(fake_root, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(L2SPError, match="no Fashion-MNIST IDX files"):
        build_task("fashion-mnist-target", root=str(empty))
    with pytest.raises(L2SPError, match="fewer than"):
        build_task("fashion-mnist-target", root=str(fake_root), n_per_class=11, val_per_class=2)
    with pytest.raises(L2SPError, match="unknown option"):
        build_task("fashion-mnist-target", root=str(fake_root), imagenet_val="x")
    with pytest.raises(L2SPError, match="unknown task"):
        build_task("mnist")
    with pytest.raises(L2SPError, match="3-channel"):
        build_task("fashion-mnist-target", root=str(fake_root), normalization="imagenet")
    # nowhere to be found and offline: the message says how to install it
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", empty)
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    monkeypatch.setenv("L2SP_CACHE", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", offline)
    fashion_mnist._load_cached.cache_clear()
    try:
        with pytest.raises(L2SPError, match="apt-get install dataset-fashion-mnist"):
            fashion_mnist.load()
    finally:
        fashion_mnist._load_cached.cache_clear()


def test_env_var_and_torchvision_layout(fake_root, tmp_path, monkeypatch):
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in fake_root.glob("*.gz"):
        (raw / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path / "tv"))
    task = build_task("fashion-mnist-target", n_per_class=3, val_per_class=2)
    ref = build_task("fashion-mnist-target", root=str(fake_root), n_per_class=3, val_per_class=2)
    assert task.split == ref.split
    torch.testing.assert_close(task.val.images, ref.val.images)


@pytest.mark.skipif(not fashion_mnist.DEBIAN_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_debian_dataset_counts():
    target = build_task("fashion-mnist-target")
    assert (len(target.train), len(target.val), len(target.test)) == (150, 500, 5000)
    source = build_task("fashion-mnist-source")
    assert (len(source.train), len(source.val), len(source.test)) == (29500, 500, 5000)
    assert 0.2 < target.split["train_mean"][0] < 0.4


def test_task_from_split_round_trip(fake_root):
    import json

    from l2sp.data import task_from_split

    task = build_task("fashion-mnist-target", root=str(fake_root), n_per_class=3, val_per_class=2, seed=4)
    record = json.loads(json.dumps(task.split))
    again = task_from_split(record, root=str(fake_root))
    assert again.split == task.split
    torch.testing.assert_close(again.val.images, task.val.images)
    record["train"] = record["train"][::-1]
    with pytest.raises(L2SPError, match="differ from the record"):
        task_from_split(record, root=str(fake_root))
