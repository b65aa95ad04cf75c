"""End to end: a segmentation model fine-tuned for a few SGD steps with L2-SP attached, then evaluated."""

import copy

import pytest
import torch
import torch.nn.functional as F

import l2sp
from l2sp.segmentation import (
    backbone_state_dict,
    build_segmentation_model,
    evaluate_segmentation,
    freeze_bn_statistics,
    poly_lr,
)


def _batch(k: int):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 64, 64, generator=g)
    y = torch.randint(0, k, (2, 64, 64), generator=g)
    y[:, :8] = 255  # ignored rows
    return x, y


@torch.no_grad()
def _calibrate_bn(model, x):
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: the statistics of this batch
    model.train()
    model(x)
    for m in bns:
        m.momentum = 0.1


@pytest.mark.parametrize("name", ["fcn", pytest.param("pspnet", marks=pytest.mark.slow)])
def test_finetune_with_attached_l2sp(name):
    k, steps, base_lr, alpha, beta = 4, 3, 1e-3, 0.5, 0.01
    x, y = _batch(k)
    model = build_segmentation_model(name, k, backbone="resnet50")
    _calibrate_bn(model, x)  # random weights with BN statistics that fit them: a tame stand-in for ImageNet
    source = {n: v.clone() for n, v in model.backbone.state_dict().items()}  # classifier-style names
    if name != "pspnet":  # the paper: BN statistics frozen except for PSPNet
        freeze_bn_statistics(model)
    w0 = backbone_state_dict(source)
    with torch.no_grad():  # mid-training: the backbone away from w0, so that α(w − w0) ≠ 0
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=0.9)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=base_lr, momentum=0.9)
    reg = l2sp.regularizer("l2-sp", model, w0, alpha=alpha, beta=beta)
    reg.attach(opt)
    reg_twin = l2sp.regularizer("l2-sp", twin, w0, alpha=alpha, beta=beta)
    running = model.backbone.layer1[0].bn1.running_mean.clone()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    twin.train()

    # one step with the attached penalty = one step on loss + reg() through autograd
    # (a single step only: ReLU/max-pool switching makes a ResNet's gradient jump under 1e-9 weight changes)
    torch.manual_seed(0)  # the same dropout masks in both models
    F.cross_entropy(model(x)["out"], y, ignore_index=255).backward()
    opt.step()
    torch.manual_seed(0)
    (F.cross_entropy(twin(x)["out"], y, ignore_index=255) + reg_twin()).backward()
    opt_twin.step()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
        assert not torch.equal(p, start[n])

    for t in range(1, steps):  # poly learning rate, as DeepLab/PSPNet
        for group in opt.param_groups:
            group["lr"] = poly_lr(base_lr, t, steps)
        loss = F.cross_entropy(model(x)["out"], y, ignore_index=255)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    conv = "backbone.layer4.0.conv2.weight"
    moved = dict(model.named_parameters())[conv].detach() - start[conv]
    assert moved.abs().max() > 0 and torch.isfinite(moved).all()
    assert torch.equal(model.backbone.layer1[0].bn1.running_mean, running) == (name != "pspnet")
    assert float(reg().detach()) > 0

    res = evaluate_segmentation(model, [(x, y)], k, scales=(0.75, 1.0), flip=True)
    assert 0 <= res["miou"] <= 1 and 0 <= res["pixel_acc"] <= 1
    assert int(res["confusion"].sum()) == int((y != 255).sum())
