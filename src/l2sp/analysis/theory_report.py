"""The Section 5.5 checks as a report: Monte-Carlo vs closed forms over a grid of α, with two figures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from l2sp.analysis import plots, tables, theory


def theory_report(
    out_dir: str | os.PathLike,
    *,
    p: int = 10,
    sigma: float = 1.0,
    eps_scale: float = 1.6,
    w_star_scale: float = 3.0,
    alphas: np.ndarray | None = None,
    draws: int = 4000,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``linear_regression.csv/.md/.png`` and ``convex_combination.png`` under ``out_dir``.

    w* ~ N(0, w_star_scale²·I_p), ε = eps_scale·σ·u with u uniform on the sphere, so ‖ε‖² = eps_scale²·pσ²;
    with eps_scale > 1 the α range where L2-SP beats least squares is bounded and visible in the figure.
    """
    out = Path(out_dir)
    g = torch.Generator().manual_seed(seed)
    w_star = w_star_scale * torch.randn(p, generator=g, dtype=torch.float64)
    u = torch.randn(p, generator=g, dtype=torch.float64)
    eps = u / u.norm() * eps_scale * sigma * p**0.5
    alphas = np.logspace(-2, 2, 17) if alphas is None else np.asarray(alphas, float)
    closed, mc, rows = [], [], []
    for a in alphas:
        c = theory.linear_regression_closed_forms(float(a), sigma, w_star, eps)
        m = theory.linear_regression_monte_carlo(float(a), sigma, w_star, eps, draws=draws, generator=g)
        closed.append(c)
        mc.append(m)
        rows.append(
            {
                "alpha": float(a),
                **{f"{k}_closed": float(c[k]) for k in ("mse_ls", "mse_l2", "mse_sp")},
                **{f"{k}_mc": float(m[k]) for k in ("mse_ls", "mse_l2", "mse_sp")},
            }
        )
    _, alpha_max = theory.beats_least_squares_alpha_range(sigma, p, float(eps.square().sum()))
    paths = {
        "csv": tables.write_csv(out / "linear_regression.csv", rows),
        "md": tables.write_markdown(
            out / "linear_regression.md",
            rows,
            title=(
                f"Linear regression, p={p}, sigma={sigma}, ||eps||^2={float(eps.square().sum()):.3g}, "
                f"L2-SP beats least squares for alpha < {alpha_max:.3g} ({draws} Monte-Carlo draws)"
            ),
            digits=4,
        ),
        "linear_regression": plots.plot_linear_regression_theory(
            alphas,
            closed,
            out / "linear_regression.png",
            monte_carlo=mc,
            alpha_max=alpha_max,
            title=f"Linear regression (p={p}, ‖ε‖² = {eps_scale**2:.2g}·pσ²): L2-SP beats LS for α < "
            f"{alpha_max:.3g}",
        ),
    }
    H = torch.tensor([[3.0, 1.2], [1.2, 0.8]], dtype=torch.float64)
    paths["convex_combination"] = plots.plot_convex_combination(
        H,
        torch.tensor([2.0, 1.0], dtype=torch.float64),
        torch.tensor([-1.0, -0.5], dtype=torch.float64),
        out / "convex_combination.png",
    )
    return paths
