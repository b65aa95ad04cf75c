"""Source-task drop, parameter distances and the per-layer Fisher against independent computations."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy

from l2sp.analysis import (
    fisher_by_layer,
    fisher_summary,
    layer_distance,
    parameter_distance,
    reattach_head,
    source_task_drop,
)
from l2sp.analysis.layers import get_module, set_module
from l2sp.errors import L2SPError


def _net(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Sequential(nn.Dropout(0.0), nn.Linear(4, classes)),
    )


def _source_and_finetuned():
    source = _net(5)
    ft = copy.deepcopy(source)
    ft[4][1] = nn.Linear(4, 2)  # the target head
    with torch.no_grad():
        ft[0].weight.add_(0.5 * torch.randn_like(ft[0].weight))
    return source, ft


def test_source_task_drop_matches_manual_evaluation():
    source, ft = _source_and_finetuned()
    x, y = torch.randn(40, 3, 6, 6), torch.randint(0, 5, (40,))
    loader = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 40, 16)]
    out = source_task_drop(ft, source, "4.1", loader)
    manual = copy.deepcopy(ft)
    manual[4][1] = nn.Linear(4, 5)
    manual[4][1].load_state_dict(source[4][1].state_dict())
    with torch.no_grad():
        src_acc = 100 * float(multiclass_accuracy(source(x), y, num_classes=5, average="micro"))
        re_acc = 100 * float(multiclass_accuracy(manual(x), y, num_classes=5, average="micro"))
    assert out["source_acc"] == pytest.approx(src_acc)
    assert out["reattached_acc"] == pytest.approx(re_acc)
    assert out["drop"] == pytest.approx(src_acc - re_acc)
    assert ft[4][1].out_features == 2  # the caller's model is left untouched
    # no fine-tuning at all: no drop
    same = source_task_drop(copy.deepcopy(source), source, "4.1", loader)
    assert same["drop"] == 0 and same["source_acc"] == pytest.approx(src_acc)


def test_source_task_drop_ten_crop_averages_softmax():
    source, ft = _source_and_finetuned()
    x, y = torch.randn(6, 10, 3, 6, 6), torch.randint(0, 5, (6,))
    model = reattach_head(ft, source, "4.1")
    with torch.no_grad():
        prob = model(x.flatten(0, 1)).softmax(-1).view(6, 10, 5).mean(1)
    expected = 100 * float((prob.argmax(1) == y).float().mean())
    assert source_task_drop(ft, source, "4.1", [(x, y)])["reattached_acc"] == pytest.approx(expected)


def test_source_task_drop_bad_input():
    source, ft = _source_and_finetuned()
    loader = [(torch.randn(2, 3, 6, 6), torch.tensor([0, 1]))]
    with pytest.raises(L2SPError, match=r"no layer named 'fc'.*valid names: 0, 1, 2, 3, 4, 4\.0, 4\.1"):
        source_task_drop(ft, source, "fc", loader)
    with pytest.raises(L2SPError, match="shares no parameter"):
        source_task_drop(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), source, "1", loader)
    with pytest.raises(L2SPError, match="no examples"):
        source_task_drop(ft, source, "4.1", [])
    with pytest.raises(L2SPError, match="labelled"):
        source_task_drop(ft, source, "4.1", [torch.randn(2, 3, 6, 6)])


def test_get_and_set_module():
    net = _net(3)
    new = nn.Linear(4, 7)
    set_module(net, "4.1", new)
    assert get_module(net, "4.1") is new and net[4][1] is new
    with pytest.raises(L2SPError, match="no layer named ''"):
        get_module(net, "")


def test_parameter_and_layer_distance_against_brute_force():
    source, ft = _source_and_finetuned()
    w0 = {k: v.clone() for k, v in source.state_dict().items()}
    d = parameter_distance(ft, w0)
    assert set(d) == {"0.weight", "0.bias"}  # the new head does not match w0's shapes
    for name in d:
        w, r = dict(ft.named_parameters())[name].detach().double(), w0[name].double()
        assert d[name] == pytest.approx(float(np.linalg.norm((w - r).numpy()) / np.linalg.norm(r.numpy())))
    assert d["0.bias"] == 0.0
    per_module = layer_distance(ft, w0)
    w = ft[0].weight.detach().double()
    num = (w - w0["0.weight"].double()).square().sum()
    den = w0["0.weight"].double().square().sum() + w0["0.bias"].double().square().sum()
    assert per_module == {"0": pytest.approx(float((num / den).sqrt()))}
    assert layer_distance(ft, w0, ["0"]) == per_module
    # wrapper prefixes (DataParallel / torch.compile) are stripped on both sides
    wrapped = {f"module.{k}": v for k, v in w0.items()}
    assert parameter_distance(ft, wrapped) == pytest.approx(d)
    # a zero reference: 0 when unchanged, inf otherwise
    zero = {k: torch.zeros_like(v) for k, v in w0.items()}
    assert parameter_distance(ft, zero)["0.weight"] == float("inf")
    with pytest.raises(L2SPError, match="no parameter of the model matches w0"):
        parameter_distance(ft, {"x.weight": torch.zeros(1)})
    with pytest.raises(L2SPError, match="layer '4' holds no parameter shared"):
        layer_distance(ft, w0, ["4"])


def test_fisher_by_layer_groups_and_summarizes():
    g = torch.Generator().manual_seed(0)
    fisher = {
        "conv1.weight": torch.rand(4, 3, 3, 3, generator=g),
        "conv1.bias": torch.rand(4, generator=g),
        "layer1.0.conv1.weight": torch.rand(4, 4, 3, 3, generator=g),
        "layer1.0.bn1.weight": torch.rand(4, generator=g),
        "layer1.1.conv1.weight": torch.rand(4, 4, 3, 3, generator=g),
        "fc.weight": torch.rand(2, 4, generator=g),
    }
    by_module = fisher_by_layer(fisher)
    assert list(by_module) == ["conv1", "layer1.0.conv1", "layer1.1.conv1", "fc"]
    torch.testing.assert_close(by_module["conv1"], fisher["conv1.weight"].flatten())
    by_block = fisher_by_layer(fisher, layers=["conv1", "layer1.0", "layer1.1"], weights_only=False)
    torch.testing.assert_close(
        by_block["layer1.0"],
        torch.cat([fisher["layer1.0.conv1.weight"].flatten(), fisher["layer1.0.bn1.weight"]]),
    )
    assert by_block["conv1"].numel() == 4 * 27 + 4
    rows = fisher_summary(by_module)
    v = fisher["layer1.0.conv1.weight"].double().numpy().ravel()
    assert rows[1]["median"] == pytest.approx(float(np.median(v)))
    assert rows[1]["q1"] == pytest.approx(float(np.percentile(v, 25)))
    assert rows[1]["n"] == v.size and rows[1]["max"] == pytest.approx(float(v.max()))
    with pytest.raises(L2SPError, match="no entry under layer 'layer9'"):
        fisher_by_layer(fisher, layers=["layer9"])
    with pytest.raises(L2SPError, match="negative"):
        fisher_by_layer({"a.weight": -torch.ones(2, 2)})
    with pytest.raises(L2SPError, match=">= 2 dims"):
        fisher_by_layer({"a.bias": torch.ones(2)})
