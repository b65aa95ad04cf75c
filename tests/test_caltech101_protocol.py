"""Caltech-101-30 from an ImageNet MobileNetV2: the "imagenet-subset" source task, the local checkpoint path,
the presets, image packs (l2sp.data.pack) and their on-device tasks, and both benchmarks (drivers of
l2sp.finetune) end to end on a tiny synthetic pack. Only a handful of the shared images are decoded."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import l2sp
from l2sp.data import build_task
from l2sp.data.folders import load_image
from l2sp.data.imagenet_subset import RestrictLogits, local_labels, present_classes, read_index
from l2sp.data.pack import PACK_FILE, carve_val, decode_group, group_item, pack_group, pack_task, read_pack, write_pack
from l2sp.errors import L2SPError

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gpu():
    return _module("caltech101_gpu")


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (12, 10), gray: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0]) if gray else (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95)
    return path


def _tiny_layout(root: Path, index: dict[str, int], n_train: int = 4, n_val: int = 3) -> Path:
    for k, w in enumerate(index):
        for i in range(n_train):
            _jpeg(root / "train" / w / f"{w}_{i}.JPEG", 100 * k + i)
        for i in range(n_val):
            _jpeg(root / "val" / w / f"val_{k}_{i}.JPEG", 1000 + 100 * k + i, gray=i == 0)
    (root / "imagenet_index.json").write_text(json.dumps(index))
    return root


# ------------------------------------------------------------------------------------ imagenet-subset task
def test_imagenet_subset_labels_are_imagenet_indices(tmp_path):
    index = {"n01443537": 1, "n09999999": 998, "n01629819": 25}
    root = _tiny_layout(tmp_path / "tiny", index)
    task = build_task("imagenet-subset", root=str(root), n_per_class=3, val_per_class=1, test_per_class=2,
                      image_size=8, resize=8, normalization="half", seed=0)
    assert task.num_classes == 1000 and len(task.classes) == 1000
    assert present_classes(task) == [1, 25, 998]
    assert [task.classes[i] for i in (1, 25, 998)] == ["n01443537", "n01629819", "n09999999"]
    assert task.classes[0] == "imagenet-000"
    assert (len(task.train), len(task.val), len(task.test)) == (6, 3, 6)
    for part, folder in ((task.train, "train"), (task.val, "train"), (task.test, "val")):
        for path, label in part.samples:
            assert Path(path).parent.name in index and index[Path(path).parent.name] == label
            assert Path(path).parent.parent.name == folder
    # the test item is the file's pixels resized to 8x8 and scaled to [-1, 1] (grey images: 3 equal channels)
    path, label = task.test.samples[0]
    x, y = task.test[0]
    ref = TF.resize(load_image(path), [8, 8], antialias=True).float() / 127.5 - 1
    assert y == label and torch.allclose(x, ref, atol=1e-6)
    # seeded: the same seed gives the same files, training files are the first n of permutation [seed, c, 0]
    again = build_task("imagenet-subset", root=str(root), n_per_class=3, val_per_class=1, test_per_class=2,
                       image_size=8, resize=8, normalization="half", seed=0)
    assert again.split["train"] == task.split["train"] and again.split["test"] == task.split["test"]
    files = sorted(str(p) for p in (root / "train" / "n01443537").iterdir())
    perm = np.random.default_rng([0, 1, 0]).permutation(len(files))
    kept = [files[i] for i in perm[:3]]
    assert [p for p, c in task.train.samples if c == 1] == kept[:2]
    assert [p for p, c in task.val.samples if c == 1] == kept[2:]


def test_imagenet_subset_flat_layout_and_errors(tmp_path):
    index = {"n01443537": 1, "n01629819": 25}
    flat = tmp_path / "flat"
    for k, w in enumerate(index):
        for i in range(4):
            _jpeg(flat / w / f"{i}.jpg", 10 * k + i)
    (flat / "imagenet_index.json").write_text(json.dumps(index))
    task = build_task("imagenet-subset", root=str(flat), n_per_class=3, image_size=8, resize=8,
                      normalization="none")
    assert (len(task.train), len(task.test)) == (6, 2)
    assert sorted({c for _, c in task.test.samples}) == [1, 25]
    with pytest.raises(L2SPError, match="n_per_class"):
        build_task("imagenet-subset", root=str(flat), normalization="none")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"n01443537": 1000}))
    with pytest.raises(L2SPError, match="integer in"):
        read_index(bad)
    bad.write_text(json.dumps({"a": 3, "b": 3}))
    with pytest.raises(L2SPError, match="same index"):
        read_index(bad)
    with pytest.raises(L2SPError, match="does not exist"):
        read_index(tmp_path / "missing.json")
    (flat / "imagenet_index.json").write_text(json.dumps({"n01443537": 1}))
    with pytest.raises(ValueError, match="not in the index file"):
        build_task("imagenet-subset", root=str(flat), n_per_class=3, normalization="none")
    with pytest.raises(L2SPError, match="unknown option"):
        build_task("imagenet-subset", root=str(flat), n_per_class=3, normalization="none", recursive=True)


def test_restrict_logits_and_local_labels():
    torch.manual_seed(0)
    idx = [7, 2, 900, 31]
    net = torch.nn.Linear(5, 1000)
    x = torch.randn(6, 5)
    z = RestrictLogits(net, idx)(x)
    ref = net(x).detach().numpy()[:, idx]
    assert z.shape == (6, 4) and np.allclose(z.detach().numpy(), ref)
    y = torch.tensor([900, 7, 31, 2, 2])
    assert local_labels(y, idx).tolist() == [2, 0, 3, 1, 1]
    with pytest.raises(L2SPError):
        local_labels(torch.tensor([5]), idx)
    with pytest.raises(L2SPError):
        RestrictLogits(net, [1, 1])


def test_tiny_imagenet_as_source_task(shared_dir):
    root = shared_dir / "data" / "tiny-imagenet"
    task = build_task("imagenet-subset", root=str(root), n_per_class=1, test_per_class=1,
                      normalization="half",
                      image_size=64, resize=64, check="none")
    index = json.loads((root / "imagenet_index.json").read_text())
    assert present_classes(task) == sorted(index.values()) and len(task.test) == 200 == len(task.train)
    for path, label in task.test.samples[:20]:
        assert index[Path(path).parent.name] == label


# ------------------------------------------------------------------------- Caltech-101-30 and the checkpoint
def test_caltech101_split_and_validation_carving(shared_dir):
    root = str(shared_dir / "data" / "caltech101")
    full = build_task("caltech101", root=root, n_per_class=30, val_per_class=0, seed=0, normalization="half",
                      check="none")
    assert (len(full.train), len(full.test), full.num_classes) == (3030, 2945, 101)
    carved = build_task("caltech101", root=root, n_per_class=30, val_per_class=5, seed=0,
                        normalization="half",
                        check="none")
    labels = torch.tensor([c for _, c in full.split["train"]])
    mask = carve_val(labels, 5)
    files = [p for p, _ in full.split["train"]]
    assert [f for f, m in zip(files, mask.tolist()) if m] == [p for p, _ in carved.split["val"]]
    assert [f for f, m in zip(files, mask.tolist()) if not m] == [p for p, _ in carved.split["train"]]
    with pytest.raises(L2SPError):
        carve_val(torch.tensor([0, 0, 1]), 1)


def test_local_checkpoint_source_network(shared_dir):
    """The weights load through the user's path (a local file named by model.weights); the source network
    recognises Tiny ImageNet images at 224 px far above chance."""
    from l2sp.engine.config import resolve
    from l2sp.engine.run import setup
    from l2sp.models import pretrained

    weights = str(shared_dir / "weights" / "mobilenet_v2_imagenet.safetensors")
    cfg = resolve("caltech101-mobilenetv2-l2-sp", {"model.weights": weights, "train.device": "cpu"})
    assert (cfg.model.arch, cfg.data.normalization, cfg.data.image_size, cfg.data.resize) == (
        "mobilenet_v2", "half", 224, 256)
    assert (cfg.optim.batch_size, cfg.optim.steps, cfg.optim.milestones) == (64, 9000, [6000])
    s = setup(cfg, SimpleNamespace(num_classes=101, in_channels=3))
    assert s.head_name == "classifier.1" and s.model.classifier[1].out_features == 101
    assert s.source_state["classifier.1.weight"].shape == (1000, 1280)
    names = {n for n, p in s.model.named_parameters()}
    assert set(s.regularizer.novel) == {"classifier.1.weight", "classifier.1.bias"}
    assert set(s.regularizer.shared) == names - set(s.regularizer.novel)
    l2 = resolve("caltech101-mobilenetv2-l2")
    assert (l2.reg.kind, l2.reg.alpha, l2.reg.beta) == ("l2", 1e-4, 1e-3)
    assert resolve("caltech101-mobilenetv2-l2-freeze").train.freeze == 7

    root = shared_dir / "data" / "tiny-imagenet"
    index = json.loads((root / "imagenet_index.json").read_text())
    wnids = sorted(index)[::10]                     # 20 classes, their first validation image
    files = [sorted((root / "val" / w).iterdir())[0] for w in wnids]
    x = torch.stack([TF.resize(load_image(str(f)), [224, 224], antialias=False) for f in files]).float()
    x = x / 127.5 - 1
    y = torch.tensor([index[w] for w in wnids])
    net = pretrained("mobilenet_v2", weights, 1000).eval()
    with torch.no_grad():
        z = net(x)
    ind = sorted(index.values())
    acc1000 = float((z.argmax(1) == y).float().mean())
    acc200 = float((RestrictLogits(net, ind)(x).argmax(1) == local_labels(y, ind)).float().mean())
    assert acc200 >= acc1000 and acc200 >= 0.2         # chance: 0.005 (measured: 0.35)


# ------------------------------------------------------------------------------------ pack and augmentation
def test_pack_roundtrip(tmp_path, shared_dir):
    root = shared_dir / "data" / "caltech101"
    files = [str(sorted((root / c).iterdir())[0]) for c in ("ant", "Faces", "yin_yang")]
    files.append(str(_jpeg(tmp_path / "grey.jpg", 3, size=(20, 14), gray=True)))
    raw = pack_group(files, [4, 0, 100, 7])
    small = pack_group(files, [4, 0, 100, 7], quality=70, short_side=48)
    path = write_pack(tmp_path / "p.safetensors", {"raw": raw, "small": small}, {"classes": ["a"], "seed": 3})
    groups, meta = read_pack(path)
    assert meta == {"classes": ["a"], "seed": 3}
    for k in ("bytes", "offsets", "labels"):
        assert torch.equal(groups["raw"][k], raw[k])
    assert groups["raw"]["labels"].tolist() == [4, 0, 100, 7]
    assert bytes(group_item(groups["raw"], 1).numpy()) == Path(files[1]).read_bytes()
    assert small["bytes"].numel() < raw["bytes"].numel()
    dec = decode_group(groups["raw"], 40)
    ref = torch.stack([TF.resize(load_image(f), [40, 40], antialias=True) for f in files])
    assert dec.dtype == torch.uint8 and torch.equal(dec, ref)
    dec_small = decode_group(groups["small"], 40)
    assert (dec_small.float() - ref.float()).abs().mean() < 8    # re-encoded: close, not equal
    img = load_image(files[0])
    first = {"bytes": small["bytes"], "offsets": small["offsets"][:2], "labels": small["labels"][:1]}
    short = decode_group(first, None)
    assert min(short.shape[-2:]) == 48 and short.shape[-1] == round(img.shape[-1] * 48 / img.shape[-2])
    with pytest.raises(L2SPError, match="one label per file"):
        pack_group(files, [1])
    with pytest.raises(L2SPError, match="no image pack"):
        read_pack(tmp_path / "nowhere")


def test_pack_task_equals_folder_task_on_device(tmp_path, monkeypatch):
    """A pack of a folder task's files, byte for byte, gives the on-device task build_task(device=...) gives:
    the same images, validation carving and batches under the same seed."""
    monkeypatch.setenv("L2SP_CACHE", str(tmp_path / "cache"))
    for c in range(3):
        for i in range(5):
            _jpeg(tmp_path / "imgs" / f"c{c}" / f"{i}.jpg", 10 * c + i, (30 + 3 * i, 26), gray=i == 2)
    kw = {"root": str(tmp_path / "imgs"), "n_per_class": 3, "test_per_class": 2, "image_size": 16, "resize": 20,
          "normalization": "half", "check": "none"}
    full = build_task("imagefolder", val_per_class=0, **kw)
    root = Path(full.split["root"])
    groups = {part: pack_group([str(root / p) for p, _ in full.split[part]], [c for _, c in full.split[part]])
              for part in ("train", "test")}
    write_pack(tmp_path / "pack" / PACK_FILE, groups, {"classes": full.classes})
    packed = pack_task(tmp_path / "pack", train="train", test="test", crop=16, resize=20, val_per_class=1)
    folder = build_task("imagefolder", val_per_class=1, device="cpu", **kw)
    for part in ("train", "val", "test"):
        a, b = getattr(packed, part), getattr(folder, part)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    torch.manual_seed(7)
    x, y = packed.train.get_batch([0, 5, 2])
    torch.manual_seed(7)
    assert torch.equal(x, folder.train.get_batch([0, 5, 2])[0])
    assert packed.num_classes == 3 and packed.split["val_per_class"] == 1
    with pytest.raises(L2SPError, match="no group 'val'"):
        pack_task(tmp_path / "pack", train="val", test="test", crop=16)


def _tiny_pack(tmp_path: Path, shared_dir: Path, gpu) -> Path:
    """A pack of synthetic images: 3 classes x (4 train + 2 test), 4 source test and 2 Fisher images."""
    imgs = tmp_path / "img"
    train = [(str(_jpeg(imgs / f"tr{c}_{i}.jpg", 10 * c + i, (40, 36))), c)
             for c in range(3) for i in range(4)]
    test = [(str(_jpeg(imgs / f"te{c}_{i}.jpg", 500 + 10 * c + i, (40, 36))), c)
            for c in range(3) for i in range(2)]
    tiny = [(str(_jpeg(imgs / f"ti{k}.jpg", 900 + k, (64, 64))), lab) for k, lab in enumerate([1, 1, 25, 25])]
    group = lambda items: pack_group([f for f, _ in items], [c for _, c in items])  # noqa: E731
    pack = tmp_path / "pack"
    meta = {"classes": ["a", "b", "c"], "split_seed": 0, "n_per_class": 4, "protocol": "test",
            "caltech_files": {}, "quality": None, "short_side": None, "tiny_class_indices": [1, 25]}
    write_pack(pack / PACK_FILE, {"caltech_train": group(train), "caltech_test": group(test),
                                          "tiny_test": group(tiny), "tiny_fisher": group(tiny[:2])}, meta)
    shutil.copyfile(shared_dir / "weights" / gpu.WEIGHTS_FILE, pack / gpu.WEIGHTS_FILE)
    return pack


# ---------------------------------------------------------------------------------- the CPU benchmark, tiny
def test_cpu_benchmark_end_to_end(tmp_path, shared_dir, gpu):
    """The CPU benchmark on a synthetic pack of 3 classes (lr probe, Fisher, L2 and L2-SP-Fisher runs,
    source drop): a few steps at 32 px."""
    bench = _module("caltech101_mobilenetv2")
    pack = _tiny_pack(tmp_path, shared_dir, gpu)
    out = tmp_path / "out"
    fisher_run = "l2-sp-fisher:reg.alpha=0.5:optim.steps=3"
    bench.main(["--pack", str(pack), "--out", str(out), "--kinds", f"l2,{fisher_run}", "--steps", "2",
                "--lr-grid", "0.01,0.001", "--probe-steps", "2", "--val-per-class", "1", "--image-size", "32",
                "--batch", "4", "--fisher-examples", "2", "--fisher-classes", "2", "--source-per-class", "2",
                "--holdout", "1"])
    rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert [r["run"] for r in rows] == ["l2", fisher_run]
    assert [r["steps"] for r in rows] == [2, 3]
    for r in rows:
        assert 0 <= r["test_acc"] <= 1 and 0 <= r["val_acc"] <= 1 and r["lr"] in (0.01, 0.001)
        assert 0 <= r["src200"] <= 100 and r["src200"] >= r["src1000"]
        assert r["overrides"]["data.val_per_class"] == 1
    assert rows[1]["overrides"]["reg.kind"] == "l2-sp-fisher"
    assert (rows[1]["overrides"]["reg.alpha"], rows[1]["overrides"]["optim.milestones"]) == (0.5, [2])
    assert (rows[0]["overrides"]["reg.alpha"], rows[0]["overrides"]["reg.beta"]) == (1e-4, 1e-3)
    table = bench.collect([str(out)])  # the table again, from the results file alone
    assert "| val top-1 % |" in table and f"| {fisher_run} | 1 | {100 * rows[1]['val_acc']:.1f} |" in table
    with pytest.raises(l2sp.L2SPError, match="does not exist"):
        bench.collect([str(tmp_path / "nowhere")])
    fisher = l2sp.fisher.load(out / "fisher-mobilenet_v2-tiny.safetensors")
    first = fisher["features.0.0.weight"]
    assert first.shape == (32, 3, 3, 3) and float(first.min()) >= 0 and float(first.max()) > 0


def test_cpu_benchmark_run_specs():
    """``kind:key=value:...`` run specs: YAML values, a folder-safe name, one-line errors."""
    bench = _module("caltech101_mobilenetv2")
    assert bench.parse_run("l2-sp:reg.alpha=0.01:train.bn=frozen") == (
        "l2-sp", {"reg.alpha": 0.01, "train.bn": "frozen"})
    assert bench.parse_run("l2") == ("l2", {})
    assert bench.run_name("l2-sp:reg.alpha=1") == "l2-sp_reg.alpha=1"
    with pytest.raises(l2sp.L2SPError, match="unknown run kind 'l3'"):
        bench.parse_run("l3:reg.alpha=1")
    with pytest.raises(l2sp.L2SPError, match="not key=value"):
        bench.parse_run("l2-sp:alpha")
    rows = [{"run": "l2-sp", "lr": lr, "overrides": {"data.val_per_class": v}}
            for lr, v in [(0.003, 5), (0.003, 5), (0.001, 5), (0.003, 0)]]
    rows.append({"run": "l2", "lr": 0.003, "overrides": {}})
    names = [r["run"] for r in bench.split_mixed(rows)]  # one spec, different settings: not pooled
    assert names == ["l2-sp (holdout 5) (lr 0.003)"] * 2 + ["l2-sp (holdout 5) (lr 0.001)",
                                                          "l2-sp (holdout 0) (lr 0.003)", "l2"]


def test_gpu_training_run_on_cpu(tmp_path, shared_dir, gpu):
    """The GPU script's run (l2sp.finetune on the decoded pack's on-device task, evaluation, source scores)
    with device=cpu: 3 classes, 36 px images, 32 px crops, 3 steps; the L2-SP-Fisher run reads a Fisher file."""
    import argparse

    pack = _tiny_pack(tmp_path, shared_dir, gpu)
    data = gpu.load_data(pack, "cpu", 36, 32)
    assert data["train"][0].shape == (12, 3, 36, 36) and data["train"][0].dtype == torch.uint8
    assert data["source"].images.shape == (4, 3, 32, 32) and data["source_indices"] == [1, 25]
    task = gpu.target_task(data, 32, 1)
    assert (len(task.train), len(task.val), len(task.test)) == (9, 3, 6) and task.train.on_device
    assert gpu.target_task(data, 32, 1) is task  # built once per setting
    source = gpu.source_network(pack / gpu.WEIGHTS_FILE, "cpu")
    fisher = {n: torch.rand_like(p) for n, p in source.named_parameters()}
    l2sp.fisher.save(tmp_path / "f.safetensors", fisher)
    args = argparse.Namespace(steps=3, val_per_class=1, device="cpu",
                              set=["data.image_size=32", "optim.batch_size=4"])
    cfg = gpu.resolve_run("l2-sp-fisher", 0, args, pack, tmp_path / "f.safetensors", {"optim.lr": 0.001})
    settings = (cfg.reg.kind, cfg.optim.lr, cfg.optim.milestones, cfg.train.amp, cfg.train.channels_last,
                cfg.data.on_device)
    assert settings == ("l2-sp-fisher", 0.001, [2], "bf16", True, True)
    cfg.train.amp = "none"
    r = gpu.train_run(cfg, data, tmp_path / "run")
    assert r["steps"] == 3 and 0 <= r["test_top1"] <= 100 and 0 <= r["val_top1"] <= 100
    assert r["src200"] >= r["src1000"] and np.isfinite(r["final_loss"])
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 3
    # the source scores are the library's: l2sp.analysis.accuracy of the source network on the same images
    from l2sp.analysis import accuracy

    src = gpu.source_scores(source, data["source"], [1, 25])
    assert src["src1000"] == accuracy(source, data["source"].batches(3))
    freeze = gpu.resolve_run("l2-freeze", 1, args, pack, None, {})
    assert (freeze.reg.kind, freeze.train.freeze, freeze.train.seed) == ("l2", 7, 1)
    assert gpu.resolve_run("l2-sp-bnfrozen", 0, args, pack, None).train.bn == "frozen"
    with pytest.raises(L2SPError, match="unknown run kind"):
        gpu.resolve_run("l3", 0, args, pack, None)
    table = gpu.summarize([{**r, "run": "l2-sp-fisher"}, {**r, "run": "l2-sp-fisher", "test_top1": 50.0}],
                          {"src1000": 10.0, "src200": 20.0})
    assert "| l2-sp-fisher | 2 |" in table


@pytest.mark.slow
def test_gpu_script_run_command_on_cpu(tmp_path, shared_dir, gpu, capsys):
    """The whole ``run`` command (Fisher, lr probe, worker processes, table), --device cpu, tiny pack."""
    pack = _tiny_pack(tmp_path, shared_dir, gpu)
    out = tmp_path / "out"
    gpu.main(["run", "--pack", str(pack), "--out", str(out), "--device", "cpu", "--kinds", "l2,l2-sp",
              "--seeds", "0", "--workers", "2", "--steps", "2", "--lr-grid", "0.01,0.001",
              "--probe-steps", "2", "--probe-val", "1", "--resize", "36", "--source-size", "32",
              "--fisher-classes", "2",
              "--set", "data.image_size=32", "--set", "optim.batch_size=4", "--set", "train.amp=none"])
    res = json.loads((out / "results.json").read_text())
    assert sorted(r["run"] for r in res["runs"]) == ["l2", "l2-sp"]
    assert all("test_top1" in r for r in res["runs"]), res["runs"]
    assert sorted(r["lr"] for r in res["lr_probe"]) == [0.001, 0.01]
    assert len(list((out / "runs").glob("*.json"))) == 4
    table = capsys.readouterr().out.split("| run |")[1]
    assert "| l2 | 1 |" in table and "| l2-sp | 1 |" in table
