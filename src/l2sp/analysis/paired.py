"""Paired comparisons of two methods run with the same seeds.

With the same seed, two penalties see the same data order, augmentation and head initialization, so the
per-seed differences D_i = a_i − b_i remove the variance the methods share. For n seeds:

    mean D̄ = Σ D_i / n,   s = √(Σ (D_i − D̄)² / (n − 1)),   t = D̄ / (s / √n)   (n − 1 degrees of freedom)

- the paired t-test: p = 2·P(T_{n−1} ≥ |t|), and the interval D̄ ± t_{1−(1−c)/2, n−1} · s/√n;
- the exact sign-flip (permutation) test: under H0 each D_i is as likely to be −D_i, so p is the share of the
  2ⁿ sign patterns whose |mean| reaches the observed one. It assumes no normality, but with n seeds it cannot go
  below 2/2ⁿ (0.0625 for 5 seeds): it says how much the seeds alone can tell.

Everything is computed here (no scipy), so the tests can check it against scipy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from l2sp.errors import L2SPError

#: sign-flip tests enumerate every pattern up to this many pairs (2²⁰ ≈ 10⁶ patterns)
EXACT_MAX = 20


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T ≥ t) for Student's t with ``df`` degrees of freedom: ½·I_{df/(df+t²)}(df/2, ½) for t ≥ 0
    (near t = 0 through the complement ½ − ½·I_{t²/(df+t²)}(½, df/2), which keeps its precision)."""
    t2 = t * t
    if t2 < df:
        tail = 0.5 - 0.5 * betainc(0.5, df / 2.0, t2 / (df + t2))
    else:
        tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t2))
    return tail if t >= 0 else 1.0 - tail


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t (bisection on :func:`t_sf`, to 1e-12)."""
    if not 0.0 < q < 1.0:
        raise L2SPError(f"a quantile needs 0 < q < 1, got {q}")
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if 1.0 - t_sf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Two-sided exact sign-flip p-value of the mean of ``diffs`` (every 2ⁿ sign pattern)."""
    d = [float(x) for x in diffs]
    n = len(d)
    if n == 0:
        raise L2SPError("a sign-flip test needs at least one pair")
    if n > EXACT_MAX:
        raise L2SPError(f"{n} pairs: the exact sign-flip test enumerates at most {EXACT_MAX}; compare fewer seeds")
    observed = abs(sum(d)) * (1 - 1e-12)  # ties with the observed statistic count as "as extreme"
    hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= observed
               for signs in itertools.product((1.0, -1.0), repeat=n))
    return hits / 2**n


@dataclass(frozen=True)
class Paired:
    """The comparison of method a with method b over n shared seeds (differences a − b)."""

    n: int
    mean: float
    std: float
    low: float
    high: float
    p_t: float
    p_sign: float
    confidence: float = 0.95

    @property
    def significant(self) -> bool:
        """The paired t-test rejects equality at level 1 − confidence (the interval excludes 0)."""
        return self.p_t < 1.0 - self.confidence

    def to_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant}

    def __str__(self) -> str:
        mark = "*" if self.significant else ""
        return f"{self.mean:+.2f} ± {self.std:.2f}{mark}"


def paired(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95) -> Paired:
    """Compare ``a`` and ``b``, two lists of per-seed results in the same seed order (see the module doc)."""
    if len(a) != len(b):
        raise L2SPError(f"paired results need the same seeds on both sides, got {len(a)} and {len(b)} values")
    if len(a) < 2:
        raise L2SPError(f"a paired comparison needs at least 2 seeds, got {len(a)}; run more seeds")
    if not 0.0 < confidence < 1.0:
        raise L2SPError(f"confidence must lie in (0, 1), got {confidence}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = std / math.sqrt(n)
    if se == 0.0:
        p_t = 1.0 if mean == 0.0 else 0.0
        half = 0.0
    else:
        p_t = min(1.0, 2.0 * t_sf(abs(mean) / se, n - 1))
        half = t_quantile(1.0 - (1.0 - confidence) / 2.0, n - 1) * se
    return Paired(n, mean, std, mean - half, mean + half, p_t, sign_flip_p(d), confidence)
