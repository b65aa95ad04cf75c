"""Segmentation models: shapes, the S / S̄ partition seen by l2sp.regularizer, loading, PPM, frozen BN."""

import pytest
import torch
import torch.nn.functional as F
import torchvision

import l2sp
from l2sp.errors import L2SPError
from l2sp.io import atomic_torch_save, save_tensors
from l2sp.segmentation import (
    PyramidPooling,
    backbone_names,
    backbone_state_dict,
    build_segmentation_model,
    freeze_bn_statistics,
)


@pytest.fixture(scope="module")
def resnet50_state():
    torch.manual_seed(1)
    return torchvision.models.resnet50().state_dict()


@pytest.mark.parametrize("name", ["fcn", "deeplabv3", "resnet", "pspnet"])
def test_output_is_dict_of_logits_at_input_size(name):
    model = build_segmentation_model(name, 5, backbone="resnet50", aux_loss=name == "pspnet").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 48, 64))
    assert out["out"].shape == (2, 5, 48, 64)
    assert torch.isfinite(out["out"]).all()
    if name == "pspnet":
        assert out["aux"].shape == (2, 5, 48, 64)
    # dilated backbone: layer4 keeps output stride 8
    feats = model.backbone(torch.randn(1, 3, 64, 64))
    assert feats["out"].shape[-2:] == (8, 8)


@pytest.mark.parametrize("name", ["fcn", "deeplabv3", "pspnet"])
def test_backbone_is_S_and_heads_are_S_bar(name, resnet50_state):
    model = build_segmentation_model(name, 7, backbone="resnet50")
    source = backbone_state_dict(resnet50_state)
    assert "backbone.conv1.weight" in source and "backbone.layer4.2.bn3.running_var" in source
    assert not any(k.startswith("backbone.fc.") for k in source)
    reg = l2sp.regularizer("l2-sp", model, source, alpha=0.1, beta=0.01)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    backbone = {n for n in trainable if n.startswith("backbone.")}
    heads = {n for n in trainable if n.startswith("classifier.")}
    assert backbone and heads and backbone | heads == trainable
    assert set(reg.shared) == backbone == backbone_names(model)
    assert set(reg.novel) == heads


def test_checkpoint_loads_backbone_and_penalty_is_exact(tmp_path, resnet50_state):
    path = tmp_path / "resnet50.pt"
    atomic_torch_save(path, {"state_dict": {"module." + k: v for k, v in resnet50_state.items()}})
    model = build_segmentation_model("fcn", 3, backbone="resnet50", checkpoint=path)
    for k, v in resnet50_state.items():
        if not k.startswith("fc."):
            torch.testing.assert_close(model.state_dict()["backbone." + k], v, rtol=0, atol=0)
    alpha, beta = 0.3, 0.02
    reg = l2sp.regularizer("l2-sp", model, backbone_state_dict(path), alpha=alpha, beta=beta)
    params = dict(model.named_parameters())
    with torch.no_grad():
        w = params["backbone.layer2.0.conv1.weight"]
        w.add_(0.01 * torch.randn_like(w))
        params["backbone.bn1.bias"].add_(0.5)
    expected = 0.0
    for n, p in params.items():
        p64 = p.detach().double()
        if n.startswith("backbone."):
            expected += alpha / 2 * (p64 - resnet50_state[n[len("backbone."):]].double()).pow(2).sum().item()
        else:
            expected += beta / 2 * p64.pow(2).sum().item()
    # rel 1e-3: float32 norms of the 9.4M-entry head kernel on CPU are only accurate to ~1e-4
    value = float(reg().detach())
    assert value == pytest.approx(expected, rel=1e-3)
    assert value > beta / 2 * sum(p.detach().double().pow(2).sum().item()
                                         for n, p in params.items() if n.startswith("classifier."))


def test_safetensors_backbone_checkpoint(tmp_path, resnet50_state):
    path = tmp_path / "w.safetensors"
    # backbone names, and no BN step counters (older checkpoints lack them)
    save_tensors(path, {"backbone." + k: v for k, v in resnet50_state.items()
                        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")})
    model = build_segmentation_model("pspnet", 4, backbone="resnet50", checkpoint=path)
    got = model.backbone.layer3[5].conv2.weight.detach()
    torch.testing.assert_close(got, resnet50_state["layer3.5.conv2.weight"], rtol=0, atol=0)


def test_wrong_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "r18.pt"
    atomic_torch_save(path, torchvision.models.resnet18().state_dict())
    with pytest.raises(L2SPError, match="does not fit"):
        build_segmentation_model("fcn", 3, backbone="resnet50", checkpoint=path)


def test_bad_arguments():
    with pytest.raises(L2SPError, match="unknown segmentation model"):
        build_segmentation_model("unet", 3)
    with pytest.raises(L2SPError, match="unknown backbone"):
        build_segmentation_model("fcn", 3, backbone="resnet18")
    with pytest.raises(L2SPError, match="not both"):
        build_segmentation_model("fcn", 3, backbone="resnet50", backbone_weights="DEFAULT", checkpoint="x.pt")
    with pytest.raises(L2SPError, match="only fc"):
        backbone_state_dict({"fc.weight": torch.zeros(2, 2)})


def test_pyramid_pooling_matches_direct_computation():
    ppm = PyramidPooling(8, bins=(1, 2, 3, 6)).eval()
    for m in ppm.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 8, 13, 17, dtype=torch.float64)
    ppm = ppm.double()
    out = ppm(x)
    assert out.shape == (2, 8 + 4 * 2, 13, 17) and ppm.out_channels == 16
    pieces = [x]
    for b, stage in zip((1, 2, 3, 6), ppm.stages):
        conv, bn = stage[1], stage[2]
        pooled = torch.empty(2, 8, b, b, dtype=torch.float64)
        for i in range(b):  # adaptive average pooling bins: [floor(i·H/b), ceil((i+1)·H/b))
            h0, h1 = (i * 13) // b, -((-(i + 1) * 13) // b)
            for j in range(b):
                w0, w1 = (j * 17) // b, -((-(j + 1) * 17) // b)
                pooled[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean((-2, -1))
        y = torch.einsum("oc,ncij->noij", conv.weight[:, :, 0, 0], pooled)
        y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        y = (y * bn.weight[:, None, None] + bn.bias[:, None, None]).clamp_min(0)
        pieces.append(F.interpolate(y, size=(13, 17), mode="bilinear", align_corners=False))
    torch.testing.assert_close(out, torch.cat(pieces, 1))
    assert torch.equal(out[:, 8:10], out[:, 8:10, :1, :1].expand(-1, -1, 13, 17))  # bin 1: constant map


def test_pspnet_head_widths():
    model = build_segmentation_model("pspnet", 19, backbone="resnet50")
    ppm = model.classifier[0]
    assert ppm.bins == (1, 2, 3, 6)
    assert [s[1].out_channels for s in ppm.stages] == [512] * 4
    assert model.classifier[1].in_channels == 4096 and model.classifier[-1].out_channels == 19


def test_freeze_bn_statistics_keeps_running_stats_and_trains_affine():
    model = build_segmentation_model("fcn", 3, backbone="resnet50")
    n = freeze_bn_statistics(model)
    assert n == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    model.train()
    bn = model.backbone.bn1
    before = bn.running_mean.clone()
    out = model(torch.randn(2, 3, 32, 32) * 3 + 1)["out"]
    out.sum().backward()
    assert not bn.training and torch.equal(bn.running_mean, before)
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
