"""Finished segmentation runs read back: the fine-tuned network of a run directory, and its scores on any split.

    model, cfg = load_segmentation_run("runs/camvid-l2-sp")
    test = score_segmentation_run("runs/camvid-l2-sp", "test")   # test["miou"], test["per_class_iou"]

The model selected on the validation split is scored on the test split without training it again.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from l2sp.engine.checkpoint import final_weights
from l2sp.engine.config import expand_path
from l2sp.errors import L2SPError
from l2sp.segmentation.config import SegConfig, resolve_segmentation
from l2sp.segmentation.data import DATASETS
from l2sp.segmentation.run import build_model, evaluation_set, score


def load_segmentation_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, SegConfig]:
    """(the fine-tuned network in eval mode, the run's resolved config) of a run directory of
    :func:`l2sp.segmentation.finetune_segmentation`: ``model.safetensors``, else the last checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise L2SPError(f"{run_dir} is not a run directory (no config.yaml); give the --out of an `l2sp segment` run")
    cfg = resolve_segmentation(str(run_dir / "config.yaml"))
    state = final_weights(run_dir, "finish the run with `l2sp segment ... --resume`")
    model = build_model(cfg, len(DATASETS[cfg.data.dataset].classes), None)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise L2SPError(f"{run_dir}: its weights do not fit its config.yaml ({first}); was the folder edited?") from exc
    return model.to(device).eval(), cfg


def score_segmentation_run(run_dir: str | Path, split: str, root: str | None = None,
                           device: str | torch.device = "cpu") -> dict:
    """mIoU (in [0, 1]), pixel accuracy and per-class IoU of a finished run on ``split`` of its dataset (under
    ``root``, default the run's ``data.root``), with the run's test scales and flips (``eval.*``)."""
    model, cfg = load_segmentation_run(run_dir, device)
    d = cfg.data
    where = expand_path(root if root is not None else d.root)
    try:
        data = evaluation_set(d, where, split)
    except L2SPError as exc:
        raise L2SPError(f"{d.dataset} under {where}: {exc}") from exc
    return score(model, data, list(DATASETS[d.dataset].classes), cfg, split, torch.device(device))
