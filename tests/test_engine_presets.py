"""Every shipped preset resolves to the config it resolved to before the presets became a dataset × penalty
matrix (and before the keys added since: optim.name/betas/eps, data.on_device, model.output_stride,
segmentation data.normalization); the matrix composes base + penalty + variant."""

import hashlib
import json

import pytest

from l2sp.engine.config import flatten, preset_matrix, preset_names, resolve
from l2sp.segmentation.config import resolve_segmentation

#: keys added after the fingerprints were taken (their defaults change no number)
ADDED = {"optim.name", "optim.betas", "optim.eps", "data.on_device", "model.output_stride"}
SEG_ADDED = {"data.normalization"}  # a classification key of long standing, new in segmentation configs
#: sha256 (first 16 hex digits) of each preset's flattened resolved config, taken before the change
BEFORE = {
    "caltech101": "fc3100294980db0e",
    "caltech101-mobilenetv2-cpu": "069d7a999de98388",  # since: lr 0.001, frozen BN statistics (measured best)
    "caltech101-mobilenetv2-l2": "7d2599af495db68d",
    "caltech101-mobilenetv2-l2-freeze": "acf993d271211227",
    "caltech101-mobilenetv2-l2-sp": "705bcae37cd9bb7c",
    "caltech101-mobilenetv2-l2-sp-fisher": "85ebe18989077f99",
    "caltech256-30-l2": "9b033ef683cb49fe",
    "caltech256-30-l2-sp": "90692db9d7ad1012",
    "caltech256-30-l2-sp-fisher": "32f1f73e7533c921",
    "caltech256-30-l2-sp-fisher-star": "c9771e5b7d3ee19a",
    "caltech256-30-l2-sp-star": "8eb67afd3cdaee3c",
    "caltech256-30-l2-star": "36fcb24ccebed11d",
    "caltech256-60-l2": "c6033305b5d81a25",
    "caltech256-60-l2-sp": "2df3b18bb2762a2e",
    "caltech256-60-l2-sp-fisher": "4aefcd3b9c718614",
    "caltech256-60-l2-sp-fisher-star": "c8f405b05703d1a7",
    "caltech256-60-l2-sp-star": "039fc346352ef237",
    "caltech256-60-l2-star": "fef114ce215973d9",
    "cityscapes-deeplab-l2": "cb09d5881169ba26",
    "cityscapes-deeplab-l2-sp": "c35361f549f9325a",
    "cityscapes-fcn-l2": "387a3c40febe1fee",
    "cityscapes-fcn-l2-sp": "9ab39fc16f492097",
    "cityscapes-pspnet-l2": "37789fd6d96c3101",
    "cityscapes-pspnet-l2-sp": "b1fdf872a0501d2f",
    "cityscapes-resnet-l2": "16358d5b645f08cb",
    "cityscapes-resnet-l2-sp": "a36c9c663b31f89b",
    "dogs120-l2": "5dc9afa5aa449289",
    "dogs120-l2-sp": "7d8955208aa389f3",
    "dogs120-l2-sp-fisher": "51e90ae83aa90bee",
    "dogs120-l2-sp-fisher-star": "c4965f808746f537",
    "dogs120-l2-sp-star": "3070df4bb56e0a55",
    "dogs120-l2-star": "6cfc82ec84fdea42",
    "fashion-mnist": "c7ad667472a17644",
    "fashion-mnist-source": "862bc2f08db360c0",
    "food101-l2": "2ab2a14316d63e9d",
    "food101-l2-sp": "c29317870931a62b",
    "food101-l2-sp-fisher": "9fe2edc0b030a082",
    "food101-l2-sp-fisher-star": "a88d3fae6f65f147",
    "food101-l2-sp-star": "721acb0b1b5debf4",
    "food101-l2-star": "d9d92351adcab893",
    "indoor67-l2": "499287ef2d7b23fc",
    "indoor67-l2-sp": "c15c3a8a77a61f60",
    "indoor67-l2-sp-fisher": "476081cfdf1e1bf4",
    "indoor67-l2-sp-fisher-star": "dfe9824515b3690c",
    "indoor67-l2-sp-star": "ef4144d54029de01",
    "indoor67-l2-star": "5efb45405a050608",
    "sbd-pspnet-l2": "745e2db4ede5bf2b",
    "sbd-pspnet-l2-sp": "37eb3e78b187ffe2",
}


def fingerprint(config: dict, added: set[str] = ADDED) -> str:
    flat = {k: v for k, v in flatten(config).items() if k not in added}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_every_preset_resolves_as_before(name):
    seg = name.startswith(("cityscapes-", "sbd-"))
    cfg = resolve_segmentation(name) if seg else resolve(name)
    assert fingerprint(cfg.to_dict(), ADDED | SEG_ADDED if seg else ADDED) == BEFORE[name]


def test_every_earlier_preset_is_still_listed():
    names = set(preset_names()) | set(preset_names("segmentation"))
    assert set(BEFORE) <= names


def test_the_matrix_composes_base_penalty_and_variant():
    m = preset_matrix()
    assert m["food101-l2-sp-fisher-star"] == ("_food101", "l2-sp-fisher", "star")
    assert set(m) <= set(preset_names())
    c = resolve("indoor67-l2-sp-fisher-star")
    assert c.name == "indoor67-l2-sp-fisher-star" and c.data.task == "indoor67"
    assert (c.reg.kind, c.reg.alpha, c.reg.beta) == ("l2-sp-fisher", 0.1, 0.01)
    assert c.reg.fisher == "{cache}/fisher/resnet101-places365.safetensors"  # the base's presets.fisher
    assert c.data.keep_aspect and c.data.ten_crop and c.optim.steps == 9000  # variant, then _paper
    plain = resolve("indoor67-l2")
    assert plain.reg.fisher is None and not plain.data.ten_crop and plain.reg.alpha == 1e-4


def test_a_yaml_file_can_use_a_matrix_preset_as_base(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("base: caltech256-30-l2-sp\nreg: {alpha: 0.5}\n")
    c = resolve(str(p))
    assert c.reg.alpha == 0.5 and c.reg.kind == "l2-sp" and c.data.n_per_class == 30


def test_caltech101_cpu_preset_carries_the_validated_setting():
    """docs/caltech101.md measured frozen BN statistics at lr 0.001 best for both penalties (3-5 points)."""
    cfg = resolve("caltech101-mobilenetv2-cpu")
    assert (cfg.optim.lr, cfg.train.bn) == (0.001, "frozen")
