"""PNG figures of the analyses (matplotlib, no display needed): one function per figure of the paper.

Every function takes plain data (dicts of tensors or table rows), writes one PNG atomically and returns
its path. Figures are built with ``matplotlib.figure.Figure`` (Agg), never through global pyplot state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import cbook
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from l2sp.analysis.tables import aggregate
from l2sp.errors import L2SPError
from l2sp.io import atomic_write

_MAX_FLIERS = 300  # outliers drawn per box (chosen at random, seeded): keeps PNGs small for big layers


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically)."""
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def _finish(
    fig: Figure, ax, path: str | os.PathLike, labels: tuple[str, str, str], *, legend: int = 0, grid: dict | None = None
) -> Path:
    """Axis labels and title from ``labels`` = (x, y, title), a legend of font size ``legend`` (0: none), a grid
    ``ax.grid(alpha=0.3, **grid)`` (None: none); then the PNG (:func:`save_figure`)."""
    xlabel, ylabel, title = labels
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if legend:
        ax.legend(fontsize=legend)
    if grid is not None:
        ax.grid(alpha=0.3, **grid)
    return save_figure(fig, path)


def _layer_ticks(ax, layers: Sequence[str]) -> None:
    """One x tick per layer, labels slanted when there are more than six."""
    slant = len(layers) > 6
    ax.set_xticks(range(len(layers)), layers, rotation=60 if slant else 0, ha="right" if slant else "center", size=8)


def _values(v) -> np.ndarray:
    a = v.detach().cpu().to(torch.float64).numpy() if isinstance(v, torch.Tensor) else np.asarray(v, float)
    return a[np.isfinite(a)].ravel()


def _box_stats(values: np.ndarray, rng: np.random.Generator) -> dict:
    """Exact quartiles and 1.5·IQR whiskers of all values; at most _MAX_FLIERS outliers kept for drawing."""
    stats = cbook.boxplot_stats(values, whis=1.5)[0]
    fliers = stats["fliers"]
    if len(fliers) > _MAX_FLIERS:
        stats["fliers"] = rng.choice(fliers, _MAX_FLIERS, replace=False)
    return stats


def _log_box_stats(values: np.ndarray, rng: np.random.Generator) -> dict:
    """Box statistics of log10(values), mapped back: whiskers at 1.5·IQR in log space, for a log axis."""
    stats = _box_stats(np.log10(values), rng)
    return {
        k: (
            np.power(10.0, v)
            if k in ("mean", "med", "q1", "q3", "cilo", "cihi", "whislo", "whishi", "fliers")
            else v
        )
        for k, v in stats.items()
    }


def _grouped_boxplots(ax, runs: Mapping[str, Mapping[str, object]], *, positive: bool = False) -> None:
    labels = list(runs)
    layers = list(dict.fromkeys(layer for r in runs.values() for layer in r))
    if not layers:
        raise L2SPError("nothing to plot: no layers given")
    width = 0.8 / len(labels)
    rng = np.random.default_rng(0)
    colors = [f"C{i}" for i in range(len(labels))]
    for j, label in enumerate(labels):
        stats, positions = [], []
        for i, layer in enumerate(layers):
            if layer not in runs[label]:
                continue
            v = _values(runs[label][layer])
            if positive:
                v = v[v > 0]
            if v.size == 0:
                continue
            stats.append(_log_box_stats(v, rng) if positive else _box_stats(v, rng))
            positions.append(i + (j - (len(labels) - 1) / 2) * width)
        if stats:
            ax.bxp(
                stats,
                positions=positions,
                widths=width * 0.85,
                patch_artist=True,
                boxprops={"facecolor": colors[j], "alpha": 0.6},
                medianprops={"color": "black"},
                flierprops={"markersize": 2, "alpha": 0.4},
            )
    _layer_ticks(ax, layers)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    if len(labels) > 1 or labels[0]:
        from matplotlib.patches import Patch

        ax.legend([Patch(facecolor=c, alpha=0.6) for c in colors], labels, loc="best", fontsize=8)


def plot_r2_boxplots(
    runs: Mapping[str, Mapping[str, torch.Tensor]],
    path: str | os.PathLike,
    *,
    title: str = "Layer-wise R² of fine-tuned vs pre-trained activations",
) -> Path:
    """Figure 4: per layer, one box of unit R² values for each run (``{run label: {layer: R² per unit}}``)."""
    fig = Figure(figsize=(max(6.0, 0.45 * max(len(r) for r in runs.values()) * max(1, len(runs)) + 2), 4.2))
    ax = fig.add_subplot()
    _grouped_boxplots(ax, runs)
    ax.set_ylim(-0.02, 1.02)
    return _finish(fig, ax, path, ("layer", "R² per unit", title), grid={"axis": "y"})


def plot_fisher_boxplots(
    by_layer: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    title: str = "Diagonal Fisher information per layer",
) -> Path:
    """Figure 5: one box of F_j values per layer, log-scale y (zeros cannot be shown and are left out).

    Quartiles are exact; whiskers extend 1.5·IQR of log10(F) (the boxplot of the log values)."""
    fig = Figure(figsize=(max(6.0, 0.3 * len(by_layer) + 2), 4.2))
    ax = fig.add_subplot()
    _grouped_boxplots(ax, {"": by_layer}, positive=True)
    ax.set_yscale("log")
    labels = ("layer", "Fisher information F_j (log scale)", title)
    return _finish(fig, ax, path, labels, grid={"axis": "y", "which": "both"})


def _label(v) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def _table_axes(rows: Sequence[Mapping], keys: list[str], value: str, size) -> tuple[list[dict], Figure, object]:
    """(mean/std of ``value`` per distinct ``keys``, a figure of ``size(aggregated rows)`` inches, its axes)."""
    agg = aggregate(rows, keys, value)
    fig = Figure(figsize=size(agg))
    return agg, fig, fig.add_subplot()


# the figures of a results table (one row per run): Figures 1, 2 and 3
def plot_alpha_beta_heatmap(
    rows: Sequence[Mapping], path: str | os.PathLike, *, x: str = "alpha", y: str = "beta", value: str = "accuracy",
    title: str = "Accuracy vs penalty strengths",
) -> Path:
    """Figure 1: mean ``value`` over a grid of (α, β), values on log-spaced axes labelled by their values."""
    def size(agg: list[dict]) -> tuple[float, float]:
        return 1.1 * len({r[x] for r in agg}) + 2.5, 0.7 * len({r[y] for r in agg}) + 2

    agg, fig, ax = _table_axes(rows, [x, y], value, size)
    xs, ys = sorted({r[x] for r in agg}), sorted({r[y] for r in agg})
    grid = np.full((len(ys), len(xs)), np.nan)
    for r in agg:
        grid[ys.index(r[y]), xs.index(r[x])] = r["mean"]
    im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, label=value)
    ax.set_xticks(range(len(xs)), [_label(v) for v in xs])
    ax.set_yticks(range(len(ys)), [_label(v) for v in ys])
    mid = np.nanmean(grid)
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(
                j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color="black" if v > mid else "white"
            )
    greek = {"alpha": "α", "beta": "β"}
    return _finish(fig, ax, path, (f"{greek.get(x, x)} (log scale)", f"{greek.get(y, y)} (log scale)", title))


def plot_penalty_bars(
    rows: Sequence[Mapping], path: str | os.PathLike, *, penalty: str = "penalty", value: str = "accuracy",
    title: str = "Accuracy per penalty (mean ± std)",
) -> Path:
    """Figure 2 style: one bar per penalty, height the mean ``value``, error bar the std over runs."""
    agg, fig, ax = _table_axes(rows, [penalty], value, lambda agg: (max(4.0, 0.9 * len(agg) + 1.5), 3.8))
    means, stds = [r["mean"] for r in agg], [r["std"] for r in agg]
    ax.bar(range(len(agg)), means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(agg))])
    ax.set_xticks(range(len(agg)), [str(r[penalty]) for r in agg])
    lo, hi = min(m - s for m, s in zip(means, stds)), max(m + s for m, s in zip(means, stds))
    pad = max(0.5, 0.15 * (hi - lo))
    ax.set_ylim(lo - pad, hi + pad)
    return _finish(fig, ax, path, ("penalty", value, title), grid={"axis": "y"})


def plot_freezing_curve(
    rows: Sequence[Mapping], path: str | os.PathLike, *, frozen: str = "frozen", penalty: str = "penalty",
    value: str = "accuracy", title: str = "Accuracy vs number of frozen layers",
) -> Path:
    """Figure 3: mean ± std of ``value`` against the number of frozen blocks, one line per penalty."""
    agg, fig, ax = _table_axes(rows, [penalty, frozen], value, lambda _: (6, 4))
    for i, name in enumerate(dict.fromkeys(r[penalty] for r in agg)):
        pts = sorted((r[frozen], r["mean"], r["std"]) for r in agg if r[penalty] == name)
        k, m, s = (np.array(c, dtype=float) for c in zip(*pts))
        ax.errorbar(k, m, yerr=s, marker="o", capsize=3, label=str(name), color=f"C{i}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(fig, ax, path, ("number of frozen layers (from the input)", value, title), legend=8, grid={})


def plot_paired_differences(
    rows: Sequence[Mapping], path: str | os.PathLike, *, x: str = "n", series: str = "quantity",
    title: str = "Paired differences with their 95% intervals", xlabel: str = "training images per class",
    ylabel: str = "difference (points)",
) -> Path:
    """One panel per ``series`` (its own y scale): the mean paired difference against ``x`` (log x), with its
    interval ``[low, high]`` as error bars; filled markers where ``significant``, a dashed line at 0."""
    names = list(dict.fromkeys(r[series] for r in rows))
    if not names:
        raise L2SPError("nothing to plot: no paired differences given")
    fig = Figure(figsize=(4.2 * len(names), 3.8))
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        pts = sorted((float(r[x]), r["mean"], r["low"], r["high"], bool(r["significant"]))
                     for r in rows if r[series] == name)
        xs, m, lo, hi, sig = (np.array(c) for c in zip(*pts))
        ax.axhline(0.0, color="gray", linestyle="--", linewidth=1)
        ax.errorbar(xs, m, yerr=[m - lo, hi - m], capsize=4, color=f"C{i}")
        ax.scatter(xs[sig], m[sig], color=f"C{i}", zorder=3, s=30)
        ax.scatter(xs[~sig], m[~sig], facecolor="white", edgecolor=f"C{i}", zorder=3, s=30)
        ax.set_xscale("log")
        ax.set_xticks(xs, [_label(int(v) if v.is_integer() else v) for v in xs])
        ax.minorticks_off()
        ax.set_xlabel(xlabel + " (log scale)")
        ax.set_ylabel(ylabel if i == 0 else "")
        ax.set_title(str(name), fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(title + " (filled: p < 0.05)", fontsize=10)
    return save_figure(fig, path)


def plot_layer_distance(
    runs: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    *,
    log: bool = True,
    title: str = "Relative distance to the starting point",
) -> Path:
    """‖w − w0‖/‖w0‖ per layer, one line per run (``{run label: {layer: distance}}``), log y by default."""
    layers = list(dict.fromkeys(layer for r in runs.values() for layer in r))
    if not layers:
        raise L2SPError("nothing to plot: no layers given")
    fig = Figure(figsize=(max(6.0, 0.3 * len(layers) + 2), 4))
    ax = fig.add_subplot()
    for i, (label, d) in enumerate(runs.items()):
        xs = [j for j, layer in enumerate(layers) if layer in d]
        ax.plot(xs, [d[layers[j]] for j in xs], marker="o", markersize=3, label=label, color=f"C{i}")
    _layer_ticks(ax, layers)
    if log:
        ax.set_yscale("log")
    labels = ("layer", "‖w − w0‖ / ‖w0‖" + (" (log scale)" if log else ""), title)
    return _finish(fig, ax, path, labels, legend=8, grid={"which": "both"})


def plot_linear_regression_theory(
    alphas: Sequence[float],
    closed: Sequence[Mapping],
    path: str | os.PathLike,
    *,
    monte_carlo: Sequence[Mapping] | None = None,
    alpha_max: float = math.inf,
    title: str | None = None,
) -> Path:
    """MSE of LS, L2 and L2-SP against α (log x): closed forms as lines, Monte-Carlo estimates as dots,
    the range where L2-SP beats least squares shaded."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    a = np.asarray(alphas, float)
    for key, name, c in (
        ("mse_ls", "least squares", "C7"),
        ("mse_l2", "L2", "C0"),
        ("mse_sp", "L2-SP", "C1"),
    ):
        ax.plot(a, [r[key] for r in closed], color=c, label=f"{name} (closed form)")
        if monte_carlo is not None:
            ax.plot(
                a, [r[key] for r in monte_carlo], "o", color=c, markersize=4, label=f"{name} (Monte-Carlo)"
            )
    hi = min(alpha_max, a.max())
    ax.axvspan(a.min(), hi, color="C1", alpha=0.08, label="L2-SP beats least squares")
    ax.set_xscale("log")
    ax.set_yscale("log")
    title = title or "Linear regression: risk of the three estimators"
    labels = ("α (log scale)", "E‖ŵ − w*‖² (mean squared error, log scale)", title)
    return _finish(fig, ax, path, labels, legend=7, grid={"which": "both"})


def plot_convex_combination(
    H: torch.Tensor,
    w_hat: torch.Tensor,
    w0: torch.Tensor,
    path: str | os.PathLike,
    *,
    alphas: Sequence[float] | None = None,
) -> Path:
    """Section 5.5 in 2-D: contours of the quadratic, the path of the L2-SP optimum as α grows from 0 to ∞
    (from ŵ to w0), the eigenvectors of H; right: the weight λ_i/(λ_i + α) kept on ŵ per eigen-direction."""
    from l2sp.analysis.theory import convex_weights, l2sp_quadratic_optimum

    if H.shape != (2, 2):
        raise L2SPError("the convex-combination picture needs a 2×2 Hessian")
    H, w_hat, w0 = (t.to(torch.float64) for t in (H, w_hat, w0))
    alphas = np.logspace(-3, 3, 121) if alphas is None else np.asarray(alphas, float)
    path_pts = np.stack([l2sp_quadratic_optimum(H, w_hat, w0, float(al)).numpy() for al in alphas])
    fig = Figure(figsize=(10, 4))
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    lo = np.minimum(w_hat.numpy(), w0.numpy()) - 1.5
    hi = np.maximum(w_hat.numpy(), w0.numpy()) + 1.5
    g0, g1 = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
    d = np.stack([g0 - w_hat[0].item(), g1 - w_hat[1].item()], -1)
    q = 0.5 * np.einsum("...i,ij,...j->...", d, H.numpy(), d)
    ax.contour(g0, g1, q, levels=np.geomspace(0.02, q.max(), 14), colors="0.6", linewidths=0.7)
    ax.plot(path_pts[:, 0], path_pts[:, 1], color="C1", label="L2-SP optimum, α from 0 to ∞")
    ax.plot(*w_hat.numpy(), "k*", markersize=10, label="ŵ (unregularized optimum)")
    ax.plot(*w0.numpy(), "s", color="C2", label="w0 (starting point)")
    P, _, _ = convex_weights(H, 1.0)
    for i in range(2):
        v = P[:, i].numpy()
        ax.annotate(
            "", xy=w_hat.numpy() + v, xytext=w_hat.numpy(), arrowprops={"arrowstyle": "->", "color": "C0"}
        )
    ax.set_xlabel("w_1")
    ax.set_ylabel("w_2")
    ax.set_aspect("equal")
    ax.set_title("Quadratic model: optimum path (arrows: eigenvectors of H)", fontsize=9)
    ax.legend(fontsize=7)
    lam = torch.linalg.eigvalsh(H).numpy()
    for i, li in enumerate(lam):
        ax2.plot(alphas, li / (li + alphas), color=f"C{i}", label=f"λ = {li:.3g}: weight on ŵ")
        ax2.plot(alphas, alphas / (li + alphas), "--", color=f"C{i}", label=f"λ = {li:.3g}: weight on w0")
    ax2.set_xscale("log")
    ax2.set_xlabel("α (log scale)")
    ax2.set_ylabel("convex-combination weight")
    ax2.set_title("λ/(λ+α) and α/(λ+α) per eigen-direction", fontsize=9)
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3, which="both")
    return save_figure(fig, path)
