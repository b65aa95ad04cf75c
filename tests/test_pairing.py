"""Seed pairing: with the same ``train.seed``, two penalties see the same batches (data order and augmentation)
and start from the same new head; another seed changes both. Observed through the public API only
(``l2sp.finetune`` with a :class:`l2sp.engine.Hook`), on the augmented Fashion-MNIST target task."""

import hashlib

import pytest
import torch

import l2sp
from l2sp.data import fashion_mnist
from l2sp.engine import Hook
from l2sp.io import save_tensors
from l2sp.models import small_resnet

pytestmark = pytest.mark.skipif(fashion_mnist.locate() is None, reason="Fashion-MNIST files not installed")

STEPS = 6


class Recorder(Hook):
    """The new head at the start, and a digest of every training batch (inputs as the model receives them)."""

    def __init__(self) -> None:
        self.head: dict[str, torch.Tensor] = {}
        self.batches: list[str] = []
        self.shapes: list[tuple] = []
        self._handle = None

    def before_train(self, trainer, state) -> None:
        self.head = {k: v.detach().clone() for k, v in trainer.model.fc.state_dict().items()}
        self._handle = trainer.model.register_forward_pre_hook(self._record)

    def _record(self, module, args) -> None:
        x = args[0].detach().contiguous().cpu()
        self.shapes.append(tuple(x.shape))
        self.batches.append(hashlib.sha256(x.numpy().tobytes()).hexdigest())

    def after_train(self, trainer, state) -> None:
        self._handle.remove()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("source") / "source.safetensors"
    save_tensors(path, small_resnet(5, 1, widths=(4, 4, 8)).state_dict())
    return path


def run(source, tmp_path, kind: str, seed: int, alpha: float) -> tuple[Recorder, dict]:
    rec = Recorder()
    over = {"model.weights": str(source), "model.options": {"widths": [4, 4, 8]}, "data.n_per_class": 10,
            "data.val_per_class": 10, "reg.kind": kind, "reg.alpha": alpha, "reg.beta": 0.01, "optim.lr": 0.05,
            "optim.steps": STEPS, "optim.milestones": [4], "optim.batch_size": 16, "train.seed": seed,
            "train.device": "cpu", "train.tensorboard": False, "train.save_checkpoint": False,
            "train.ckpt_every": 0, "train.log_every": 3, "eval.splits": ["val"]}
    res = l2sp.finetune("fashion-mnist", overrides=over, hooks=[rec], out=str(tmp_path / f"{kind}-s{seed}"), quiet=True,
                        overwrite=True)
    return rec, res


def test_same_seed_same_batches_and_head_across_penalties(source, tmp_path):
    a, ra = run(source, tmp_path, "l2", 3, 0.01)
    b, rb = run(source, tmp_path, "l2-sp", 3, 0.1)
    assert len(a.batches) == STEPS and a.shapes[0] == (16, 1, 28, 28)
    assert a.batches == b.batches  # same order, same augmented pixels, step by step
    assert a.head.keys() == {"weight", "bias"} and a.head.keys() == b.head.keys()
    for k in a.head:
        assert torch.equal(a.head[k], b.head[k])
    # the methods themselves differ: same data, different penalties, different training
    assert (ra["regularizer"], rb["regularizer"]) == ("l2", "l2-sp")
    assert ra["final_loss"] != rb["final_loss"]


def test_same_penalty_other_seed_other_batches_and_head(source, tmp_path):
    a, _ = run(source, tmp_path, "l2-sp", 3, 0.1)
    c, _ = run(source, tmp_path, "l2-sp", 4, 0.1)
    assert len(c.batches) == STEPS
    assert all(x != y for x, y in zip(a.batches, c.batches))
    assert not torch.equal(a.head["weight"], c.head["weight"])

