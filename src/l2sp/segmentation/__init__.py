"""Semantic segmentation with L2-SP: the backbone is S (pulled toward its ImageNet weights w0 with α),
the segmentation heads are S̄ (weight decay β).

    model = build_segmentation_model("pspnet", 19, backbone="resnet101", backbone_weights="DEFAULT")
    w0 = backbone_state_dict(torchvision.models.resnet101(weights="DEFAULT").state_dict())
    reg = l2sp.regularizer("l2-sp", model, w0, alpha=1e-4, beta=1e-3)

The paper's protocol from a preset: ``finetune_segmentation("cityscapes-fcn-l2-sp", ["data.root=..."])``
(``l2sp segment`` on the command line).
"""

from l2sp.segmentation.config import SegConfig, resolve_segmentation, segmentation_presets
from l2sp.segmentation.data import (
    DATASETS,
    CamVidSegmentation,
    CityscapesSegmentation,
    SBDSegmentation,
    SegDataset,
    build_dataset,
    cityscapes_train_id_lut,
    colorize,
)
from l2sp.segmentation.metrics import confusion_matrix, evaluate_segmentation, predict_probabilities, scores
from l2sp.segmentation.models import (
    BACKBONES,
    HEADS,
    OUTPUT_STRIDES,
    PSPHead,
    PyramidPooling,
    backbone_names,
    backbone_state_dict,
    build_segmentation_model,
    dilate_mobilenet_v2,
    freeze_bn_statistics,
    load_backbone,
    reattach_classifier,
)
from l2sp.segmentation.run import finetune_segmentation
from l2sp.segmentation.saved import load_segmentation_run, score_segmentation_run
from l2sp.segmentation.schedule import poly_lr
from l2sp.segmentation.transforms import RandomScale, eval_transform, train_transform

__all__ = [
    "BACKBONES",
    "CamVidSegmentation",
    "CityscapesSegmentation",
    "DATASETS",
    "HEADS",
    "OUTPUT_STRIDES",
    "PSPHead",
    "PyramidPooling",
    "RandomScale",
    "SBDSegmentation",
    "SegConfig",
    "SegDataset",
    "backbone_names",
    "backbone_state_dict",
    "build_dataset",
    "build_segmentation_model",
    "cityscapes_train_id_lut",
    "colorize",
    "confusion_matrix",
    "dilate_mobilenet_v2",
    "eval_transform",
    "evaluate_segmentation",
    "finetune_segmentation",
    "freeze_bn_statistics",
    "load_backbone",
    "load_segmentation_run",
    "poly_lr",
    "predict_probabilities",
    "reattach_classifier",
    "resolve_segmentation",
    "score_segmentation_run",
    "scores",
    "segmentation_presets",
    "train_transform",
]
