"""``l2sp analyze``: every subcommand on small inputs; run directories come from a stand-in load_run."""

import argparse
import copy
import sys
import types

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from l2sp.analysis import command, tables
from l2sp.errors import L2SPError
from l2sp.io import save_tensors


def _parse(*argv):
    parser = argparse.ArgumentParser(prog="l2sp analyze")
    command.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def _net(classes):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes)
    )


@pytest.fixture
def fake_runs(monkeypatch):
    """Two runs fine-tuned from one source, and one from another source."""
    source, other = _net(5), _net(5)
    data = TensorDataset(torch.randn(12, 3, 8, 8), torch.randint(0, 3, (12,)))
    src_data = TensorDataset(torch.randn(10, 3, 8, 8), torch.randint(0, 5, (10,)))
    runs = {}
    for name, src, kind, step in (
        ("run_l2", source, "l2", 0.5),
        ("run_sp", source, "l2-sp", 0.05),
        ("run_other", other, "l2-sp", 0.05),
        ("run_nosrc", source, "l2", 0.1),
    ):
        ft = copy.deepcopy(src)
        ft[4] = nn.Linear(4, 3)
        with torch.no_grad():
            ft[0].weight.add_(step * torch.randn_like(ft[0].weight))
        runs[name] = types.SimpleNamespace(
            model=ft.eval(),
            source_model=copy.deepcopy(src).eval(),
            head_name="4",
            config={},
            task=types.SimpleNamespace(train=data, val=data, test=data),
            source_task=None
            if name == "run_nosrc"
            else types.SimpleNamespace(train=src_data, val=None, test=src_data),
            regularizer_kind=kind,
        )
    module = types.ModuleType("l2sp.engine.run")
    module.load_run = lambda path, device="cpu": runs[str(path).rstrip("/").rsplit("/", 1)[-1]]
    monkeypatch.setitem(sys.modules, "l2sp.engine.run", module)
    return runs


def test_drop_r2_distance_commands(fake_runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert command.run(_parse("drop", "x/run_l2", "x/run_sp", "--out", out, "--device", "cpu")) == 0
    rows = tables.read_csv(out / "source_drop.csv")
    assert [r["run"] for r in rows] == ["l2", "l2-sp"]
    for r in rows:
        assert r["drop"] == pytest.approx(r["source_acc"] - r["reattached_acc"])
    assert "Source-task accuracy" in capsys.readouterr().out

    assert (
        command.run(
            _parse("r2", "x/run_l2", "x/run_sp", "--out", out, "--device", "cpu", "--max-images", "8")
        )
        == 0
    )
    rows = tables.read_csv(out / "r2.csv")
    assert {r["layer"] for r in rows} == {0, 1, 2, 3}  # numeric names read back as numbers; head "4" left out
    by = {(r["run"], r["layer"]): r for r in rows}
    assert by[("l2-sp", 0)]["median"] > by[("l2", 0)]["median"]  # smaller step, closer to the source
    assert (out / "r2.png").stat().st_size > 2000 and (out / "r2_units.safetensors").is_file()

    assert command.run(_parse("distance", "x/run_l2", "x/run_sp", "--out", out, "--labels", "A", "B")) == 0
    rows = tables.read_csv(out / "distance.csv")
    assert [r["layer"] for r in rows] == [0] and rows[0]["A"] > rows[0]["B"] > 0
    assert (out / "distance.png").is_file()


def test_run_commands_bad_input(fake_runs, tmp_path):
    with pytest.raises(L2SPError, match="different source models"):
        command.run(_parse("r2", "run_l2", "run_other", "--out", tmp_path))
    with pytest.raises(L2SPError, match="run run_nosrc has no source test set"):
        command.run(_parse("drop", "run_nosrc", "--out", tmp_path))
    with pytest.raises(L2SPError, match="no layer named 'layer9'.*valid names"):
        command.run(_parse("r2", "run_l2", "--layers", "layer9", "--out", tmp_path))
    with pytest.raises(L2SPError, match="2 labels for 1 runs"):
        command.run(_parse("distance", "run_l2", "--labels", "a", "b", "--out", tmp_path))


def test_table_fisher_theory_commands(tmp_path):
    rows = [
        {"penalty": p, "alpha": a, "beta": b, "frozen": k, "accuracy": 80 + i}
        for i, (p, a, b, k) in enumerate(
            [
                ("L2", 0.01, 0.01, 0),
                ("L2", 0.1, 0.01, 1),
                ("L2-SP", 0.01, 0.1, 0),
                ("L2-SP", 0.1, 0.1, 1),
                ("L2-SP", 0.1, 0.1, 1),
            ]
        )
    ]
    table = tables.write_csv(tmp_path / "results.csv", rows)
    out = tmp_path / "out"
    for sub in ("heatmap", "penalties", "freezing"):
        assert command.run(_parse(sub, table, "--out", out)) == 0
    pen = tables.read_csv(out / "penalties.csv")
    assert pen[1]["penalty"] == "L2-SP" and pen[1]["mean"] == pytest.approx(83.0) and pen[1]["n"] == 3
    assert {p.name for p in out.glob("*.png")} == {"alpha_beta.png", "penalties.png", "freezing.png"}
    with pytest.raises(L2SPError, match="lacks column"):
        command.run(_parse("heatmap", table, "--x", "lr", "--out", out))

    fisher = {
        "conv1.weight": torch.rand(4, 3, 3, 3),
        "conv1.bias": torch.rand(4),
        "fc.weight": torch.rand(2, 4),
    }
    save_tensors(tmp_path / "fisher.safetensors", fisher)
    assert command.run(_parse("fisher", tmp_path / "fisher.safetensors", "--out", out)) == 0
    assert [r["layer"] for r in tables.read_csv(out / "fisher.csv")] == ["conv1", "fc"]
    assert (out / "fisher.png").is_file()
    with pytest.raises(L2SPError, match="no such .*missing.safetensors"):
        command.run(_parse("fisher", tmp_path / "missing.safetensors", "--out", out))

    assert command.run(_parse("theory", "--draws", "200", "--out", out)) == 0
    assert (out / "linear_regression.png").is_file() and (out / "convex_combination.png").is_file()
