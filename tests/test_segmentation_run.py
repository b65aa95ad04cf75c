"""Segmentation runs from presets (`l2sp segment`): run files, S/S̄, resume, schedules, BatchNorm, errors.

Tiny synthetic Cityscapes and SBD trees (32×64 images), a random ResNet-50 saved as the local source
checkpoint (BatchNorm statistics calibrated so that frozen statistics keep the activations tame), 32-pixel
crops, batch 2, 2-3 steps.
"""

import json
from pathlib import Path

import pytest
import torch
import torchvision

from l2sp.cli import main
from l2sp.errors import L2SPError
from l2sp.io import atomic_torch_save, load_tensors, save_tensors
from l2sp.segmentation import (
    evaluate_segmentation,
    finetune_segmentation,
    load_segmentation_run,
    resolve_segmentation,
    score_segmentation_run,
    segmentation_presets,
)
from l2sp.segmentation.data import build_dataset
from l2sp.segmentation.run import setup_segmentation
from l2sp.segmentation.transforms import eval_transform
from test_segmentation_data import fake_cityscapes, fake_sbd  # the data tests' tiny dataset trees

PRESETS = [f"cityscapes-{n}-{k}" for n in ("fcn", "resnet", "deeplab", "pspnet") for k in ("l2", "l2-sp")] + [
    "sbd-pspnet-l2", "sbd-pspnet-l2-sp"]


def paper_presets(names: list[str]) -> list[str]:
    """The presets of the paper's Table 3 (other datasets, e.g. CamVid, have their own tests)."""
    return [n for n in names if n.startswith(("cityscapes-", "sbd-"))]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    """Datasets and the source checkpoint, shared by the module's tests."""
    root = tmp_path_factory.mktemp("seg")
    fake_cityscapes(root / "cityscapes", "train", n=4)
    fake_cityscapes(root / "cityscapes", "val", n=1, seed=1)
    fake_sbd(root / "sbd", ids=("2008_000002", "2008_000003", "2008_000004"))
    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: the statistics of one batch
    with torch.no_grad():
        net.train()(torch.randn(4, 3, 64, 64))
    state = net.state_dict()
    save_tensors(root / "resnet50.safetensors", state)
    return {"root": root, "ckpt": root / "resnet50.safetensors", "state": state}


def small(tree: dict, dataset: str = "cityscapes", **extra) -> list[str]:
    """Overrides shrinking a preset to the tiny tree: local ResNet-50 checkpoint, 32-px crops, 2 steps."""
    base = {"data.root": tree["root"] / dataset, "model.backbone": "resnet50", "model.backbone_weights": "null",
            "model.checkpoint": tree["ckpt"], "data.crop": 32, "data.num_workers": 0, "optim.batch_size": 2,
            "optim.steps": 2, "train.log_every": 1, "train.tensorboard": "false", "train.device": "cpu",
            "train.save_checkpoint": "false"}
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def bn_buffers(state: dict, prefix: str = "") -> dict:
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and k.endswith(("running_mean", "running_var"))}


def test_presets_follow_table3():
    assert paper_presets(segmentation_presets()) == sorted(PRESETS)
    for name in PRESETS:
        c = resolve_segmentation(name)
        net = name.split("-")[1]
        assert c.task == "segmentation" and c.name == name
        assert c.model.name == {"deeplab": "deeplabv3"}.get(net, net) and c.model.backbone == "resnet101"
        assert c.model.backbone_weights == "IMAGENET1K_V1" and c.model.checkpoint is None
        assert c.reg.kind == name.split(f"{net}-")[1] and (c.reg.alpha, c.reg.beta) == (1e-4, 1e-3)
        assert c.optim.momentum == 0.9 and c.optim.weight_decay == 0.0
        assert c.optim.schedule == ("poly" if net in ("deeplab", "pspnet") else "constant")
        assert c.train.freeze_bn_statistics is (net != "pspnet")
        assert (c.data.scale_range == [0.5, 2.0]) is (net == "pspnet")
        multi = net in ("deeplab", "pspnet")
        assert (len(c.eval.scales) > 1, c.eval.flip) == (multi, multi)
        want = (16, 480) if name.startswith("sbd") else (8, 836) if net == "pspnet" else (2, 800)
        assert (c.optim.batch_size, c.data.crop) == want


def test_fcn_run_writes_its_files_partition_constant_lr_frozen_bn(tree, tmp_path, capsys):
    out = tmp_path / "fcn"
    args = ["segment", "cityscapes-fcn-l2-sp", *small(tree), "--out", str(out), "-q"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("val mIoU ") and printed.rstrip().endswith(f"-> {out}")
    res = json.loads((out / "results.json").read_text())
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "metrics.jsonl", "results.json", "model.safetensors"}
    assert resolve_segmentation(str(out / "config.yaml")).model.name == "fcn"
    assert 0 <= res["val_miou"] <= 1 and 0 <= res["val_pixel_acc"] <= 1 and res["val"]["images"] == 1
    ious = [v for v in res["val"]["per_class_iou"] if v is not None]
    assert len(res["val"]["per_class_iou"]) == 19 and res["val"]["classes"][:2] == ["road", "sidewalk"]
    assert res["val_miou"] == pytest.approx(sum(ious) / len(ious))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 2] and "val_miou" in rows[-1]
    assert [r["lr"] for r in rows[:2]] == [0.001, 0.001]  # constant: lr_t = lr

    # S = every backbone parameter (matched in w0), S̄ = the FCN head, in the run and in the optimizer
    s = setup_segmentation(resolve_segmentation(str(out / "config.yaml")))
    names = [n for n, p in s.model.named_parameters() if p.requires_grad]
    assert s.regularizer.shared == [n for n in names if n.startswith("backbone.")]
    assert s.regularizer.novel == [n for n in names if n.startswith("classifier.")]
    assert res["penalized"] == {"S": len(s.regularizer.shared), "S_bar": len(s.regularizer.novel)}
    assert res["bn_statistics"] == "frozen"

    final = load_tensors(out / "model.safetensors")[0]
    assert not torch.equal(final["backbone.layer4.0.conv2.weight"], tree["state"]["layer4.0.conv2.weight"])
    source_bn = bn_buffers(tree["state"])
    trained_bn = bn_buffers(final, "backbone.")
    assert trained_bn.keys() == source_bn.keys()
    assert all(torch.equal(trained_bn[k], source_bn[k]) for k in source_bn)  # statistics frozen
    head_bn = bn_buffers(final, "classifier.")
    assert head_bn and all(torch.equal(v, torch.zeros_like(v) if k.endswith("mean") else torch.ones_like(v))
                           for k, v in head_bn.items())


def test_killed_and_resumed_run_equals_the_uninterrupted_one(tree, tmp_path):
    # poly schedule, random scale + flip, and the ResNet head's dropout: the RNG states must be restored
    ov = small(tree, **{"optim.steps": 3, "optim.schedule": "poly", "data.scale_range": "[0.5, 2.0]",
                        "data.flip": "true"})
    finetune_segmentation("cityscapes-resnet-l2-sp", ov, out=tmp_path / "whole", quiet=True)
    part = tmp_path / "part"
    with_ckpt = [*ov, "train.save_checkpoint=true", "train.save_model=false"]
    r = finetune_segmentation("cityscapes-resnet-l2-sp", with_ckpt, out=part, quiet=True, stop_after=1)
    assert r == {"interrupted": True, "step": 1, "run_dir": str(part)}
    assert (part / "checkpoints" / "last.pt").is_file() and not (part / "results.json").exists()
    with pytest.raises(L2SPError, match="already holds this run; pass --resume"):
        finetune_segmentation("cityscapes-resnet-l2-sp", with_ckpt, out=part, quiet=True)
    finetune_segmentation("cityscapes-resnet-l2-sp", ov, out=part, quiet=True, resume=True)

    a = load_tensors(tmp_path / "whole" / "model.safetensors")[0]
    b = load_tensors(part / "model.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    whole, resumed = metrics(tmp_path / "whole"), metrics(part)
    assert [m["step"] for m in resumed] == [1, 2, 3, 3]
    assert [m["loss"] for m in resumed[:3]] == [m["loss"] for m in whole[:3]]
    base = 0.001
    for m in whole[:3]:  # poly: the step t (0-based) uses lr·(1 − t/T)^0.9
        assert m["lr"] == pytest.approx(base * (1 - (m["step"] - 1) / 3) ** 0.9, rel=1e-12)


def test_a_finished_run_is_read_back_and_scored_on_another_split(tree, tmp_path):
    out = tmp_path / "run"
    res = finetune_segmentation("cityscapes-fcn-l2-sp", small(tree, **{"train.save_checkpoint": "true"}), out=out,
                                quiet=True)
    assert res["miou"] == res["val_miou"] == res["val"]["miou"] and 0 <= res["miou"] <= 1
    model, cfg = load_segmentation_run(out)
    assert not model.training and cfg.model.name == "fcn" and cfg.data.val_split == "val"
    saved = load_tensors(out / "model.safetensors")[0]
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert score_segmentation_run(out, "val") == res["val"]  # the same network and images: the same scores

    train = score_segmentation_run(out, "train")  # another split, checked against the metric by hand
    images = build_dataset("cityscapes", tree["root"] / "cityscapes", "train", transforms=eval_transform())
    by_hand = evaluate_segmentation(model, torch.utils.data.DataLoader(images, batch_size=1), 19)
    assert train["split"] == "train" and train["images"] == 4 and train["miou"] == pytest.approx(by_hand["miou"])
    assert train["per_class_iou"] == [None if v != v else pytest.approx(v) for v in by_hand["per_class_iou"]]
    assert train["miou"] != res["miou"]

    (out / "model.safetensors").unlink()  # the last checkpoint holds the same weights
    assert score_segmentation_run(out, "val") == res["val"]
    for bad, match in ((tmp_path, "no config.yaml"), (out, "holds no weights")):
        if bad == out:
            (out / "checkpoints" / "last.pt").unlink()
        with pytest.raises(L2SPError, match=match) as err:
            load_segmentation_run(bad)
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_pspnet_on_sbd_trains_bn_statistics(tree, tmp_path):
    out = tmp_path / "psp"
    ov = small(tree, "sbd", **{"eval.scales": "[0.75, 1.0]"})
    res = finetune_segmentation("sbd-pspnet-l2", ov, out=out, quiet=True)
    assert res["bn_statistics"] == "trained" and res["regularizer"] == "l2"
    assert len(res["val"]["per_class_iou"]) == 21 and res["val"]["classes"][0] == "background"
    assert res["val"]["scales"] == [0.75, 1.0] and res["val"]["flip"] is True
    assert 0 <= res["val_miou"] <= 1
    final = bn_buffers(load_tensors(out / "model.safetensors")[0], "backbone.")
    source = bn_buffers(tree["state"])
    assert not torch.equal(final["bn1.running_mean"], source["bn1.running_mean"])
    assert not torch.equal(final["layer4.2.bn3.running_var"], source["layer4.2.bn3.running_var"])
    lrs = [m["lr"] for m in metrics(out)[:2]]
    assert lrs == pytest.approx([0.01, 0.01 * 0.5**0.9], rel=1e-12)


@pytest.mark.parametrize("args, words", [
    (["segment", "fashion-mnist"], ["fashion-mnist is a classification preset", "l2sp finetune"]),
    (["finetune", "cityscapes-fcn-l2-sp"], ["segmentation config", "l2sp segment cityscapes-fcn-l2-sp"]),
    (["segment", "cityscapes-fcn"], ["unknown segmentation preset", "cityscapes-fcn-l2-sp"]),
    (["segment", "cityscapes-fcn-l2", "model.name=unet"], ["model.name='unet'", "fcn, deeplabv3, resnet, pspnet"]),
    (["segment", "cityscapes-fcn-l2", "model.nme=fcn"], ["unknown key model.nme", "name, backbone"]),
    (["segment", "cityscapes-fcn-l2"], ["data.root is not set"]),
    (["segment", "cityscapes-fcn-l2-sp", "model.backbone_weights=null"], ["neither", "model.checkpoint"]),
    (["segment", "cityscapes-fcn-l2-sp", "reg.kind=l2-sp-fisher"], ["reg.fisher=FILE"]),
    (["segment"], ["give a segmentation preset", "--list"]),
])
def test_bad_input_is_one_line(args, words, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("l2sp: error: ") and err.count("\n") == 1
    for w in words:
        assert w in err


def test_bad_files_are_one_line(tree, tmp_path, capsys):
    missing = ["segment", "cityscapes-fcn-l2", *small(tree), f"data.root={tmp_path / 'nowhere'}"]
    assert main(missing) == 2
    assert "missing folder" in capsys.readouterr().err
    r18 = tmp_path / "resnet18.pth"
    atomic_torch_save(r18, torchvision.models.resnet18().state_dict())
    assert main(["segment", "cityscapes-fcn-l2", *small(tree), f"model.checkpoint={r18}"]) == 2
    err = capsys.readouterr().err
    assert f"model.checkpoint={r18}" in err and "does not fit" in err and err.count("\n") == 1
    assert main(["segment", "cityscapes-fcn-l2-sp", *small(tree), "reg.kind=gl-sp-fisher",
                 f"reg.fisher={tmp_path / 'F.safetensors'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["segment", "--list"]) == 0
    assert paper_presets(capsys.readouterr().out.split()) == sorted(PRESETS)


def test_nan_loss_stops_naming_the_step(tree, tmp_path):
    with pytest.raises(L2SPError) as exc:
        finetune_segmentation("cityscapes-resnet-l2", small(tree, **{"optim.lr": 1e30}), out=tmp_path / "nan",
                              quiet=True)
    msg = str(exc.value)
    assert "\n" not in msg and "at step 2" in msg and "lower optim.lr" in msg


def test_fisher_kind_weights_the_backbone_with_the_source_fisher(tree, tmp_path):
    from l2sp import fisher

    path = tmp_path / "fisher.safetensors"  # estimated on the ImageNet classifier: its names, fc.* included
    fisher.save(path, {k: torch.full_like(v, 2.0) for k, v in tree["state"].items()
                       if v.is_floating_point() and "running" not in k})
    ov = small(tree, **{"reg.kind": "l2-sp-fisher", "reg.fisher": path})
    s = setup_segmentation(resolve_segmentation("cityscapes-resnet-l2-sp", ov))
    conv = s.model.backbone.conv1.weight
    with torch.no_grad():
        conv.add_(0.5)
    head = sum(float(p.detach().double().pow(2).sum()) for n, p in s.model.named_parameters()
               if n.startswith("classifier."))
    # Ω = α/2 Σ F (w − w0)² + β/2 ‖w_S̄‖² with F = 2 and w − w0 = 0.5 on conv1 only
    expected = 1e-4 / 2 * 2.0 * 0.25 * conv.numel() + 1e-3 / 2 * head
    assert float(s.regularizer().detach()) == pytest.approx(expected, rel=1e-5)
