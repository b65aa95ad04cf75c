"""Section 5.5: closed forms against Monte-Carlo and exact matrix algebra; the L2-SP quadratic optimum."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from l2sp.analysis import theory
from l2sp.errors import L2SPError

P_DIM, SIGMA = 6, 0.7


def _problem(eps_scale: float, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    w_star = 2 * torch.randn(P_DIM, generator=g, dtype=torch.float64)
    u = torch.randn(P_DIM, generator=g, dtype=torch.float64)
    eps = u / u.norm() * eps_scale * SIGMA * P_DIM**0.5
    return w_star, eps, g


@pytest.mark.parametrize("alpha", [0.1, 1.0, 5.0])
def test_closed_forms_match_exact_algebra(alpha):
    w_star, eps, g = _problem(1.3)
    c = theory.linear_regression_closed_forms(alpha, SIGMA, w_star, eps)
    X = theory.orthonormal_design(15, P_DIM, generator=g)
    torch.testing.assert_close(X.T @ X, torch.eye(P_DIM, dtype=torch.float64))
    Ey = (X @ w_star)[None]  # the estimators are linear in y: their mean is the estimate at E[y]
    torch.testing.assert_close(c["mean_ls"], theory.regularized_least_squares(X, Ey, 0.0)[0])
    torch.testing.assert_close(c["mean_l2"], theory.regularized_least_squares(X, Ey, alpha)[0])
    torch.testing.assert_close(c["mean_sp"], theory.regularized_least_squares(X, Ey, alpha, w_star + eps)[0])
    # Cov = σ² A⁻¹XᵀX A⁻¹ with A = XᵀX + αI
    A_inv = torch.linalg.inv(X.T @ X + alpha * torch.eye(P_DIM, dtype=torch.float64))
    cov = SIGMA**2 * A_inv @ X.T @ X @ A_inv
    torch.testing.assert_close(cov, c["var_sp"] * torch.eye(P_DIM, dtype=torch.float64))
    assert c["var_l2"] == c["var_sp"] and c["var_ls"] == pytest.approx(SIGMA**2)
    assert c["bias2_sp"] == pytest.approx(float((c["mean_sp"] - w_star).square().sum()))
    assert c["bias2_l2"] == pytest.approx(float((c["mean_l2"] - w_star).square().sum()))
    assert c["mse_sp"] == pytest.approx(c["bias2_sp"] + float(torch.trace(cov)))
    assert c["mse_ls"] == pytest.approx(P_DIM * SIGMA**2)


@pytest.mark.parametrize("alpha", [0.3, 2.0])
def test_closed_forms_match_monte_carlo(alpha):
    w_star, eps, g = _problem(1.3)
    draws = 20000
    c = theory.linear_regression_closed_forms(alpha, SIGMA, w_star, eps)
    m = theory.linear_regression_monte_carlo(alpha, SIGMA, w_star, eps, draws=draws, generator=g)
    for key in ("ls", "l2", "sp"):
        se = math.sqrt(c[f"var_{key}"] / draws)  # standard error of each mean coordinate
        assert (m[f"mean_{key}"] - c[f"mean_{key}"]).abs().max() < 5 * se
        assert m[f"var_{key}"] == pytest.approx(c[f"var_{key}"], rel=0.03)
        assert m[f"offdiag_{key}"] < 0.05 * c[f"var_{key}"]
        assert m[f"mse_{key}"] == pytest.approx(c[f"mse_{key}"], rel=0.03)


def test_alpha_range_where_l2sp_beats_least_squares():
    w_star, eps, g = _problem(1.5)
    e2 = float(eps.square().sum())
    lo, hi = theory.beats_least_squares_alpha_range(SIGMA, P_DIM, e2)
    assert lo == 0 and hi == pytest.approx(2 * P_DIM * SIGMA**2 / (e2 - P_DIM * SIGMA**2))
    # closed-form MSE difference changes sign exactly at hi
    for a, beats in ((0.5 * hi, True), (0.999 * hi, True), (1.001 * hi, False), (3 * hi, False)):
        c = theory.linear_regression_closed_forms(a, SIGMA, w_star, eps)
        assert (c["mse_sp"] < c["mse_ls"]) is beats
    # and Monte-Carlo agrees well inside / outside the range
    for a, beats in ((0.4 * hi, True), (4 * hi, False)):
        m = theory.linear_regression_monte_carlo(a, SIGMA, w_star, eps, draws=20000, generator=g)
        assert (m["mse_sp"] < m["mse_ls"]) is beats
    # small ε: every α helps
    w_star, eps, _ = _problem(0.9)
    assert theory.beats_least_squares_alpha_range(SIGMA, P_DIM, float(eps.square().sum()))[1] == math.inf
    for a in np.logspace(-3, 6, 10):
        c = theory.linear_regression_closed_forms(float(a), SIGMA, w_star, eps)
        assert c["mse_sp"] < c["mse_ls"]


def _random_psd(p, g, rank=None):
    A = torch.randn(p, rank or p, generator=g, dtype=torch.float64)
    return A @ A.T


@pytest.mark.parametrize("alpha", [0.01, 0.5, 20.0])
def test_quadratic_optimum_is_eigen_convex_combination(alpha):
    g = torch.Generator().manual_seed(3)
    for rank in (None, 3):  # full rank and singular Hessians
        H = _random_psd(7, g, rank)
        w_hat, w0 = (
            torch.randn(7, generator=g, dtype=torch.float64),
            torch.randn(7, generator=g, dtype=torch.float64),
        )
        w = theory.l2sp_quadratic_optimum(H, w_hat, w0, alpha)
        torch.testing.assert_close(theory.l2sp_quadratic_optimum_eigen(H, w_hat, w0, alpha), w)

        Hn, wh, w0n = H.numpy(), w_hat.numpy(), w0.numpy()

        def f(v, Hn=Hn, wh=wh, w0n=w0n):
            d = v - wh
            return 0.5 * d @ Hn @ d + 0.5 * alpha * np.sum((v - w0n) ** 2)

        def grad(v, Hn=Hn, wh=wh, w0n=w0n):
            return Hn @ (v - wh) + alpha * (v - w0n)

        ref = minimize(f, np.zeros(7), jac=grad, method="BFGS", options={"gtol": 1e-11}).x
        np.testing.assert_allclose(w.numpy(), ref, atol=1e-6)
        # along each eigenvector: weights in [0, 1] summing to 1, ŵ-weight λ/(λ+α)
        P, a, b = theory.convex_weights(H, alpha)
        torch.testing.assert_close(a + b, torch.ones_like(a))
        assert ((a >= 0) & (a <= 1)).all()
        lam = torch.linalg.eigvalsh(H).clamp(min=0)
        torch.testing.assert_close(a, lam / (lam + alpha))
        coords, c_hat, c0 = P.T @ w, P.T @ w_hat, P.T @ w0
        torch.testing.assert_close(coords, a * c_hat + b * c0)
        assert (
            (coords - torch.minimum(c_hat, c0) >= -1e-9) & (torch.maximum(c_hat, c0) - coords >= -1e-9)
        ).all()
    # L2 is the same with w0 = 0: ridge toward the origin
    H = _random_psd(5, g)
    w_hat = torch.randn(5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        theory.l2sp_quadratic_optimum(H, w_hat, torch.zeros(5, dtype=torch.float64), alpha),
        torch.linalg.solve(H + alpha * torch.eye(5, dtype=torch.float64), H @ w_hat),
    )


def test_theory_bad_input():
    H = torch.eye(3, dtype=torch.float64)
    v = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(L2SPError, match="alpha"):
        theory.l2sp_quadratic_optimum(H, v, v, -1.0)
    with pytest.raises(L2SPError, match="square"):
        theory.l2sp_quadratic_optimum(torch.eye(2, dtype=torch.float64), v, v, 1.0)
    with pytest.raises(L2SPError, match="positive semi-definite"):
        theory.convex_weights(-H, 1.0)
    with pytest.raises(L2SPError, match="n >= p"):
        theory.orthonormal_design(2, 3)
    with pytest.raises(L2SPError):
        theory.beats_least_squares_alpha_range(-1.0, 3, 1.0)
