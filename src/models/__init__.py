"""Networks with the shape stem -> ordered blocks -> head, run under a `Plan`; `adapt(model)`
turns a Hugging Face, timm or torchvision model into one (src/models/adapt.py)."""

import importlib

from src.models.adapt import FAMILIES, adapt
from src.models.network import FULL, Block, Network, Plan, count_parameters
from src.models.preact_resnet import preact_resnet_cifar, preact_resnet_imagenet
from src.models.torchvision_resnet import torchvision_resnet
from src.models.vgg import vgg15

__all__ = [
    "FAMILIES",
    "FULL",
    "Block",
    "Network",
    "Plan",
    "adapt",
    "causal_lm_network",
    "count_parameters",
    "hf_causal_lm",
    "preact_resnet_cifar",
    "preact_resnet_imagenet",
    "resnetv2_network",
    "timm_resnetv2",
    "timm_vit",
    "torchvision_resnet",
    "vgg15",
    "vit_network",
]

# timm / transformers adapters load on first use (importing transformers takes seconds)
_LAZY = {
    "causal_lm_network": "src.models.hf_adapters",
    "hf_causal_lm": "src.models.hf_adapters",
    "resnetv2_network": "src.models.timm_adapters",
    "timm_resnetv2": "src.models.timm_adapters",
    "timm_vit": "src.models.timm_adapters",
    "vit_network": "src.models.timm_adapters",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
