"""Mistakes at the regularizer's door: coefficients that are not numbers, a model changed after building."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import l2sp
from l2sp.errors import L2SPError


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


@pytest.mark.parametrize("bad", [True, False, "0.1", None, [0.1]])
def test_alpha_must_be_a_real_number(bad):
    model = _model()
    with pytest.raises(L2SPError, match=r"^alpha must be a number, got .*\(") as err:
        l2sp.regularizer("l2-sp", model, l2sp.snapshot(model), alpha=bad, beta=0.01)
    assert "\n" not in str(err.value)
    if isinstance(bad, str):
        assert "write alpha=0.1" in str(err.value)


def test_beta_refuses_a_bool():
    model = _model()
    with pytest.raises(L2SPError, match="^beta must be a number"):
        l2sp.regularizer("l2-sp", model, l2sp.snapshot(model), alpha=0.1, beta=True)


@pytest.mark.parametrize("good", [0.1, 1, np.float32(0.1), np.float64(0.1), torch.tensor(0.1)])
def test_alpha_accepts_real_scalars(good):
    model = _model()
    reg = l2sp.regularizer("l2-sp", model, l2sp.snapshot(model), alpha=good, beta=0.01)
    assert reg.alpha == pytest.approx(float(good))


def test_head_replaced_after_building_warns_once():
    model = _model()
    w0 = l2sp.snapshot(model)
    reg = l2sp.regularizer("l2-sp", model, w0, alpha=0.1, beta=0.01)
    model[2] = nn.Linear(5, 7)  # the new head: not governed; the old one: no longer in the model
    with pytest.warns(UserWarning, match=r"not governed: 2\.weight, 2\.bias; no longer in the model: 2\.weight"):
        reg()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg()  # once only: no per-step cost, no repeated warning
        reg.add_grad_()


def test_attach_checks_again():
    model = _model()
    reg = l2sp.regularizer("l2-sp", model, l2sp.snapshot(model), alpha=0.1, beta=0.01)
    reg()  # checked, nothing changed
    model.add_module("extra", nn.Linear(3, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"not governed: extra\.weight, extra\.bias"):
        reg.attach(opt)


def test_unchanged_or_frozen_model_is_silent():
    model = _model()
    reg = l2sp.regularizer("l2-sp", model, l2sp.snapshot(model), alpha=0.1, beta=0.01)
    model[0].weight.requires_grad_(False)  # freezing after building is fine
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
        reg()


def _define_and_register(name):
    class Twice(l2sp.Penalty):
        label = "twice"

        def value(self, b, acc, exact):
            return sum(torch.stack(torch._foreach_norm(b.diff(), 2, dtype=acc)).square())

        def add_grad_(self, b, out, scale):
            torch._foreach_add_(out, b.diff(), alpha=2 * self.alpha * scale)

    return l2sp.register_penalty(name)(Twice)


def test_a_notebook_cell_run_twice_registers_again_but_a_clash_is_refused():
    from l2sp.penalties import get_penalty

    first = _define_and_register("test-twice")
    second = _define_and_register("test-twice")  # same module and qualified name: replaces the first
    assert get_penalty("test-twice") is second and second is not first

    class Other(l2sp.Penalty):
        def value(self, b, acc, exact):
            return torch.zeros((), dtype=acc)

        def add_grad_(self, b, out, scale):
            pass

    with pytest.raises(L2SPError, match="already registered"):
        l2sp.register_penalty("test-twice")(Other)
