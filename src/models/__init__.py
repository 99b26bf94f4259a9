"""Networks with the shape stem -> ordered blocks -> head, run under a `Plan`."""

from src.models.network import FULL, Block, Network, Plan, count_parameters
from src.models.preact_resnet import preact_resnet_cifar, preact_resnet_imagenet
from src.models.torchvision_resnet import torchvision_resnet
from src.models.vgg import vgg15

__all__ = [
    "FULL",
    "Block",
    "Network",
    "Plan",
    "count_parameters",
    "preact_resnet_cifar",
    "preact_resnet_imagenet",
    "torchvision_resnet",
    "vgg15",
]
