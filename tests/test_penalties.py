"""The six penalties against independent float64 computations, autograd, and their definitions.

The checks every kind passes live in penalty_checks.py (tests/test_custom_penalty.py runs them on a kind
registered from outside the library); this file runs them on the built-ins and tests what is specific to them.
"""

import pytest
import torch
import torchvision
from torch import nn

import l2sp
from l2sp import L2SPError
from l2sp.penalties import get_penalty, penalty_names
from penalty_checks import (
    check_add_grad,
    check_attach_trajectory,
    check_decoupled,
    check_gradcheck,
    check_prox,
    check_value,
    fisher_for,
    make,
    pretrained_and_finetuned,
    reference_value,
    tiny_net,
)

BUILTIN = l2sp.KINDS
PROXIMAL = tuple(k for k in BUILTIN if get_penalty(k).has_prox)


def test_registry_lists_the_six_builtins_first_with_their_flags():
    assert BUILTIN == ("l2", "l2-sp", "l2-sp-fisher", "l1-sp", "gl-sp", "gl-sp-fisher")
    assert penalty_names()[:6] == BUILTIN
    flags = {k: (c.label, c.needs_w0, c.needs_fisher, c.grouped, c.smoothed, c.has_prox)
             for k in BUILTIN for c in [get_penalty(k)]}
    assert flags == {
        "l2": ("L2", False, False, False, False, True),
        "l2-sp": ("L2-SP", True, False, False, False, True),
        "l2-sp-fisher": ("L2-SP-Fisher", True, True, False, False, True),
        "l1-sp": ("L1-SP", True, False, False, True, True),
        "gl-sp": ("GL-SP", True, False, True, True, True),
        "gl-sp-fisher": ("GL-SP-Fisher", True, True, True, True, False),
    }
    assert PROXIMAL == ("l2", "l2-sp", "l2-sp-fisher", "l1-sp", "gl-sp")


def test_registry_refuses_duplicates_and_unknown_names():
    with pytest.raises(L2SPError, match="'l2-sp' is already registered") as info:
        l2sp.register_penalty("l2-sp")(type("Again", (l2sp.Penalty,), {}))
    assert "\n" not in str(info.value)
    with pytest.raises(L2SPError, match="unknown regularizer kind 'l3-sp'; choose one of l2, l2-sp,"):
        get_penalty("l3-sp")
    with pytest.raises(L2SPError, match="must define value"):
        l2sp.register_penalty("half-done")(type("HalfDone", (l2sp.Penalty,), {}))
    assert "half-done" not in penalty_names()
    with pytest.raises(L2SPError, match="subclass of l2sp.Penalty"):
        l2sp.register_penalty("not-a-penalty")(object)


def test_kind_options_are_checked():
    model, w0 = pretrained_and_finetuned()
    with pytest.raises(L2SPError, match="kind 'l2-sp' has no option gamma; its options: none"):
        make("l2-sp", model, w0, gamma=1.0)


@pytest.mark.parametrize("kind", BUILTIN)
def test_value_matches_float64_reference(kind):
    check_value(kind)


@pytest.mark.parametrize("kind", [k for k in BUILTIN if get_penalty(k).smoothed])
def test_smoothing_eps_enters_value(kind):
    check_value(kind, eps=1e-2)


def test_l2_with_source_uses_beta_on_new_layers():
    model, w0 = pretrained_and_finetuned()
    reg = l2sp.regularizer("l2", model, w0, alpha=0.3, beta=0.05)
    expected = sum((0.05 if n.startswith("7.") else 0.3) / 2 * (p.detach() ** 2).sum().item()
                   for n, p in model.named_parameters())
    assert reg().item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kind", BUILTIN)
def test_gradcheck(kind):
    check_gradcheck(kind)


@pytest.mark.parametrize("include", ["all", "weights"])
@pytest.mark.parametrize("kind", BUILTIN)
def test_add_grad_equals_autograd(kind, include):
    check_add_grad(kind, include)


def test_add_grad_allocates_missing_grads():
    model, w0 = pretrained_and_finetuned()
    reg = make("l2-sp", model, w0)
    reg.add_grad_()
    for (name, p) in model.named_parameters():
        expected = 0.05 * p if name.startswith("7.") else 0.3 * (p - w0[name])
        torch.testing.assert_close(p.grad, expected.detach())


def test_add_grad_scale_multiplies_the_gradient():
    model, w0 = pretrained_and_finetuned()
    reg = make("gl-sp", model, w0)
    reg.add_grad_()
    once = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    reg.add_grad_(scale=256.0)
    for p, g in zip(model.parameters(), once):
        torch.testing.assert_close(p.grad, 256.0 * g, rtol=1e-12, atol=0)


@pytest.mark.parametrize("closure", [False, True], ids=["step", "closure"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("kind", BUILTIN)
def test_attach_coupled_follows_the_loss_term_trajectory(kind, opt, closure):
    check_attach_trajectory(kind, opt, closure)


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


@pytest.mark.parametrize("kind", BUILTIN)
def test_decoupled_is_a_plain_gradient_step_on_the_penalty(kind):
    check_decoupled(kind)


@pytest.mark.parametrize("kind", PROXIMAL)
def test_proximal_step_solves_its_definition(kind):
    lin, w0 = check_prox(kind)
    if get_penalty(kind).smoothed:  # L1/GL: a group within lr·α of w0 is thresholded exactly onto it
        torch.testing.assert_close(lin.weight[1], w0["weight"][1], rtol=0, atol=0)


def test_proximal_refuses_group_lasso_fisher():
    model, w0 = pretrained_and_finetuned()
    reg = make("gl-sp-fisher", model, w0, fisher_for(model))
    with pytest.raises(L2SPError, match="proximal works for 'l2', 'l2-sp', 'l2-sp-fisher', 'l1-sp', 'gl-sp'"):
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


@pytest.mark.parametrize("kind", BUILTIN)
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
    ref_fisher = {k: v.double() for k, v in fisher.items()}
    expected = reference_value(kind, model, {k: v.double() for k, v in w0.items()}, ref_fisher, 0.3, 0.05,
                               eps=1e-16 if get_penalty(kind).smoothed else None)
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


def imported_modules(path):
    """Every module an import statement of the file names (function-local imports included)."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_no_import_cycle_between_penalties_and_optim():
    """optim drives the regularizer through its public methods and imports nothing back; the penalties
    import neither the package root (which imports them) nor anything above them."""
    from pathlib import Path

    import l2sp.optim
    import l2sp.penalties

    assert not {m for m in imported_modules(Path(l2sp.optim.__file__)) if m.startswith("l2sp.penalties")}
    above = {"engine", "experiments", "cli", "integrations", "analysis", "segmentation", "search"}
    for path in Path(l2sp.penalties.__file__).parent.glob("*.py"):
        names = imported_modules(path)
        assert "l2sp" not in names, path  # `from l2sp import x` runs the package root, which imports this
        assert not {m.split(".")[1] for m in names if m.startswith("l2sp.")} & above, path
