"""Image-folder tasks: tiny generated datasets in each exact on-disk layout (ImageFolder, Caltech-256/101,
MIT Indoor-67, Food-101, Stanford Dogs + ImageNet val), split sizes, determinism, disjointness, the cached
training mean, 10-crop items, and every layout error."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from l2sp.data import build_task, folders, stats
from l2sp.errors import L2SPError

SMALL = {"image_size": 8, "resize": 10}
# tiny datasets have fewer classes than the protocols: that warning is asserted where it matters
pytestmark = pytest.mark.filterwarnings("ignore:.*the protocol has:UserWarning")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("L2SP_CACHE", str(tmp_path / "cache"))


def write_image(path, seed, size=(12, 10), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(arr, mode).save(path, format=fmt)


def make_classes(base, counts, ext=".png", prefix=""):
    """base/<class>/<prefix><k><ext> for class name -> count; distinct pixels per file."""
    seed = 0
    for name, k in counts.items():
        for i in range(k):
            seed += 1
            write_image(base / name / f"{prefix}{i:04d}{ext}", seed, fmt="PNG" if ext == ".png" else "JPEG")


def parts(task):
    return {p: [tuple(x) for x in task.split[p]] for p in ("train", "val", "test")}


def assert_disjoint(task):
    sp = parts(task)
    files = {p: {f for f, _ in v} for p, v in sp.items()}
    assert not files["train"] & files["val"] and not files["train"] & files["test"]
    assert not files["val"] & files["test"]


# ---- generic ImageFolder ----

def test_imagefolder_n_per_class_split(tmp_path):
    make_classes(tmp_path / "ds", {"a": 6, "b": 7, "c": 6})
    kw = dict(root=str(tmp_path / "ds"), n_per_class=3, val_per_class=1, test_per_class=2,
              normalization="none", **SMALL)
    task = build_task("imagefolder", seed=1, **kw)
    assert (len(task.train), len(task.val), len(task.test)) == (6, 3, 6)
    assert task.classes == ["a", "b", "c"] and task.num_classes == 3
    assert_disjoint(task)
    for p in ("train", "val", "test"):
        labels = [c for _, c in task.split[p]]
        assert all(labels.count(k) == labels.count(0) for k in range(3))
        assert all(f.startswith(task.classes[c] + "/") for f, c in task.split[p])
    assert build_task("imagefolder", seed=1, **kw).split == task.split
    assert build_task("imagefolder", seed=2, **kw).split["train"] != task.split["train"]
    x, y = task.train[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == task.split["train"][0][1]
    with pytest.raises(L2SPError, match="pass n_per_class"):
        build_task("imagefolder", root=str(tmp_path / "ds"))


def test_imagefolder_train_test_layout(tmp_path):
    make_classes(tmp_path / "ds" / "train", {"x": 4, "y": 5})
    make_classes(tmp_path / "ds" / "test", {"x": 2, "y": 3}, prefix="t")
    task = build_task("imagefolder", root=str(tmp_path / "ds"), val_per_class=1, normalization="none",
                      **SMALL)
    assert (len(task.train), len(task.val), len(task.test)) == (7, 2, 5)
    assert all(f.startswith("test/") for f, _ in task.split["test"])
    assert_disjoint(task)
    make_classes(tmp_path / "ds" / "val", {"x": 1, "y": 1}, prefix="v")
    with_val = build_task("imagefolder", root=str(tmp_path / "ds"), normalization="none", **SMALL)
    assert (len(with_val.train), len(with_val.val)) == (9, 2)
    make_classes(tmp_path / "bad" / "train", {"x": 2})
    with pytest.raises(L2SPError, match="no test/ folder"):
        build_task("imagefolder", root=str(tmp_path / "bad"))
    make_classes(tmp_path / "bad" / "test", {"z": 2})
    with pytest.raises(L2SPError, match="class folders differ"):
        build_task("imagefolder", root=str(tmp_path / "bad"))


def test_train_mean_is_computed_over_training_images_and_cached(tmp_path, monkeypatch):
    import l2sp.data.task as data_pkg

    for i in range(4):
        write_image(tmp_path / "sq" / "a" / f"s{i}.png", 50 + i, size=(10, 10))
        write_image(tmp_path / "sq" / "b" / f"s{i}.png", 60 + i, size=(10, 10))
    write_image(tmp_path / "sq" / "a" / "g.png", 98, size=(10, 10), mode="L")  # grayscale -> 3 channels
    kw = dict(root=str(tmp_path / "sq"), n_per_class=3, val_per_class=1, image_size=10, resize=10)
    task = build_task("imagefolder", **kw)
    # independent reference: PIL decode to RGB at the native size (the resize to 10x10 is then the identity)
    files = [tmp_path / "sq" / f for f, _ in task.split["train"]]
    ref = np.mean([np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) for f in files], axis=(0, 1, 2))
    np.testing.assert_allclose(task.split["train_mean"], ref / 255, atol=1e-12)
    x, _ = task.val[0]
    raw = np.asarray(Image.open(tmp_path / "sq" / task.split["val"][0][0]).convert("RGB"), dtype=np.float64)
    np.testing.assert_allclose(x.numpy(), (raw / 255 - ref / 255).transpose(2, 0, 1), atol=1e-6)
    # the second build reads the cache: computing again would fail
    monkeypatch.setattr(data_pkg, "streaming_mean", lambda *a, **k: pytest.fail("mean recomputed"))
    again = build_task("imagefolder", **kw)
    assert again.split["train_mean"] == task.split["train_mean"]
    assert again.split["mean_cache_key"] == task.split["mean_cache_key"]
    # another split (seed) or another resize is another cache entry
    monkeypatch.setattr(data_pkg, "streaming_mean", stats.streaming_mean)
    other = build_task("imagefolder", **{**kw, "seed": 3})
    bigger = build_task("imagefolder", **{**kw, "resize": 12})
    keys = {task.split["mean_cache_key"], other.split["mean_cache_key"], bigger.split["mean_cache_key"]}
    assert len(keys) == 3
    assert len(list((tmp_path / "cache" / "means").glob("*.json"))) == 3
    # computed in a worker process: the same numbers
    workers = build_task("imagefolder", **kw, cache=False, mean_workers=1)
    np.testing.assert_allclose(workers.split["train_mean"], task.split["train_mean"], rtol=0, atol=1e-15)


def test_ten_crop_test_items_and_keep_aspect(tmp_path):
    make_classes(tmp_path / "ds", {"a": 3, "b": 3})
    task = build_task("imagefolder", root=str(tmp_path / "ds"), n_per_class=2, ten_crop=True,
                      keep_aspect=True, normalization="half", image_size=8, resize=9)
    x, _ = task.test[0]
    assert x.shape == (10, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert task.train[0][0].shape == (3, 8, 8) and task.split["keep_aspect"] is True


def test_unreadable_files_are_skipped_with_one_warning(tmp_path):
    make_classes(tmp_path / "ds", {"a": 4, "b": 4})
    (tmp_path / "ds" / "a" / "broken.jpg").write_bytes(b"not an image at all")
    (tmp_path / "ds" / "b" / "empty.png").write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = build_task("imagefolder", root=str(tmp_path / "ds"), n_per_class=3, normalization="none",
                          **SMALL)
    msgs = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(msgs) == 1 and "broken.jpg" in msgs[0] and "empty.png" in msgs[0]
    used = {f for p in ("train", "val", "test") for f, _ in task.split[p]}
    assert "a/broken.jpg" not in used and "b/empty.png" not in used and len(used) == 8
    # a file that becomes unreadable later fails with its name, not a bare decoder error
    with pytest.raises(L2SPError, match="broken.jpg"):
        folders.load_image(str(tmp_path / "ds" / "a" / "broken.jpg"))
    with pytest.raises(L2SPError, match="check="):
        build_task("imagefolder", root=str(tmp_path / "ds"), n_per_class=3, check="deep")


def test_full_check_catches_files_the_header_check_accepts(tmp_path):
    write_image(tmp_path / "ds" / "a" / "0000.jpg", 1, size=(64, 64), fmt="JPEG")
    good = (tmp_path / "ds" / "a" / "0000.jpg").read_bytes()
    (tmp_path / "ds" / "a" / "cut.jpg").write_bytes(good[: len(good) // 2])
    assert folders.is_readable(str(tmp_path / "ds" / "a" / "0000.jpg"), "full")
    header_ok = folders.is_readable(str(tmp_path / "ds" / "a" / "cut.jpg"), "header")
    full_ok = folders.is_readable(str(tmp_path / "ds" / "a" / "cut.jpg"), "full")
    assert header_ok and not full_ok


# ---- Caltech ----

def test_caltech256_layout_counts_and_strictness(tmp_path):
    base = tmp_path / "256_ObjectCategories"
    make_classes(base, {"001.ak47": 6, "002.american-flag": 7, "257.clutter": 6}, ext=".jpg")
    write_image(base / "002.american-flag" / "greg" / "extra.jpg", 5, fmt="JPEG")  # nested: ignored
    with pytest.raises(L2SPError, match="found 3 classes, the protocol has 257"):
        build_task("caltech256", root=str(tmp_path))
    with pytest.warns(UserWarning, match="protocol has 257"):
        task = build_task("caltech256", root=str(tmp_path), strict=False, n_per_class=3, test_per_class=2,
                          val_per_class=1, normalization="none", **SMALL)
    assert (len(task.train), len(task.val), len(task.test)) == (6, 3, 6)
    assert_disjoint(task)
    assert not any("greg" in f for p in ("train", "val", "test") for f, _ in task.split[p])
    with pytest.raises(L2SPError, match=r"fewer than 3 training \+ 4 test.*001.ak47 \(6\)"):
        build_task("caltech256", root=str(base), strict=False, n_per_class=3, test_per_class=4)
    with pytest.raises(L2SPError, match="does not exist"):
        build_task("caltech256", root=str(tmp_path / "nowhere"))
    with pytest.raises(L2SPError, match="needs root"):
        build_task("caltech256")


def test_caltech101_rest_up_to_test_per_class(tmp_path):
    base = tmp_path / "101_ObjectCategories"
    make_classes(base, {"Faces": 8, "accordion": 4, "BACKGROUND_Google": 5}, ext=".jpg")
    with pytest.warns(UserWarning, match="protocol has 101"):
        task = build_task("caltech101", root=str(base), strict=False, n_per_class=3, test_per_class=3,
                          normalization="none", **SMALL)
    assert task.classes == ["Faces", "accordion"]
    labels = [c for _, c in task.split["test"]]
    assert labels.count(0) == 3 and labels.count(1) == 1 and len(task.train) == 6 and len(task.val) == 0


def test_caltech101_real_files(shared_dir):
    root = shared_dir / "data" / "caltech101"
    if not root.is_dir():
        pytest.skip("no caltech101 copy in ../shared")
    task = build_task("caltech101", root=str(root), normalization="half", ten_crop=True, image_size=112,
                      resize=128, check="none")
    assert task.num_classes == 101
    assert (len(task.train), len(task.test)) == (3030, 2945)  # the protocol's numbers (README of the copy)
    assert_disjoint(task)
    x, y = task.train[0]
    assert x.shape == (3, 112, 112) and -1 <= x.min() and x.max() <= 1
    assert task.test[5][0].shape == (10, 3, 112, 112)
    val = build_task("caltech101", root=str(root), normalization="half", val_per_class=5, check="none")
    assert (len(val.train), len(val.val)) == (2525, 505)
    assert set(map(tuple, val.split["train"] + val.split["val"])) == set(map(tuple, task.split["train"]))


# ---- official-list datasets ----

def _indoor(tmp_path):
    base = tmp_path / "indoor"
    make_classes(base / "Images", {"bar": 5, "kitchen": 5, "office": 5}, ext=".jpg")
    files = {c: sorted(p.name for p in (base / "Images" / c).iterdir()) for c in ("bar", "kitchen", "office")}
    (base / "TrainImages.txt").write_text("".join(f"{c}/{f}\n" for c, fs in files.items() for f in fs[:3]))
    (base / "TestImages.txt").write_text("".join(f"{c}/{f}\n" for c, fs in files.items() for f in fs[3:]))
    return base


def test_indoor67(tmp_path):
    base = _indoor(tmp_path)
    with pytest.raises(L2SPError, match="found 3 classes, the protocol has 67"):
        build_task("indoor67", root=str(base))
    with pytest.warns(UserWarning):
        task = build_task("indoor67", root=str(base), strict=False, val_per_class=1, normalization="none",
                          **SMALL)
    assert (len(task.train), len(task.val), len(task.test)) == (6, 3, 6)
    assert_disjoint(task)
    listed = {ln for ln in (base / "TestImages.txt").read_text().split()}
    assert {f.removeprefix("Images/") for f, _ in task.split["test"]} == listed
    with pytest.warns(UserWarning):
        sub = build_task("indoor67", root=str(base), strict=False, n_per_class=2, normalization="none",
                         **SMALL)
    official_train = {f for f, _ in parts(task)["train"] + parts(task)["val"]}
    assert len(sub.train) == 6 and {f for f, _ in sub.split["train"]} < official_train
    with pytest.warns(UserWarning), pytest.raises(L2SPError, match="class 'bar' has 3 training images"):
        build_task("indoor67", root=str(base), strict=False, n_per_class=4)
    (base / "Images" / "bar" / "0000.jpg").unlink()
    with pytest.warns(UserWarning), pytest.raises(L2SPError, match=r"missing: .*bar/0000.jpg"):
        build_task("indoor67", root=str(base), strict=False)
    (base / "TestImages.txt").unlink()
    with pytest.raises(L2SPError, match="TestImages.txt is missing"):
        build_task("indoor67", root=str(base))
    with pytest.raises(L2SPError, match="does not hold 'TrainImages.txt'"):
        build_task("indoor67", root=str(tmp_path))


def test_food101(tmp_path):
    base = tmp_path / "food-101"
    make_classes(base / "images", {"apple_pie": 4, "sushi": 4}, ext=".jpg")
    (base / "meta").mkdir()
    (base / "meta" / "classes.txt").write_text("apple_pie\nsushi\n")
    (base / "meta" / "train.txt").write_text("".join(f"{c}/{i:04d}\n" for c in ("apple_pie", "sushi")
                                                     for i in range(3)))
    (base / "meta" / "test.txt").write_text("apple_pie/0003\nsushi/0003\n")
    with pytest.warns(UserWarning, match="protocol has 101"):
        task = build_task("food101", root=str(tmp_path), strict=False, val_per_class=1, normalization="none",
                          **SMALL)
    assert (len(task.train), len(task.val), len(task.test)) == (4, 2, 2)
    assert task.split["test"] == [["images/apple_pie/0003.jpg", 0], ["images/sushi/0003.jpg", 1]]
    assert_disjoint(task)
    (base / "meta" / "classes.txt").write_text("apple_pie\n")
    with pytest.warns(UserWarning), pytest.raises(L2SPError, match="not in meta/classes.txt: sushi"):
        build_task("food101", root=str(base), strict=False)
    (base / "meta" / "classes.txt").unlink()
    (base / "images" / "sushi" / "0001.jpg").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable.*0001.jpg"), \
            pytest.raises(L2SPError, match="'sushi' has 2"):
        build_task("food101", root=str(base), strict=False, n_per_class=3)


def _dogs(tmp_path, mat=True):
    scipy_io = pytest.importorskip("scipy.io")
    base = tmp_path / "dogs"
    breeds = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]
    make_classes(base / "Images", {b: 4 for b in breeds}, ext=".jpg", prefix="img_")
    entries = [f"{b}/img_{i:04d}.jpg" for b in breeds for i in range(3)]
    if mat:
        (base / "lists").mkdir()
        cell = np.empty((len(entries), 1), dtype=object)
        for i, e in enumerate(entries):
            cell[i, 0] = np.array([e])
        scipy_io.savemat(str(base / "lists" / "train_list.mat"),
                         {"file_list": cell, "labels": np.array([[1]] * 3 + [[2]] * 3)})
    else:
        (base / "train_list.txt").write_text("\n".join(entries) + "\n")
    return base, breeds


def test_dogs120_with_imagenet_val_folders(tmp_path):
    base, breeds = _dogs(tmp_path)
    val = tmp_path / "imagenet_val"
    make_classes(val, {"n02085620": 3, "n02085782": 3, "n01440764": 2}, ext=".jpg", prefix="ILSVRC_")
    with pytest.raises(L2SPError, match="pass imagenet_val="):
        build_task("dogs120", root=str(base), strict=False)
    with pytest.warns(UserWarning, match="protocol has 120"):
        task = build_task("dogs120", root=str(base), strict=False, imagenet_val=str(val), test_per_class=3,
                          val_per_class=1, normalization="none", **SMALL)
    assert task.classes == breeds
    assert (len(task.train), len(task.val), len(task.test)) == (4, 2, 6)
    assert all(f.startswith(str(val)) for f, _ in task.split["test"])
    assert {c for f, c in task.split["test"] if "n02085782" in f} == {1}
    assert not any("img_0003" in f for f, _ in task.split["train"] + task.split["val"])
    with pytest.warns(UserWarning), pytest.raises(L2SPError, match=r"fewer than 50 ImageNet validation"):
        build_task("dogs120", root=str(base), strict=False, imagenet_val=str(val))


def test_dogs120_text_list_and_flat_val_with_labels(tmp_path):
    base, breeds = _dogs(tmp_path, mat=False)
    flat = tmp_path / "val_flat"
    for i in range(6):
        write_image(flat / f"ILSVRC2012_val_{i:08d}.JPEG", 200 + i, fmt="JPEG")
    wnids = ["n02085620", "n02085782", "n01440764"] * 2
    csv_text = "ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i:08d},{w} 1 2 3 4\n" for i, w in enumerate(wnids))
    (tmp_path / "LOC_val_solution.csv").write_text(csv_text)
    with pytest.raises(L2SPError, match="imagenet_val_labels"):
        build_task("dogs120", root=str(base), strict=False, imagenet_val=str(flat))
    with pytest.warns(UserWarning):
        task = build_task("dogs120", root=str(base), strict=False, imagenet_val=str(flat), test_per_class=2,
                          imagenet_val_labels=str(tmp_path / "LOC_val_solution.csv"), normalization="none",
                          **SMALL)
    names = sorted((f.rsplit("/", 1)[1], c) for f, c in task.split["test"])
    assert names == [("ILSVRC2012_val_00000000.JPEG", 0), ("ILSVRC2012_val_00000001.JPEG", 1),
                     ("ILSVRC2012_val_00000003.JPEG", 0), ("ILSVRC2012_val_00000004.JPEG", 1)]
    lines = [f"ILSVRC2012_val_{i:08d}.JPEG {w}\n" for i, w in enumerate(wnids)]
    (tmp_path / "labels.txt").write_text("".join(lines))
    with pytest.warns(UserWarning):
        again = build_task("dogs120", root=str(base), strict=False, imagenet_val=str(flat), test_per_class=2,
                           imagenet_val_labels=str(tmp_path / "labels.txt"), normalization="none", **SMALL)
    assert again.split["test"] == task.split["test"]
    (base / "Images" / "not_a_synset").mkdir()
    with pytest.warns(UserWarning), pytest.raises(L2SPError, match="synset id"):
        build_task("dogs120", root=str(base), strict=False, imagenet_val=str(flat))


def test_option_and_name_errors(tmp_path):
    with pytest.raises(L2SPError, match="unknown option.*imagenet_val"):
        build_task("caltech101", root=str(tmp_path), imagenet_val="x")
    with pytest.raises(L2SPError, match="unknown normalization"):
        build_task("caltech101", root=str(tmp_path), normalization="std")
    make_classes(tmp_path / "ds", {"a": 3, "b": 3})
    with pytest.raises(L2SPError, match="smaller than image_size"):
        build_task("imagefolder", root=str(tmp_path / "ds"), n_per_class=2, image_size=32, resize=16)
    with pytest.raises(L2SPError, match="val_per_class < n_per_class"):
        build_task("imagefolder", root=str(tmp_path / "ds"), n_per_class=2, val_per_class=2)
    with pytest.raises(L2SPError, match="does not exist"):
        build_task("imagefolder", root=str(tmp_path / "none"), n_per_class=2)


def test_task_from_split_rebuilds_the_recorded_files(tmp_path):
    import json
    import shutil

    from l2sp.data import task_from_split

    make_classes(tmp_path / "ds", {"a": 5, "b": 5})
    task = build_task("imagefolder", root=str(tmp_path / "ds"), n_per_class=3, val_per_class=1, **SMALL)
    record = json.loads(json.dumps(task.split))
    shutil.copytree(tmp_path / "ds", tmp_path / "moved")
    for i in range(5):  # more files: a fresh seeded draw could change, the record does not
        write_image(tmp_path / "moved" / "a" / f"new{i}.png", 300 + i)
    again = task_from_split(record, root=str(tmp_path / "moved"), ten_crop=True)
    for part in ("train", "val", "test"):
        assert again.split[part] == task.split[part]
    assert again.split["train_mean"] == pytest.approx(task.split["train_mean"], abs=1e-12)
    assert again.test[0][0].shape == (10, 3, 8, 8)
    torch.testing.assert_close(again.val[0][0], task.val[0][0])
    (tmp_path / "moved" / task.split["test"][0][0]).unlink()
    with pytest.raises(L2SPError, match="recorded file"):
        task_from_split(record, root=str(tmp_path / "moved"))
    with pytest.raises(L2SPError, match="cannot override"):
        task_from_split(record, seed=3)
    with pytest.raises(L2SPError, match="names task"):
        task_from_split({"task": "cifar"})
