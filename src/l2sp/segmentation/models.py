"""Segmentation networks on an ImageNet ResNet backbone: FCN, DeepLabv3 (torchvision), dilated ResNet, PSPNet.

Every model has the same layout as torchvision's segmentation models: ``model.backbone`` (an
``IntermediateLayerGetter`` over a dilated ResNet, output stride 8), ``model.classifier`` and, optionally,
``model.aux_classifier`` (an FCN head on ``layer3``); ``model(x)`` returns ``{"out": logits}``
(plus ``"aux"``) upsampled to the input size. The backbone is the paper's S (penalized toward w0 with α),
the heads are S̄ (β): ``backbone_state_dict`` renames an ImageNet classifier's weights so that
``l2sp.regularizer`` finds exactly that partition by name.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation import (
    deeplabv3_resnet50,
    deeplabv3_resnet101,
    fcn_resnet50,
    fcn_resnet101,
)
from torchvision.models.segmentation.fcn import FCNHead

from l2sp.errors import L2SPError
from l2sp.reference import Source, load_source, strip_prefix

NAMES = ("fcn", "deeplabv3", "resnet", "pspnet")
BACKBONES = ("resnet50", "resnet101")
DILATION = [False, True, True]  # output stride 8: layer3 and layer4 dilated instead of strided
_TV = {("fcn", "resnet50"): fcn_resnet50, ("fcn", "resnet101"): fcn_resnet101,
       ("deeplabv3", "resnet50"): deeplabv3_resnet50, ("deeplabv3", "resnet101"): deeplabv3_resnet101}
_CLASSIFIER_HEAD = ("fc.",)  # the ImageNet classification layer: not part of a segmentation backbone


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module (Zhao et al. 2017).

    For each bin size b: AdaptiveAvgPool(b) → 1×1 conv (C → C/len(bins)) → BN → ReLU → bilinear upsampling to
    the feature size; output = concat(x, branch_1, ..., branch_n) with C + len(bins)·(C/len(bins)) channels.
    """

    def __init__(self, in_channels: int, bins: Sequence[int] = (1, 2, 3, 6),
                 reduction_channels: int | None = None):
        super().__init__()
        self.bins = tuple(int(b) for b in bins)
        red = reduction_channels or in_channels // len(self.bins)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_channels, red, 1, bias=False),
                          nn.BatchNorm2d(red), nn.ReLU(inplace=True))
            for b in self.bins
        )
        self.out_channels = in_channels + red * len(self.bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return torch.cat([x] + [F.interpolate(s(x), size=size, mode="bilinear", align_corners=False)
                                for s in self.stages], dim=1)


class PSPHead(nn.Sequential):
    """Pyramid pooling → 3×3 conv (→ 512) → BN → ReLU → Dropout(0.1) → 1×1 conv to the class scores."""

    def __init__(self, in_channels: int, num_classes: int, bins: Sequence[int] = (1, 2, 3, 6),
                 channels: int = 512, dropout: float = 0.1):
        ppm = PyramidPooling(in_channels, bins)
        super().__init__(ppm, nn.Conv2d(ppm.out_channels, channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Dropout2d(dropout),
                         nn.Conv2d(channels, num_classes, 1))


class DilatedSegmenter(nn.Module):
    """backbone → classifier on ``"out"`` (aux_classifier on ``"aux"``), logits upsampled to the input size.

    The same forward as torchvision's FCN/DeepLabV3, so one training loop serves every model here.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module, aux_classifier: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        feats = self.backbone(x)
        out = OrderedDict(out=F.interpolate(self.classifier(feats["out"]), size=size, mode="bilinear",
                                            align_corners=False))
        if self.aux_classifier is not None:
            out["aux"] = F.interpolate(self.aux_classifier(feats["aux"]), size=size, mode="bilinear",
                                       align_corners=False)
        return out


def _dilated_backbone(backbone: str, weights: str | None, aux: bool) -> IntermediateLayerGetter:
    resnet = getattr(tvm, backbone)(weights=weights, replace_stride_with_dilation=DILATION)
    layers = {"layer4": "out", **({"layer3": "aux"} if aux else {})}
    return IntermediateLayerGetter(resnet, return_layers=layers)


def build_segmentation_model(name: str, num_classes: int, *, backbone: str = "resnet101",
                             backbone_weights: str | None = None, checkpoint: str | os.PathLike | None = None,
                             aux_loss: bool = False, bins: Sequence[int] = (1, 2, 3, 6)) -> nn.Module:
    """A segmentation network on a dilated (output stride 8) ResNet; ``model(x)["out"]`` is (N, K, H, W).

    - ``name``: ``"fcn"``, ``"deeplabv3"`` (torchvision), ``"resnet"`` (the paper's ResNet without global
      pooling: dropout + a 1×1 conv on ``layer4``) or ``"pspnet"`` (pyramid pooling with ``bins``).
    - ``backbone_weights``: torchvision ImageNet weights for the backbone (``"DEFAULT"``, ``"IMAGENET1K_V1"``;
      downloaded once) or None for random weights.
    - ``checkpoint``: a local file holding the ImageNet classifier's state dict (``conv1.weight``,
      ``layer1.0...``; ``fc.*`` ignored) or a backbone with ``backbone.`` names, loaded with
      ``l2sp.io.load_state_dict`` into ``model.backbone``.
    - ``aux_loss``: add torchvision's FCN head on ``layer3`` (output ``"aux"``); off by default.
    """
    if name not in NAMES:
        raise L2SPError(f"unknown segmentation model {name!r}; use one of {', '.join(NAMES)}")
    if backbone not in BACKBONES:
        raise L2SPError(f"unknown backbone {backbone!r} for {name}; use one of {', '.join(BACKBONES)}")
    if int(num_classes) < 1:
        raise L2SPError(f"num_classes must be >= 1, got {num_classes}")
    if backbone_weights is not None and checkpoint is not None:
        raise L2SPError("pass either backbone_weights (torchvision download) or checkpoint (local file), "
                        "not both")
    if (name, backbone) in _TV:
        model = _TV[name, backbone](weights=None, weights_backbone=backbone_weights,
                                    num_classes=int(num_classes), aux_loss=aux_loss)
    else:
        body = _dilated_backbone(backbone, backbone_weights, aux_loss)
        head = (PSPHead(2048, int(num_classes), bins) if name == "pspnet"
                else nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(2048, int(num_classes), 1)))
        model = DilatedSegmenter(body, head, FCNHead(1024, int(num_classes)) if aux_loss else None)
    if checkpoint is not None:
        load_backbone(model, checkpoint)
    return model


def backbone_state_dict(classifier_state_dict: Source, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """Rename an ImageNet ResNet's weights to a segmentation model's backbone names (w0 for L2-SP).

    ``"conv1.weight"`` → ``"backbone.conv1.weight"`` and so on;
    the classification layer ``fc.*`` is dropped, wrapper prefixes (``module.``) stripped. Accepts a state
    dict, an ``nn.Module`` or a checkpoint path. ``l2sp.regularizer("l2-sp", seg_model, result, ...)`` then
    puts every backbone parameter in S and every head parameter in S̄.
    """
    out = {}
    for k, v in load_source(classifier_state_dict).items():
        if k.startswith(prefix):
            k = k[len(prefix):]
        if k.startswith(_CLASSIFIER_HEAD):
            continue
        out[prefix + k] = v
    if not out:
        raise L2SPError("the classifier state dict holds no backbone weight (only fc.*); "
                        "pass the whole ResNet")
    return out


def load_backbone(model: nn.Module, checkpoint: Source) -> nn.Module:
    """Load an ImageNet ResNet checkpoint (classifier or ``backbone.`` names) into ``model.backbone``."""
    body = getattr(model, "backbone", None)
    if body is None:
        raise L2SPError(f"{type(model).__name__} has no .backbone; build it with build_segmentation_model")
    if isinstance(checkpoint, str | os.PathLike):
        from l2sp.io import load_state_dict

        checkpoint = load_state_dict(checkpoint)
    state = {k[len("backbone."):]: v for k, v in backbone_state_dict(checkpoint).items()}
    own = body.state_dict()
    # older checkpoints have no BN step counters; they are not weights
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    bad = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad:
        what = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                         for label, keys in (("missing", missing), ("unexpected", unexpected),
                                             ("wrong shape", bad)) if keys)
        raise L2SPError(f"the checkpoint does not fit the {type(model).__name__} backbone ({what}); "
                        "pass the ImageNet weights of the same ResNet depth")
    body.load_state_dict(state, strict=False)
    return model


def backbone_names(model: nn.Module) -> set[str]:
    """Names of the trainable backbone parameters of ``model`` (the paper's S for segmentation)."""
    return {strip_prefix(n) for n, p in model.named_parameters() if p.requires_grad
            and strip_prefix(n).startswith("backbone.")}


def freeze_bn_statistics(model: nn.Module) -> int:
    """Every BatchNorm uses and keeps its running statistics (eval mode, even after ``model.train()``);
    γ and β stay trainable. The paper's setting for FCN, ResNet and DeepLab (not PSPNet). Returns the count.
    """
    from l2sp.freeze import freeze_bn_stats

    return freeze_bn_stats(model)


def segmentation_logits(output: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The main logits of a model's output: ``output["out"]`` for dict outputs, else the tensor itself."""
    return output["out"] if isinstance(output, Mapping) else output
