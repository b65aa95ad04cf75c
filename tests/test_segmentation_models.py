"""Segmentation models: shapes, dilation (output stride 8/16), the S / S̄ partition seen by l2sp.regularizer,
loading ResNet and MobileNetV2 checkpoints, PPM, frozen BN."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.segmentation import deeplabv3_resnet50, fcn_resnet50

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
from l2sp.segmentation.models import BACKBONES, HEADS, OUTPUT_STRIDES, dilate_mobilenet_v2, reattach_classifier


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


# ---- MobileNetV2 backbone, output strides 8 and 16 -------------------------------------------------------------

def calibrated(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Random weights with BatchNorm statistics of ``x`` (activations of order 1, not ~1e-8), in eval mode."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the statistics to its own
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(3)
    return calibrated(torchvision.models.mobilenet_v2(), torch.randn(4, 3, 64, 64))


def test_registries():
    assert HEADS == ("fcn", "deeplabv3", "resnet", "pspnet")
    assert BACKBONES == ("resnet50", "resnet101", "mobilenet_v2")
    assert OUTPUT_STRIDES == (8, 16)


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("name", HEADS)
def test_mobilenet_shapes_at_both_output_strides(name, output_stride):
    model = build_segmentation_model(name, 11, backbone="mobilenet_v2", output_stride=output_stride,
                                     aux_loss=name == "fcn").eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out, feats = model(x), model.backbone(x)
    assert out["out"].shape == (2, 11, 64, 96) and torch.isfinite(out["out"]).all()
    assert feats["out"].shape == (2, 320, 64 // output_stride, 96 // output_stride)
    if name == "fcn":
        assert out["aux"].shape == (2, 11, 64, 96) and feats["aux"].shape[1] == 96


@pytest.mark.parametrize("output_stride", [8, 16])
def test_mobilenet_dilation_equals_strided_network_subsampled(mobilenet, output_stride):
    """Dilating instead of striding computes the strided network's features on a denser grid: the dilated
    features at every (32/OS)-th position equal torchvision's undilated features.0..17 (output stride 32)."""
    model = build_segmentation_model("deeplabv3", 5, backbone="mobilenet_v2", output_stride=output_stride,
                                     checkpoint=None)
    model.backbone.load_state_dict({k[len("backbone."):]: v for k, v in backbone_state_dict(mobilenet).items()})
    model.eval()
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    mob = mobilenet.double()
    model.double()
    with torch.no_grad():
        reference = mob.features[:18](x)
        dense = model.backbone(x)["out"]
    k = 32 // output_stride
    assert reference.shape[-2:] == (2, 3) and dense.shape[-2:] == (2 * k, 3 * k)
    assert reference.abs().mean() > 0.1  # order-1 activations: the comparison is not trivially 0 == 0
    torch.testing.assert_close(dense[..., ::k, ::k], reference, rtol=1e-9, atol=1e-9)
    # without the dilation (strides removed only), the same positions differ: the rate matters
    plain = copy_without_dilation(model.backbone)
    with torch.no_grad():
        assert (plain(x)["out"][..., ::k, ::k] - reference).abs().max() > 1e-3
    mobilenet.float()


def copy_without_dilation(body):
    import copy

    body = copy.deepcopy(body)
    for m in body.modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
            m.dilation, m.padding = (1, 1), (1, 1)
    return body


@pytest.mark.parametrize(("output_stride", "rates"), [
    (16, [1] * 15 + [2] * 3),                 # block 14 keeps rate 1 without its stride, 15..17 rate 2
    (8, [1] * 8 + [2] * 7 + [4] * 3),         # block 7 loses its stride (rate 1), 8..14 rate 2, 15..17 rate 4
])
def test_mobilenet_dilation_rates_and_strides(output_stride, rates):
    features = dilate_mobilenet_v2(torch.nn.Sequential(*torchvision.models.mobilenet_v2().features[:18]),
                                   output_stride)
    got_rates, strides = [], []
    for block in features:
        convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        assert len(convs) == 1 and convs[0].padding == convs[0].dilation
        got_rates.append(convs[0].dilation[0])
        strides.append(convs[0].stride[0])
    assert got_rates == rates
    total = 1
    for s in strides:
        total *= s
    assert total == output_stride
    # receptive field of the last feature: 1 + Σ (k−1)·dilation·(product of the earlier strides)
    rf, jump = 1, 1
    for r, s in zip(got_rates, strides):
        rf, jump = rf + 2 * r * jump, jump * s
    assert rf == 491  # the same as the undilated network's: dilation keeps the field, only densifies it


@pytest.mark.parametrize("output_stride", [8, 16])
def test_resnet_dilation_equals_strided_network_subsampled(output_stride):
    torch.manual_seed(0)
    resnet = calibrated(torchvision.models.resnet50(), torch.randn(2, 3, 64, 64)).double()
    model = build_segmentation_model("fcn", 3, backbone="resnet50", output_stride=output_stride).double()
    model.backbone.load_state_dict({k[len("backbone."):]: v for k, v in backbone_state_dict(resnet).items()})
    model.eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    body = torch.nn.Sequential(*list(resnet.children())[:-2])
    with torch.no_grad():
        reference, dense = body(x), model.backbone(x)["out"]
    k = 32 // output_stride
    assert dense.shape[-1] == 64 // output_stride and reference.abs().mean() > 0.1
    torch.testing.assert_close(dense[..., ::k, ::k], reference, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("ours", "torchvision_builder"), [("fcn", fcn_resnet50), ("deeplabv3", deeplabv3_resnet50)])
def test_resnet_output_stride_8_is_torchvisions_model(ours, torchvision_builder):
    mine = build_segmentation_model(ours, 4, backbone="resnet50", aux_loss=True)
    theirs = torchvision_builder(weights=None, weights_backbone=None, num_classes=4, aux_loss=True)
    assert type(mine) is type(theirs)
    assert {k: v.shape for k, v in mine.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert [(m.stride, m.dilation) for m in mine.modules() if isinstance(m, torch.nn.Conv2d)] == \
        [(m.stride, m.dilation) for m in theirs.modules() if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.parametrize(("output_stride", "rates"), [(8, [12, 24, 36]), (16, [6, 12, 18])])
def test_aspp_rates_follow_output_stride(output_stride, rates):
    model = build_segmentation_model("deeplabv3", 3, backbone="mobilenet_v2", output_stride=output_stride)
    aspp = model.classifier[0]
    assert [branch[0].dilation[0] for branch in aspp.convs[1:4]] == rates
    assert aspp.convs[0][0].in_channels == 320


def test_mobilenet_w0_from_classifier_file_equals_loaded_backbone(tmp_path, mobilenet):
    path = tmp_path / "mobilenet_v2.safetensors"
    save_tensors(path, {k: v.contiguous() for k, v in mobilenet.state_dict().items()})
    w0 = backbone_state_dict(path)
    assert "backbone.0.0.weight" in w0 and "backbone.17.conv.2.weight" in w0
    assert not any(k.startswith(("backbone.18.", "backbone.classifier", "backbone.features")) for k in w0)
    model = build_segmentation_model("deeplabv3", 11, backbone="mobilenet_v2", checkpoint=path)
    state = model.state_dict()
    body = {k for k in state if k.startswith("backbone.")}
    assert body == set(w0)
    for k, v in mobilenet.state_dict().items():
        block = int(k.split(".")[1]) if k.startswith("features.") else None
        if block is not None and block < 18:
            torch.testing.assert_close(state["backbone." + k[len("features."):]], v, rtol=0, atol=0)
            torch.testing.assert_close(w0["backbone." + k[len("features."):]], v, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["fcn", "deeplabv3"])
def test_mobilenet_backbone_is_S_heads_are_S_bar_and_penalty_exact(name, mobilenet):
    model = build_segmentation_model(name, 11, backbone="mobilenet_v2", aux_loss=True)
    w0 = backbone_state_dict(mobilenet)
    load = {k[len("backbone."):]: v for k, v in w0.items()}
    model.backbone.load_state_dict(load)
    alpha, beta = 0.2, 0.03
    reg = l2sp.regularizer("l2-sp", model, w0, alpha=alpha, beta=beta)
    params = dict(model.named_parameters())
    assert set(reg.shared) == {n for n in params if n.startswith("backbone.")} == backbone_names(model)
    assert set(reg.novel) == {n for n in params if n.startswith(("classifier.", "aux_classifier."))}
    assert len(reg.shared) == 51 * 3 and reg.novel  # 51 conv + BN (γ, β) of features.0..17
    with torch.no_grad():
        for p in params.values():
            p.add_(0.01 * torch.randn_like(p))
    expected = sum(alpha / 2 * (p.detach().double() - w0[n].double()).pow(2).sum().item() if n in w0 else
                   beta / 2 * p.detach().double().pow(2).sum().item() for n, p in params.items())
    assert float(reg().detach()) == pytest.approx(expected, rel=1e-5)


def test_mobilenet_training_step_moves_backbone_and_heads(mobilenet):
    torch.manual_seed(0)
    model = build_segmentation_model("deeplabv3", 4, backbone="mobilenet_v2", output_stride=16)
    model.backbone.load_state_dict({k[len("backbone."):]: v for k, v in backbone_state_dict(mobilenet).items()})
    freeze_bn_statistics(model)
    reg = l2sp.regularizer("l2-sp", model, backbone_state_dict(mobilenet), alpha=0.1, beta=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    handle = reg.attach(opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = model.backbone["5"].conv[0][1].running_mean.clone()
    x, y = torch.randn(2, 3, 48, 48), torch.randint(0, 4, (2, 48, 48))
    y[:, :4] = 255
    model.train()
    loss = F.cross_entropy(model(x)["out"], y, ignore_index=255)
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    handle.remove()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "backbone.0.0.weight" in moved and "classifier.4.weight" in moved
    assert torch.equal(model.backbone["5"].conv[0][1].running_mean, stats)


def test_reattach_classifier_carries_the_fine_tuned_backbone(mobilenet):
    model = build_segmentation_model("fcn", 3, backbone="mobilenet_v2", output_stride=8)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    back = reattach_classifier(model, mobilenet)
    seg, src, got = model.state_dict(), mobilenet.state_dict(), back.state_dict()
    for k, v in got.items():
        block = int(k.split(".")[1]) if k.startswith("features.") else 99
        expected = seg["backbone." + k[len("features."):]] if block < 18 else src[k]
        torch.testing.assert_close(v, expected, rtol=0, atol=0)
    # the source network's own strides: a 64² image still gives one 1000-way score
    assert back.features[14].conv[1][0].stride == (2, 2) and back.features[15].conv[1][0].dilation == (1, 1)
    assert back(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    with pytest.raises(L2SPError, match="no same-shaped counterpart"):
        reattach_classifier(model, torchvision.models.resnet18())


def test_bad_output_stride_and_wrong_backbone_file(tmp_path):
    with pytest.raises(L2SPError, match="output_stride must be one of 8, 16"):
        build_segmentation_model("fcn", 3, backbone="mobilenet_v2", output_stride=32)
    path = tmp_path / "r18.pt"
    atomic_torch_save(path, torchvision.models.resnet18().state_dict())
    with pytest.raises(L2SPError, match="does not fit"):
        build_segmentation_model("deeplabv3", 3, backbone="mobilenet_v2", checkpoint=path)
