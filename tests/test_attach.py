"""reg.attach(optimizer) for every way of stepping: step(), step(closure), LBFGS, GradScaler.step, fused optimizers.

Each is compared with what it must equal: the trajectory of ``loss + reg()`` (coupled), a plain gradient step on
Ω after the loss gradient was taken (decoupled), the same steps without a closure (decoupled, proximal).
"""

import pytest
import torch
from torch import nn

import l2sp
from l2sp import L2SPError
from penalty_checks import make


def setup(dtype=torch.float64, kind="l2-sp"):
    """A small MLP moved away from its snapshot, a new head, a fixed batch, a regularizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)
    w0 = l2sp.snapshot(model)
    model[2] = nn.Linear(8, 3).to(dtype)
    with torch.no_grad():
        model[0].weight.add_(0.2 * torch.randn_like(model[0].weight))
    x, y = torch.randn(16, 6, dtype=dtype), torch.randint(0, 3, (16,))
    reg = make(kind, model, w0, alpha=0.5, beta=0.05, eps=1e-4)
    return model, reg, x, y


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b, rtol=1e-10, atol=1e-12):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def distance(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def closure_for(model, opt, x, y, reg=None, calls=None):
    """A closure as Lightning and LBFGS use one: zero_grad, forward, backward, return the loss."""
    def closure():
        if calls is not None:
            calls.append(1)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if reg is not None:
            loss = loss + reg()
        loss.backward()
        return loss
    return closure


def run(make_opt, mode, steps=3, how="step", kind="l2-sp", dtype=torch.float64):
    """Train ``steps`` steps; mode "loss" adds reg() to the loss, "none" has no penalty, else attach(mode)."""
    model, reg, x, y = setup(dtype, kind)
    opt = make_opt(model.parameters())
    if mode not in ("loss", "none"):
        reg.attach(opt, mode)
    closure = closure_for(model, opt, x, y, reg if mode == "loss" else None)
    for _ in range(steps):
        if how == "closure":
            opt.step(closure)
        elif how == "closure-kwarg":
            opt.step(closure=closure)
        else:
            closure()
            opt.step()
    return weights(model)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def adam(params):
    return torch.optim.Adam(params, lr=0.01)


# ---------------------------------------------------------------- step(closure)
@pytest.mark.parametrize("how", ["closure", "closure-kwarg"])
def test_sgd_momentum_closure_steps_equal_the_loss_plus_reg_trajectory(how):
    """The measured bug: 3 SGD-momentum steps of opt.step(closure) with attach gave the no-penalty weights."""
    target = run(sgd, "loss")
    got = run(sgd, "coupled", how=how)
    assert_same(got, target)
    assert distance(got, run(sgd, "none", how=how)) > 1e-2  # the penalty is really there


def test_closure_step_returns_loss_plus_omega():
    model, reg, x, y = setup()
    opt = sgd(model.parameters())
    reg.attach(opt)
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(x), y) + reg()
    returned = opt.step(closure_for(model, opt, x, y))
    assert returned.item() == pytest.approx(expected.item(), rel=1e-14)
    assert not returned.requires_grad


@pytest.mark.parametrize("kind", ["l2-sp", "l1-sp", "gl-sp"])
@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
def test_lbfgs_sees_the_penalized_objective_at_every_evaluation(line_search, kind):
    """LBFGS evaluates the closure several times per step: every gradient and every loss it sees is loss + Ω."""
    def lbfgs(params):
        return torch.optim.LBFGS(params, lr=0.5, max_iter=5, line_search_fn=line_search)

    calls = []
    model, reg, x, y = setup(kind=kind)
    opt = lbfgs(model.parameters())
    reg.attach(opt)
    closure = closure_for(model, opt, x, y, calls=calls)
    for _ in range(3):
        opt.step(closure)
    assert len(calls) > 3  # several evaluations per step
    # LBFGS amplifies round-off (add_grad_ and autograd differ in the last bits): still far below the penalty
    assert_same(weights(model), run(lbfgs, "loss", how="closure", kind=kind), rtol=1e-7, atol=1e-9)


def test_decoupled_with_a_closure_shrinks_after_the_gradient_like_adamw():
    """AdamW order: loss gradient at the un-shrunk w, then w ← w − lr·∇Ω(w), then Adam's update."""
    model, reg, x, y = setup()
    opt = adam(model.parameters())
    for _ in range(3):
        closure_for(model, opt, x, y)()  # gradient at w
        shrink_by_hand(model, reg, 0.01)
        opt.step()
    expected = weights(model)
    assert_same(run(adam, "decoupled", how="closure"), expected)
    assert_same(run(adam, "decoupled", how="step"), expected)


class TwoEvaluations(torch.optim.Optimizer):
    """An optimizer that evaluates its closure twice per step (as line searches do), then steps like plain SGD.

    (Not a subclass of SGD: calling ``super().step()`` would run the step hooks a second time.)"""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            closure()
            loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"])
        return loss


def shrink_by_hand(model, reg, lr):
    """w ← w − lr·∇Ω(w), ∇Ω by autograd."""
    grads = torch.autograd.grad(reg(), list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p.sub_(lr * g)


def test_decoupled_shrinks_once_per_step_after_the_first_evaluation():
    model, reg, x, y = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    closure = closure_for(model, opt, x, y)
    for _ in range(3):
        closure()
        shrink_by_hand(model, reg, 0.1)
        closure()  # the second evaluation sees the shrunk weights
        opt.step()
    expected = weights(model)

    def two(params):
        return TwoEvaluations(params, lr=0.1)

    assert_same(run(two, "decoupled", how="closure"), expected)


def test_decoupled_shrinks_even_if_the_optimizer_never_calls_its_closure():
    class Lazy(torch.optim.SGD):
        def step(self, closure=None):
            return super().step()  # ignores the closure

    model, reg, x, y = setup()
    opt = Lazy(model.parameters(), lr=0.1)
    reg.attach(opt, "decoupled")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    grads = torch.autograd.grad(reg(), list(model.parameters()))
    expected = [p.detach() - 0.1 * g for p, g in zip(model.parameters(), grads)]
    opt.step(lambda: None)
    assert_same(weights(model), expected)


@pytest.mark.parametrize("kind", ["l2-sp", "l1-sp", "gl-sp"])
def test_proximal_with_a_closure_equals_proximal_without(kind):
    assert_same(run(sgd, "proximal", how="closure", kind=kind), run(sgd, "proximal", how="step", kind=kind))


# ---------------------------------------------------------------- GradScaler
def scaled_run(make_opt, mode, steps=4, inf_at=None, kind="l2-sp"):
    """float32 training through GradScaler.step; ``inf_at``: a step whose gradient is made inf (skipped)."""
    model, reg, x, y = setup(torch.float32, kind)
    opt = make_opt(model.parameters())
    if mode != "loss":
        reg.attach(opt, mode)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    history = []
    for i in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + (reg() if mode == "loss" else 0)
        scaler.scale(loss).backward()
        if i == inf_at:
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        history.append(weights(model))
    return history


def unscaled_run(make_opt, mode, steps=4, kind="l2-sp"):
    model, reg, x, y = setup(torch.float32, kind)
    opt = make_opt(model.parameters())
    if mode != "loss":
        reg.attach(opt, mode)
    closure = closure_for(model, opt, x, y, reg if mode == "loss" else None)
    history = []
    for _ in range(steps):
        closure()
        opt.step()
        history.append(weights(model))
    return history


@pytest.mark.parametrize("mode", ["coupled", "decoupled", "proximal"])
def test_grad_scaler_step_applies_the_penalty_to_unscaled_gradients(mode):
    assert_same(scaled_run(sgd, mode)[-1], unscaled_run(sgd, mode)[-1], rtol=1e-5, atol=1e-6)
    assert_same(scaled_run(sgd, "coupled")[-1], unscaled_run(sgd, "loss")[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("mode", ["coupled", "decoupled", "proximal"])
def test_grad_scaler_skipped_step_skips_the_penalty(mode, fused):
    def opt(params):
        return torch.optim.Adam(params, lr=0.01, fused=fused)

    history = scaled_run(opt, mode, steps=3, inf_at=1)
    assert_same(history[1], history[0], rtol=0, atol=0)  # the skipped step moved nothing
    assert distance(history[2], history[1]) > 1e-4


@pytest.mark.parametrize("mode", ["coupled", "decoupled", "proximal"])
def test_fused_optimizer_under_grad_scaler_gets_the_gradient_scaled_like_its_own(mode):
    """fused=True optimizers unscale inside their step: ∇Ω is added at the loss scale."""
    def fused(params):
        return torch.optim.Adam(params, lr=0.01, fused=True)

    def plain(params):
        return torch.optim.Adam(params, lr=0.01)

    assert_same(scaled_run(fused, mode)[-1], unscaled_run(plain, mode)[-1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- attaching
def test_attaching_twice_refuses_in_one_line_and_remove_allows_again():
    model, reg, x, y = setup()
    opt = sgd(model.parameters())
    handle = reg.attach(opt)
    for mode in ("coupled", "decoupled"):
        with pytest.raises(L2SPError, match="already attached to this optimizer") as info:
            reg.attach(opt, mode)
        assert "\n" not in str(info.value)
    handle.remove()
    handle.remove()  # idempotent
    reg.attach(opt)  # fine again
    reg.attach(sgd(model.parameters()))  # another optimizer: fine


def test_two_regularizers_on_one_optimizer_add_up():
    model, reg, x, y = setup()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    other = make("l2", model, None, alpha=0.2, beta=0.0)
    opt = sgd(model.parameters())
    reg.attach(opt)
    other.attach(opt)
    closure = closure_for(model, opt, x, y)
    for _ in range(3):
        opt.step(closure)
    got = weights(model)
    model.load_state_dict(start)
    opt = sgd(model.parameters())

    def both():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + reg() + other()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(both)
    assert_same(got, weights(model))


def test_decoupled_follows_a_parameter_group_added_after_attach():
    model, reg, x, y = setup()
    head = list(model[2].parameters())
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    reg.attach(opt, "decoupled")
    opt.add_param_group({"params": head, "lr": 0.5})
    before = [p.detach().clone() for p in head]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(head, before):  # β/2‖w‖² on the new head: w ← w − lr·β·w
        torch.testing.assert_close(p.detach(), b * (1 - 0.5 * 0.05), rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", ["decoupled", "proximal"])
def test_lr_followed_after_optimizer_load_state_dict(mode):
    """load_state_dict replaces the optimizer's group dicts: the penalty must read the new groups' lr."""
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    w0 = {"w": torch.zeros(3, dtype=torch.float64)}
    model = torch.nn.Module()
    model.w = w
    reg = l2sp.regularizer("l2-sp", model, w0, alpha=1.0, beta=0.0)
    opt = torch.optim.SGD([w], lr=0.0)
    reg.attach(opt, mode=mode)
    w.grad = torch.zeros_like(w)
    opt.step()  # lr 0: nothing moves, the handle has cached the groups
    opt.load_state_dict(opt.state_dict())
    opt.param_groups[0]["lr"] = 0.5
    w.grad = torch.zeros_like(w)
    opt.step()
    expected = 0.5 if mode == "decoupled" else 1 / 1.5  # w − lr·α·w, or w / (1 + lr·α)
    torch.testing.assert_close(w.detach(), torch.full((3,), expected, dtype=torch.float64))
