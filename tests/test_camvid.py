"""CamVid and the ImageNet MobileNetV2 on a handful of the shared files (../shared/data/camvid,
../shared/weights, ../shared/data/tiny-imagenet): the official split, the masks' class counts against the
dataset's own statistics, a few L2-SP steps of DeepLabV3-MobileNetV2 on real crops, and the source-task drop of
the segmentation backbone on Tiny ImageNet validation images."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Subset

import l2sp
from l2sp.analysis.source_drop import segmentation_source_drop
from l2sp.io import load_state_dict
from l2sp.segmentation import evaluate_segmentation, freeze_bn_statistics
from l2sp.segmentation.data import CAMVID_NAMES, CAMVID_SPLIT_SIZES, DATASETS, CamVidSegmentation
from l2sp.segmentation.models import backbone_state_dict, build_segmentation_model
from l2sp.segmentation.transforms import eval_transform, train_transform


def _shared(shared_dir: Path, relative: str) -> Path:
    path = shared_dir / relative
    if not path.exists():
        pytest.skip(f"../shared/{relative} is absent")
    return path


@pytest.fixture
def camvid(shared_dir) -> Path:
    return _shared(shared_dir, "data/camvid")


@pytest.fixture
def weights(shared_dir) -> Path:
    return _shared(shared_dir, "weights/mobilenet_v2_imagenet.safetensors")


def test_official_split_and_items(camvid):
    sizes = {split: len(CamVidSegmentation(camvid, split)) for split in CAMVID_SPLIT_SIZES}
    assert sizes == {"train": 367, "val": 101, "test": 233}
    image, mask = CamVidSegmentation(camvid, "test")[0]
    assert image.shape == (3, 360, 480) and image.dtype == torch.uint8
    assert mask.shape == (360, 480) and set(mask.unique().tolist()) <= set(range(11)) | {255}


def test_val_masks_match_the_datasets_class_counts(camvid):
    """Per-class pixel counts of all 101 val masks read through the dataset = the counts in class_stats.json."""
    stats = json.loads((camvid / "class_stats.json").read_text())["val"]
    ds = DATASETS["camvid"].build(camvid, "val", transforms=None)
    counts = torch.zeros(256, dtype=torch.long)
    for i in range(len(ds)):
        counts += torch.bincount(ds[i][1].reshape(-1), minlength=256)
    assert int(counts.sum()) == stats["total_px"] == 101 * 360 * 480
    assert [int(counts[k]) for k in range(11)] == [stats["per_class"][name]["px"] for name in CAMVID_NAMES]
    assert int(counts[255]) / stats["total_px"] == pytest.approx(stats["void_share"], abs=1e-12)


def test_l2sp_steps_on_camvid_crops_and_evaluation(camvid, weights):
    torch.manual_seed(0)
    train = DATASETS["camvid"].build(camvid, "train",
                                     transforms=train_transform(96, scale_range=(0.5, 1.0), normalization="half"))
    x, y = next(iter(DataLoader(Subset(train, [0, 50]), batch_size=2)))
    model = build_segmentation_model("deeplabv3", 11, backbone="mobilenet_v2", output_stride=16, checkpoint=weights)
    freeze_bn_statistics(model)
    w0 = backbone_state_dict(weights)
    source = load_state_dict(weights)
    for k, v in w0.items():  # w0 from the classifier file = the loaded backbone = the file's features.*
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
        torch.testing.assert_close(v, source["features." + k[len("backbone."):]], rtol=0, atol=0)
    alpha, beta = 0.1, 0.01
    reg = l2sp.regularizer("l2-sp", model, w0, alpha=alpha, beta=beta)
    heads = sum(p.detach().double().pow(2).sum().item() for n, p in model.named_parameters() if n not in w0)
    assert float(reg().detach()) == pytest.approx(beta / 2 * heads, rel=1e-5)  # the backbone sits at w0
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    handle = reg.attach(opt)
    model.train()
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(model(x)["out"], y, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    handle.remove()
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    params = dict(model.named_parameters())
    expected = sum(alpha / 2 * (p.detach().double() - w0[n].double()).pow(2).sum().item() if n in w0 else
                   beta / 2 * p.detach().double().pow(2).sum().item() for n, p in params.items())
    shared = sum(1 for n in params if n in w0)
    assert shared == 153 and float(reg().detach()) == pytest.approx(expected, rel=1e-5)
    assert expected > beta / 2 * sum(p.detach().double().pow(2).sum().item() for n, p in params.items()
                                     if n not in w0)  # the backbone left w0
    val = DATASETS["camvid"].build(camvid, "val", transforms=eval_transform(normalization="half"))
    two = Subset(val, [0, 1])
    result = evaluate_segmentation(model, DataLoader(two, batch_size=1), 11)
    labelled = sum(int((val[i][1] != 255).sum()) for i in (0, 1))
    assert int(result["confusion"].sum()) == labelled and 0 <= result["miou"] <= 1


def tiny_imagenet_batch(shared_dir: Path, classes: int = 6, per_class: int = 2):
    """A few Tiny ImageNet val images at 224² (bilinear), inputs in [-1, 1], ImageNet-1k labels."""
    root = _shared(shared_dir, "data/tiny-imagenet")
    index = json.loads((root / "imagenet_index.json").read_text())
    xs, ys = [], []
    for wnid in sorted(index)[:classes]:
        for path in sorted((root / "val" / wnid).iterdir())[:per_class]:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB").resize((224, 224), Image.BILINEAR), dtype=np.float32)
            xs.append(torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1)
            ys.append(index[wnid])
    return torch.stack(xs), torch.tensor(ys), sorted(index.values())


def _by_hand(features: dict, classifier: torch.nn.Module, x, y, indices):
    net = torchvision.models.mobilenet_v2().eval()
    net.load_state_dict({**classifier.state_dict(), **features})
    with torch.no_grad():
        z = net(x)
    idx = torch.tensor(indices)
    full = 100 * int((z.argmax(1) == y).sum()) / len(y)
    return full, 100 * int((idx[z[:, idx].argmax(1)] == y).sum()) / len(y)


def test_segmentation_source_drop_on_tiny_imagenet(shared_dir, weights):
    x, y, indices = tiny_imagenet_batch(shared_dir)
    source = torchvision.models.mobilenet_v2().eval()
    source.load_state_dict(load_state_dict(weights))
    model = build_segmentation_model("fcn", 11, backbone="mobilenet_v2", output_stride=8, checkpoint=weights)
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]
    same = segmentation_source_drop(model, source, loader, indices=indices)
    src_full, src_200 = _by_hand({}, source, x, y, indices)
    assert same == {"source_acc": src_full, "reattached_acc": src_full, "drop": 0.0,
                    "source_acc_restricted": src_200, "reattached_acc_restricted": src_200, "drop_restricted": 0.0}
    assert src_200 >= 100 / 12  # at least one of the 12 images recognised 200-way (chance: 0.5 %)

    torch.manual_seed(0)
    with torch.no_grad():  # a "fine-tuned" backbone: weights and BN statistics moved
        for p in model.backbone.parameters():
            p.add_(0.3 * p.std().nan_to_num() * torch.randn_like(p))
        model.backbone["3"].conv[0][1].running_mean.add_(1.0)
    moved = segmentation_source_drop(model, source, loader, indices=indices)
    feats = {"features." + k[len("backbone."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    new_full, new_200 = _by_hand(feats, source, x, y, indices)
    assert moved["reattached_acc"] == new_full and moved["reattached_acc_restricted"] == new_200
    assert moved["drop"] == pytest.approx(src_full - new_full) and moved["source_acc"] == src_full
    kept = segmentation_source_drop(model, source, loader, source_bn_statistics=True)
    stats = {k: v for k, v in source.state_dict().items() if "running_" in k}
    assert kept["reattached_acc"] == _by_hand({**feats, **stats}, source, x, y, indices)[0]
    assert set(kept) == {"source_acc", "reattached_acc", "drop"}


@pytest.mark.parametrize("head", ["deeplab", "fcn"])
def test_camvid_presets_resolve(head):
    from l2sp.segmentation.config import resolve_segmentation, segmentation_presets

    names = [f"camvid-{head}-mobilenetv2-{kind}" for kind in ("l2", "l2-sp")]
    assert set(names) <= set(segmentation_presets())
    l2, sp = (resolve_segmentation(n, ["data.root=/data/camvid"]) for n in names)
    for cfg in (l2, sp):
        assert (cfg.task, cfg.model.backbone, cfg.model.output_stride) == ("segmentation", "mobilenet_v2", 16)
        assert cfg.model.name == {"deeplab": "deeplabv3", "fcn": "fcn"}[head]
        assert cfg.model.checkpoint.endswith("mobilenet_v2_imagenet.safetensors") and not cfg.model.backbone_weights
        assert (cfg.data.dataset, cfg.data.root, cfg.data.crop, cfg.data.normalization) == (
            "camvid", "/data/camvid", [360, 480], "half")
        assert (cfg.data.train_split, cfg.data.val_split, cfg.data.scale_range, cfg.data.flip) == (
            "train", "test", None, True)
        assert (cfg.reg.alpha, cfg.reg.beta, cfg.optim.batch_size, cfg.optim.steps) == (1e-4, 1e-3, 8, 6000)
        assert cfg.train.freeze_bn_statistics and cfg.optim.momentum == 0.9
    assert (l2.reg.kind, sp.reg.kind) == ("l2", "l2-sp")
    assert l2.to_dict() | {"reg": None, "name": None} == sp.to_dict() | {"reg": None, "name": None}
    if head == "deeplab":
        assert (l2.optim.schedule, l2.optim.lr, l2.eval.flip) == ("poly", 0.01, True)
        assert l2.eval.scales == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    else:
        assert (l2.optim.schedule, l2.optim.lr, l2.eval.scales, l2.eval.flip) == ("constant", 0.005, [1.0], False)
    assert len(DATASETS[l2.data.dataset].classes) == 11


def test_the_documented_command_runs_resumes_after_a_kill_and_writes_miou(camvid, weights, tmp_path, capsys):
    """``l2sp segment camvid-deeplab-mobilenetv2-l2-sp data.root=... model.checkpoint=...`` on 2 training frames
    and 1 test frame at a quarter of the resolution, 3 steps: killed after 1 step (its checkpoint), resumed with
    --resume, it ends with the weights of the uninterrupted run; results.json holds mIoU in [0, 1]."""
    from l2sp.cli import main
    from l2sp.io import load_tensors
    from l2sp.segmentation import finetune_segmentation

    root = tmp_path / "camvid"
    for split, n in (("train", 2), ("test", 1)):
        for image in sorted((camvid / split / "images").glob("*.jpg"))[:n]:
            for sub, name in (("images", image.name), ("masks", f"{image.stem}.png")):
                (root / split / sub).mkdir(parents=True, exist_ok=True)
                (root / split / sub / name).symlink_to(camvid / split / sub / name)
    preset = "camvid-deeplab-mobilenetv2-l2-sp"
    ov = [f"data.root={root}", f"model.checkpoint={weights}", "data.crop=[48,64]", "data.scale_range=[0.25,0.25]",
          "eval.scales=[0.25]", "eval.flip=false", "optim.batch_size=2", "optim.steps=3", "data.num_workers=0",
          "train.log_every=1", "train.tensorboard=false"]
    finetune_segmentation(preset, ov, out=tmp_path / "whole", quiet=True)
    killed = finetune_segmentation(preset, [*ov, "train.ckpt_every=1"], out=tmp_path / "run", quiet=True,
                                   stop_after=1)
    assert killed["interrupted"] and not (tmp_path / "run" / "results.json").exists()
    assert main(["segment", preset, *ov, "train.ckpt_every=1", "--out", str(tmp_path / "run"), "--resume", "-q"]) == 0
    assert capsys.readouterr().out.startswith("val mIoU ")
    a, b = (load_tensors(tmp_path / d / "model.safetensors")[0] for d in ("whole", "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert res["miou"] == whole["miou"] == res["val"]["miou"] and 0 <= res["miou"] <= 1
    assert res["val"]["split"] == "test" and res["val"]["images"] == 1 and len(res["val"]["per_class_iou"]) == 11
    assert res["model"] == "deeplabv3" and res["backbone"] == "mobilenet_v2"
