"""The trainer and finetune(): short runs on synthetic data, equivalence with a hand-written L2-SP loop,
resume equivalence, divergence, run-directory checks, the data stream."""

import json

import pytest
import torch
import torch.nn.functional as F

import l2sp
from l2sp.engine.checkpoint import load as load_checkpoint
from l2sp.engine.config import resolve
from l2sp.engine.run import build_optimizer, finetune, load_run, seed_everything
from l2sp.engine.schedule import Schedule, make_scheduler
from l2sp.engine.synthetic import synthetic_task
from l2sp.engine.trainer import StepBatchSampler, train_loader
from l2sp.errors import L2SPError
from l2sp.io import load_tensors, save_tensors
from l2sp.models import build_model, create


@pytest.fixture(scope="module")
def task():
    return synthetic_task(num_classes=5, n_train=160, n_val=50, n_test=60, noise=1.0, seed=1)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("src") / "source.safetensors"
    save_tensors(path, create("small_resnet", 10, 1, options={"widths": [8, 16, 16]}).state_dict())
    return str(path)


def config(source, **over):
    c = {
        "model": {"arch": "small_resnet", "weights": source, "options": {"widths": [8, 16, 16]}},
        "reg": {"kind": "l2-sp", "alpha": 0.1, "beta": 0.01},
        "optim": {"lr": 0.05, "batch_size": 32, "steps": 24, "milestones": [16]},
        "train": {
            "log_every": 5,
            "ckpt_every": 8,
            "quiet": True,
            "tensorboard": False,
            "channels_last": False,
        },
    }
    return resolve(c, over)


def test_short_run_writes_the_run_directory(task, source, tmp_path):
    out = tmp_path / "run"
    r = finetune(config(source, **{"train.tensorboard": True}), task=task, out=str(out))
    for name in (
        "config.yaml",
        "split.json",
        "metrics.jsonl",
        "results.json",
        "model.safetensors",
        "checkpoints/last.pt",
    ):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(r))
    assert r["steps"] == 24 and r["head"] == "fc" and r["regularizer"] == "l2-sp"
    assert r["test"]["n"] == 60 and len(r["test"]["per_class"]) == 5
    assert r["test_acc"] > 0.5 and r["val_acc"] > 0.5  # chance is 0.2: it learned
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in recs if "loss" in x]
    assert [x["step"] for x in train] == [5, 8, 10, 15, 16, 20, 24]
    assert [x["lr"] for x in train if x["step"] <= 16] == pytest.approx([0.05] * 5)
    assert [x["lr"] for x in train if x["step"] > 16] == pytest.approx([0.005] * 2)
    assert all(x["penalty"] >= 0 and x["images_per_s"] > 0 for x in train)
    assert json.loads((out / "split.json").read_text()) == task.split
    assert resolve(str(out / "config.yaml")).reg.alpha == 0.1


def test_matches_a_hand_written_loss_plus_penalty_loop(task, source, tmp_path):
    """The engine (attach, coupled, weight decay 0 on penalized parameters) follows exactly the trajectory
    of SGD on CE + Ω computed with autograd, with the same batches. (A few steps only: this small ReLU
    network is chaotic enough that a 1e-8 perturbation grows to 1e-4 within 24 steps.)"""
    cfg = config(
        source,
        **{
            "train.ckpt_every": 0,
            "train.save_checkpoint": False,
            "optim.weight_decay": 0.3,
            "optim.steps": 12,
            "optim.milestones": [8],
        },
    )
    finetune(cfg, task=task, out=str(tmp_path / "run"))
    engine = load_tensors(tmp_path / "run" / "model.safetensors")[0]

    seed_everything(cfg.train.seed)
    built = build_model("small_resnet", 5, weights=source, in_channels=1, options={"widths": [8, 16, 16]})
    model = built.model
    reg = l2sp.regularizer("l2-sp", model, built.source_state, alpha=0.1, beta=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # no weight decay anywhere
    sched = make_scheduler(opt, Schedule("step", 12, [8], 0.1))
    model.train()
    for x, y in train_loader(task.train, 32, cfg.train.seed, 0, 12):
        loss = F.cross_entropy(model(x), y) + reg()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    ref = model.state_dict()
    assert set(ref) == set(engine)
    for k in ref:
        torch.testing.assert_close(engine[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


def test_optimizer_weight_decay_only_where_nothing_penalizes(task, source):
    built = build_model("small_resnet", 5, weights=source, in_channels=1, options={"widths": [8, 16, 16]})
    reg = l2sp.regularizer("l2-sp", built.model, built.source_state, alpha=0.1, beta=0.01, include="weights")
    opt = build_optimizer(built.model, config(source, **{"optim.weight_decay": 1e-3}), reg.penalized_names())
    ids = {id(p): n for n, p in built.model.named_parameters()}
    pen = {ids[id(p)] for p in opt.param_groups[0]["params"]}
    free = {ids[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.param_groups[1]["weight_decay"] == 1e-3
    assert pen == reg.penalized_names() and free == set(reg.free) and free
    assert "fc.weight" in pen and "stem.1.weight" in free  # BN γ free with include=weights


@pytest.mark.parametrize("stop", [8, 11])
def test_resume_gives_the_same_weights(task, source, tmp_path, stop):
    cfg = config(source)
    full = finetune(cfg, task=task, out=str(tmp_path / "full"))
    part = finetune(cfg, task=task, out=str(tmp_path / "part"), stop_after=stop)
    assert part == {"interrupted": True, "step": stop, "run_dir": str(tmp_path / "part")}
    assert load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["step"] == stop
    resumed = finetune(cfg, task=task, out=str(tmp_path / "part"), resume=True)
    a = load_tensors(tmp_path / "full" / "model.safetensors")[0]
    b = load_tensors(tmp_path / "part" / "model.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_acc"] == full["test_acc"] and resumed["final_loss"] == full["final_loss"]
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # no duplicated log lines
    # resuming a finished run returns its results
    assert finetune(cfg, task=task, out=str(tmp_path / "part"), resume=True) == resumed


def test_divergence_stops_and_keeps_the_last_good_checkpoint(task, source, tmp_path):
    cfg = config(source, **{"optim.lr": 1e6, "optim.steps": 40, "train.ckpt_every": 1, "train.log_every": 10})
    with pytest.raises(L2SPError) as exc:
        finetune(cfg, task=task, out=str(tmp_path / "run"))
    msg = str(exc.value)
    step = int(msg.split(" at step ")[1].split(";")[0])
    assert 1 <= step <= 40 and f"last good checkpoint (step {step - 1})" in msg and "\n" not in msg
    assert msg.startswith(
        ("loss became nan", "loss became inf", "parameters or BatchNorm statistics became NaN/Inf")
    )
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["step"] == step - 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "results.json").exists()


def test_run_directory_with_another_config(task, source, tmp_path):
    out = str(tmp_path / "run")
    finetune(config(source, **{"optim.steps": 4}), task=task, out=out)
    with pytest.raises(L2SPError, match=r"different config \(reg.alpha: 0.1 != 0.2\)"):
        finetune(config(source, **{"optim.steps": 4, "reg.alpha": 0.2}), task=task, out=out)
    with pytest.raises(L2SPError, match="different config"):
        finetune(config(source, **{"optim.steps": 4, "reg.alpha": 0.2}), task=task, out=out, resume=True)
    with pytest.raises(L2SPError, match="--resume"):
        finetune(config(source, **{"optim.steps": 4}), task=task, out=out)
    r = finetune(config(source, **{"optim.steps": 4, "reg.alpha": 0.2}), task=task, out=out, overwrite=True)
    assert r["steps"] == 4 and resolve(f"{out}/config.yaml").reg.alpha == 0.2


def test_pretraining_from_scratch_and_no_penalty(task, tmp_path):
    base = {
        "model": {"arch": "small_resnet", "weights": None, "options": {"widths": [8, 8, 8]}},
        "optim": {"steps": 6, "batch_size": 32, "milestones": [4]},
        "train": {"quiet": True, "tensorboard": False, "ckpt_every": 0},
    }
    r = finetune(resolve(base, {"reg.kind": "l2", "reg.alpha": 1e-3}), task=task, out=str(tmp_path / "a"))
    assert r["regularizer"] == "l2"
    r = finetune(resolve(base, {"reg.kind": "none"}), task=task, out=str(tmp_path / "b"))
    assert r["regularizer"] == "none"
    with pytest.raises(L2SPError, match="needs pre-trained weights"):
        finetune(resolve(base, {"reg.kind": "l2-sp"}), task=task, out=str(tmp_path / "c"))


def test_bf16_autocast_and_ten_crop_on_cpu(source, tmp_path):
    t10 = synthetic_task(num_classes=5, n_train=64, n_val=0, n_test=20, seed=2, ten_crop=True)
    r = finetune(
        config(source, **{"train.amp": "bf16", "optim.steps": 3, "train.channels_last": True}),
        task=t10,
        out=str(tmp_path / "run"),
    )
    assert r["val"] is None and r["test"]["n"] == 20 and 0 <= r["test_acc"] <= 1


def test_load_run_rebuilds_models(task, source, tmp_path):
    out = tmp_path / "run"
    finetune(config(source, **{"optim.steps": 4}), task=task, out=str(out))
    run = load_run(out, task=task)
    assert run.head_name == "fc" and run.regularizer_kind == "l2-sp" and run.source_task is None
    w = load_tensors(out / "model.safetensors")[0]
    assert all(torch.equal(run.model.state_dict()[k], w[k]) for k in w) and not run.model.training
    src = load_tensors(source)[0]
    assert run.source_model.fc.out_features == 10
    assert all(torch.equal(run.source_model.state_dict()[k], src[k]) for k in src)
    assert run.results["steps"] == 4 and run.config.optim.steps == 4


def test_step_batches_are_epoch_permutations_and_resumable():
    s = StepBatchSampler(n=10, batch_size=3, seed=5, start=0, total=9)  # 3 batches per epoch, 1 dropped
    batches = [[i for i, _ in b] for b in s]
    for e in range(3):
        seen = sum(batches[3 * e : 3 * e + 3], [])
        assert len(seen) == 9 and len(set(seen)) == 9
    assert batches[0:3] != batches[3:6]
    tail = [[i for i, _ in b] for b in StepBatchSampler(10, 3, 5, 4, 9)]
    assert tail == batches[4:]
    seeds = [b[0][1] for b in StepBatchSampler(10, 3, 5, 0, 9)]
    assert len(set(seeds)) == 9
    with pytest.raises(L2SPError, match="fewer than optim.batch_size"):
        StepBatchSampler(2, 3, 0, 0, 1)


def test_augmentation_stream_does_not_depend_on_workers_or_caller_rng(task):
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.rand(2), i

    a = [x for x, _ in train_loader(Noisy(), 4, 0, 0, 6)]
    torch.manual_seed(999)
    b = [x for x, _ in train_loader(Noisy(), 4, 0, 2, 6)]
    c = [x for x, _ in train_loader(Noisy(), 4, 0, 0, 6, num_workers=2)]
    assert all(torch.equal(u, v) for u, v in zip(a[2:], b))
    assert all(torch.equal(u, v) for u, v in zip(a, c))
    state = torch.get_rng_state()
    list(train_loader(Noisy(), 4, 0, 0, 2))
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG untouched


def test_checkpoint_restores_every_rng(tmp_path):
    import random

    import numpy as np

    from l2sp.engine import checkpoint

    checkpoint.save(tmp_path / "c.pt", step=3)
    draws = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])  # noqa: NPY002
    state = checkpoint.load(tmp_path / "c.pt")
    assert state["step"] == 3
    checkpoint.set_rng_state(state["rng"])
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])  # noqa: NPY002
    assert torch.equal(draws[0], again[0]) and (draws[1] == again[1]).all() and draws[2] == again[2]
    with pytest.raises(L2SPError, match="no checkpoint"):
        checkpoint.load(tmp_path / "missing.pt")


def test_validation_during_training(task, source, tmp_path):
    out = tmp_path / "run"
    finetune(config(source, **{"train.eval_every": 12}), task=task, out=str(out))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [x for x in recs if "val_top1" in x]
    assert [x["step"] for x in vals] == [12, 24] and all(0 <= x["val_top1"] <= 1 for x in vals)
    final = json.loads((out / "results.json").read_text())
    assert vals[-1]["val_top1"] == pytest.approx(final["val_acc"])


def test_batched_and_per_item_datasets_give_the_same_batches(task):
    class PerItem(torch.utils.data.Dataset):
        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            return self.ds[i]

    fast = list(train_loader(task.train, 32, 3, 0, 7))
    slow = list(train_loader(PerItem(task.train), 32, 3, 0, 7))
    for (a, ya), (b, yb) in zip(fast, slow):
        assert torch.equal(a, b) and torch.equal(ya, yb) and ya.dtype == torch.int64
