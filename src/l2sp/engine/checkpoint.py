"""Training-state checkpoints, written atomically and read back with ``weights_only=True``.

A checkpoint holds the step, the model, optimizer, LR scheduler, AMP scaler and regularizer states and the
RNG states of torch (CPU and CUDA), numpy and Python, so that a resumed run continues exactly.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from l2sp.errors import L2SPError
from l2sp.io import atomic_torch_save


def rng_state() -> dict:
    np_state = np.random.get_state()  # noqa: NPY002 (the legacy global RNG is what user code seeds)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            *map(float, np_state[2:4]),
            float(np_state[4]),
        ],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` (its tensors wherever the checkpoint was mapped: RNG states live on the CPU)."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np_state = (name, keys.cpu().numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached))
    np.random.set_state(np_state)  # noqa: NPY002
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def save(path: str | Path, **state: Any) -> Path:
    """Atomically write ``state`` plus the current RNG states."""
    return atomic_torch_save(path, {**state, "rng": rng_state()})


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise L2SPError(f"no checkpoint at {path}; the run has not saved one yet (start it without --resume)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise L2SPError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}); delete it and restart the run"
        ) from exc


def final_weights(run_dir: str | Path, fix: str) -> dict[str, torch.Tensor]:
    """The fine-tuned weights of a run directory: ``model.safetensors``, else the model of ``checkpoints/last.pt``
    (the error, when neither exists, ends with ``fix``)."""
    from l2sp.io import load_tensors

    run_dir = Path(run_dir)
    if (run_dir / "model.safetensors").is_file():
        return load_tensors(run_dir / "model.safetensors")[0]
    if not (run_dir / "checkpoints" / "last.pt").is_file():
        raise L2SPError(f"{run_dir} holds no weights (model.safetensors or checkpoints/last.pt); {fix}")
    return load(run_dir / "checkpoints" / "last.pt")["model"]
