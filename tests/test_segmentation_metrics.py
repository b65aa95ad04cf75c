"""Segmentation metrics against brute-force numpy and torchmetrics; multi-scale + flip test; poly lr."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l2sp.errors import L2SPError
from l2sp.segmentation import confusion_matrix, evaluate_segmentation, poly_lr, predict_probabilities, scores


def brute_force(pred: np.ndarray, target: np.ndarray, k: int, ignore: int):
    cm = np.zeros((k, k), dtype=np.int64)
    for p, t in zip(pred.ravel(), target.ravel()):
        if t != ignore:
            cm[t, p] += 1
    ious = []
    for c in range(k):
        tp = cm[c, c]
        union = cm[c, :].sum() + cm[:, c].sum() - tp
        ious.append(tp / union if union else float("nan"))
    present = [v for v in ious if not math.isnan(v)]
    return cm, ious, sum(present) / len(present), np.trace(cm) / cm.sum()


def test_confusion_and_scores_match_brute_force():
    g = torch.Generator().manual_seed(3)
    k = 5
    target = torch.randint(0, k - 1, (2, 9, 11), generator=g)  # class 4 never in the target
    target[torch.rand(target.shape, generator=g) < 0.2] = 255
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target.clamp_max(k - 1),
                       torch.randint(0, k - 1, target.shape, generator=g))  # class 4 never predicted either
    cm_ref, iou_ref, miou_ref, acc_ref = brute_force(pred.numpy(), target.numpy(), k, 255)
    cm = confusion_matrix(pred, target, k, 255)
    np.testing.assert_array_equal(cm.numpy(), cm_ref)
    s = scores(cm)
    np.testing.assert_allclose(s["per_class_iou"][:4], iou_ref[:4], rtol=1e-12)
    assert math.isnan(s["per_class_iou"][4]) and math.isnan(iou_ref[4])
    assert s["miou"] == pytest.approx(miou_ref, rel=1e-12)
    assert s["pixel_acc"] == pytest.approx(acc_ref, rel=1e-12)


def test_iou_agrees_with_torchmetrics():
    from torchmetrics.classification import MulticlassJaccardIndex

    g = torch.Generator().manual_seed(5)
    k = 6
    target = torch.randint(0, k, (3, 20, 20), generator=g)
    target[:, :2] = 255
    pred = torch.randint(0, k, (3, 20, 20), generator=g)
    ref = MulticlassJaccardIndex(num_classes=k, average="none", ignore_index=255)(pred, target)
    ours = scores(confusion_matrix(pred, target, k))["per_class_iou"]
    np.testing.assert_allclose(ours, ref.double().numpy(), rtol=1e-6)


def test_bad_labels_are_rejected():
    with pytest.raises(L2SPError, match="labels outside"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 7, 255]), 3)
    with pytest.raises(L2SPError, match="shape"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long), 3)


class Tiny(nn.Module):
    """Not flip- or scale-equivariant (3×3 conv + position-dependent bias), dict output like torchvision."""

    def __init__(self, k: int):
        super().__init__()
        self.conv = nn.Conv2d(3, k, 3, padding=1)

    def forward(self, x):
        ramp = torch.linspace(0, 2, x.shape[-1])
        return {"out": self.conv(x) + ramp * torch.arange(self.conv.out_channels)[:, None, None]}


def test_multiscale_flip_averages_softmax():
    model = Tiny(4).eval()
    x = torch.randn(2, 3, 16, 20)
    scales = (0.5, 1.0, 1.5)
    probs = []
    with torch.no_grad():
        for s in scales:
            xs = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False) if s != 1 else x
            for flip in (False, True):
                out = model(torch.flip(xs, [3]) if flip else xs)["out"]
                out = torch.flip(out, [3]) if flip else out
                out = F.interpolate(out, size=(16, 20), mode="bilinear", align_corners=False)
                probs.append(F.softmax(out, 1))
    expected = torch.stack(probs).mean(0)
    torch.testing.assert_close(predict_probabilities(model, x, scales, flip=True), expected)
    single = predict_probabilities(model, x)
    torch.testing.assert_close(single, F.softmax(model(x)["out"], 1).detach())
    assert not torch.allclose(single, expected, atol=1e-3)  # the averaging changes the answer


def test_evaluate_segmentation_over_a_loader():
    model = Tiny(3)
    model.train()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 3, 8, 10, generator=g), torch.randint(0, 3, (2, 8, 10), generator=g))
               for _ in range(3)]
    batches[1][1][:, :, :3] = 255
    res = evaluate_segmentation(model, batches, 3, scales=(1.0, 0.75), flip=True)
    assert model.training  # restored
    pred = torch.cat([predict_probabilities(model, x, (1.0, 0.75), True).argmax(1) for x, _ in batches])
    target = torch.cat([y for _, y in batches])
    cm_ref, iou_ref, miou_ref, acc_ref = brute_force(pred.numpy(), target.numpy(), 3, 255)
    np.testing.assert_array_equal(res["confusion"].numpy(), cm_ref)
    assert res["miou"] == pytest.approx(miou_ref) and res["pixel_acc"] == pytest.approx(acc_ref)
    np.testing.assert_allclose(res["per_class_iou"], iou_ref)


def test_poly_lr():
    for step, total, power in [(0, 100, 0.9), (37, 100, 0.9), (99, 100, 0.9), (5, 10, 1.0), (120, 100, 0.9)]:
        expected = 0.01 * max(0.0, 1 - step / total) ** power
        assert poly_lr(0.01, step, total, power) == pytest.approx(expected, rel=1e-15, abs=0)
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5 ** 0.9)
    with pytest.raises(L2SPError):
        poly_lr(0.01, 0, 0)
