"""Learning-rate schedules: values at the boundaries, and the rate the optimizer actually uses per step."""

import pytest
import torch

from l2sp.engine.schedule import Schedule, make_scheduler


def test_step_schedule_boundaries_of_the_paper():
    s = Schedule("step", 9000, [6000], 0.1)
    assert [s(t) for t in (0, 1, 5999)] == [1.0, 1.0, 1.0]
    assert s(6000) == pytest.approx(0.1) and s(8999) == pytest.approx(0.1)


def test_step_schedule_several_milestones_in_any_order():
    s = Schedule("step", 100, [60, 30], 0.5)
    assert [s(t) for t in (29, 30, 59, 60, 99)] == [1.0, 0.5, 0.5, 0.25, 0.25]


def test_poly_and_constant():
    s = Schedule("poly", 200, power=0.9)
    for t in (0, 1, 100, 199):
        assert s(t) == pytest.approx((1 - t / 200) ** 0.9, rel=1e-12)
    assert s(200) == 0.0 and s(250) == 0.0
    assert Schedule("constant")(12345) == 1.0


def test_rate_used_by_each_optimizer_step():
    """The rate of the step of iteration t (0-based) is lr·schedule(t): lr/10 from iteration 6 on."""
    p = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([p], lr=0.2)
    sched = make_scheduler(opt, Schedule("step", 10, [6], 0.1))
    used = []
    for _ in range(10):
        p.grad = torch.ones(())
        used.append(opt.param_groups[0]["lr"])
        before = p.detach().clone()
        opt.step()
        assert float(before - p.detach()) == pytest.approx(used[-1])  # the step really used that rate
        sched.step()
    assert used == pytest.approx([0.2] * 6 + [0.02] * 4)


def test_scheduler_state_round_trips():
    p = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_scheduler(opt, Schedule("step", 10, [3], 0.1))
    for _ in range(5):
        opt.step()
        sched.step()
    state, opt_state = sched.state_dict(), opt.state_dict()
    opt2 = torch.optim.SGD([p], lr=1.0)
    sched2 = make_scheduler(opt2, Schedule("step", 10, [3], 0.1))
    opt2.load_state_dict(opt_state)  # the engine restores the optimizer (its lr) then the scheduler
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 5 and opt2.param_groups[0]["lr"] == pytest.approx(0.1)
    for _ in range(5):
        opt2.step()
        sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1)
