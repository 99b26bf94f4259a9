"""timm's VisionTransformer (ViT, DeiT) and pre-activation ResNetV2 seen through the block
interface, so every analysis of the paper (Secs. 4-6: deleting, reordering, path gradients) runs on
them unchanged. Under the full plan a `Network` built here computes exactly what the timm model does
(each block's fused `forward` is timm's own code); the timm modules are shared, not copied.

ViT, `granularity="sublayer"` (default): every transformer layer gives two blocks, its attention
branch x + drop_path1(ls1(attn(norm1(x)))) and its MLP branch x + drop_path2(ls2(mlp(norm2(x)))),
so n = 2 x depth. `granularity="layer"`: one block per layer; deleting it makes the layer's output
its input x; its residual is attn(x) + mlp(x + attn(x)), the sum of the two branch outputs (never
layer(x) - x, which would cancel digits), merged by addition.

ResNetV2 (`PreActBasic` / `PreActBottleneck`): shortcut and residual share the block's
pre-activation norm1(x), as in timm (and `preact_resnet.PreActBlock`): the `downsample` projection
is fed by norm1(x); deleting a block keeps that projection.
"""

from __future__ import annotations

from pathlib import Path

import timm
from timm.models.resnetv2 import PreActBasic, PreActBottleneck, ResNetV2
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from src.errors import ConfigError
from src.models.network import Block, Network

GRANULARITIES = ("sublayer", "layer")


def _take(dst: nn.Module, src: nn.Module, names: tuple[str, ...]) -> None:
    """Share `src`'s modules, parameters and settings `names` with `dst`."""
    for name in names:
        setattr(dst, name, getattr(src, name))


class ViTStem(nn.Module):
    """timm's `forward_features` up to the blocks: patch embedding, class/register tokens and
    position embedding (timm's own `_pos_embed`), pos_drop, patch_drop, norm_pre."""

    _pos_embed = VisionTransformer._pos_embed

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        _take(self, vit, ("patch_embed", "cls_token", "reg_token", "pos_embed", "pos_drop"))
        _take(self, vit, ("patch_drop", "norm_pre"))
        _take(self, vit, ("dynamic_img_size", "no_embed_class", "num_prefix_tokens"))

    def forward(self, x: Tensor) -> Tensor:
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))


class ViTHead(nn.Module):
    """timm's final norm, then its `forward_head` (pooling, fc_norm, head_drop, classifier)."""

    pool = VisionTransformer.pool
    forward_head = VisionTransformer.forward_head

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        _take(self, vit, ("norm", "attn_pool", "fc_norm", "head_drop", "head"))
        _take(self, vit, ("global_pool", "num_prefix_tokens", "pool_include_prefix"))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.norm(x))


class ViTBranch(Block):
    """One sub-layer of a timm ViT layer: x + drop_path(ls(fn(norm(x)))), fn = attn or mlp."""

    def __init__(self, layer: nn.Module, kind: str, index: int):
        super().__init__()
        k = 1 if kind == "attn" else 2
        self.norm, self.fn = getattr(layer, f"norm{k}"), getattr(layer, kind)
        self.ls, self.drop_path = getattr(layer, f"ls{k}"), getattr(layer, f"drop_path{k}")
        self.kind, self.layer_index = kind, index

    def shortcut(self, x: Tensor) -> Tensor:
        return x

    def residual(self, x: Tensor) -> Tensor:
        return self.drop_path(self.ls(self.fn(self.norm(x))))


class ViTLayer(Block):
    """A whole timm ViT layer as one block: deleting it leaves x; residual = a + mlp(x + a) with
    a = the attention branch output (what the layer adds to x, without a subtraction)."""

    kind = "layer"

    def __init__(self, layer: nn.Module, index: int):
        super().__init__()
        self.block, self.layer_index = layer, index

    def shortcut(self, x: Tensor) -> Tensor:
        return x

    def residual(self, x: Tensor) -> Tensor:
        b = self.block
        a = b.drop_path1(b.ls1(b.attn(b.norm1(x))))
        return a + b.drop_path2(b.ls2(b.mlp(b.norm2(x + a))))

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


def vit_network(vit: VisionTransformer, granularity: str = "sublayer") -> Network:
    """A timm VisionTransformer (ViT, DeiT) as a `Network` sharing its modules."""
    if type(vit) is not VisionTransformer:
        raise ConfigError(
            f"{type(vit).__name__} is not a plain timm VisionTransformer (e.g. a distilled DeiT "
            "with two heads): use a vit_* or deit_* model without distillation"
        )
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity={granularity!r}: choose 'sublayer' or 'layer'")
    if granularity == "layer":
        blocks = [ViTLayer(layer, i) for i, layer in enumerate(vit.blocks)]
    else:
        blocks = [ViTBranch(b, k, i) for i, b in enumerate(vit.blocks) for k in ("attn", "mlp")]
    return Network(ViTStem(vit), blocks, ViTHead(vit))


class ResNetV2Block(Block):
    """Adapter around timm's PreActBasic / PreActBottleneck; owns the wrapped block's modules."""

    def __init__(self, block: nn.Module, stage: int):
        super().__init__()
        self.block, self.stage = block, stage
        self.downsampling = block.downsample is not None
        self._n_convs = 3 if isinstance(block, PreActBottleneck) else 2

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.block.downsample is None else self.block.downsample(self.block.norm1(x))

    def residual(self, x: Tensor) -> Tensor:
        b = self.block
        out = b.conv1(b.norm1(x))
        for j in range(2, self._n_convs + 1):
            out = getattr(b, f"conv{j}")(getattr(b, f"norm{j}")(out))
        return b.drop_path(out)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


def resnetv2_network(model: ResNetV2) -> Network:
    """A timm pre-activation ResNetV2 as a `Network`: stem, blocks of every stage, norm + head."""
    blocks = [ResNetV2Block(b, stage) for stage, s in enumerate(model.stages) for b in s.blocks]
    if not all(isinstance(b.block, (PreActBasic, PreActBottleneck)) for b in blocks):
        raise ConfigError("only pre-activation ResNetV2 models are supported: use preact=True")
    return Network(model.stem, blocks, nn.Sequential(model.norm, model.head))


def _load(model: nn.Module, weights: str | None, arch: str) -> None:
    if not weights:
        return
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"weights file {path} not found: pass model.weights=<a local {arch} state dict>"
        )
    timm.models.load_checkpoint(model, str(path))


def timm_vit(
    arch: str = "vit_tiny_patch16_224",
    img_size: int = 32,
    patch_size: int = 4,
    granularity: str = "sublayer",
    weights: str | None = None,
    in_channels: int = 3,
    num_classes: int = 10,
    **overrides,
) -> Network:
    """timm `arch` (a vit_*/deit_* name) for `img_size` inputs cut into `patch_size` patches;
    `overrides` go to timm (depth, embed_dim, num_heads, drop_path_rate, init_values, ...).
    Weights come from a local file only (nothing is downloaded)."""
    vit = timm.create_model(
        arch,
        pretrained=False,
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_channels,
        num_classes=num_classes,
        **overrides,
    )
    _load(vit, weights, arch)
    return vit_network(vit, granularity)


def timm_resnetv2(
    arch: str = "resnetv2_18",
    weights: str | None = None,
    in_channels: int = 3,
    num_classes: int = 10,
    **overrides,
) -> Network:
    """timm pre-activation ResNetV2 `arch` (resnetv2_18 ... resnetv2_152); `overrides` go to timm
    (layers, channels, stem_type, ...). Weights come from a local file only."""
    model = timm.create_model(
        arch, pretrained=False, in_chans=in_channels, num_classes=num_classes, **overrides
    )
    _load(model, weights, arch)
    return resnetv2_network(model)
