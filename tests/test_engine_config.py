"""Typed configs: presets, YAML files with base:, key=value overrides and their errors."""

import pytest
import yaml

from l2sp.engine.config import (
    Config,
    differences,
    expand_path,
    parse_overrides,
    preset_names,
    resolve,
    to_yaml,
)
from l2sp.errors import L2SPError

TABLE2 = [
    f"{t}-{k}{s}"
    for t in ("caltech256-30", "caltech256-60", "indoor67", "dogs120", "food101")
    for k in ("l2", "l2-sp", "l2-sp-fisher")
    for s in ("", "-star")
]


def test_every_preset_parses():
    names = preset_names()
    assert {"fashion-mnist", "caltech101", *TABLE2} <= set(names)
    for name in names:
        cfg = resolve(name)
        assert isinstance(cfg, Config) and cfg.name


@pytest.mark.parametrize("name", TABLE2)
def test_table2_presets_follow_the_paper(name):
    c = resolve(name)
    assert c.model.arch == "resnet101"
    assert (c.optim.momentum, c.optim.batch_size, c.optim.steps, c.optim.milestones) == (
        0.9,
        64,
        9000,
        [6000],
    )
    assert c.optim.schedule == "step" and c.optim.gamma == 0.1
    kind = name.removesuffix("-star")[name.index("-l2") + 1 :]
    assert c.reg.kind == kind
    assert (c.reg.alpha, c.reg.beta) == ((1e-4, 1e-3) if kind == "l2" else (0.1, 0.01))
    star = name.endswith("-star")
    assert c.data.keep_aspect is star and c.data.ten_crop is star
    if kind == "l2-sp-fisher":
        assert c.reg.fisher
    if name.startswith("indoor67"):
        assert c.model.weights.endswith((".pt", ".pth", ".safetensors"))  # Places365: a user-supplied file


def test_overrides_are_typed_yaml_scalars():
    c = resolve(
        "fashion-mnist",
        [
            "reg.alpha=1e-4",
            "optim.milestones=[10, 20]",
            "optim.steps=30",
            "train.amp=bf16",
            "model.options.widths=[8, 16, 32]",
            "reg.fisher=null",
        ],
    )
    assert c.reg.alpha == pytest.approx(1e-4) and isinstance(c.reg.alpha, float)
    assert c.optim.milestones == [10, 20] and c.optim.steps == 30
    assert c.train.amp == "bf16" and c.model.options == {"widths": [8, 16, 32]} and c.reg.fisher is None
    assert resolve("fashion-mnist", {"reg.alpha": 2}).reg.alpha == 2.0


@pytest.mark.parametrize(
    "item, words",
    [
        ("reg.alphaa=1", ["reg.alphaa", "kind, alpha, beta"]),
        ("regg.alpha=1", ["regg", "model, data, reg, optim, train, eval"]),
        ("train.amp=fp8", ["train.amp", "none, bf16, fp16"]),
        ("reg.kind=l3", ["reg.kind", "l2-sp-fisher"]),
        ("optim.steps=many", ["optim.steps", "int"]),
        ("optim.lr=-1", ["optim.lr"]),
        ("reg.alpha", ["key=value"]),
        ("reg.alpha.x=1", ["reg.alpha is a value"]),
    ],
)
def test_bad_overrides_name_the_key_and_valid_values(item, words):
    with pytest.raises(L2SPError) as exc:
        resolve("fashion-mnist", [item])
    msg = str(exc.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_unknown_keys_in_a_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("base: fashion-mnist\noptim: {lr: 0.1, stepz: 3}\n")
    with pytest.raises(L2SPError, match=r"optim.stepz.*valid keys: name, lr, momentum"):
        resolve(str(p))
    with pytest.raises(L2SPError, match="unknown preset 'nope'"):
        resolve("nope")
    with pytest.raises(L2SPError, match="does not exist"):
        resolve(str(tmp_path / "missing.yaml"))


def test_base_inheritance_and_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nreg: {alpha: 0.5}\n")
    (tmp_path / "b.yaml").write_text("base: fashion-mnist\nreg: {beta: 0.2}\noptim: {steps: 7}\n")
    c = resolve(str(tmp_path / "a.yaml"))
    assert (c.reg.alpha, c.reg.beta, c.optim.steps, c.name) == (0.5, 0.2, 7, "a")
    assert c.data.task == "fashion-mnist-target"  # inherited from the preset
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(L2SPError, match="loops"):
        resolve(str(tmp_path / "c.yaml"))


def test_yaml_round_trip_and_differences(tmp_path):
    c = resolve("fashion-mnist", ["reg.alpha=0.3"])
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(c))
    assert resolve(str(p)) == resolve(yaml.safe_load(p.read_text()))
    back = resolve(str(p))
    back.name = c.name
    assert differences(back, c) == []
    d = differences(resolve("fashion-mnist"), c)
    assert d == ["reg.alpha: 0.1 != 0.3"]
    assert differences(resolve("fashion-mnist", ["train.quiet=true"]), resolve("fashion-mnist")) == []


def test_parse_overrides_and_expand_path(monkeypatch):
    assert parse_overrides(["a.b=1", "c=x y", "d=[1,2]", "e="]) == {
        "a.b": 1,
        "c": "x y",
        "d": [1, 2],
        "e": None,
    }
    monkeypatch.setenv("L2SP_CACHE", "/some/cache")
    assert expand_path("{cache}/w.safetensors") == "/some/cache/w.safetensors"
    assert expand_path(None) is None
