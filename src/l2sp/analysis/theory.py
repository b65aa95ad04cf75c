"""Section 5.5 of the paper, as functions: what L2-SP does to a quadratic problem and to linear regression.

Quadratic approximation. Around the unregularized optimum ŵ with Hessian H = PΛPᵀ, the minimizer of
    ½ (w − ŵ)ᵀ H (w − ŵ) + α/2 ‖w − w0‖²
solves (H + αI) w̃ = H ŵ + α w0, i.e. Pᵀw̃ = (Λ + αI)⁻¹ΛPᵀŵ + α(Λ + αI)⁻¹Pᵀw0: along eigenvector i,
a convex combination of ŵ and w0 with weights λ_i/(λ_i + α) and α/(λ_i + α) (L2: the same with w0 = 0).

Linear regression with an orthonormal design (XᵀX = I), E[y] = Xw*, Var[y] = σ²I, w0 = w* + ε:
    ŵ = Xᵀy,  ŵ_L2 = Xᵀy/(1 + α),  ŵ_SP = Xᵀy/(1 + α) + α/(1 + α)·w0
    E: w*, w*/(1 + α), w* + α/(1 + α)·ε;   Cov: σ²I, σ²/(1 + α)²·I (both regularized)
    bias²: 0, α²‖w*‖²/(1 + α)², α²‖ε‖²/(1 + α)²;   MSE = bias² + trace(Cov)
L2-SP beats least squares (lower MSE) for every α > 0 when ‖ε‖² ≤ pσ², else for 0 < α < 2pσ²/(‖ε‖² − pσ²).
"""

from __future__ import annotations

import math

import torch

from l2sp.errors import L2SPError


def _check_alpha(alpha: float) -> None:
    if not alpha >= 0:
        raise L2SPError(f"alpha must be >= 0, got {alpha}; pass a non-negative penalty strength")


# ---------------------------------------------------------------------------------------- quadratic model
def l2sp_quadratic_optimum(
    H: torch.Tensor, w_hat: torch.Tensor, w0: torch.Tensor, alpha: float
) -> torch.Tensor:
    """argmin_w ½(w − ŵ)ᵀH(w − ŵ) + α/2‖w − w0‖², by solving (H + αI) w = Hŵ + αw0."""
    _check_alpha(alpha)
    if H.dim() != 2 or H.shape[0] != H.shape[1] or H.shape[0] != w_hat.numel() or w0.shape != w_hat.shape:
        raise L2SPError("H must be a square (p, p) matrix and w_hat, w0 vectors of length p")
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.linalg.solve(H + alpha * eye, H @ w_hat + alpha * w0)


def convex_weights(H: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, λ/(λ + α), α/(λ + α)) for the symmetric positive semi-definite H = PΛPᵀ."""
    _check_alpha(alpha)
    lam, P = torch.linalg.eigh(H)
    if lam.min() < -1e-10 * max(1.0, float(lam.abs().max())):
        raise L2SPError("H is not positive semi-definite; the quadratic model needs a convex optimum")
    lam = lam.clamp(min=0)
    return P, lam / (lam + alpha), alpha / (lam + alpha)


def l2sp_quadratic_optimum_eigen(
    H: torch.Tensor, w_hat: torch.Tensor, w0: torch.Tensor, alpha: float
) -> torch.Tensor:
    """The same optimum written as the paper does: w̃ = P[diag(λ/(λ+α))Pᵀŵ + diag(α/(λ+α))Pᵀw0]."""
    P, a, b = convex_weights(H, alpha)
    return P @ (a * (P.T @ w_hat) + b * (P.T @ w0))


# -------------------------------------------------------------------------------------- linear regression
def linear_regression_closed_forms(
    alpha: float, sigma: float, w_star: torch.Tensor, eps: torch.Tensor
) -> dict[str, torch.Tensor | float]:
    """Means, per-coordinate variances, squared biases and MSEs of the LS, L2 and L2-SP estimators.

    Orthonormal design, noise σ, true weights w*, starting point w0 = w* + ε, p = len(w*).
    """
    _check_alpha(alpha)
    if sigma < 0 or w_star.shape != eps.shape or w_star.dim() != 1:
        raise L2SPError("need sigma >= 0 and vectors w_star, eps of the same length")
    p, s = w_star.numel(), 1.0 + alpha
    var_reg = sigma**2 / s**2
    bias2_l2 = alpha**2 * float(w_star.square().sum()) / s**2
    bias2_sp = alpha**2 * float(eps.square().sum()) / s**2
    return {
        "mean_ls": w_star.clone(),
        "mean_l2": w_star / s,
        "mean_sp": w_star + alpha / s * eps,
        "var_ls": sigma**2,
        "var_l2": var_reg,
        "var_sp": var_reg,
        "bias2_ls": 0.0,
        "bias2_l2": bias2_l2,
        "bias2_sp": bias2_sp,
        "mse_ls": p * sigma**2,
        "mse_l2": bias2_l2 + p * var_reg,
        "mse_sp": bias2_sp + p * var_reg,
    }


def beats_least_squares_alpha_range(sigma: float, p: int, eps_norm2: float) -> tuple[float, float]:
    """The open interval (0, α_max) of α where MSE(ŵ_SP) < MSE(ŵ); α_max = inf when ‖ε‖² ≤ pσ².

    From α²‖ε‖² + pσ² < pσ²(1 + α)²  ⇔  α(‖ε‖² − pσ²) < 2pσ².
    """
    if sigma < 0 or p < 1 or eps_norm2 < 0:
        raise L2SPError("need sigma >= 0, p >= 1 and ||eps||^2 >= 0")
    noise = p * sigma**2
    if eps_norm2 <= noise:
        return 0.0, math.inf
    return 0.0, 2 * noise / (eps_norm2 - noise)


def orthonormal_design(
    n: int, p: int, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """A random n×p matrix X with XᵀX = I (n ≥ p), from the QR decomposition of a Gaussian matrix."""
    if n < p:
        raise L2SPError(f"an orthonormal design needs n >= p, got n={n}, p={p}")
    q, _ = torch.linalg.qr(torch.randn(n, p, generator=generator, dtype=dtype))
    return q


def regularized_least_squares(
    X: torch.Tensor, y: torch.Tensor, alpha: float, w0: torch.Tensor | None = None
) -> torch.Tensor:
    """argmin_w ½‖y − Xw‖² + α/2‖w − w0‖² for a batch of targets y (…, n): solves (XᵀX + αI)w = Xᵀy + αw0."""
    _check_alpha(alpha)
    p = X.shape[1]
    A = X.T @ X + alpha * torch.eye(p, dtype=X.dtype, device=X.device)
    rhs = y @ X  # (…, p): one Xᵀy per row
    if w0 is not None:
        rhs = rhs + alpha * w0
    return torch.linalg.solve(A, rhs.unsqueeze(-1)).squeeze(-1)


def linear_regression_monte_carlo(
    alpha: float,
    sigma: float,
    w_star: torch.Tensor,
    eps: torch.Tensor,
    *,
    n: int | None = None,
    draws: int = 20000,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor | float]:
    """Empirical counterparts of :func:`linear_regression_closed_forms` over ``draws`` noisy datasets.

    Each draw: y = Xw* + σ·noise with one fixed orthonormal X (n×p); the three estimators are computed by
    solving their normal equations (not with the closed forms). Returns means, per-coordinate variances
    (averaged over coordinates), the largest off-diagonal covariance, squared biases and MSEs.
    """
    w_star, eps = w_star.to(torch.float64), eps.to(torch.float64)
    p = w_star.numel()
    X = orthonormal_design(n or 2 * p, p, generator=generator)
    y = X @ w_star + sigma * torch.randn(draws, X.shape[0], generator=generator, dtype=torch.float64)
    estimates = {
        "ls": regularized_least_squares(X, y, 0.0),
        "l2": regularized_least_squares(X, y, alpha),
        "sp": regularized_least_squares(X, y, alpha, w_star + eps),
    }
    out: dict[str, torch.Tensor | float] = {}
    for key, w in estimates.items():
        mean = w.mean(0)
        cov = torch.cov(w.T)
        off = cov - torch.diag(torch.diag(cov))
        out[f"mean_{key}"] = mean
        out[f"var_{key}"] = float(torch.diag(cov).mean())
        out[f"offdiag_{key}"] = float(off.abs().max())
        out[f"bias2_{key}"] = float((mean - w_star).square().sum())
        out[f"mse_{key}"] = float((w - w_star).square().sum(1).mean())
    return out
