"""A seventh penalty written outside the library, in this file alone, passes the checks of the six built-ins.

Elastic net toward the pre-trained weights, d = w − w0 on S:

    Ω_S = α Σ_j |d_j| + α₂/2 ‖d‖²        (|d| smoothed to √(d² + ε) for the gradient, as L1-SP)

α is ``alpha=``, α₂ is the kind's own option ``alpha2=`` passed through ``l2sp.regularizer``.
"""

import pytest
import torch
from torch import Tensor

import l2sp
from l2sp.penalties import Block, check_coefficient, get_penalty, penalty_names
from penalty_checks import (
    check_add_grad,
    check_attach_trajectory,
    check_decoupled,
    check_gradcheck,
    check_prox,
    check_value,
    make,
    pretrained_and_finetuned,
    reference,
)


@l2sp.register_penalty("elastic-sp")
class ElasticSP(l2sp.Penalty):
    """Ω_S = α‖w − w0‖₁ + α₂/2‖w − w0‖² (smoothed L1 part)."""

    label, formula = "Elastic-SP", "α‖w−w0‖₁ + α₂/2‖w−w0‖²"
    smoothed, has_prox = True, True

    def __init__(self, alpha: float, eps: float = 1e-16, *, alpha2: float = 0.0):
        super().__init__(alpha, eps)
        self.alpha2 = check_coefficient("alpha2", alpha2)

    def is_zero(self) -> bool:
        return not (self.alpha or self.alpha2)

    def describe(self) -> str:
        return f"{self.formula}, α={self.alpha:g}, α₂={self.alpha2:g}"

    def value(self, b: Block, acc: torch.dtype, exact: bool) -> Tensor:
        d = b.diff()
        sq = torch._foreach_mul(d, d)
        abs_d = d if exact else torch._foreach_sqrt(torch._foreach_add(sq, self.eps))
        l1 = torch.stack(torch._foreach_norm(abs_d, 1, dtype=acc)).sum()
        l2 = torch.stack(torch._foreach_norm(sq, 1, dtype=acc)).sum()
        return self.alpha * l1 + self.alpha2 / 2 * l2

    def add_grad_(self, b: Block, out: list[Tensor], scale: float) -> None:  # α d/√(d² + ε) + α₂ d
        _, d = b.diff_into("d")
        _, den = b.work("t")
        torch._foreach_copy_(den, d)
        torch._foreach_mul_(den, d)
        torch._foreach_add_(den, self.eps)
        torch._foreach_sqrt_(den)
        torch._foreach_clamp_min_(den, torch.finfo(den[0].dtype).tiny)
        torch._foreach_addcdiv_(out, d, den, value=self.alpha * scale)
        torch._foreach_add_(out, d, alpha=self.alpha2 * scale)

    def prox_(self, b: Block, lr: float) -> None:  # w0 + soft_threshold(d, lr·α) / (1 + lr·α₂)
        t1, t2 = lr * self.alpha, lr * self.alpha2
        _, d = b.diff_into("d")
        torch._foreach_clamp_min_(d, -t1)
        torch._foreach_clamp_max_(d, t1)
        torch._foreach_sub_(b.shared, d)  # w0 + soft_threshold(d, t1)
        torch._foreach_lerp_(b.shared, b.ref, t2 / (1.0 + t2))


@reference("elastic-sp")
def elastic_reference(d, f, alpha, eps, alpha2):
    """The equation, in float64, on one tensor of S."""
    a = d.abs() if eps is None else (d ** 2 + eps).sqrt()
    return alpha * a.sum().item() + alpha2 / 2 * (d ** 2).sum().item()


KIND = "elastic-sp"
OPTIONS = {"alpha2": 0.7}


# ---------------------------------------------------------------- the checks of the built-ins
@pytest.mark.parametrize("eps", [1e-16, 1e-2])
def test_value_matches_float64_reference(eps):
    check_value(KIND, OPTIONS, eps=eps)


def test_gradcheck():
    check_gradcheck(KIND, OPTIONS)


@pytest.mark.parametrize("include", ["all", "weights"])
def test_add_grad_equals_autograd(include):
    check_add_grad(KIND, include, OPTIONS)


@pytest.mark.parametrize("closure", [False, True], ids=["step", "closure"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_attach_coupled_follows_the_loss_term_trajectory(opt, closure):
    check_attach_trajectory(KIND, opt, closure, OPTIONS)


def test_decoupled_is_a_plain_gradient_step_on_the_penalty():
    check_decoupled(KIND, OPTIONS)


def test_proximal_step_solves_its_definition():
    lin, w0 = check_prox(KIND, OPTIONS)
    torch.testing.assert_close(lin.weight[1], w0["weight"][1], rtol=0, atol=0)  # |d| < lr·α: onto w0


# ---------------------------------------------------------------- registered like a built-in
def test_registered_after_the_builtins():
    assert penalty_names()[:6] == l2sp.KINDS and KIND in penalty_names()[6:]
    assert get_penalty(KIND) is ElasticSP and ElasticSP.label == "Elastic-SP"
    assert l2sp.KINDS == ("l2", "l2-sp", "l2-sp-fisher", "l1-sp", "gl-sp", "gl-sp-fisher")


def test_option_reaches_the_penalty_and_the_summary():
    model, w0 = pretrained_and_finetuned()
    reg = make(KIND, model, w0, alpha=0.3, beta=0.05, alpha2=0.7)
    assert (reg.penalty.alpha, reg.penalty.alpha2) == (0.3, 0.7)
    assert "α₂=0.7" in reg.summary() and "elastic-sp: " in reg.summary()
    only_l2 = make(KIND, model, w0, alpha=0.0, beta=0.0, alpha2=0.7)  # α = 0 but α₂ > 0: not skipped
    d2 = sum(((p - w0[n]) ** 2).sum().item() for n, p in model.named_parameters() if n in reg.shared)
    assert only_l2().item() == pytest.approx(0.35 * d2, rel=1e-12)


def test_bad_options_are_one_line_errors():
    model, w0 = pretrained_and_finetuned()
    with pytest.raises(l2sp.L2SPError, match="alpha2 must be finite and >= 0"):
        make(KIND, model, w0, alpha2=-1.0)
    with pytest.raises(l2sp.L2SPError, match="kind 'elastic-sp' has no option l1_ratio; its options: alpha2"):
        make(KIND, model, w0, l1_ratio=0.5)
    class AnotherElastic(ElasticSP):  # another class under a taken name (the same class again would replace it)
        pass

    with pytest.raises(l2sp.L2SPError, match="'elastic-sp' is already registered"):
        l2sp.register_penalty(KIND)(AnotherElastic)
