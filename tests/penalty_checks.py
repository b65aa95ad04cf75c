"""The checks every penalty kind must pass, built-in or registered by a user (tests/test_custom_penalty.py).

A kind is checked against an independent float64 reference of its Ω_S, written tensor by tensor from its
equation and registered here with :func:`reference` (no fall-through: a kind without one fails loudly). What
a check needs to know about a kind it reads from the kind's flags (``needs_w0``, ``needs_fisher``,
``grouped``, ``smoothed``, ``has_prox``), never from its name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

import l2sp
from l2sp.penalties import get_penalty

# kind -> Ω_S of one tensor: f(d, F, alpha, eps, **options) -> float, d = w − w0 (w for kinds without w0), in
# float64; F the Fisher entry or None; eps None for the exact value, else the smoothing
REFERENCES: dict[str, Callable[..., float]] = {}


def reference(kind: str):
    """Register the float64 reference of ``kind``'s penalty on one tensor of S."""
    def decorator(fn):
        REFERENCES[kind] = fn
        return fn
    return decorator


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The groups of a tensor as rows: one per index of dim 0 (≥ 2 dims), one per element (a vector)."""
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(-1, 1)


@reference("l2")
@reference("l2-sp")
def _quadratic(d, f, alpha, eps):
    return alpha / 2 * (d ** 2).sum().item()


@reference("l2-sp-fisher")
def _quadratic_fisher(d, f, alpha, eps):
    return alpha / 2 * (f * d ** 2).sum().item()


@reference("l1-sp")
def _l1(d, f, alpha, eps):
    a = d.abs() if eps is None else (d ** 2 + eps).sqrt()
    return alpha * a.sum().item()


@reference("gl-sp")
@reference("gl-sp-fisher")
def _group_lasso(d, f, alpha, eps):
    rows, total = _rows(d), 0.0
    fr = None if f is None else _rows(f)
    for i in range(rows.shape[0]):  # one group at a time, s_g = √p_g
        sq = (rows[i] ** 2 if fr is None else fr[i] * rows[i] ** 2).sum().item()
        norm = math.sqrt(sq) if eps is None else math.sqrt(sq + eps)
        total += alpha * math.sqrt(rows.shape[1]) * norm
    return total


# ---------------------------------------------------------------- models and regularizers
def tiny_net(n_out=5, dtype=torch.float64):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, n_out),
    ).to(dtype)


def pretrained_and_finetuned(dtype=torch.float64, jitter=0.3):
    """A 'source' net, its snapshot, then a new head and moved weights (w != w0 everywhere)."""
    model = tiny_net(7, dtype)
    w0 = l2sp.snapshot(model)
    model[7] = nn.Linear(6, 3).to(dtype)  # new head: S̄
    with torch.no_grad():
        for p in model.parameters():
            p.add_(jitter * torch.randn_like(p))
    return model, w0


def fisher_for(model, dtype=torch.float64):
    return {n: torch.rand(p.shape, dtype=dtype) + 0.1 for n, p in model.named_parameters()}


def make(kind, model, w0, fisher=None, **kw):
    """``l2sp.regularizer`` with the test's default coefficients; w0 and F passed when the kind uses them."""
    kw.setdefault("alpha", 0.3)
    kw.setdefault("beta", 0.05)
    cls = get_penalty(kind)
    return l2sp.regularizer(kind, model, w0 if cls.needs_w0 else None,
                            fisher=fisher if cls.needs_fisher else None, **kw)


def reference_value(kind, model, w0, fisher, alpha, beta, eps=None, options=None):
    """Ω by the kind's equation, parameter by parameter, in float64 (eps: smoothing, None for the exact value).

    As :func:`make` builds them: a kind without w0 has all of the model in S (reference 0)."""
    ref_fn, cls = REFERENCES[kind], get_penalty(kind)
    total = 0.0
    for name, p in model.named_parameters():
        w = p.detach().double()
        in_s = not cls.needs_w0 or (name in w0 and w0[name].shape == p.shape)
        if not in_s:
            total += beta / 2 * (w ** 2).sum().item()
            continue
        d = w - w0[name].double() if cls.needs_w0 else w
        f = fisher[name].double() if cls.needs_fisher else None
        total += ref_fn(d, f, alpha, eps, **(options or {}))
    return total


# ---------------------------------------------------------------- the checks
def check_value(kind, options=None, eps=1e-16):
    """reg.exact() and reg() against the float64 reference (smoothed with eps for smoothed kinds)."""
    options = options or {}
    model, w0 = pretrained_and_finetuned()
    fisher = fisher_for(model)
    reg = make(kind, model, w0, fisher, eps=eps, **options)
    exact = reference_value(kind, model, w0, fisher, 0.3, 0.05, options=options)
    assert math.isclose(reg.exact().item(), exact, rel_tol=1e-12), (reg.exact().item(), exact)
    smooth = get_penalty(kind).smoothed
    smoothed = reference_value(kind, model, w0, fisher, 0.3, 0.05, eps=eps if smooth else None, options=options)
    assert math.isclose(reg().item(), smoothed, rel_tol=1e-12), (reg().item(), smoothed)
    if smooth and eps >= 1e-4:
        assert reg().item() > reg.exact().item()


def check_gradcheck(kind, options=None):
    """The autograd gradient of reg() against finite differences (float64)."""
    model, w0 = pretrained_and_finetuned()
    reg = make(kind, model, w0, fisher_for(model), eps=1e-3, **(options or {}))
    params = tuple(model.parameters())
    # gradcheck perturbs the inputs in place: they are the very tensors the regularizer reads
    assert torch.autograd.gradcheck(lambda *_: reg(), params, eps=1e-6, atol=1e-7, rtol=1e-5)


def check_add_grad(kind, include="all", options=None):
    """reg.add_grad_() adds exactly the autograd gradient of reg() to existing gradients."""
    model, w0 = pretrained_and_finetuned()
    reg = make(kind, model, w0, fisher_for(model), include=include, **(options or {}))
    params = list(model.parameters())
    expected = torch.autograd.grad(reg(), params, allow_unused=True)
    start = [torch.randn_like(p) for p in params]
    for p, s in zip(params, start):
        p.grad = s.clone()
    reg.add_grad_()
    for p, s, e in zip(params, start, expected):
        e = torch.zeros_like(p) if e is None else e
        torch.testing.assert_close(p.grad, s + e, rtol=1e-10, atol=1e-12)


def train(model, reg_mode, kind, w0, steps=6, opt="sgd", closure=False, options=None):
    """A few optimizer steps on a fixed batch, with the penalty as a loss term or attached."""
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 9, 9, dtype=torch.float64), torch.randint(0, 3, (8,))
    reg = make(kind, model, w0, fisher_for(model), eps=1e-4, **(options or {}))
    if opt == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    handle = reg.attach(optimizer, reg_mode) if reg_mode != "loss" else None

    def step_loss():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if reg_mode == "loss":
            loss = loss + reg()
        loss.backward()
        return loss

    for _ in range(steps):
        if closure:
            optimizer.step(step_loss)
        else:
            step_loss()
            optimizer.step()
    if handle:
        handle.remove()
    return [p.detach().clone() for p in model.parameters()]


def check_attach_trajectory(kind, opt="sgd", closure=False, options=None):
    """attach(optimizer) follows the trajectory of loss + reg(), with step() or step(closure)."""
    torch.manual_seed(0)
    model, w0 = pretrained_and_finetuned(jitter=0.0)  # start at w0, as fine-tuning does
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = train(model, "loss", kind, w0, opt=opt, options=options)
    model.load_state_dict(state)
    b = train(model, "coupled", kind, w0, opt=opt, closure=closure, options=options)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)
    moved = max((x - state[n]).abs().max().item() for (n, _), x in zip(model.named_parameters(), a))
    assert moved > 1e-3  # the trajectory went somewhere


def check_decoupled(kind, options=None):
    """mode='decoupled' is w ← w − lr·∇Ω(w), then the optimizer's update with the loss gradient."""
    model, w0 = pretrained_and_finetuned()
    reg = make(kind, model, w0, fisher_for(model), eps=1e-4, **(options or {}))
    params = list(model.parameters())
    lr = 0.01
    penalty_grad = torch.autograd.grad(reg(), params)
    loss_grad = [torch.randn_like(p) for p in params]
    expected_w = [p.detach() - lr * g for p, g in zip(params, penalty_grad)]
    # Adam's first step moves each weight by lr·sign(grad) (up to eps): applied to the shrunk weights
    opt = torch.optim.Adam(params, lr=lr)
    reg.attach(opt, "decoupled")
    for p, g in zip(params, loss_grad):
        p.grad = g.clone()
    opt.step()
    for p, e, g in zip(params, expected_w, loss_grad):
        torch.testing.assert_close(p.detach(), e - lr * g / (g.abs() + 1e-8), rtol=1e-7, atol=1e-9)


def _nelder_mead(f, v):
    """argmin f over a small vector, derivative-free, from several starts (float64)."""
    from scipy.optimize import minimize

    starts = [v, v * 0.5, np.zeros(len(v)) + v.mean()]
    runs = [minimize(f, x0, method="Nelder-Mead", options={"xatol": 1e-11, "fatol": 1e-15, "maxiter": 20000})
            for x0 in starts]
    return min(runs, key=lambda r: r.fun).x


def check_prox(kind, options=None):
    """mode='proximal' gives argmin_u lr·Ω(u) + ½‖u − v‖², against brute-force minimization of the reference.

    Every penalty is separable over its groups (rows for grouped kinds, elements otherwise), so the minimizer
    is found group by group; a group near w0 is thresholded onto it by the L1/GL kinds."""
    cls, options = get_penalty(kind), options or {}
    torch.manual_seed(3)
    lin = nn.Linear(3, 4, dtype=torch.float64)  # weight 4×3: four groups of three for grouped kinds
    w0 = l2sp.snapshot(lin)
    with torch.no_grad():
        lin.weight.add_(0.2 * torch.randn_like(lin.weight))
        lin.weight[1] = w0["weight"][1] + 0.01
        lin.bias.add_(torch.tensor([0.3, -0.01, 0.02, -0.5], dtype=torch.float64))
    fisher = {n: torch.rand_like(p) + 0.2 for n, p in lin.named_parameters()}
    lr, alpha = 0.5, 0.8
    reg = make(kind, lin, w0, fisher, alpha=alpha, beta=0.0, **options)
    v = torch.cat([p.detach().reshape(-1) for p in lin.parameters()])

    class Probe:  # the parameters of lin at u, for the reference
        def __init__(self, u):
            u = torch.as_tensor(u)
            self.params = [("weight", u[:12].view(4, 3)), ("bias", u[12:])]

        def named_parameters(self):
            return self.params

    def objective(u):  # lr·Ω(u) + ½‖u − v‖², Ω exact from the reference
        omega = reference_value(kind, Probe(u), w0, fisher, alpha, 0.0, options=options)
        return lr * omega + 0.5 * ((torch.as_tensor(u) - v) ** 2).sum().item()

    opt = torch.optim.SGD(lin.parameters(), lr=lr)
    reg.attach(opt, "proximal")
    for p in lin.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    got = torch.cat([p.detach().reshape(-1) for p in lin.parameters()])
    groups = ([list(range(3 * r, 3 * r + 3)) for r in range(4)] if cls.grouped else [[j] for j in range(12)])
    brute = v.clone().numpy()
    for idx in groups + [[j] for j in range(12, 16)]:
        def f(x, idx=idx):
            u = brute.copy()
            u[idx] = x
            return objective(u)
        brute[idx] = _nelder_mead(f, v[idx].numpy())
    assert objective(got.numpy()) <= objective(brute) + 1e-12  # at least as good as the numerical minimizer
    torch.testing.assert_close(got, torch.from_numpy(brute), atol=1e-6, rtol=0)
    return lin, w0
