"""The one runner: your own model, loss and data (``finetune(model=, loss=, task=)``), AdamW, on-device data
switches, registries in config validation, ``--print-config``, ``python -m l2sp``, the segmentation loss."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import l2sp
import l2sp.engine
from l2sp.cli import main
from l2sp.engine.config import Config, flatten, resolve
from l2sp.engine.run import build_optimizer, finetune, seed_everything
from l2sp.engine.runner import loader_options
from l2sp.engine.schedule import Schedule, make_scheduler
from l2sp.engine.synthetic import TensorImages, synthetic_task
from l2sp.engine.trainer import train_loader
from l2sp.errors import L2SPError
from l2sp.io import load_tensors, save_tensors

STEPS = 8


def tiny_net(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 13 * 13, num_classes))


def smooth_ce(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target, label_smoothing=0.1)


def cfg(**over) -> Config:
    base = {"data": {"task": "synthetic"}, "reg": {"kind": "l2-sp", "alpha": 0.1, "beta": 0.01},
            "optim": {"lr": 0.05, "batch_size": 16, "steps": STEPS, "milestones": [6]},
            "train": {"log_every": 4, "ckpt_every": 0, "quiet": True, "tensorboard": False, "channels_last": False,
                      "save_checkpoint": False, "device": "cpu"}}
    return resolve(base, over)


@pytest.fixture(scope="module")
def data():
    return synthetic_task(num_classes=3, n_train=64, n_val=24, n_test=24, seed=2)


def source_and_model(seed: int = 5) -> tuple[dict, nn.Module]:
    """w0 taken from a 'pre-trained' net before its head is replaced (so the new head is in S̄)."""
    torch.manual_seed(seed)
    net = tiny_net(7)
    w0 = l2sp.snapshot(net)
    net[3] = nn.Linear(4 * 13 * 13, 3)
    return w0, net


def hand_loop(c: Config, net: nn.Module, w0: dict, data, loss_fn, opt_cls, **opt_kw) -> dict:
    """SGD/AdamW on loss + Ω with autograd through Ω, the engine's batches and schedule."""
    reg = l2sp.regularizer("l2-sp", net, w0, alpha=0.1, beta=0.01)
    opt = opt_cls(net.parameters(), lr=c.optim.lr, **opt_kw)
    sched = make_scheduler(opt, Schedule("step", STEPS, [6], 0.1))
    net.train()
    for x, y in train_loader(data.train, c.optim.batch_size, c.train.seed, 0, STEPS):
        loss = loss_fn(net(x), y) + reg()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def engine_weights(tmp_path, c: Config, data, loss_fn) -> tuple[dict, dict]:
    w0, net = source_and_model()
    r = finetune(c, task=data, model=net, loss=loss_fn, source=w0, out=str(tmp_path / "run"))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, r


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_own_model_and_loss_follow_a_hand_written_loop(tmp_path, data, opt):
    c = cfg(**{"optim.name": opt, "optim.lr": 0.05 if opt == "sgd" else 0.01})
    engine, r = engine_weights(tmp_path, c, data, smooth_ce)
    assert r["steps"] == STEPS and r["head"] == "3" and 0 <= r["test_acc"] <= 1
    seed_everything(c.train.seed)
    w0, net = source_and_model()
    if opt == "sgd":
        ref = hand_loop(c, net, w0, data, smooth_ce, torch.optim.SGD, momentum=0.9)
    else:
        ref = hand_loop(c, net, w0, data, smooth_ce, torch.optim.AdamW, weight_decay=0.0)
    for k in ref:
        torch.testing.assert_close(engine[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


def test_the_loss_is_the_one_given(tmp_path, data):
    a, _ = engine_weights(tmp_path / "a", cfg(), data, smooth_ce)
    b, _ = engine_weights(tmp_path / "b", cfg(), data, None)  # default: plain cross-entropy
    assert not torch.equal(a["3.weight"], b["3.weight"])


def test_top_level_finetune_passes_model_and_loss(tmp_path, data):
    w0, net = source_and_model()
    r = l2sp.finetune(cfg(), task=data, model=net, loss=smooth_ce, source=w0, out=str(tmp_path / "r"))
    assert r["steps"] == STEPS and (tmp_path / "r" / "results.json").is_file()


def test_task_object_needs_only_datasets_and_num_classes(tmp_path):
    """A plain object: train/val/test datasets and num_classes; no split (no split.json), in_channels 3."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, 8, 8, generator=g), torch.arange(40) % 2
    task = SimpleNamespace(train=TensorImages(x, y), val=TensorImages(x[:0], y[:0]), test=TensorImages(x, y),
                           num_classes=2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 2))
    r = finetune(cfg(**{"reg.kind": "l2"}), task=task, model=net, out=str(tmp_path / "run"))
    assert r["val"] is None and r["test"]["n"] == 40
    assert not (tmp_path / "run" / "split.json").exists()


def test_model_must_be_a_module(tmp_path, data):
    with pytest.raises(L2SPError, match="model= must be a torch.nn.Module"):
        finetune(cfg(), task=data, model="resnet", out=str(tmp_path / "run"))


def test_adamw_groups_betas_eps_and_decay_only_where_unpenalized():
    c = cfg(**{"optim.name": "adamw", "optim.betas": [0.8, 0.99], "optim.eps": 1e-6, "optim.weight_decay": 0.05})
    w0, net = source_and_model()
    reg = l2sp.regularizer("l2-sp", net, w0, alpha=0.1, beta=0.01, include="weights")
    opt = build_optimizer(net, c, reg.penalized_names())
    assert isinstance(opt, torch.optim.AdamW)
    pen, free = opt.param_groups
    assert (pen["weight_decay"], free["weight_decay"]) == (0.0, 0.05)
    assert pen["betas"] == (0.8, 0.99) and pen["eps"] == 1e-6
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[id(p)] for p in pen["params"]} == {"0.weight", "3.weight", "3.bias"}  # S̄ always gets β
    assert resolve({}).optim.name == "sgd" and resolve({}).optim.betas == [0.9, 0.999]
    with pytest.raises(L2SPError, match="optim.name='adam' is not valid; choose one of sgd, adamw"):
        resolve({}, ["optim.name=adam"])
    with pytest.raises(L2SPError, match="optim.betas"):
        resolve({}, ["optim.betas=[0.9, 1.5]"])


def test_reg_kind_and_mode_come_from_the_registries():
    from l2sp.engine.config import reg_kinds
    from l2sp.optim import MODES
    from l2sp.penalties import penalty_names

    assert reg_kinds() == ("none", *penalty_names())
    with pytest.raises(L2SPError, match="reg.kind='l3' is not valid; choose one of none, l2, l2-sp"):
        resolve({}, ["reg.kind=l3"])
    with pytest.raises(L2SPError, match=f"reg.mode='fast' is not valid; choose one of {', '.join(MODES)}"):
        resolve({}, ["reg.mode=fast"])
    for kind in penalty_names():
        assert resolve({}, [f"reg.kind={kind}"]).reg.kind == kind


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_nan_or_negative_numbers_are_refused(value):
    with pytest.raises(L2SPError, match="optim.lr=.* must be a finite number > 0"):
        resolve({}, [f"optim.lr={'.nan' if value == 'nan' else '.inf' if value == 'inf' else value}"])
    with pytest.raises(L2SPError, match="reg.alpha"):
        resolve({}, ["reg.alpha=.nan"])
    with pytest.raises(L2SPError, match="train.ckpt_every=-1"):
        resolve({}, ["train.ckpt_every=-1"])


def test_on_device_datasets_get_no_workers_and_no_pinning():
    on = SimpleNamespace(on_device=True)
    assert loader_options(on, 4, torch.device("cuda")) == {"num_workers": 0, "pin_memory": False}
    assert loader_options([], 4, torch.device("cuda")) == {"num_workers": 4, "pin_memory": True}
    assert loader_options([], 2, torch.device("cpu")) == {"num_workers": 2, "pin_memory": False}


@pytest.mark.parametrize("on_device", [False, True])
def test_data_on_device_passes_the_run_device(monkeypatch, on_device):
    import l2sp.data
    from l2sp.engine.classification import setup

    seen = {}

    def fake_build(name, **kw):
        seen.update(kw)
        return synthetic_task(num_classes=3, n_train=32, n_val=0, n_test=8)

    monkeypatch.setattr(l2sp.data, "build_task", fake_build)
    c = cfg(**{"data.task": "fashion-mnist-target", "data.on_device": on_device, "reg.kind": "l2",
               "model.options": {"widths": [4, 4, 4]}})
    c.model.arch = "small_resnet"
    setup(c)
    assert seen.get("device") == (torch.device("cpu") if on_device else None)


def test_print_config_shows_every_key_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["finetune", "fashion-mnist", "reg.alpha=0.3", "--print-config", "--out", str(out)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert set(flatten(printed)) == set(flatten(Config().to_dict()))
    assert printed["reg"]["alpha"] == 0.3 and printed["out"] == str(out) and printed["name"] == "fashion-mnist"
    assert resolve(printed).to_dict() == printed  # the printed config resolves to itself
    assert not out.exists()


def test_segment_print_config(capsys):
    from l2sp.segmentation.config import SegConfig

    assert main(["segment", "cityscapes-fcn-l2-sp", "optim.steps=7", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert set(flatten(printed)) == set(flatten(SegConfig().to_dict()))
    assert printed["optim"]["steps"] == 7 and printed["model"]["output_stride"] == 8


def test_python_dash_m_l2sp_is_the_command():
    run = subprocess.run([sys.executable, "-m", "l2sp", "presets"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "fashion-mnist" in run.stdout.split()
    bad = subprocess.run([sys.executable, "-m", "l2sp", "finetune", "fashion-mnist", "reg.kind=l3"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("l2sp: error: reg.kind='l3'")


def test_pixel_cross_entropy_leaves_ignored_pixels_out():
    from l2sp.segmentation.run import pixel_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=g)
    mask = torch.randint(0, 4, (2, 5, 6), generator=g)
    mask[0, :2] = 255
    logp = logits.double().log_softmax(1)
    keep = mask != 255
    picked = logp.gather(1, mask.clamp_max(3)[:, None])[:, 0]
    want = -(picked[keep]).mean()
    assert float(pixel_cross_entropy(logits, mask)) == pytest.approx(float(want), rel=1e-6)


def test_validation_metrics_are_logged_with_a_val_prefix(tmp_path, data):
    w0, net = source_and_model()
    finetune(cfg(**{"train.eval_every": 4}), task=data, model=net, source=w0, out=str(tmp_path / "run"))
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "val_top1" in r] == [4, 8]


class Recorder(l2sp.engine.Hook):
    """Records what a user hook sees: the steps, the learning rate, Ω at each step."""

    def __init__(self) -> None:
        self.events: list = []

    def before_train(self, trainer, state) -> None:
        self.events.append(("before", state.step))

    def after_step(self, trainer, state) -> None:
        with torch.no_grad():
            omega = float(trainer.regularizer())
        self.events.append((state.step, trainer.optimizer.param_groups[0]["lr"], omega))

    def after_train(self, trainer, state) -> None:
        self.events.append(("after", state.step))


def test_hooks_see_every_step_and_change_no_number(tmp_path, data):
    rec = Recorder()
    w0, net = source_and_model()
    finetune(cfg(), task=data, model=net, source=w0, hooks=[rec], out=str(tmp_path / "hooked"))
    plain, _ = engine_weights(tmp_path / "plain", cfg(), data, None)
    assert rec.events[0] == ("before", 0) and rec.events[-1] == ("after", STEPS)
    steps = rec.events[1:-1]
    assert [e[0] for e in steps] == list(range(1, STEPS + 1))
    # the rate after step t is the schedule's rate of step t (lr/10 from step 6 on)
    assert [e[1] for e in steps] == pytest.approx([0.05] * 5 + [0.005] * 3)
    assert steps[0][2] > 0  # Ω > 0 once the weights moved from w0 (the head is in S̄)
    assert all(torch.equal(plain[k], v) for k, v in net.state_dict().items())


def test_report_labels_come_from_the_penalty_registry():
    from l2sp.experiments.report import ORDER, label
    from l2sp.penalties import get_penalty, penalty_names

    for kind in penalty_names():
        assert label(kind) == get_penalty(kind).label
    assert label("l2-sp+freeze") == "L2-SP + freezing" and label("other") == "other"
    assert ORDER[: len(penalty_names())] == list(penalty_names())


def test_on_device_data_trains_exactly_like_the_host_pipeline(tmp_path):
    """data.on_device=true (images decoded once, uint8 on the run's device, augmented there: CPU here) ends with
    the very weights of the host pipeline: same batches, same random draws."""
    import numpy as np

    from l2sp.engine.classification import setup
    from l2sp.models import create
    from test_data_fashion import write_idx  # the data tests' IDX writer

    rng = np.random.default_rng(0)
    for part, per in (("train", 30), ("t10k", 6)):
        labels = np.repeat(np.arange(10), per)
        rng.shuffle(labels)
        write_idx(tmp_path / f"{part}-images-idx3-ubyte.gz", rng.integers(0, 256, (len(labels), 28, 28)))
        write_idx(tmp_path / f"{part}-labels-idx1-ubyte.gz", labels)
    torch.manual_seed(0)
    save_path = tmp_path / "source.safetensors"
    save_tensors(save_path, create("small_resnet", 5, 1, options={"widths": [4, 4, 8]}).state_dict())
    base = {"model": {"arch": "small_resnet", "weights": str(save_path), "options": {"widths": [4, 4, 8]}},
            "data": {"task": "fashion-mnist-target", "root": str(tmp_path), "n_per_class": 10, "val_per_class": 4},
            "optim": {"lr": 0.05, "batch_size": 16, "steps": 6, "milestones": [4]},
            "train": {"log_every": 3, "ckpt_every": 0, "quiet": True, "tensorboard": False, "device": "cpu"}}
    weights = {}
    for on in (False, True):
        c = resolve(base, [f"data.on_device={str(on).lower()}"])
        assert bool(getattr(setup(c).task.train, "on_device", False)) is on
        finetune(c, out=str(tmp_path / f"run-{on}"))
        weights[on] = load_tensors(tmp_path / f"run-{on}" / "model.safetensors")[0]
    assert all(torch.equal(weights[False][k], weights[True][k]) for k in weights[False])


def test_own_model_runs_resume_exactly_and_say_what_they_trained(tmp_path, data):
    from l2sp.engine.run import load_run

    full, _ = engine_weights(tmp_path / "full", cfg(**{"train.save_checkpoint": True}), data, smooth_ce)
    part = tmp_path / "part"
    c = cfg(**{"train.save_checkpoint": True})
    w0, net = source_and_model()
    assert finetune(c, task=data, model=net, loss=smooth_ce, source=w0, out=str(part), stop_after=3)["interrupted"]
    w0, net = source_and_model()  # a new process would build the network again
    finetune(c, task=data, model=net, loss=smooth_ce, source=w0, out=str(part), resume=True)
    assert all(torch.equal(full[k], v) for k, v in net.state_dict().items())
    saved = resolve(str(part / "config.yaml"))
    assert saved.model.arch == "module:Sequential" and saved.model.weights is None
    with pytest.raises(L2SPError, match="trained your own network"):
        _ = load_run(part, task=data).model
