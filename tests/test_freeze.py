"""Freezing the first k blocks: parameters and BatchNorm statistics really stay fixed."""

import pytest
import torch
import torchvision
from torch import nn

from l2sp.errors import L2SPError
from l2sp.freeze import blocks, freeze_bn_stats, freeze_first
from l2sp.models import small_resnet


def _train_steps(model, n=5):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for _ in range(n):
        model.train()
        loss = model(torch.randn(16, 1, 28, 28)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_freeze_first_two_blocks_of_the_small_resnet():
    torch.manual_seed(0)
    m = small_resnet(5, 1)
    assert freeze_first(m, 2) == ["stem", "stage1"]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    _train_steps(m)
    after = m.state_dict()
    frozen = [k for k in before if k.startswith(("stem.", "stage1."))]
    assert frozen and any("running_mean" in k for k in frozen)
    for k in frozen:
        assert torch.equal(before[k], after[k]), k  # weights and BN statistics
    moved = [k for k in before if k.startswith("stage2.") and not torch.equal(before[k], after[k])]
    assert any(k.endswith("running_mean") for k in moved) and any(k.endswith("conv1.weight") for k in moved)
    assert not m.stem[1].training and m.stage2[0].bn1.training  # train() keeps frozen BN in eval
    assert all(not p.requires_grad for p in m.stage1.parameters())


def test_bn_frozen_mode_keeps_every_statistic():
    torch.manual_seed(0)
    m = small_resnet(5, 1)
    assert freeze_bn_stats(m) == sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    stats = {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}
    gamma = m.stem[1].weight.detach().clone()
    _train_steps(m)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in stats.items())
    assert not torch.equal(gamma, m.stem[1].weight)  # γ, β still trained
    import copy

    assert not copy.deepcopy(m).train().stem[1].training  # survives a copy


def test_block_lists_of_torchvision_models():
    r = torchvision.models.resnet18()
    assert [n for n, _ in blocks(r)] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert (
        freeze_first(r, 1) == ["stem"]
        and not r.conv1.weight.requires_grad
        and r.layer1[0].conv1.weight.requires_grad
    )
    mb = torchvision.models.mobilenet_v2()
    names = [n for n, _ in blocks(mb)]
    assert names[0] == "features.0" and len(names) == len(mb.features)
    with pytest.raises(L2SPError, match="has 4 blocks"):
        freeze_first(small_resnet(5, 1), 5)
    assert freeze_first(small_resnet(5, 1), 0) == []


def test_freeze_through_finetune(tmp_path):
    from l2sp.engine.run import finetune
    from l2sp.engine.synthetic import synthetic_task
    from l2sp.io import load_tensors, save_tensors

    src = tmp_path / "s.safetensors"
    save_tensors(src, small_resnet(5, 1, widths=(8, 8, 8)).state_dict())
    task = synthetic_task(n_train=64, n_val=0, n_test=10)
    cfg = {
        "model": {"weights": str(src), "options": {"widths": [8, 8, 8]}},
        "train": {"freeze": 3, "quiet": True, "tensorboard": False, "ckpt_every": 0},
        "optim": {"steps": 4, "batch_size": 32, "lr": 0.1},
    }
    finetune(cfg, task=task, out=str(tmp_path / "run"))
    w0, w = load_tensors(src)[0], load_tensors(tmp_path / "run" / "model.safetensors")[0]
    for k in w0:
        if k.startswith(("stem.", "stage1.", "stage2.")):
            assert torch.equal(w0[k], w[k]), k
    assert not torch.equal(w0["stage3.0.conv1.weight"], w["stage3.0.conv1.weight"])
