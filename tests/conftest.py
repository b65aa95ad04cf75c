import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

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
