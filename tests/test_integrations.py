"""L2-SP in the setups users combine it with: AMP's GradScaler, DistributedDataParallel, torch.compile."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import l2sp


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    w0 = l2sp.snapshot(model)
    model[2] = nn.Linear(8, 3)
    with torch.no_grad():
        model[0].weight.add_(0.1)
    return model, w0


def steps(model, w0, wrap=lambda m: m, scaler=None, n=5):
    torch.manual_seed(1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    net = wrap(model)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    l2sp.regularizer("l2-sp", net, w0, alpha=0.5, beta=0.05).attach(opt)
    for _ in range(n):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)  # unscales the gradients, then optimizer.step() runs the penalty hook
            scaler.update()
    return [p.detach().clone() for p in model.parameters()]


def test_grad_scaler_unscales_before_the_penalty_is_added():
    model, w0 = make_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = steps(model, w0)
    model.load_state_dict(state)
    scaled = steps(model, w0, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_wrapped_model_trains_like_the_plain_one(process_group):
    model, w0 = make_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = steps(model, w0)
    model.load_state_dict(state)
    wrapped = steps(model, w0, wrap=nn.parallel.DistributedDataParallel)
    for a, b in zip(plain, wrapped):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    reg = l2sp.regularizer("l2-sp", nn.parallel.DistributedDataParallel(model), w0, alpha=0.5, beta=0.05)
    assert reg.shared == ["module.0.weight", "module.0.bias"] and reg.novel == ["module.2.weight", "module.2.bias"]


def test_compiled_model_names_match_the_source():
    model, w0 = make_model()
    compiled = torch.compile(model)  # compiles lazily, at the first call: only the names are used here
    reg = l2sp.regularizer("l2-sp", compiled, w0, alpha=0.5, beta=0.05)
    assert reg.shared == ["_orig_mod.0.weight", "_orig_mod.0.bias"]
    assert reg.novel == ["_orig_mod.2.weight", "_orig_mod.2.bias"]
    assert reg().item() == pytest.approx(l2sp.regularizer("l2-sp", model, w0, alpha=0.5, beta=0.05)().item())
