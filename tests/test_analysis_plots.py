"""Figures and tables: produced, non-empty, readable PNGs; Markdown/CSV round trips; aggregation."""

import math

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from l2sp.analysis import plots, tables
from l2sp.analysis.theory_report import theory_report
from l2sp.errors import L2SPError


def _check_png(path, max_kb=200):
    assert path.is_file() and 2_000 < path.stat().st_size < max_kb * 1024
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # not a blank canvas


def _runs_rows():
    rows = []
    for penalty, base in (("L2", 80.0), ("L2-SP", 83.0)):
        for alpha in (1e-3, 1e-2, 1e-1):
            for beta in (1e-3, 1e-2):
                for seed in range(2):
                    rows.append(
                        {
                            "penalty": penalty,
                            "alpha": alpha,
                            "beta": beta,
                            "seed": seed,
                            "frozen": int(alpha * 1000) % 4,
                            "accuracy": base + math.log10(alpha) + 10 * beta + 0.1 * seed,
                        }
                    )
    return rows


def test_r2_and_fisher_boxplots(tmp_path):
    g = torch.Generator().manual_seed(0)
    runs = {
        label: {
            f"layer{i}": torch.rand(64, generator=g, dtype=torch.float64) ** (shift + i) for i in range(5)
        }
        for label, shift in (("L2", 1.0), ("L2-SP", 0.2))
    }
    runs["L2"]["layer0"][:3] = float("nan")  # dead units are skipped
    _check_png(plots.plot_r2_boxplots(runs, tmp_path / "r2.png"))
    fisher = {f"layer{i}": torch.rand(200_000, generator=g) ** 4 * 10.0 ** (-i) for i in range(6)}
    fisher["layer0"][:10] = 0.0  # zeros cannot be drawn on a log axis
    _check_png(plots.plot_fisher_boxplots(fisher, tmp_path / "fisher.png"))
    with pytest.raises(L2SPError, match="no layers"):
        plots.plot_r2_boxplots({"a": {}}, tmp_path / "x.png")


def test_box_stats_are_exact_quartiles():
    v = np.random.default_rng(0).lognormal(size=100_001)
    s = plots._box_stats(v, np.random.default_rng(0))
    assert s["med"] == pytest.approx(np.median(v))
    assert s["q1"] == pytest.approx(np.percentile(v, 25)) and s["q3"] == pytest.approx(np.percentile(v, 75))
    assert len(s["fliers"]) <= plots._MAX_FLIERS
    ls = plots._log_box_stats(v, np.random.default_rng(0))  # log axis: whiskers from log10 values
    assert ls["med"] == pytest.approx(np.median(v))
    q1, q3 = np.percentile(np.log10(v), [25, 75])
    assert ls["whishi"] == pytest.approx(v[np.log10(v) <= q3 + 1.5 * (q3 - q1)].max())


def test_result_figures(tmp_path):
    rows = _runs_rows()
    _check_png(
        plots.plot_alpha_beta_heatmap([r for r in rows if r["penalty"] == "L2-SP"], tmp_path / "ab.png")
    )
    _check_png(plots.plot_penalty_bars(rows, tmp_path / "pen.png"))
    _check_png(plots.plot_freezing_curve(rows, tmp_path / "frz.png"))
    _check_png(
        plots.plot_layer_distance(
            {
                "L2": {"conv1": 0.01, "layer1.0": 0.05, "layer2.0": 0.3},
                "L2-SP": {"conv1": 0.001, "layer1.0": 0.004, "layer2.0": 0.02},
            },
            tmp_path / "dist.png",
        )
    )


def test_theory_report_files(tmp_path):
    paths = theory_report(tmp_path, draws=300, alphas=np.logspace(-1, 1, 5))
    _check_png(paths["linear_regression"])
    _check_png(paths["convex_combination"])
    rows = tables.read_csv(paths["csv"])
    assert [r["alpha"] for r in rows] == pytest.approx(list(np.logspace(-1, 1, 5)))
    assert all(r["mse_ls_closed"] == pytest.approx(10.0) for r in rows)  # p·σ² with p = 10, σ = 1


def test_tables_markdown_csv_and_aggregate(tmp_path):
    rows = [
        {"penalty": "L2", "accuracy": 80.0},
        {"penalty": "L2", "accuracy": 82.0},
        {"penalty": "L2-SP", "accuracy": 84.5},
    ]
    md = tables.markdown_table(rows)
    assert md.splitlines()[:3] == ["| penalty | accuracy |", "|---|---|", "| L2 | 80.000 |"]
    assert tables.markdown_table([{"a": 1e-5, "b": 0.00312345, "c": 0.5, "d": float("inf")}]).splitlines()[
        2
    ] == ("| 1e-05 | 0.00312 | 0.500 | inf |")
    path = tables.write_csv(tmp_path / "t.csv", rows)
    assert tables.read_csv(path) == rows
    agg = tables.aggregate(rows, ["penalty"], "accuracy")
    assert agg[0] == {"penalty": "L2", "mean": 81.0, "std": pytest.approx(np.std([80, 82], ddof=1)), "n": 2}
    assert agg[1]["std"] == 0.0 and agg[1]["n"] == 1
    assert (tmp_path / "t.md").exists() is False
    tables.write_markdown(tmp_path / "t.md", rows, title="T")
    assert (tmp_path / "t.md").read_text().startswith("# T\n\n| penalty")
    with pytest.raises(L2SPError, match="lacks column.*accuracy_top5.*its columns: penalty, accuracy"):
        tables.aggregate(rows, ["penalty"], "accuracy_top5")
    with pytest.raises(L2SPError, match="no such table"):
        tables.read_csv(tmp_path / "missing.csv")
