"""DDP through torchrun on CPU (gloo, 2 processes, one thread each): the same weights and accuracy as one process,
SIGKILL and --resume under DDP, rank 0 alone writing the run directory, the global batch split over ranks."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import l2sp
from l2sp.engine import distributed
from l2sp.engine.run import finetune
from l2sp.engine.synthetic import synthetic_task
from l2sp.engine.trainer import Hook, SeededBatches, StepBatchSampler
from l2sp.errors import L2SPError
from l2sp.io import load_tensors

HERE = Path(__file__).resolve().parent
STEPS = 10


def _torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (``python -m torch.distributed.run``), one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
            out, err = proc.communicate()
            pytest.fail(f"torchrun {' '.join(args)} hung for {timeout} s: {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# --- the job a torchrun test starts (also run in one process for the reference) -----------------------------

class KillRank1(Hook):
    """SIGKILL the process of rank 1 after optimizer step ``at`` (the others then fail too)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def after_step(self, trainer, state) -> None:
        if state.step == self.at and distributed.current().rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)


def job(out: str, *, kill_at: int = 0, resume: bool = False) -> tuple[dict, list, float]:
    """An L2-SP run of a tiny conv net with dropout (its own w0, new head in S̄) on a synthetic task, batch 8
    (global). Returns the results, the labels of every step's batch as the loss saw them, and Σ of the weights."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
                        nn.Linear(4 * 13 * 13, 7))
    w0 = l2sp.snapshot(net)
    net[5] = nn.Linear(4 * 13 * 13, 3)
    data = synthetic_task(num_classes=3, n_train=40, n_val=12, n_test=24, seed=2)
    cfg = {"reg": {"kind": "l2-sp", "alpha": 0.1, "beta": 0.01},
           "optim": {"lr": 0.05, "batch_size": 8, "steps": STEPS, "milestones": [7]},
           "train": {"log_every": 2, "ckpt_every": 4, "quiet": True, "tensorboard": False, "channels_last": False,
                     "device": "cpu", "bn": "frozen"}}
    hooks = [KillRank1(kill_at)] if kill_at else []
    seen: list[list[int]] = []

    def loss(output, target):
        seen.append(target.tolist())
        return F.cross_entropy(output.float(), target)

    results = finetune(cfg, task=data, model=net, source=w0, out=out, hooks=hooks, resume=resume, loss=loss)
    return results, seen, float(sum(p.detach().double().sum() for p in net.parameters()))


def _job_main() -> None:
    """Entry point under torchrun: ``python test_distributed.py OUT [--kill-at K] [--resume]``."""
    out, args = sys.argv[1], sys.argv[2:]
    kill_at = int(args[args.index("--kill-at") + 1]) if "--kill-at" in args else 0
    results, seen, total = job(out, kill_at=kill_at, resume="--resume" in args)
    rank = distributed.launched().rank
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"test_acc": results["test_acc"], "labels": seen,
                                                          "sum": total}))


# --- tests ----------------------------------------------------------------------------------------------------

def test_global_batch_must_split_over_ranks():
    assert distributed.local_batch(12, world=4) == 3
    with pytest.raises(L2SPError, match=r"optim.batch_size=10 .*over 4 processes; use a multiple of 4 \(8 or 12\)"):
        distributed.local_batch(10, world=4)
    assert distributed.current() == distributed.Rank() and not distributed.current().distributed


def test_device_of_a_rank(monkeypatch):
    monkeypatch.setattr(distributed, "current", lambda: distributed.Rank(3, 4, 1))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.device(torch.device("cuda")) == torch.device("cuda", 1)
    assert distributed.device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(L2SPError, match=r"^train.device=cuda:0 puts every rank on the same GPU; .*"):
        distributed.device(torch.device("cuda", 0))


def test_run_refuses_a_global_batch_that_does_not_split_before_writing(tmp_path, monkeypatch):
    """Under 2 ranks, optim.batch_size=9 stops the run before the run directory is claimed."""
    monkeypatch.setattr(distributed, "current", lambda: distributed.Rank(0, 2, 0))
    cfg = {"data": {"task": "synthetic"}, "model": {"arch": "small_resnet", "weights": None},
           "reg": {"kind": "l2"}, "optim": {"batch_size": 9, "steps": 2}, "train": {"device": "cpu", "quiet": True}}
    with pytest.raises(L2SPError, match=r"^optim.batch_size=9 \(the global batch\) does not split over 2 "
                                        r"processes; use a multiple of 2 \(8 or 10\) or another --nproc_per_node$"):
        finetune(cfg, out=str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_rank_slices_concatenate_to_the_one_process_batch():
    """Rank r's slice is positions [r·B/N, (r+1)·B/N) of the batch one process builds, augmentation included
    (an item-wise transform drawing from the batch's seeded RNG stream)."""

    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return torch.full((2,), float(i)) + torch.rand(2), i

    items = next(iter(StepBatchSampler(20, 8, seed=3, start=4, total=5)))
    whole = SeededBatches(Noisy()).__getitems__(items)
    parts = [SeededBatches(Noisy(), (r, 4)).__getitems__(items) for r in range(4)]
    assert [len(p) for p in parts] == [2, 2, 2, 2]
    flat = [x for p in parts for x in p]
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(whole, flat, strict=True))


def test_sync_batchnorm_converts_only_layers_that_train():
    from l2sp.freeze import freeze_bn_stats

    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)))
    freeze_bn_stats(net[1])
    w = net[2][1].weight
    assert distributed.sync_batchnorm(net) == 1
    assert type(net[1]) is nn.BatchNorm2d and isinstance(net[2][1], nn.SyncBatchNorm) and net[2][1].weight is w


def _weights(path: Path) -> dict:
    return load_tensors(path)[0]


def _close(a: dict, b: dict, atol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The labels of each step of :func:`job` in one process."""
    out = tmp_path_factory.mktemp("one") / "run"
    torch.set_num_threads(1)
    return job(str(out))[1]


@pytest.mark.slow
def test_ddp_kill_and_resume_equals_the_uninterrupted_run(tmp_path, reference):
    """2 ranks (gloo), dropout in the net: rank 1 SIGKILLed after step 6 (checkpoint at step 4) ends the job;
    --resume under DDP ends with exactly the weights and accuracy of an uninterrupted DDP run (each rank's RNG
    stream restored), identical on both ranks; rank r trained on slice r (4 of the 8 examples) of the one-process
    batch of every step."""
    whole, out = tmp_path / "whole", tmp_path / "run"
    assert _torchrun(str(HERE / "test_distributed.py"), str(whole)).returncode == 0
    killed = _torchrun(str(HERE / "test_distributed.py"), str(out), "--kill-at", "6")
    assert killed.returncode != 0, killed.stderr[-2000:]
    assert not (out / "results.json").exists() and (out / "checkpoints" / "last.pt").is_file()
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    done = _torchrun(str(HERE / "test_distributed.py"), str(out), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    _close(_weights(out / "model.safetensors"), _weights(whole / "model.safetensors"), atol=0)
    ranks = [json.loads((tmp_path / f"run.rank{r}.json").read_text()) for r in (0, 1)]
    acc = json.loads((whole / "results.json").read_text())["test_acc"]
    assert json.loads((out / "results.json").read_text())["test_acc"] == acc
    assert [r["test_acc"] for r in ranks] == [acc, acc] and ranks[0]["sum"] == ranks[1]["sum"]
    halves = [json.loads((tmp_path / f"whole.rank{r}.json").read_text())["labels"] for r in (0, 1)]
    assert [a + b for a, b in zip(*halves, strict=True)] == reference
    assert [a + b for a, b in zip(ranks[0]["labels"], ranks[1]["labels"], strict=True)] == reference[4:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 10]  # one line per log step: rank 1 wrote none


@pytest.mark.slow
def test_torchrun_cli_equals_one_process_and_rank0_writes(tmp_path):
    """``torchrun -m l2sp finetune CONFIG`` (L2-SP from a source file, new head): the same weights (within 1e-4),
    accuracy and logged losses as one process; one TensorBoard file, the metrics written once, the result printed
    once."""
    from l2sp.io import save_tensors
    from l2sp.models.small_resnet import small_resnet

    torch.manual_seed(0)
    save_tensors(tmp_path / "source.safetensors", small_resnet(num_classes=5).state_dict())
    config = {"data": {"task": "synthetic", "options": {"num_classes": 3, "n_train": 48, "n_test": 30,
                                                        "n_val": 12}},
              "model": {"arch": "small_resnet", "weights": str(tmp_path / "source.safetensors")},
              "reg": {"kind": "l2-sp", "alpha": 0.1, "beta": 0.01}, "eval": {"splits": ["val", "test"]},
              "optim": {"lr": 0.05, "batch_size": 8, "steps": 6, "milestones": [4]},
              "train": {"log_every": 3, "eval_every": 2, "ckpt_every": 0, "quiet": True, "tensorboard": True,
                        "device": "cpu", "bn": "frozen", "channels_last": False}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    torch.set_num_threads(1)
    one = finetune(str(path), out=str(tmp_path / "one"))
    run = _torchrun("-m", "l2sp", "finetune", str(path), "--out", str(tmp_path / "two"))
    assert run.returncode == 0, run.stderr[-3000:]
    two = tmp_path / "two"
    _close(_weights(two / "model.safetensors"), _weights(tmp_path / "one" / "model.safetensors"))
    res = json.loads((two / "results.json").read_text())
    assert (res["test_acc"], res["val_acc"]) == (one["test_acc"], one["val_acc"])
    lines = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [x["step"] for x in ref] == [2, 3, 4, 6, 6]
    for a, b in zip(lines[:4], ref[:4], strict=True):  # the global batch's mean loss, not rank 0's slice
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a.get("val_top1") == b.get("val_top1")
    assert [x["step"] for x in lines if "val_top1" in x] == [2, 4, 6]  # validation on rank 0, every 2 steps
    assert len(list((two / "tb").glob("events.out.tfevents.*"))) == 1
    assert run.stdout.count("test_acc") == 1  # the result line printed by rank 0 only


def test_pixel_loss_under_ddp_is_the_mean_over_the_global_batch(monkeypatch):
    """Rank r's Σℓ/(V/N) averaged over the ranks = the mean over the valid pixels of the whole batch (the ranks'
    slices hold different numbers of ignored pixels)."""
    from l2sp.segmentation.run import IGNORE_INDEX, pixel_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 6, 6, generator=g, dtype=torch.float64)
    mask = torch.randint(0, 5, (4, 6, 6), generator=g)
    mask[:2, :4] = IGNORE_INDEX  # rank 0's slice: far fewer valid pixels
    whole = pixel_cross_entropy(logits, mask)
    valid = [(mask[2 * r:2 * r + 2] != IGNORE_INDEX).sum() for r in (0, 1)]
    monkeypatch.setattr(distributed, "current", lambda: distributed.Rank(0, 2, 0))
    monkeypatch.setattr(distributed, "mean", lambda t: (valid[0] + valid[1]).to(t.dtype) / 2)
    ranks = [pixel_cross_entropy(logits[2 * r:2 * r + 2], mask[2 * r:2 * r + 2]) for r in (0, 1)]
    torch.testing.assert_close((ranks[0] + ranks[1]) / 2, whole.float(), rtol=1e-6, atol=0)
    assert not torch.allclose((ranks[0] + ranks[1]) / 2, torch.stack(
        [torch.nn.functional.cross_entropy(logits[2 * r:2 * r + 2].float(), mask[2 * r:2 * r + 2],
                                           ignore_index=IGNORE_INDEX) for r in (0, 1)]).mean())


@pytest.mark.slow
def test_torchrun_segment_smoke(tmp_path):
    """``torchrun -m l2sp segment``: 2 ranks train an FCN (ResNet-50 backbone, frozen BN) on a tiny Cityscapes
    tree; one results file with a finite mIoU, metrics written once."""
    import torchvision

    from l2sp.io import save_tensors
    from test_segmentation_data import fake_cityscapes

    fake_cityscapes(tmp_path / "cityscapes", "train", n=4)
    fake_cityscapes(tmp_path / "cityscapes", "val", n=1, seed=1)
    torch.manual_seed(0)
    save_tensors(tmp_path / "r50.safetensors", torchvision.models.resnet50().state_dict())
    over = {"data.root": tmp_path / "cityscapes", "model.backbone": "resnet50", "model.backbone_weights": "null",
            "model.checkpoint": tmp_path / "r50.safetensors", "data.crop": 32, "data.num_workers": 0,
            "optim.batch_size": 2, "optim.steps": 2, "train.log_every": 1, "train.tensorboard": "false",
            "train.device": "cpu", "train.save_checkpoint": "false"}
    run = _torchrun("-m", "l2sp", "segment", "cityscapes-fcn-l2-sp", *[f"{k}={v}" for k, v in over.items()],
                    "--out", str(tmp_path / "seg"), "-q")
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((tmp_path / "seg" / "results.json").read_text())
    assert 0 <= res["val_miou"] <= 1 and res["steps"] == 2
    steps = [json.loads(x)["step"] for x in (tmp_path / "seg" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2] and run.stdout.count("val mIoU") == 1


@pytest.mark.slow
def test_seeds_side_by_side_equal_one_after_the_other(tmp_path, capsys):
    """``l2sp finetune CONFIG --seeds 3 --workers 2``: seeds 0, 2 in one spawned process and 1 in another give the
    weights of the same seeds run one after the other, and the same table."""
    from l2sp.cli import main
    from l2sp.experiments.seeds import run_seeds

    config = {"data": {"task": "synthetic", "options": {"num_classes": 3, "n_train": 32, "n_val": 9, "n_test": 9}},
              "model": {"arch": "small_resnet", "weights": None, "options": {"widths": [4, 8, 8]}},
              "reg": {"kind": "l2", "alpha": 0.01}, "optim": {"lr": 0.05, "batch_size": 8, "steps": 4},
              "train": {"log_every": 2, "device": "cpu", "channels_last": False}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["finetune", str(path), "--seeds", "3", "--workers", "2", "--light", "--out",
                 str(tmp_path / "par"), "-q"]) == 0
    printed = capsys.readouterr().out
    torch.set_num_threads(1)
    seq = run_seeds(str(path), 3, out=tmp_path / "seq", light=True)
    for s in range(3):
        _close(_weights(tmp_path / "par" / f"seed{s}" / "model.safetensors"),
               _weights(tmp_path / "seq" / f"seed{s}" / "model.safetensors"), atol=0)
        assert json.loads((tmp_path / "par" / f"seed{s}" / "results.json").read_text())["test_acc"] == \
            seq[s]["test_acc"]
    assert (tmp_path / "par" / "summary.md").is_file() and "| c | 3 |" in printed
    assert main(["finetune", str(path), "--workers", "2"]) == 2
    assert "l2sp: error: --workers 2 runs seeds side by side: give --seeds N too" in capsys.readouterr().err


if __name__ == "__main__":
    _job_main()
