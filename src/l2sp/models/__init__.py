"""Networks: the built-in small ResNet, torchvision/timm backbones, local checkpoints, head surgery."""

from l2sp.models.factory import BuiltModel, build_model, create, from_config, pretrained
from l2sp.models.heads import find_head, new_head, replace_head
from l2sp.models.small_resnet import SmallResNet, small_resnet

__all__ = [
    "BuiltModel",
    "SmallResNet",
    "build_model",
    "create",
    "find_head",
    "from_config",
    "new_head",
    "pretrained",
    "replace_head",
    "small_resnet",
]
