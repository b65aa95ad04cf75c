"""Top-1, per-class and 10-crop accuracy against a brute-force computation."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from l2sp.engine.evaluate import evaluate
from l2sp.engine.synthetic import TensorImages


class Fixed(nn.Module):
    """Logits = x·W (x flattened), with a BatchNorm that must be in eval mode during evaluation."""

    def __init__(self, d, k):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, k))
        self.bn = nn.BatchNorm1d(k)

    def forward(self, x):
        return self.bn(x.flatten(1) @ self.w)


def brute(model, x, y, k):
    model.eval()
    with torch.no_grad():
        p = np.stack([model(xi[None]).softmax(-1)[0].numpy() for xi in x])
    pred = p.argmax(1)
    yn = y.numpy()
    per = [float((pred[yn == c] == c).mean()) if (yn == c).any() else float("nan") for c in range(k)]
    nll = float(-np.log(p[np.arange(len(yn)), yn]).mean())
    return float((pred == yn).mean()), per, nll


def test_centre_crop_accuracy_matches_brute_force():
    torch.manual_seed(0)
    k, n = 4, 103
    model = Fixed(12, k)
    model.bn.running_mean.uniform_(-1, 1)
    x, y = torch.randn(n, 3, 2, 2), torch.randint(0, k - 1, (n,))  # class 3 absent from the split
    r = evaluate(model.train(), DataLoader(TensorImages(x, y), batch_size=10), "cpu", k)
    assert model.training  # mode restored
    top1, per, nll = brute(model, x, y, k)
    assert r["top1"] == pytest.approx(top1) and r["n"] == n
    assert r["per_class"][:3] == pytest.approx(per[:3]) and np.isnan(r["per_class"][3])
    assert r["mean_per_class"] == pytest.approx(np.mean(per[:3]))
    assert r["nll"] == pytest.approx(nll, rel=1e-5)


def test_ten_crop_averages_softmax_over_crops():
    torch.manual_seed(1)
    k, n = 3, 17
    model = Fixed(8, k).eval()
    crops, y = torch.randn(n, 10, 2, 2, 2), torch.randint(0, k, (n,))
    r = evaluate(model, DataLoader(TensorImages(crops, y), batch_size=4), "cpu", k)
    with torch.no_grad():
        p = torch.stack([model(c).softmax(-1).mean(0) for c in crops])  # average of probabilities
    pred = p.argmax(1)
    assert r["top1"] == pytest.approx(float((pred == y).float().mean()))
    assert r["n"] == n
    assert r["nll"] == pytest.approx(float(-p[torch.arange(n), y].log().mean()), rel=1e-5)
