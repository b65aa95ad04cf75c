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


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    """A YAML config on the synthetic task with a local source checkpoint (the CLI and search tests)."""
    torch.manual_seed(0)
    src = tmp_path / "source.safetensors"
    save_tensors(src, small_resnet(10, 1, widths=(8, 8, 16)).state_dict())
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"model: {{arch: small_resnet, weights: {src}, options: {{widths: [8, 8, 16]}}}}\n"
        "data: {task: synthetic, options: {num_classes: 4, n_train: 96, n_val: 40, n_test: 40}}\n"
        "reg: {kind: l2-sp, alpha: 0.1, beta: 0.01}\n"
        "optim: {lr: 0.05, batch_size: 32, steps: 12, milestones: [8]}\n"
        "train: {log_every: 4, ckpt_every: 4, tensorboard: false}\n"
    )
    return path
