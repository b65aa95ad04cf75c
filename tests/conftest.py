import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from l2sp.io import save_tensors
from l2sp.models import small_resnet

# one thread per pytest worker: on a 2-core machine more threads than cores slow torch down sharply
torch.set_num_threads(int(os.environ.get("L2SP_TEST_THREADS", "1")))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 (seeds code that uses the global generator)
    torch.manual_seed(0)


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not beside the checkout")
    return SHARED


def tiny_config(tmp_path: Path, widths=(8, 8, 16), classes: int = 4, sizes=(96, 40),
                optim: str = "lr: 0.05, batch_size: 32, steps: 12, milestones: [8]",
                train: str = "log_every: 4, ckpt_every: 4, tensorboard: false") -> Path:
    """A YAML config on the synthetic task (``sizes`` = training, validation = test images) with a local source
    checkpoint (a small ResNet of ``widths``), written in ``tmp_path``."""
    torch.manual_seed(0)
    src = tmp_path / "source.safetensors"
    save_tensors(src, small_resnet(10, 1, widths=widths).state_dict())
    path = tmp_path / "tiny.yaml"
    n_train, n_eval = sizes
    path.write_text(
        f"model: {{arch: small_resnet, weights: {src}, options: {{widths: {list(widths)}}}}}\n"
        f"data: {{task: synthetic, options: {{num_classes: {classes}, n_train: {n_train}, n_val: {n_eval}, "
        f"n_test: {n_eval}}}}}\n"
        "reg: {kind: l2-sp, alpha: 0.1, beta: 0.01}\n"
        f"optim: {{{optim}}}\n"
        f"train: {{{train}}}\n"
    )
    return path


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    """The tiny synthetic-task config of the CLI and search tests."""
    return tiny_config(tmp_path)
