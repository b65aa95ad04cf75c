"""The paper's transforms: geometry of crops and 10-crop, blur, normalization; the batched fast path
checked image by image against torchvision's functional ops."""

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from l2sp.data import transforms as T
from l2sp.errors import L2SPError


def _image(c=3, h=12, w=16):
    return torch.arange(c * h * w, dtype=torch.int64).reshape(c, h, w).remainder(251).to(torch.uint8)


def test_ten_crop_geometry_matches_manual_slices():
    x = _image(3, 12, 16)
    out = T.paper_transform(False, crop=8, resize=None, ten_crop=True)(x)
    assert out.shape == (10, 3, 8, 8)
    f = x.float() / 255
    c = 8
    expected = [f[:, :c, :c], f[:, :c, -c:], f[:, -c:, :c], f[:, -c:, -c:], f[:, 2:10, 4:12]]
    mirrored = f.flip(-1)
    expected += [mirrored[:, :c, :c], mirrored[:, :c, -c:], mirrored[:, -c:, :c], mirrored[:, -c:, -c:],
                 mirrored[:, 2:10, 4:12]]
    for k in range(10):
        torch.testing.assert_close(out[k], expected[k], rtol=0, atol=1e-6)
    # the batched version gives the same stack
    torch.testing.assert_close(T.ten_crops(x[None], 8)[0].float() / 255, out, rtol=0, atol=1e-6)


def test_centre_crop_and_train_mean_subtraction():
    x = _image(3, 10, 10)
    mean = [0.1, 0.2, 0.3]
    out = T.paper_transform(False, crop=6, resize=None, mean=mean)(x)
    ref = x[:, 2:8, 2:8].double() / 255 - torch.tensor(mean, dtype=torch.float64)[:, None, None]
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-6)


def test_resize_square_and_keep_aspect():
    x = _image(3, 40, 80)
    sq = T.paper_transform(False, crop=24, resize=32, ten_crop=False)
    assert T.deterministic_transform(32)(x).shape == (3, 32, 32)
    assert T.deterministic_transform(32, keep_aspect=True)(x).shape == (3, 32, 64)
    assert sq(x).shape == (3, 24, 24)
    tr = T.paper_transform(True, crop=24, resize=32, keep_aspect=True)
    assert tr(x).shape == (3, 24, 24)
    with pytest.raises(L2SPError, match="smaller than the crop"):
        T.paper_transform(True, crop=24, resize=20)


def test_train_transform_is_crop_of_resized_image_up_to_flip():
    torch.manual_seed(3)
    x = _image(3, 20, 20)
    tf = T.paper_transform(True, crop=16, resize=None, blur=False)
    f = x.float() / 255
    for _ in range(20):
        out = tf(x)
        crops = [f[:, t:t + 16, l:l + 16] for t in range(5) for l in range(5)]
        hits = [c for c in crops
                if torch.allclose(out, c, atol=1e-6) or torch.allclose(out, c.flip(-1), atol=1e-6)]
        assert hits


def test_batch_gaussian_blur_matches_torchvision():
    torch.manual_seed(0)
    x = torch.rand(4, 2, 9, 11)
    sigma = torch.tensor([0.1, 0.5, 0.8, 1.0])
    out = T.batch_gaussian_blur(x, sigma, 5)
    for b in range(4):
        ref = TF.gaussian_blur(x[b], kernel_size=[5, 5], sigma=[float(sigma[b])] * 2)
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-6)


def test_batch_augment_equals_per_image_functional_ops():
    torch.manual_seed(1)
    x = torch.randint(0, 256, (16, 1, 12, 12), dtype=torch.uint8)
    aug = T.BatchAugment(True, 9, blur=True, mean=[0.3], std=[0.5])
    p = aug.sample(16, 12, 12, torch.Generator().manual_seed(0))
    assert p["blur"].any() and (~p["blur"]).any() and p["flip"].any() and (~p["flip"]).any()
    out = aug.apply(x, p)
    k = T.blur_kernel_size(T.BLUR_SIGMA[1])
    for b in range(16):
        ref = TF.crop(x[b], int(p["top"][b]), int(p["left"][b]), 9, 9)
        if p["flip"][b]:
            ref = TF.horizontal_flip(ref)
        ref = ref.float() / 255
        if p["blur"][b]:
            ref = TF.gaussian_blur(ref, [k, k], [float(p["sigma"][b])] * 2)
        ref = TF.normalize(ref, [0.3], [0.5])
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5)


def test_batch_augment_parameter_ranges_cover_all_positions():
    aug = T.BatchAugment(True, 28)
    p = aug.sample(20000, 32, 32, torch.Generator().manual_seed(0))
    assert set(p["top"].tolist()) == set(range(5)) and set(p["left"].tolist()) == set(range(5))
    assert abs(p["flip"].float().mean() - 0.5) < 0.02 and abs(p["blur"].float().mean() - T.BLUR_P) < 0.02
    lo, hi = T.BLUR_SIGMA
    assert p["sigma"].min() >= lo and p["sigma"].max() <= hi
    assert not T.BatchAugment(True, 28, blur=False).sample(100, 32, 32)["blur"].any()


def test_batch_eval_centre_and_ten_crop():
    x = torch.randint(0, 256, (3, 1, 10, 10), dtype=torch.uint8)
    centre = T.BatchAugment(False, 8)(x)
    torch.testing.assert_close(centre, x[:, :, 1:9, 1:9].float() / 255)
    ten = T.BatchAugment(False, 8, ten_crop=True)(x)
    assert ten.shape == (3, 10, 1, 8, 8)
    ref = torch.stack([torch.stack(v2.TenCrop(8)(x[b])) for b in range(3)]).float() / 255
    torch.testing.assert_close(ten, ref, rtol=0, atol=1e-6)


def test_normalization_stats():
    assert T.normalization_stats("none", 3) is None
    assert T.normalization_stats("half", 1) == ([0.5], [0.5])
    assert T.normalization_stats("imagenet", 3) == (list(T.IMAGENET_MEAN), list(T.IMAGENET_STD))
    assert T.normalization_stats("train-mean", 2, [0.1, 0.2]) == ([0.1, 0.2], [1.0, 1.0])
    with pytest.raises(L2SPError, match="3-channel"):
        T.normalization_stats("imagenet", 1)
    with pytest.raises(L2SPError, match="unknown normalization"):
        T.normalization_stats("zscore", 3)
    with pytest.raises(L2SPError, match="channel means"):
        T.normalization_stats("train-mean", 3, None)


def test_imagenet_normalization_in_pipeline():
    x = _image(3, 8, 8)
    m, s = T.normalization_stats("imagenet", 3)
    out = T.paper_transform(False, crop=8, resize=None, mean=m, std=s)(x)
    ref = (x.double() / 255 - torch.tensor(m, dtype=torch.float64)[:, None, None]) / torch.tensor(
        s, dtype=torch.float64)[:, None, None]
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


def test_random_blur_matches_torchvision_gaussian_blur():
    x = torch.rand(3, 11, 13)
    blur = T.RandomBlur()
    blurred = 0
    for seed in range(12):
        torch.manual_seed(seed)
        out = blur(x)
        torch.manual_seed(seed)
        if torch.rand(()) >= T.BLUR_P:
            torch.testing.assert_close(out, x, rtol=0, atol=0)
            continue
        blurred += 1
        lo, hi = T.BLUR_SIGMA
        sigma = float(lo + (hi - lo) * torch.rand(1))
        ref = TF.gaussian_blur(x, [blur.size, blur.size], [sigma, sigma])
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert 0 < blurred < 12


def test_to_float_normalized_equals_v2_todtype_normalize():
    x = torch.randint(0, 256, (3, 7, 9), dtype=torch.uint8)
    m, s = [0.4, 0.5, 0.6], [0.2, 0.3, 0.4]
    ref = v2.Normalize(m, s)(v2.ToDtype(torch.float32, scale=True)(x))
    torch.testing.assert_close(T.ToFloatNormalized(m, s)(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(T.ToFloatNormalized()(x), x.float() / 255, rtol=1e-6, atol=1e-7)
    with pytest.raises(L2SPError, match="uint8"):
        T.ToFloatNormalized()(x.float())


def test_batch_crops_brute_force():
    x = torch.randint(0, 256, (6, 2, 9, 7), dtype=torch.uint8)
    top, left = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([0, 2, 1, 2, 0, 2])
    out = T.batch_crops(x, top, left, 5)
    for b in range(6):
        t, l = int(top[b]), int(left[b])
        assert torch.equal(out[b], x[b, :, t:t + 5, l:l + 5])
