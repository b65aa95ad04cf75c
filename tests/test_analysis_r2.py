"""Layer-wise R²: streaming statistics against numpy/scipy regressions; default layers; bad input."""

import copy

import numpy as np
import pytest
import torch
import torchvision
from scipy import stats
from torch import nn

from l2sp.analysis import StreamingR2, default_layers, layerwise_r2, r2_summary
from l2sp.errors import L2SPError


def _r2_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """R² = 1 − SS_res/SS_tot of the least-squares fit y ≈ a·x + b (numpy lstsq)."""
    A = np.stack([x, np.ones_like(x)], 1)
    coef = np.linalg.lstsq(A, y, rcond=None)[0]
    res = y - A @ coef
    return 1 - (res @ res) / ((y - y.mean()) @ (y - y.mean()))


def test_streaming_r2_equals_batch_and_scipy():
    g = torch.Generator().manual_seed(0)
    units, n = 5, 900
    x = torch.randn(units, n, generator=g, dtype=torch.float64) * 3 + 10  # offset: tests the merging
    y = x * torch.tensor([[0.5], [-2.0], [0.0], [1.0], [3.0]], dtype=torch.float64)
    y = y + torch.randn(units, n, generator=g, dtype=torch.float64) * torch.tensor(
        [[1.0], [4.0], [1.0], [0.1], [20.0]], dtype=torch.float64
    )
    batch = StreamingR2()
    batch.update(x, y)
    stream = StreamingR2()
    cuts = [0, 1, 7, 100, 101, 450, 899, 900]
    for a, b in zip(cuts[:-1], cuts[1:]):
        stream.update(x[:, a:b].float() if a == 1 else x[:, a:b], y[:, a:b])  # any dtype in, float64 inside
    r_batch, r_stream = batch.compute(), stream.compute()
    ref = np.array([stats.linregress(x[u].numpy(), y[u].numpy()).rvalue ** 2 for u in range(units)])
    ref2 = np.array([_r2_numpy(x[u].numpy(), y[u].numpy()) for u in range(units)])
    np.testing.assert_allclose(r_batch.numpy(), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ref2, ref, rtol=1e-9, atol=1e-12)
    # the float32 chunk loses a little precision on 6 samples; everything else is float64
    np.testing.assert_allclose(r_stream.numpy(), r_batch.numpy(), rtol=1e-6, atol=1e-9)
    assert r_batch[2] < 0.01 and r_batch[3] > 0.99  # independent vs nearly exact linear relation


def test_streaming_r2_constant_unit_is_nan():
    s = StreamingR2()
    x = torch.randn(2, 50, dtype=torch.float64)
    y = x.clone()
    y[1] = 0.0  # a dead unit
    s.update(x, y)
    r = s.compute()
    assert r[0].item() == pytest.approx(1.0) and torch.isnan(r[1])
    with pytest.raises(L2SPError, match="shape"):
        s.update(x, y[:, :10])
    with pytest.raises(L2SPError, match="two samples"):
        StreamingR2().compute()


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.pool(self.block(self.conv1(x))).flatten(1))


def _pair():
    pre = TinyNet()
    with torch.no_grad():
        pre.block[2].running_mean.uniform_(-0.5, 0.5)
        pre.block[2].running_var.uniform_(0.5, 2.0)
    ft = copy.deepcopy(pre)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return ft.double(), pre.double()  # float64 models: the comparisons below are exact to rounding


def _activations(model, x, name):
    out = {}
    h = dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: out.setdefault("a", o))
    with torch.no_grad():
        model.eval()(x)
    h.remove()
    a = out["a"]
    return a.movedim(1, 0).reshape(a.shape[1], -1).double().numpy()


def test_layerwise_r2_matches_numpy_regression_and_streams():
    ft, pre = _pair()
    data = torch.randn(10, 3, 8, 8, dtype=torch.float64)
    loader = [(data[i : i + 3], torch.zeros(len(data[i : i + 3]))) for i in range(0, 10, 3)]  # uneven batches
    layers = ["conv1", "block.2", "fc"]
    r2 = layerwise_r2(ft, pre, loader, layers)
    assert ft.training and pre.training  # modes restored
    r2_one_batch = layerwise_r2(ft, pre, [data], layers)
    assert list(r2) == layers and r2["conv1"].shape == (4,) and r2["block.2"].shape == (6,)
    for name in layers:
        xa, ya = _activations(pre, data, name), _activations(ft, data, name)
        ref = np.array([_r2_numpy(xa[u], ya[u]) for u in range(xa.shape[0])])
        np.testing.assert_allclose(r2[name].numpy(), ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(r2[name].numpy(), r2_one_batch[name].numpy(), rtol=1e-10, atol=1e-12)
    # comparing a model with itself gives R² = 1; max_images limits the data
    same = layerwise_r2(pre, pre, loader, ["conv1"])
    torch.testing.assert_close(same["conv1"], torch.ones(4, dtype=torch.float64))
    first4 = layerwise_r2(ft, pre, loader, ["conv1"], max_images=4)
    xa, ya = _activations(pre, data[:4], "conv1"), _activations(ft, data[:4], "conv1")
    np.testing.assert_allclose(
        first4["conv1"].numpy(), [_r2_numpy(xa[u], ya[u]) for u in range(4)], rtol=1e-9
    )
    # 10-crop inputs (B, crops, C, H, W): every crop is an image
    crops = layerwise_r2(ft, pre, [data[:6].view(2, 3, 3, 8, 8)], ["conv1"])
    six = layerwise_r2(ft, pre, [data[:6]], ["conv1"])
    torch.testing.assert_close(crops["conv1"], six["conv1"])
    # default layers leave out the head replaced for the target task
    new_head = copy.deepcopy(ft)
    new_head.fc = nn.Linear(6, 5).double()
    assert list(layerwise_r2(new_head, pre, loader)) == ["conv1", "block", "pool"]
    rows = r2_summary(r2)
    assert [r["layer"] for r in rows] == layers
    assert rows[0]["median"] == pytest.approx(float(np.median(r2["conv1"].numpy())))


def test_layerwise_r2_resnet18_default_layers():
    pre = torchvision.models.resnet18(num_classes=10)
    ft = copy.deepcopy(pre)
    with torch.no_grad():
        ft.layer4[1].conv2.weight.normal_(0, 0.1)
    r2 = layerwise_r2(ft, pre, [torch.randn(4, 3, 64, 64)])  # 16 samples per unit of layer4
    assert list(r2) == [
        "conv1",
        "layer1.0",
        "layer1.1",
        "layer2.0",
        "layer2.1",
        "layer3.0",
        "layer3.1",
        "layer4.0",
        "layer4.1",
    ]
    assert r2["layer4.1"].shape == (512,)
    for name in list(r2)[:-1]:  # untouched up to the changed conv
        v = r2[name][~torch.isnan(r2[name])]
        torch.testing.assert_close(v, torch.ones_like(v))
    assert torch.nanmedian(r2["layer4.1"]) < 0.99


def test_default_layers_by_architecture():
    assert default_layers(torchvision.models.resnet18()) == ["conv1"] + [
        f"layer{i}.{j}" for i in range(1, 5) for j in range(2)
    ]
    mb = torchvision.models.mobilenet_v2()
    assert default_layers(mb) == [f"features.{i}" for i in range(19)]
    assert default_layers(TinyNet()) == ["conv1", "block", "pool", "fc"]
    assert default_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) == ["0", "1"]
    with pytest.raises(L2SPError, match="no submodules"):
        default_layers(nn.Linear(2, 2))


def test_layerwise_r2_bad_input():
    ft, pre = _pair()
    with pytest.raises(L2SPError, match=r"no layer named 'layer9'.*valid names: conv1, block, block\.0"):
        layerwise_r2(ft, pre, [torch.randn(2, 3, 8, 8, dtype=torch.float64)], ["conv1", "layer9"])
    other = TinyNet().double()
    other.block[1] = nn.Conv2d(4, 5, 3).double()
    with pytest.raises(L2SPError, match="share the analysed layers"):
        layerwise_r2(ft, other, [torch.randn(2, 3, 8, 8, dtype=torch.float64)], ["block.1"])
    with pytest.raises(L2SPError, match="no images"):
        layerwise_r2(ft, pre, [], ["conv1"])


def test_streaming_r2_unit_dim_and_channel_last_layers():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 4, 4, generator=g, dtype=torch.float64)
    y = 0.5 * x + torch.randn(3, 5, 4, 4, generator=g, dtype=torch.float64)
    nd, flat = StreamingR2(), StreamingR2()
    nd.update(x, y, unit_dim=1)
    flat.update(x.movedim(1, 0).reshape(5, -1), y.movedim(1, 0).reshape(5, -1))
    torch.testing.assert_close(nd.compute(), flat.compute(), rtol=1e-12, atol=1e-14)
    # a channel-last layer (batch, tokens, features): channel_dim=-1
    pre = nn.Sequential(nn.Linear(6, 4), nn.Tanh()).double()
    ft = copy.deepcopy(pre)
    with torch.no_grad():
        ft[0].weight.add_(0.5 * torch.randn(4, 6, generator=g, dtype=torch.float64))
    tokens = torch.randn(5, 7, 6, generator=g, dtype=torch.float64)
    r2 = layerwise_r2(ft, pre, [tokens], ["1"], channel_dim=-1)["1"]
    with torch.no_grad():
        a, b = pre(tokens).reshape(-1, 4).numpy(), ft(tokens).reshape(-1, 4).numpy()
    np.testing.assert_allclose(r2.numpy(), [_r2_numpy(a[:, u], b[:, u]) for u in range(4)], rtol=1e-9)
