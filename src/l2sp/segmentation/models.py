"""Segmentation networks on an ImageNet backbone: FCN, DeepLabv3 (ASPP), dilated ResNet, PSPNet heads on a
dilated ResNet-50/101 or MobileNetV2.

Every model has the layout of torchvision's segmentation models: ``model.backbone`` (an
``IntermediateLayerGetter`` over the dilated backbone, output stride 8 or 16), ``model.classifier`` and,
optionally, ``model.aux_classifier`` (an FCN head on an intermediate stage); ``model(x)`` returns
``{"out": logits}`` (plus ``"aux"``) upsampled to the input size. The backbone is the paper's S (penalized
toward w0 with α), the heads are S̄ (β): ``backbone_state_dict`` renames an ImageNet classifier's weights so that
``l2sp.regularizer`` finds exactly that partition by name.

Dilation (output stride OS): the strided convolutions past OS keep stride 1 and every later 3×3 convolution
is dilated by the stride it replaced (rate r → r·2 per removed stride-2 stage), the block that loses its stride
keeping the previous rate: features(x)[..., ::k, ::k] of the dilated network equal those of the original
strided one (k = its stride / OS). MobileNetV2 (the MobileNetV2 paper's DeepLabv3): ``features.0..17`` (320
channels at the output); the last 1×1 convolution to 1280 channels (``features.18``) belongs to the ImageNet
classifier, like ``classifier.*``.
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
from torchvision.models.segmentation import FCN, DeepLabV3
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from l2sp.errors import L2SPError
from l2sp.reference import Source, load_source, strip_prefix

HEADS = ("fcn", "deeplabv3", "resnet", "pspnet")
NAMES = HEADS  # the earlier name of HEADS
BACKBONES = ("resnet50", "resnet101", "mobilenet_v2")
OUTPUT_STRIDES = (8, 16)
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}  # DeepLabv3's atrous rates for each output stride
MOBILENET_V2_BLOCKS = 18  # features.0..17 form the backbone (320 channels), features.18 is classifier-side
# (backbone output channels, channels of the stage under the auxiliary FCN head)
_CHANNELS = {"resnet50": (2048, 1024), "resnet101": (2048, 1024), "mobilenet_v2": (320, 96)}
_AUX_LAYER = {"resnet50": "layer3", "resnet101": "layer3", "mobilenet_v2": "13"}
_OUT_LAYER = {"resnet50": "layer4", "resnet101": "layer4", "mobilenet_v2": str(MOBILENET_V2_BLOCKS - 1)}
# the ImageNet classification layers: not part of a segmentation backbone (ResNet fc, MobileNetV2 classifier)
_CLASSIFIER_HEAD = ("fc.", "classifier.", "aux_classifier.")


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


def dilate_mobilenet_v2(features: nn.Sequential, output_stride: int) -> nn.Sequential:
    """Make MobileNetV2 ``features`` (in place) reach at most ``output_stride``: each stride-2 block past it gets
    stride 1 and the current rate r; every later 3×3 convolution gets dilation and padding r·2 per removed stride.
    """
    stride, rate = 1, 1
    for block in features:
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
        s = max((c.stride[0] for c in convs), default=1)
        block_rate = rate
        if stride * s > output_stride:
            rate, s = rate * s, 1
        stride *= s
        for c in convs:
            c.stride = (s, s)
            c.dilation = (block_rate, block_rate)
            c.padding = (block_rate * (c.kernel_size[0] - 1) // 2, block_rate * (c.kernel_size[1] - 1) // 2)
    return features


def _dilated_body(backbone: str, weights: str | None, output_stride: int, aux: bool) -> IntermediateLayerGetter:
    """The backbone at ``output_stride``, returning ``"out"`` (and ``"aux"``) feature maps."""
    if backbone == "mobilenet_v2":
        net = nn.Sequential(*tvm.mobilenet_v2(weights=weights).features[:MOBILENET_V2_BLOCKS])
        dilate_mobilenet_v2(net, output_stride)
    else:  # ResNet: layer4 (OS 16), layer3 and layer4 (OS 8) dilated instead of strided
        dilation = [False, output_stride == 8, True]
        net = getattr(tvm, backbone)(weights=weights, replace_stride_with_dilation=dilation)
    layers = {_OUT_LAYER[backbone]: "out", **({_AUX_LAYER[backbone]: "aux"} if aux else {})}
    return IntermediateLayerGetter(net, return_layers=layers)


def _head(name: str, channels: int, num_classes: int, output_stride: int, bins: Sequence[int]) -> nn.Module:
    if name == "fcn":
        return FCNHead(channels, num_classes)
    if name == "deeplabv3":
        return DeepLabHead(channels, num_classes, ASPP_RATES[output_stride])
    if name == "pspnet":
        return PSPHead(channels, num_classes, bins)
    return nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))


def _check_args(name: str, num_classes: int, backbone: str, output_stride: int) -> None:
    if name not in HEADS:
        raise L2SPError(f"unknown segmentation model {name!r}; use one of {', '.join(HEADS)}")
    if backbone not in BACKBONES:
        raise L2SPError(f"unknown backbone {backbone!r} for {name}; use one of {', '.join(BACKBONES)}")
    if isinstance(num_classes, bool) or int(num_classes) < 1:
        raise L2SPError(f"num_classes must be >= 1, got {num_classes}")
    if output_stride not in OUTPUT_STRIDES:
        raise L2SPError(f"output_stride must be one of {', '.join(map(str, OUTPUT_STRIDES))}, got {output_stride!r}")


def build_segmentation_model(name: str, num_classes: int, *, backbone: str = "resnet101",
                             backbone_weights: str | None = None, checkpoint: str | os.PathLike | None = None,
                             aux_loss: bool = False, bins: Sequence[int] = (1, 2, 3, 6),
                             output_stride: int = 8) -> nn.Module:
    """A segmentation network on a dilated backbone; ``model(x)["out"]`` is (N, K, H, W).

    - ``name`` (``HEADS``): ``"fcn"``, ``"deeplabv3"`` (torchvision's heads; ASPP rates 12/24/36 at output
      stride 8, 6/12/18 at 16), ``"resnet"`` (the paper's ResNet without global pooling: dropout + a 1×1 conv)
      or ``"pspnet"`` (pyramid pooling with ``bins``).
    - ``backbone`` (``BACKBONES``): ``"resnet50"``, ``"resnet101"`` or ``"mobilenet_v2"`` (features.0..17).
    - ``output_stride``: 8 or 16 (input size / feature size), by dilation instead of striding.
    - ``backbone_weights``: torchvision ImageNet weights for the backbone (``"DEFAULT"``, ``"IMAGENET1K_V1"``;
      downloaded once) or None for random weights.
    - ``checkpoint``: a local file holding the ImageNet classifier's state dict (ResNet ``conv1.weight``, ...;
      MobileNetV2 ``features.*``; the classification layers ignored) or a backbone with ``backbone.`` names,
      loaded into ``model.backbone``.
    - ``aux_loss``: an FCN head (output ``"aux"``) on ResNet ``layer3`` / MobileNetV2 ``features.13``.
    """
    _check_args(name, num_classes, backbone, output_stride)
    if backbone_weights is not None and checkpoint is not None:
        raise L2SPError("pass either backbone_weights (torchvision download) or checkpoint (local file), "
                        "not both")
    k = int(num_classes)
    body = _dilated_body(backbone, backbone_weights, output_stride, aux_loss)
    channels, aux_channels = _CHANNELS[backbone]
    head = _head(name, channels, k, output_stride, bins)
    aux = FCNHead(aux_channels, k) if aux_loss else None
    model = {"fcn": FCN, "deeplabv3": DeepLabV3}.get(name, DilatedSegmenter)(body, head, aux)
    if checkpoint is not None:
        load_backbone(model, checkpoint)
    return model


def _backbone_key(key: str, prefix: str) -> str | None:
    """The backbone-relative name of a classifier (or backbone) state-dict key; None for classifier-side keys."""
    if key.startswith(prefix):
        key = key[len(prefix):]
    elif key.startswith("features."):  # MobileNetV2: features.N.* -> N.*; features.18 is the 1280-channel conv
        key = key[len("features."):]
        block = key.split(".", 1)[0]
        if block.isdigit() and int(block) >= MOBILENET_V2_BLOCKS:
            return None
    return None if key.startswith(_CLASSIFIER_HEAD) else key


def backbone_state_dict(classifier_state_dict: Source, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """Rename an ImageNet classifier's weights to a segmentation model's backbone names (w0 for L2-SP).

    ResNet: ``"conv1.weight"`` → ``"backbone.conv1.weight"``, ``fc.*`` dropped. MobileNetV2:
    ``"features.3.conv.1.0.weight"`` → ``"backbone.3.conv.1.0.weight"``, ``features.18.*`` and
    ``classifier.*`` dropped. Wrapper prefixes (``module.``) are stripped; names already under ``prefix`` are
    kept. Accepts a state dict, an ``nn.Module`` or a checkpoint path. ``l2sp.regularizer("l2-sp", seg_model,
    result, ...)`` then puts every backbone parameter in S and every head parameter in S̄.
    """
    out = {}
    for k, v in load_source(classifier_state_dict).items():
        name = _backbone_key(k, prefix)
        if name is not None:
            out[prefix + name] = v
    if not out:
        raise L2SPError("the classifier state dict holds no backbone weight (only fc.* / classifier.*); "
                        "pass the whole ResNet or MobileNetV2")
    return out


def reattach_classifier(model: nn.Module, source_model: nn.Module) -> nn.Module:
    """A copy of the ImageNet ``source_model`` carrying ``model``'s backbone tensors (parameters and BN buffers).

    The inverse of :func:`backbone_state_dict`: ``backbone.X`` goes back to ``features.X`` (MobileNetV2) or
    ``X`` (ResNet); the classifier-side layers (``fc``, ``features.18`` + ``classifier``) stay the source's, and
    the copy keeps the source network's own strides (no dilation): the fine-tuned backbone scored as a
    classifier, for the source-task drop.
    """
    import copy

    src = source_model.state_dict()
    mapped, bad = {}, []
    for k, v in model.state_dict().items():
        if not strip_prefix(k).startswith("backbone."):
            continue
        rel = strip_prefix(k)[len("backbone."):]
        name = "features." + rel if "features." + rel in src else rel
        if name in src and tuple(src[name].shape) == tuple(v.shape):
            mapped[name] = v
        else:
            bad.append(k)
    if bad or not mapped:
        raise L2SPError(f"{len(bad)} backbone tensors of the fine-tuned model ({', '.join(bad[:3]) or 'none found'}) "
                        "have no same-shaped counterpart in the source model; pass the network it was built from")
    out = copy.deepcopy(source_model)
    out.load_state_dict({**src, **{k: v.detach().to(src[k].device) for k, v in mapped.items()}})
    return out


def load_backbone(model: nn.Module, checkpoint: Source) -> nn.Module:
    """Load an ImageNet ResNet or MobileNetV2 checkpoint (classifier or ``backbone.`` names) into
    ``model.backbone`` (the names of :func:`backbone_state_dict`); anything missing or extra is refused."""
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
                        "pass the ImageNet weights of the same backbone (ResNet depth, MobileNetV2)")
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
