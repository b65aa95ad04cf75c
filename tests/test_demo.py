"""The demo's pipeline in a tiny configuration (structure and sanity of its outputs, its cache), and its selection
and paired statistics against independent computations on made-up results."""

import csv
import math

import numpy as np
import pytest
import scipy.stats as scipy_stats

from l2sp.experiments.demo import ALPHAS, Plan, choose, run_demo, select
from l2sp.experiments.report import compare, conclusions, label


@pytest.mark.slow
def test_tiny_demo_writes_tables_plots_and_reuses_its_cache(tmp_path):
    plan = Plan.tiny()
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
    l2_sp = next(r for r in summary["accuracy"] if r["method"] == "L2-SP")
    assert l2_sp["− L2 (paired)"].startswith(("+", "-")) and l2_sp["− L2-SP (paired)"] == ""
    for row in summary["drop"]:
        assert -100.0 <= float(row["drop (points)"].split(" ± ")[0]) <= 100.0
    assert [r["n per class"] for r in summary["sizes"]] == [13, 15]
    assert len(summary["selection"]) == 2 + 3 + 2  # L2, L2-SP at n=13; 3 kinds and 2 frozen at n=15
    assert any(c.startswith("13 images per class: L2-SP − L2 = ") for c in summary["conclusions"])

    out = tmp_path / "out"
    report = (out / "report.md").read_text()
    for words in ("Table 2", "Table 5", "Machine:", "paired t-test", "L2-SP − L2 vs training images per class"):
        assert words in report
    for fig in summary["figures"]:
        assert (out / fig).stat().st_size > 2000
        assert f"]({fig})" in report
    assert {"accuracy_per_penalty.png", "fisher_per_layer.png", "r2_per_layer.png",
            "gain_vs_size.png"} <= set(summary["figures"])
    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == plan.run_count() - len(list(csv.DictReader(open(out / "grid.csv"))))
    assert len(runs) == (2 + len(methods)) * plan.seeds
    assert all(0 <= float(r["test_acc"]) <= 100 for r in runs)
    # the printed lines are the report's conclusions
    assert all(f"- {c}" in said for c in summary["conclusions"])

    said.clear()
    run_demo(plan, tmp_path / "out2", workers=1, cache=cache, say=said.append)
    assert any("source model: cached" in line for line in said)
    assert any("Fisher: cached" in line for line in said)


def test_plan_sizes():
    """The full plan's run count (what its 15 minutes are sized from), and --quick is a small version of it."""
    full, quick = Plan.full(), Plan.quick()
    assert full.points() == [(15, "l2"), (15, "l2-sp"), *[(30, k) for k in ALPHAS], (100, "l2"), (100, "l2-sp")]
    # grid: 2 seeds x (3 sizes x 2 kinds x 3 alphas + 4 kinds x 2 alphas); final: 10 pairs x 5 seeds
    assert full.run_count() == 2 * (3 * 2 * 3 + 4 * 2) + 10 * 5 == 102
    assert quick.run_count() == 2 * (2 * 2 * 2) + 4 * 3 == 28
    assert quick.steps * quick.run_count() < full.steps * full.run_count() / 8


def _run(n, kind, alpha, seed, val, test=None, drop=None, lr=0.02, label=None):
    return {"n": n, "label": label or kind, "seed": seed, "val_acc": val, "test_acc": test,
            "source_drop": {"drop": drop}, "params": {"n": n, "kind": kind, "alpha": alpha, "lr": lr,
                                                     "beta": 0.01, "freeze": 0, "seed": seed}}


def test_select_uses_the_mean_over_seeds_and_reports_margin_and_noise():
    # α 1e-3: one lucky seed (0.95) but mean 0.90; α 1e-2: mean 0.92 -> chosen, though a one-seed rule picks 1e-3
    runs = [_run(30, "l2", 1e-3, 100, 0.95), _run(30, "l2", 1e-3, 101, 0.85),
            _run(30, "l2", 1e-2, 100, 0.93), _run(30, "l2", 1e-2, 101, 0.91),
            _run(30, "l2", 1e-1, 100, 0.80), _run(30, "l2", 1e-1, 101, 0.80)]
    c = select(runs)
    assert c["params"]["alpha"] == 1e-2 and c["val_acc"] == pytest.approx(0.92)
    assert c["runner_up"]["alpha"] == 1e-3 and c["margin"] == pytest.approx(2.0)
    # pooled within-point variance (points²): (50 + 2 + 0) / 3; noise = sqrt(pooled · 2 / 2)
    sds = [np.std([95, 85], ddof=1), np.std([93, 91], ddof=1), 0.0]
    assert c["noise"] == pytest.approx(math.sqrt(np.mean(np.square(sds)) * 2 / 2))
    assert c["resolved"] is False  # 2.0 < 2 · 4.16
    # a tie goes to the earlier grid point
    tie = select([_run(30, "l2", 1e-3, 100, 0.9), _run(30, "l2", 1e-2, 100, 0.9)])
    assert tie["params"]["alpha"] == 1e-3 and tie["margin"] == 0.0


def test_choose_groups_by_size_and_kind():
    plan = Plan("t", n_per_class=30, sizes=[10, 30], kinds=["l2", "l2-sp"], alphas={"l2": [1, 2], "l2-sp": [1, 2]})
    grid = [_run(n, k, a, s, v) for n in (10, 30) for k in ("l2", "l2-sp") for a, v in ((1, 0.45 + n / 100),
            (2, 0.6 if k == "l2" else 0.4)) for s in (100, 101)]
    chosen = choose(plan, grid)
    assert set(chosen) == {(10, "l2"), (10, "l2-sp"), (30, "l2"), (30, "l2-sp")}
    assert chosen[(10, "l2")]["params"]["alpha"] == 2 and chosen[(30, "l2")]["params"]["alpha"] == 1
    assert chosen[(10, "l2-sp")]["params"]["alpha"] == 1


def _finals(gains, drops, base=0.90, n=30):
    rng = np.random.default_rng(0)
    out = []
    for s, (g, d) in enumerate(zip(gains, drops)):
        acc = base + rng.normal(0, 0.004)
        out += [_run(n, "l2", 1e-2, s, 0, acc, 50.0), _run(n, "l2-sp", 1e-3, s, 0, acc + g / 100, 50.0 + d)]
    return out


def test_paired_comparison_and_generated_conclusions():
    sig = _finals([0.9, 1.1, 1.3, 0.8, 1.2], [-30, -28, -33, -31, -29], n=10)
    flat = _finals([0.5, -0.6, 0.1, -0.2, 0.3], [-1, 2, -3, 1, 0], n=100)
    final = sig + flat
    p = compare(final, 10, "l2-sp", "l2")
    a = [100 * r["test_acc"] for r in sig if r["label"] == "l2-sp"]
    b = [100 * r["test_acc"] for r in sig if r["label"] == "l2"]
    ref = scipy_stats.ttest_rel(a, b)
    assert p.mean == pytest.approx(1.06) and p.p_t == pytest.approx(ref.pvalue, rel=1e-9) and p.significant
    assert p.p_sign == pytest.approx(2 / 32)
    text = conclusions(final, 10)
    assert any(t.startswith("10 images per class: L2-SP − L2 = +1.06") and "L2-SP is significantly better than L2"
               in t for t in text)
    assert any(t.startswith("100 images per class:") and "no significant difference between L2-SP and L2" in t
               for t in text)
    assert any("The gain shrinks with more data" in t for t in text)
    assert any(t.startswith("Forgetting at 10") and "forgets significantly less" in t for t in text)
    assert any(t.startswith("Forgetting at 100") and "no significant difference in forgetting" in t for t in text)
    # a method ahead on the mean but not significantly: no claim of "better"
    assert compare(final, 100, "l2-sp", "l2").mean > 0 and not compare(final, 100, "l2-sp", "l2").significant
