"""The six penalties against independent float64 computations, autograd, and their definitions."""

import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import l2sp
from l2sp import L2SPError

SMOOTH_KINDS = ("l2", "l2-sp", "l2-sp-fisher")


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


def reference_value(kind, model, w0, fisher, alpha, beta, eps=None):
    """Ω by the paper's equations, parameter by parameter, in float64 (eps: smoothing for L1/GL)."""
    total = 0.0
    for name, p in model.named_parameters():
        w = p.detach().double()
        in_s = kind == "l2" or (name in w0 and w0[name].shape == p.shape)
        if not in_s:
            total += beta / 2 * (w ** 2).sum().item()
            continue
        d = w if kind == "l2" else w - w0[name].double()
        f = fisher[name].double() if fisher is not None else None
        if kind in ("l2", "l2-sp"):
            total += alpha / 2 * (d ** 2).sum().item()
        elif kind == "l2-sp-fisher":
            total += alpha / 2 * (f * d ** 2).sum().item()
        elif kind == "l1-sp":
            a = d.abs() if eps is None else (d ** 2 + eps).sqrt()
            total += alpha * a.sum().item()
        else:
            rows = d.reshape(d.shape[0], -1) if d.dim() >= 2 else d.reshape(-1, 1)
            fr = None if f is None else (f.reshape(f.shape[0], -1) if f.dim() >= 2 else f.reshape(-1, 1))
            for i in range(rows.shape[0]):
                sq = (rows[i] ** 2 if fr is None else fr[i] * rows[i] ** 2).sum().item()
                norm = math.sqrt(sq) if eps is None else math.sqrt(sq + eps)
                total += alpha * math.sqrt(rows.shape[1]) * norm
    return total


def make(kind, model, w0, fisher=None, **kw):
    kw.setdefault("alpha", 0.3)
    kw.setdefault("beta", 0.05)
    return l2sp.regularizer(kind, model, None if kind == "l2" else w0,
                            fisher=fisher if kind.endswith("fisher") else None, **kw)


@pytest.mark.parametrize("kind", l2sp.KINDS)
def test_value_matches_float64_reference(kind):
    model, w0 = pretrained_and_finetuned()
    fisher = fisher_for(model)
    reg = make(kind, model, w0, fisher)
    f = fisher if kind.endswith("fisher") else None
    exact = reference_value(kind, model, w0, f, 0.3, 0.05)
    assert reg.exact().item() == pytest.approx(exact, rel=1e-12)
    smoothed = reference_value(kind, model, w0, f, 0.3, 0.05, eps=None if kind in SMOOTH_KINDS else 1e-16)
    assert reg().item() == pytest.approx(smoothed, rel=1e-12)


@pytest.mark.parametrize("kind", ["l1-sp", "gl-sp", "gl-sp-fisher"])
def test_smoothing_eps_enters_value(kind):
    model, w0 = pretrained_and_finetuned()
    fisher = fisher_for(model)
    reg = make(kind, model, w0, fisher, eps=1e-2)
    ref = reference_value(kind, model, w0, fisher if kind.endswith("fisher") else None, 0.3, 0.05, eps=1e-2)
    assert reg().item() == pytest.approx(ref, rel=1e-12)
    assert reg().item() > reg.exact().item()


def test_l2_with_source_uses_beta_on_new_layers():
    model, w0 = pretrained_and_finetuned()
    reg = l2sp.regularizer("l2", model, w0, alpha=0.3, beta=0.05)
    expected = sum((0.05 if n.startswith("7.") else 0.3) / 2 * (p.detach() ** 2).sum().item()
                   for n, p in model.named_parameters())
    assert reg().item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kind", l2sp.KINDS)
def test_gradcheck(kind):
    model, w0 = pretrained_and_finetuned()
    reg = make(kind, model, w0, fisher_for(model), eps=1e-3)
    params = tuple(model.parameters())
    # gradcheck perturbs the inputs in place: they are the very tensors the regularizer reads
    assert torch.autograd.gradcheck(lambda *_: reg(), params, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("include", ["all", "weights"])
@pytest.mark.parametrize("kind", l2sp.KINDS)
def test_add_grad_equals_autograd(kind, include):
    model, w0 = pretrained_and_finetuned()
    reg = make(kind, model, w0, fisher_for(model), include=include)
    params = list(model.parameters())
    expected = torch.autograd.grad(reg(), params, allow_unused=True)
    start = [torch.randn_like(p) for p in params]
    for p, s in zip(params, start):
        p.grad = s.clone()
    reg.add_grad_()
    for p, s, e in zip(params, start, expected):
        e = torch.zeros_like(p) if e is None else e
        torch.testing.assert_close(p.grad, s + e, rtol=1e-10, atol=1e-12)


def test_add_grad_allocates_missing_grads():
    model, w0 = pretrained_and_finetuned()
    reg = make("l2-sp", model, w0)
    reg.add_grad_()
    for (name, p) in model.named_parameters():
        expected = 0.05 * p if name.startswith("7.") else 0.3 * (p - w0[name])
        torch.testing.assert_close(p.grad, expected.detach())


def train(model, reg_mode, kind, w0, steps=6, opt="sgd", dtype=torch.float64):
    """A few optimizer steps on a fixed regression batch, with the penalty as a loss term or attached."""
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 9, 9, dtype=dtype), torch.randint(0, 3, (8,))
    reg = make(kind, model, w0, fisher_for(model) if kind.endswith("fisher") else None, eps=1e-4)
    if opt == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    handle = reg.attach(optimizer, reg_mode) if reg_mode != "loss" else None
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if reg_mode == "loss":
            loss = loss + reg()
        loss.backward()
        optimizer.step()
    if handle:
        handle.remove()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("kind", l2sp.KINDS)
def test_attach_coupled_follows_the_loss_term_trajectory(kind, opt):
    torch.manual_seed(0)
    model, w0 = pretrained_and_finetuned(jitter=0.0)  # start at w0, as fine-tuning does
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = train(model, "loss", kind, w0, opt=opt)
    model.load_state_dict(state)
    b = train(model, "coupled", kind, w0, opt=opt)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)
    moved = max((x - state[n]).abs().max().item() for (n, _), x in zip(model.named_parameters(), a))
    assert moved > 1e-3  # the trajectory went somewhere


def test_handle_remove_stops_the_penalty():
    model, w0 = pretrained_and_finetuned()
    reg = make("l2-sp", model, w0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt).remove()
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), q)


@pytest.mark.parametrize("kind", l2sp.KINDS)
def test_decoupled_is_a_plain_gradient_step_on_the_penalty(kind):
    model, w0 = pretrained_and_finetuned()
    reg = make(kind, model, w0, fisher_for(model), eps=1e-4)
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


def brute_force_prox(objective, v, groups):
    """argmin_u objective(u) + ½‖u − v‖², group by group (every penalty here is separable over its groups),
    with derivative-free Nelder-Mead from several starts, in float64."""
    from scipy.optimize import minimize

    u = v.clone().numpy()
    for idx in groups:
        def f(x, idx=idx):
            full = torch.from_numpy(u.copy())
            full[idx] = torch.from_numpy(x)
            return objective(full, idx).item() + 0.5 * ((torch.from_numpy(x) - v[idx]) ** 2).sum().item()

        starts = [v[idx].numpy(), v[idx].numpy() * 0.5, np.zeros(len(idx)) + v[idx].numpy().mean()]
        best = min((minimize(f, x0, method="Nelder-Mead",
                             options={"xatol": 1e-11, "fatol": 1e-15, "maxiter": 20000}) for x0 in starts),
                   key=lambda r: r.fun)
        u[idx] = best.x
    return torch.from_numpy(u)


@pytest.mark.parametrize("kind", ["l2", "l2-sp", "l2-sp-fisher", "l1-sp", "gl-sp"])
def test_proximal_step_solves_its_definition(kind):
    """The prox of lr·Ω at v is the minimizer of lr·Ω(u) + ½‖u − v‖²: compare to brute-force minimization."""
    torch.manual_seed(3)
    lin = nn.Linear(3, 4, dtype=torch.float64)  # weight 4×3: four groups of three for GL-SP
    w0 = l2sp.snapshot(lin)
    with torch.no_grad():
        lin.weight.add_(0.2 * torch.randn_like(lin.weight))
        lin.weight[1] = w0["weight"][1] + 0.01  # a group close to w0: exactly thresholded to w0
        lin.bias.add_(torch.tensor([0.3, -0.01, 0.02, -0.5], dtype=torch.float64))
    fisher = {n: torch.rand_like(p) + 0.2 for n, p in lin.named_parameters()}
    reg = make(kind, lin, w0, fisher, alpha=0.8, beta=0.0)
    lr = 0.5
    v = torch.cat([p.detach().reshape(-1) for p in lin.parameters()])
    ref = torch.cat([w0[n].reshape(-1) for n, _ in lin.named_parameters()])
    f = torch.cat([fisher[n].reshape(-1) for n, _ in lin.named_parameters()])
    alpha = 0.8 * lr

    def objective(u, idx):  # the penalty restricted to the group idx (exact, unsmoothed)
        d = (u if kind == "l2" else u - ref)[idx]
        if kind in ("l2", "l2-sp"):
            return alpha / 2 * (d ** 2).sum()
        if kind == "l2-sp-fisher":
            return alpha / 2 * (f[idx] * d ** 2).sum()
        if kind == "l1-sp":
            return alpha * d.abs().sum()
        return alpha * math.sqrt(len(idx)) * d.norm()  # gl-sp: s_g = √p_g

    opt = torch.optim.SGD(lin.parameters(), lr=lr)
    reg.attach(opt, "proximal")
    for p in lin.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    got = torch.cat([p.detach().reshape(-1) for p in lin.parameters()])
    groups = ([list(range(3 * r, 3 * r + 3)) for r in range(4)] if kind == "gl-sp" else
              [[j] for j in range(12)]) + [[j] for j in range(12, 16)]
    brute = brute_force_prox(objective, v, groups)
    total = lambda u: sum(objective(u, g).item() for g in groups) + 0.5 * ((u - v) ** 2).sum().item()  # noqa: E731
    assert total(got) <= total(brute) + 1e-12  # at least as good as the numerical minimizer
    torch.testing.assert_close(got, brute, atol=1e-6, rtol=0)
    if kind in ("l1-sp", "gl-sp"):
        torch.testing.assert_close(lin.weight[1], w0["weight"][1])  # thresholded exactly onto w0


def test_proximal_refuses_group_lasso_fisher():
    model, w0 = pretrained_and_finetuned()
    reg = make("gl-sp-fisher", model, w0, fisher_for(model))
    with pytest.raises(L2SPError, match="proximal"):
        reg.attach(torch.optim.SGD(model.parameters(), lr=0.1), "proximal")


def test_resnet18_partition_with_replaced_head():
    model = torchvision.models.resnet18()
    w0 = l2sp.snapshot(model)
    model.fc = nn.Linear(512, 10)
    reg = l2sp.regularizer("l2-sp", model, w0, alpha=0.1, beta=0.01)
    names = [n for n, _ in model.named_parameters()]
    assert reg.novel == ["fc.weight", "fc.bias"]
    assert reg.shared == [n for n in names if not n.startswith("fc.")]
    assert reg.free == []
    weights_only = l2sp.regularizer("l2-sp", model, w0, alpha=0.1, beta=0.01, include="weights")
    assert weights_only.shared == [n for n in names if n.endswith("weight") and "bn" not in n
                                   and "downsample.1" not in n and not n.startswith("fc.")]
    assert len(weights_only.shared) == 20  # 17 convolutions + 3 downsampling 1x1 convolutions
    assert weights_only.novel == ["fc.weight", "fc.bias"]
    assert set(weights_only.free) == set(names) - set(weights_only.shared) - {"fc.weight", "fc.bias"}
    summary = weights_only.summary()
    assert "conv1.weight" in summary and "free" in summary and "S̄" in summary


def test_same_name_but_new_shape_goes_to_novel_set():
    model = torchvision.models.resnet18(num_classes=1000)
    source = l2sp.snapshot(model)
    target = torchvision.models.resnet18(num_classes=5)  # fc has the same names, another shape
    reg = l2sp.regularizer("l2-sp", target, source, alpha=0.1, beta=0.01)
    assert reg.novel == ["fc.weight", "fc.bias"]


class Wrapper(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def test_wrapper_prefixes_are_stripped():
    model, w0 = pretrained_and_finetuned()
    wrapped = Wrapper(model)  # names "module.0.weight", like DDP
    reg = make("l2-sp", wrapped, w0)
    assert reg.shared[0] == "module.0.weight" and len(reg.novel) == 2
    torch.testing.assert_close(reg(), make("l2-sp", model, w0)())
    compiled_names = {"_orig_mod." + k: v for k, v in w0.items()}  # torch.compile's prefix in the source
    assert make("l2-sp", model, compiled_names)().item() == pytest.approx(reg().item())
    assert l2sp.reference.strip_prefix("module._orig_mod.layer1.0.weight") == "layer1.0.weight"


def test_source_from_module_and_from_files(tmp_path):
    model, w0 = pretrained_and_finetuned()
    source_model = tiny_net(7)
    source_model.load_state_dict(w0)
    from safetensors.torch import save_file

    torch.save(w0, tmp_path / "w0.pt")
    save_file({k: v.contiguous() for k, v in w0.items()}, str(tmp_path / "w0.safetensors"))
    expected = make("l2-sp", model, w0)().item()
    for source in (source_model, tmp_path / "w0.pt", str(tmp_path / "w0.safetensors")):
        assert make("l2-sp", model, source)().item() == pytest.approx(expected, rel=1e-12)


def test_snapshot_is_a_copy():
    model = tiny_net()
    w0 = l2sp.snapshot(model)
    for (name, p) in model.named_parameters():
        assert p.untyped_storage().data_ptr() != w0[name].untyped_storage().data_ptr()
        assert not w0[name].requires_grad
    assert "1.running_mean" in w0  # buffers too: the source model can be rebuilt from it


def test_low_precision_parameters_accumulate_in_float32():
    model, w0 = pretrained_and_finetuned(dtype=torch.float32)
    reg32 = make("l2-sp", model, w0)
    expected = reg32().item()
    model.to(torch.bfloat16)
    reg16 = make("l2-sp", model, w0)
    value = reg16()
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=2e-2)
    reg16.add_grad_()
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_state_dict_round_trip_and_to():
    model, w0 = pretrained_and_finetuned()
    reg = make("l2-sp-fisher", model, w0, fisher_for(model))
    state = reg.state_dict()
    assert any(k.startswith("w0.") for k in state) and any(k.startswith("fisher.") for k in state)
    other = make("l2-sp-fisher", model, {k: torch.zeros_like(v) for k, v in w0.items()}, fisher_for(model))
    other.load_state_dict(state)
    assert other().item() == pytest.approx(reg().item(), rel=1e-12)
    reg.to(torch.float32)
    assert next(iter(reg.buffers())).dtype == torch.float32


# ---------------------------------------------------------------- bad input: one clear line each
def test_error_no_parameter_matches():
    model, _ = pretrained_and_finetuned()
    wrong = l2sp.snapshot(torchvision.models.resnet18())
    with pytest.raises(L2SPError, match="no parameter of the model matches the source"):
        l2sp.regularizer("l2-sp", model, wrong, alpha=0.1, beta=0.01)


def test_error_source_shares_storage():
    model, _ = pretrained_and_finetuned()
    with pytest.raises(L2SPError, match="shares storage"):
        l2sp.regularizer("l2-sp", model, dict(model.named_parameters()), alpha=0.1, beta=0.01)
    with pytest.raises(L2SPError, match="shares storage"):
        l2sp.regularizer("l2-sp", model, model, alpha=0.1, beta=0.01)


def test_error_fisher_problems():
    model, w0 = pretrained_and_finetuned()
    fisher = fisher_for(model)
    with pytest.raises(L2SPError, match="needs fisher"):
        l2sp.regularizer("l2-sp-fisher", model, w0, alpha=0.1, beta=0.01)
    missing = dict(fisher)
    del missing["0.weight"]
    with pytest.raises(L2SPError, match="no entry for shared parameter '0.weight'"):
        l2sp.regularizer("l2-sp-fisher", model, w0, alpha=0.1, beta=0.01, fisher=missing)
    bad = dict(fisher, **{"0.weight": torch.ones(2, 2, dtype=torch.float64)})
    with pytest.raises(L2SPError, match="has shape"):
        l2sp.regularizer("gl-sp-fisher", model, w0, alpha=0.1, beta=0.01, fisher=bad)
    negative = dict(fisher, **{"0.weight": -fisher["0.weight"]})
    with pytest.raises(L2SPError, match="negative or non-finite"):
        l2sp.regularizer("l2-sp-fisher", model, w0, alpha=0.1, beta=0.01, fisher=negative)


@pytest.mark.parametrize("field,value", [("alpha", -1.0), ("beta", float("nan")), ("eps", -1e-3),
                                         ("alpha", float("inf")), ("beta", "big")])
def test_error_bad_coefficients(field, value):
    model, w0 = pretrained_and_finetuned()
    kw = {"alpha": 0.1, "beta": 0.01, field: value}
    with pytest.raises(L2SPError, match=field):
        l2sp.regularizer("l1-sp", model, w0, **kw)


def test_error_unknown_kind_lists_the_valid_ones():
    model, w0 = pretrained_and_finetuned()
    with pytest.raises(L2SPError, match="l2-sp-fisher, l1-sp, gl-sp"):
        l2sp.regularizer("l3-sp", model, w0, alpha=0.1, beta=0.01)


def test_error_sp_kind_without_source_and_bad_mode():
    model, w0 = pretrained_and_finetuned()
    with pytest.raises(L2SPError, match="needs the pre-trained weights"):
        l2sp.regularizer("l2-sp", model, alpha=0.1, beta=0.01)
    reg = make("l2-sp", model, w0)
    with pytest.raises(L2SPError, match="unknown mode"):
        reg.attach(torch.optim.SGD(model.parameters(), lr=0.1), "sideways")


def test_errors_are_one_line():
    model, _ = pretrained_and_finetuned()
    with pytest.raises(L2SPError) as info:
        l2sp.regularizer("l2-sp", model, {"x": torch.zeros(1)}, alpha=0.1, beta=0.01)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", l2sp.KINDS)
def test_float32_value_is_accurate_on_large_tensors(kind):
    """Ω of a float32 model with a 2.4M-element tensor matches float64 to 1e-6 (CPU float32 norms do not)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(256, 1024, 3), nn.Conv2d(1024, 4, 1))
    w0 = l2sp.snapshot(model)
    model[1] = nn.Conv2d(1024, 2, 1)
    with torch.no_grad():
        model[0].weight.add_(0.05 * torch.randn_like(model[0].weight))
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    reg = make(kind, model, w0, fisher)
    ref_fisher = {k: v.double() for k, v in fisher.items()} if kind.endswith("fisher") else None
    expected = reference_value(kind, model, {k: v.double() for k, v in w0.items()}, ref_fisher, 0.3, 0.05,
                               eps=None if kind in SMOOTH_KINDS else 1e-16)
    value = reg()
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_replaced_head_with_the_same_shape_is_novel():
    """5 source classes -> 5 target classes: the new head matches w0 by name and shape, but is a new object."""
    model = tiny_net(5)
    w0 = l2sp.snapshot(model)
    model[7] = nn.Linear(6, 5).to(torch.float64)
    reg = l2sp.regularizer("l2-sp", model, w0, alpha=0.1, beta=0.01)
    assert reg.novel == ["7.weight", "7.bias"]
    # the same weights read back from a file: only names and shapes are known, so the head is shared
    plain = l2sp.regularizer("l2-sp", model, {k: v.clone() for k, v in w0.items()}, alpha=0.1, beta=0.01)
    assert "7.weight" in plain.shared
    # a snapshot of another object (a deep copy) says nothing about this model's objects
    import copy

    copied = copy.deepcopy(model)
    assert l2sp.regularizer("l2-sp", copied, w0, alpha=0.1, beta=0.01).novel == []


def test_snapshot_is_a_plain_dict_that_saves_and_loads_safely(tmp_path):
    w0 = l2sp.snapshot(tiny_net())
    assert type(w0) is dict
    torch.save(w0, tmp_path / "w0.pt")
    loaded = torch.load(tmp_path / "w0.pt", weights_only=True)
    assert loaded.keys() == w0.keys()
