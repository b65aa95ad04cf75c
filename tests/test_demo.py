"""The demo's pipeline in a tiny configuration: structure and sanity of its outputs, and its cache."""

import csv

import pytest

from l2sp.experiments.demo import ALPHAS, Plan, run_demo
from l2sp.experiments.report import label


@pytest.mark.slow
def test_tiny_demo_writes_tables_plots_and_reuses_its_cache(tmp_path):
    plan = Plan.tiny()
    plan.kinds = ["l2", "l2-sp", "l2-sp-fisher"]
    said: list[str] = []
    cache = tmp_path / "cache"
    summary = run_demo(plan, tmp_path / "out", workers=1, cache=cache, say=said.append)

    methods = [label(k) for k in plan.kinds] + ["L2 + freezing", "L2-SP + freezing"]
    assert [r["method"] for r in summary["accuracy"]] == methods
    assert [r["method"] for r in summary["drop"]] == methods
    for row in summary["accuracy"]:
        mean = float(row["test accuracy %"].split(" ± ")[0])
        assert 0.0 <= mean <= 100.0 and row["runs"] == plan.seeds
        assert row["alpha"] in ALPHAS["l2" if row["method"].startswith("L2 ") or row["method"] == "L2" else "l2-sp"]
    for row in summary["drop"]:
        assert -100.0 <= float(row["drop (points)"].split(" ± ")[0]) <= 100.0

    out = tmp_path / "out"
    report = (out / "report.md").read_text()
    assert "Table 2" in report and "Table 5" in report and "Machine:" in report
    for fig in summary["figures"]:
        assert (out / fig).stat().st_size > 2000
        assert f"]({fig})" in report
    assert {"accuracy_per_penalty.png", "fisher_per_layer.png", "r2_per_layer.png"} <= set(summary["figures"])
    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == len(methods) * plan.seeds
    assert all(0 <= float(r["test_acc"]) <= 100 for r in runs)

    said.clear()
    run_demo(plan, tmp_path / "out2", workers=1, cache=cache, say=said.append)
    assert any("source model: cached" in line for line in said)
    assert any("Fisher: cached" in line for line in said)
