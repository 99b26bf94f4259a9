"""timm models seen through the block interface, so every analysis of the paper (Secs. 4-6:
deleting, reordering, path gradients) runs on them unchanged. Each family is registered in
`src.models.adapt` and `adapt(model)` verifies it; the timm modules are shared, not copied, and
under the full plan a `Network` built here computes what the timm model does (a layer's fused
`forward` is timm's own code).

Transformers (ViT and its variants DeiT, DeiT-3, DINOv2 with registers, SigLIP, GAP; EVA and the
RoPE ViTs; BEiT; ViT-RelPos; Swin), `granularity="sublayer"` (default): every layer gives two
blocks, its attention branch x + drop_path1(ls1(attn(norm1(x)))) and its MLP branch
x + drop_path2(ls2(mlp(norm2(x)))) (layer scale `ls` or `gamma`; post-norm layers:
x + drop_path(norm(fn(x)))), so n = 2 x depth. `granularity="layer"`: one block per layer;
deleting it makes the layer's output its input x; its residual is a + mlp(x + a), a = the
attention branch's output (never layer(x) - x, which would cancel digits).

- RoPE (EVA), shared relative position bias (BEiT, ViT-RelPos): the stem computes it once per
  input, as timm does, into an `AttnContext` every attention block reads.
- Parallel layers use the Network's parallel mechanism (`Block.parallel`): ParallelScalingBlock
  (ViT-22B: x + attn(n) + mlp(n), n = in_norm(x) through one in_proj) gives an attention and an
  MLP branch of one parallel group; ParallelThingsBlock (x + sum of parallel attentions, then
  + sum of parallel MLPs) gives one branch per attention and per MLP, the attentions one group and
  the MLPs the next. `granularity="layer"` makes each layer one block with the branch sum as its
  residual. A branch's layer scale then applies per branch: ls(a) + ls(m) instead of timm's
  ls(a + m), equal up to float rounding; a fused output projection (`fuse_out_proj`) only splits
  at layer granularity.
- Swin: the attention branch is the block's own windowed, shifted attention (`_attn`: cyclic
  shift, window partition, attention mask, reverse), so deleting it leaves the (B, H, W, C) map.

Downsampling between stages (Swin's patch merging, ConvNeXt's norm + strided conv) is not a
block: it sits in front of the first block of its stage (`Downsampled`), read by that block's
shortcut and residual alike, so deleting that block keeps the downsampling (like a projection
shortcut); the block is marked `downsampling`.

CNNs: ResNetV2 (`PreActBasic` / `PreActBottleneck`): shortcut and residual share the block's
pre-activation norm1(x), as in timm (and `preact_resnet.PreActBlock`); deleting a block keeps its
`downsample` projection of norm1(x). ResNet (post-activation `BasicBlock` / `Bottleneck`, with
timm's se, aa, drop_block, drop_path where set): y = act(shortcut(x) + residual(x)); deleting a
block keeps act(shortcut(x)). ConvNeXt: x + drop_path(gamma * mlp(norm(conv_dw(x)))).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Literal

import timm
import torch
import torch.nn.functional as F
from timm.models.beit import Beit
from timm.models.convnext import ConvNeXt
from timm.models.eva import Eva, EvaBlock, EvaBlockPostNorm
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.resnetv2 import PreActBasic, PreActBottleneck, ResNetV2
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import Block as ViTBlock
from timm.models.vision_transformer import (
    ParallelScalingBlock,
    ParallelThingsBlock,
    ResPostBlock,
    VisionTransformer,
)
from timm.models.vision_transformer_relpos import ResPostRelPosBlock, VisionTransformerRelPos
from torch import Tensor, nn

from src.errors import ConfigError
from src.models.adapt import adapt, family_of, register
from src.models.network import Block, Network
from src.schema import POSITIVE

GRANULARITIES = ("sublayer", "layer")
POST_NORM = (ResPostBlock, EvaBlockPostNorm, ResPostRelPosBlock)


def _take(dst: nn.Module, src: nn.Module, names: tuple[str, ...]) -> None:
    """Share `src`'s modules, parameters and settings `names` with `dst`."""
    for name in names:
        setattr(dst, name, getattr(src, name))


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity={granularity!r}: choose 'sublayer' or 'layer'")


class AttnContext:
    """The extra argument every attention call of one forward takes (`name`: the RoPE embedding,
    a shared relative position bias). The stem computes it once per input, as timm does (it does
    not depend on the input's values; training with patch dropout: on that call's kept patches);
    the blocks read it, so they can run deleted, reordered or from the lesion engine's cached
    block inputs. `per_layer`: one value per layer (mixed RoPE)."""

    def __init__(self, name: str, per_layer: bool = False):
        self.name, self.per_layer, self.value = name, per_layer, None

    def __call__(self, layer: int) -> dict:
        if self.per_layer and self.value is not None:
            return {self.name: self.value[layer]}
        return {self.name: self.value}


class Gamma(nn.Module):
    """Layer scale held as a bare parameter (EVA's, BEiT's `gamma_1` / `gamma_2`; None: none)."""

    def __init__(self, gamma: nn.Parameter | None):
        super().__init__()
        self.gamma = gamma

    def forward(self, x: Tensor) -> Tensor:
        return x if self.gamma is None else self.gamma * x


class SubLayer(Block):
    """One sub-layer of a transformer layer: x + drop_path(scale(fn(norm(x)))), or, post-norm,
    x + drop_path(norm(fn(x))); fn = attention (with the context's argument) or MLP."""

    def __init__(self, layer: nn.Module, kind: str, index: int, context: AttnContext | None):
        super().__init__()
        k = 1 if kind == "attn" else 2
        self.norm, self.fn = getattr(layer, f"norm{k}"), getattr(layer, kind)
        self.drop_path = getattr(layer, f"drop_path{k}")
        self.post_norm = isinstance(layer, POST_NORM)
        if not self.post_norm:
            self.scale = getattr(layer, f"ls{k}", None) or Gamma(getattr(layer, f"gamma_{k}", None))
        self.context = context if kind == "attn" else None
        self.kind, self.layer_index = kind, index

    def kwargs(self) -> dict:
        return {} if self.context is None else self.context(self.layer_index)

    def shortcut(self, x: Tensor) -> Tensor:
        return x

    def residual(self, x: Tensor) -> Tensor:
        if self.post_norm:
            return self.drop_path(self.norm(self.fn(x, **self.kwargs())))
        return self.drop_path(self.scale(self.fn(self.norm(x), **self.kwargs())))


class SwinSubLayer(Block):
    """One sub-layer of a SwinTransformerBlock on its (B, H, W, C) map: the windowed, shifted
    attention x + drop_path1(_attn(norm1(x))), or the MLP over the flattened tokens."""

    def __init__(self, layer: nn.Module, kind: str, index: int, stage: int):
        super().__init__()
        self.layer, self.kind, self.layer_index, self.stage = layer, kind, index, stage

    def shortcut(self, x: Tensor) -> Tensor:
        return x

    def residual(self, x: Tensor) -> Tensor:
        b = self.layer
        if self.kind == "attn":
            return b.drop_path1(b._attn(b.norm1(x)))
        B, H, W, C = x.shape
        return b.drop_path2(b.mlp(b.norm2(x.reshape(B, -1, C)))).reshape(B, H, W, C)


class BranchSum(Block):
    """Parallel branches of one ParallelThingsBlock sub-layer as one block: x + sum of them."""

    def __init__(self, branches: nn.ModuleList, kind: str, index: int):
        super().__init__()
        self.branches, self.kind, self.layer_index = branches, kind, index

    def shortcut(self, x: Tensor) -> Tensor:
        return x

    def residual(self, x: Tensor) -> Tensor:
        return torch.stack([branch(x) for branch in self.branches]).sum(dim=0)


class Branch(Block):
    """One branch of a parallel layer (ParallelThingsBlock's norm, attn/mlp, ls, drop_path)."""

    def __init__(self, branch: nn.Module, kind: str, index: int, group: int):
        super().__init__()
        self.branch, self.kind, self.layer_index, self.parallel = branch, kind, index, group

    def shortcut(self, x: Tensor) -> Tensor:
        return x

    def residual(self, x: Tensor) -> Tensor:
        return self.branch(x)


def _scaling_branches(b: ParallelScalingBlock, x: Tensor, kinds: tuple[str, ...]) -> dict:
    """timm's ParallelScalingBlock.forward up to its output projection: the attention output
    and/or the activated MLP hidden state, for the branches in `kinds`."""
    B, N, C = x.shape
    x_mlp, q, k, v = torch.split(b.in_proj(b.in_norm(x)), b.in_split, dim=-1)
    out = {}
    if "mlp" in kinds:
        if b.mlp_bias is not None:
            x_mlp = x_mlp + b.mlp_bias
        out["mlp"] = b.mlp_drop(b.mlp_act(x_mlp))
    if "attn" in kinds:
        q = b.q_norm(q.view(B, N, b.num_heads, b.head_dim)).transpose(1, 2)
        k = b.k_norm(k.view(B, N, b.num_heads, b.head_dim)).transpose(1, 2)
        v = v.view(B, N, b.num_heads, b.head_dim).transpose(1, 2)
        if b.fused_attn:
            p = b.attn_drop.p if b.training else 0.0
            x_attn = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:  # no mask: timm's mask helpers leave the scores as they are
            x_attn = b.attn_drop(((q * b.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
        out["attn"] = x_attn.transpose(1, 2).reshape(B, N, C)
    return out


class ScalingBranch(Block):
    """The attention or MLP branch of a ParallelScalingBlock (separate output projections):
    drop_path(ls(out_proj(branch(in_proj(in_norm(x)))))), one of a parallel group."""

    def __init__(self, layer: ParallelScalingBlock, kind: str, index: int, group: int):
        super().__init__()
        self.layer, self.kind, self.layer_index, self.parallel = layer, kind, index, group

    def shortcut(self, x: Tensor) -> Tensor:
        return x

    def residual(self, x: Tensor) -> Tensor:
        b = self.layer
        proj = b.attn_out_proj if self.kind == "attn" else b.mlp_out_proj
        return b.drop_path(b.ls(proj(_scaling_branches(b, x, (self.kind,))[self.kind])))


class ScalingLayer(Block):
    """A whole ParallelScalingBlock as one block: residual drop_path(ls(y)), y the sum of its
    attention and MLP branches' projections, computed as timm does."""

    kind = "layer"

    def __init__(self, layer: ParallelScalingBlock, index: int):
        super().__init__()
        self.layer, self.layer_index = layer, index

    def shortcut(self, x: Tensor) -> Tensor:
        return x

    def residual(self, x: Tensor) -> Tensor:
        b = self.layer
        h = _scaling_branches(b, x, ("attn", "mlp"))
        if b.out_proj is not None:
            y = b.out_proj(torch.cat((h["attn"], h["mlp"]), dim=-1))
        else:
            y = b.attn_out_proj(h["attn"]) + b.mlp_out_proj(h["mlp"])
        return b.drop_path(b.ls(y))

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class Layer(Block):
    """A whole transformer layer as one block: deleting it leaves x; residual = a + m(x + a), a
    the attention sub-layer's output, m the MLP sub-layer (what the layer adds to x, without a
    subtraction). Its fused forward is the layer's own."""

    kind = "layer"

    def __init__(self, layer: nn.Module, attn: Block, mlp: Block):
        super().__init__()
        self.layer, self.attn, self.mlp = layer, attn, mlp
        self.layer_index, self.stage = attn.layer_index, attn.stage

    def shortcut(self, x: Tensor) -> Tensor:
        return x

    def residual(self, x: Tensor) -> Tensor:
        a = self.attn.residual(x)
        return a + self.mlp.residual(x + a)

    def forward(self, x: Tensor) -> Tensor:
        kwargs = self.attn.kwargs() if isinstance(self.attn, SubLayer) else {}
        return self.layer(x, **kwargs)


class Downsampled(Block):
    """The first block of a stage behind the stage's downsampling layer, which is not a block of
    its own: shortcut, residual and skip all read downsample(x), so deleting the block keeps the
    downsampling (the layer runs once per branch when they run separately)."""

    downsampling = True

    def __init__(self, downsample: nn.Module, block: Block):
        super().__init__()
        self.downsample, self.block = downsample, block
        self.stage, self.layer_index, self.kind = block.stage, block.layer_index, block.kind

    def shortcut(self, x: Tensor) -> Tensor:
        return self.block.shortcut(self.downsample(x))

    def residual(self, x: Tensor) -> Tensor:
        return self.block.residual(self.downsample(x))

    def merge(self, s: Tensor, r: Tensor) -> Tensor:
        return self.block.merge(s, r)

    def skip(self, x: Tensor) -> Tensor:
        return self.block.skip(self.downsample(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.downsample(x))


def _stage_blocks(downsample: nn.Module, blocks: list[Block]) -> list[Block]:
    if isinstance(downsample, nn.Identity) or not blocks:
        return blocks
    return [Downsampled(downsample, blocks[0]), *blocks[1:]]


def _sublayers(layer, i: int, granularity: str, context: AttnContext | None) -> list[Block]:
    """The blocks of one pre-/post-norm transformer layer (ViT Block, EVA, BEiT, RelPos)."""
    attn, mlp = (SubLayer(layer, kind, i, context) for kind in ("attn", "mlp"))
    return [Layer(layer, attn, mlp)] if granularity == "layer" else [attn, mlp]


def _token_blocks(layers, granularity: str, context: AttnContext | None = None) -> list[Block]:
    _check_granularity(granularity)
    return [b for i, layer in enumerate(layers) for b in _sublayers(layer, i, granularity, context)]


class TokenHead(nn.Module):
    """The model's final norm, then its own `forward_head` (pooling, fc_norm, head_drop, head)."""

    names: tuple[str, ...] = ("norm", "fc_norm", "head_drop", "head", "global_pool")

    def __init__(self, model: nn.Module):
        super().__init__()
        _take(self, model, self.names)
        self.num_prefix_tokens = getattr(model, "num_prefix_tokens", 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.norm(x))


# --- ViT (DeiT, DeiT-3, DINOv2, SigLIP, GAP; ResPost and parallel layers) ---


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


class ViTHead(TokenHead):
    names = (*TokenHead.names, "attn_pool", "pool_include_prefix")
    pool = VisionTransformer.pool
    forward_head = VisionTransformer.forward_head


def _vit_layer_blocks(layer: nn.Module, i: int, granularity: str) -> list[Block]:
    """One ViT layer's blocks. Parallel group keys: layer i's ParallelScalingBlock branches
    share key i; its ParallelThingsBlock attentions key 2i, its MLPs 2i + 1."""
    if isinstance(layer, (ViTBlock, ResPostBlock)):
        return _sublayers(layer, i, granularity, None)
    if isinstance(layer, ParallelThingsBlock):
        if granularity == "layer":
            attn, mlp = BranchSum(layer.attns, "attn", i), BranchSum(layer.ffns, "mlp", i)
            return [Layer(layer, attn, mlp)]
        return [
            Branch(b, kind, i, 2 * i + k)
            for k, (kind, branches) in enumerate((("attn", layer.attns), ("mlp", layer.ffns)))
            for b in branches
        ]
    if isinstance(layer, ParallelScalingBlock):
        if granularity == "layer":
            return [ScalingLayer(layer, i)]
        if layer.out_proj is not None:
            raise ConfigError(
                "a ParallelScalingBlock with fuse_out_proj=True has one output projection for "
                "attention and MLP: use granularity='layer'"
            )
        return [ScalingBranch(layer, kind, i, i) for kind in ("attn", "mlp")]
    raise ConfigError(
        f"timm ViT layers of type {type(layer).__name__} are not supported: Block, ResPostBlock, "
        "ParallelThingsBlock or ParallelScalingBlock"
    )


@register(
    "timm ViT",
    "timm",
    ("VisionTransformer",),
    "ViT, DeiT, DeiT-3, DINOv2, SigLIP, GAP; attention + MLP sub-layers (parallel branches)",
)
def vit_network(vit: VisionTransformer, granularity: str = "sublayer") -> Network:
    """A timm VisionTransformer (ViT, DeiT, DeiT-3, DINOv2 with registers, SigLIP, GAP ViTs;
    ResPost, ParallelThings and ParallelScaling layers) as a `Network` sharing its modules."""
    if type(vit) is not VisionTransformer:
        raise ConfigError(
            f"{type(vit).__name__} is not a plain timm VisionTransformer (e.g. a distilled DeiT "
            "with two heads): use a vit_* or deit_* model without distillation"
        )
    _check_granularity(granularity)
    blocks = [
        b for i, layer in enumerate(vit.blocks) for b in _vit_layer_blocks(layer, i, granularity)
    ]
    return Network(ViTStem(vit), blocks, ViTHead(vit))


# --- EVA, RoPE ViTs ---


class EvaStem(nn.Module):
    """Eva's `forward_features` up to the blocks: patch embedding, tokens, position embedding and
    the RoPE embedding (timm's own `_pos_embed`, into the context), norm_pre."""

    _pos_embed = Eva._pos_embed

    def __init__(self, eva: Eva, context: AttnContext):
        super().__init__()
        _take(self, eva, ("patch_embed", "cls_token", "reg_token", "pos_embed", "pos_drop"))
        _take(self, eva, ("patch_drop", "norm_pre", "rope"))
        _take(self, eva, ("dynamic_img_size", "no_embed_class", "num_prefix_tokens"))
        self.rope_mixed = context.per_layer
        self.context = context

    def forward(self, x: Tensor) -> Tensor:
        x, self.context.value = self._pos_embed(self.patch_embed(x))
        return self.norm_pre(x)


class EvaHead(TokenHead):
    names = (*TokenHead.names, "attn_pool")
    pool = Eva.pool
    forward_head = Eva.forward_head


@register(
    "timm EVA",
    "timm",
    ("Eva",),
    "EVA-02, RoPE ViTs (vit_*_rope_*); attention + MLP sub-layers, RoPE from the stem",
)
def eva_network(eva: Eva, granularity: str = "sublayer") -> Network:
    """A timm Eva (EVA-02, the RoPE ViTs, PE) as a `Network`: the stem computes the RoPE embedding
    once per input (per layer for mixed RoPE) and every attention sub-layer reads it."""
    if not all(isinstance(b, (EvaBlock, EvaBlockPostNorm)) for b in eva.blocks):
        raise ConfigError("only Eva models of EvaBlock / EvaBlockPostNorm layers are supported")
    context = AttnContext("rope", per_layer=bool(getattr(eva, "rope_mixed", False)))
    blocks = _token_blocks(eva.blocks, granularity, context)
    return Network(EvaStem(eva, context), blocks, EvaHead(eva))


# --- BEiT ---


class BeitStem(nn.Module):
    """Beit's `forward_features` up to the blocks (patch embedding, class token, absolute
    position embedding, pos_drop) and its shared relative position bias, into the context."""

    def __init__(self, beit: Beit, context: AttnContext):
        super().__init__()
        _take(self, beit, ("patch_embed", "cls_token", "pos_embed", "pos_drop", "rel_pos_bias"))
        self.context = context

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        self.context.value = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        return self.pos_drop(x)


class BeitHead(TokenHead):
    forward_head = Beit.forward_head


@register(
    "timm BEiT",
    "timm",
    ("Beit",),
    "BEiT, BEiT-2; attention + MLP sub-layers, relative position bias per layer or shared",
)
def beit_network(beit: Beit, granularity: str = "sublayer") -> Network:
    """A timm Beit as a `Network`: layer scale gamma_1 / gamma_2 in the branches; a shared
    relative position bias is computed by the stem once per input, a per-layer one by the
    layer's attention."""
    context = AttnContext("shared_rel_pos_bias")
    blocks = _token_blocks(beit.blocks, granularity, context)
    return Network(BeitStem(beit, context), blocks, BeitHead(beit))


# --- ViT with relative position (vision_transformer_relpos) ---


class RelPosStem(nn.Module):
    """VisionTransformerRelPos's `forward_features` up to the blocks (patch embedding, class
    token) and its shared relative position bias, into the context."""

    def __init__(self, vit: VisionTransformerRelPos, context: AttnContext):
        super().__init__()
        _take(self, vit, ("patch_embed", "cls_token", "shared_rel_pos"))
        self.context = context

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        rel = self.shared_rel_pos
        self.context.value = rel.get_bias() if rel is not None else None
        return x


class RelPosHead(TokenHead):
    forward_head = VisionTransformerRelPos.forward_head


@register(
    "timm ViT RelPos",
    "timm",
    ("VisionTransformerRelPos",),
    "ViT with relative position (vit_relpos_*); attention + MLP sub-layers",
)
def relpos_network(vit: VisionTransformerRelPos, granularity: str = "sublayer") -> Network:
    """A timm VisionTransformerRelPos (pre- or post-norm layers) as a `Network`."""
    context = AttnContext("shared_rel_pos")
    blocks = _token_blocks(vit.blocks, granularity, context)
    return Network(RelPosStem(vit, context), blocks, RelPosHead(vit))


# --- Swin ---


@register(
    "timm Swin",
    "timm",
    ("SwinTransformer",),
    "Swin; windowed attention + MLP sub-layers, patch merging in front of a stage's first block",
)
def swin_network(swin: SwinTransformer, granularity: str = "sublayer") -> Network:
    """A timm SwinTransformer as a `Network`: patch embedding; per stage its patch merging in
    front of its first block, then each SwinTransformerBlock's attention and MLP sub-layers;
    final norm + head."""
    _check_granularity(granularity)
    blocks, i = [], 0
    for stage, s in enumerate(swin.layers):
        stage_blocks = []
        for layer in s.blocks:
            attn, mlp = (SwinSubLayer(layer, kind, i, stage) for kind in ("attn", "mlp"))
            stage_blocks += [Layer(layer, attn, mlp)] if granularity == "layer" else [attn, mlp]
            i += 1
        blocks += _stage_blocks(s.downsample, stage_blocks)
    return Network(swin.patch_embed, blocks, nn.Sequential(swin.norm, swin.head))


# --- ConvNeXt ---


class ConvNeXtBlock(Block):
    """Adapter around timm's ConvNeXtBlock: shortcut(x) + drop_path(gamma * mlp(norm(dw(x))))."""

    def __init__(self, block: nn.Module, stage: int):
        super().__init__()
        self.block, self.stage = block, stage
        self.downsampling = not isinstance(block.shortcut, nn.Identity)

    def shortcut(self, x: Tensor) -> Tensor:
        return self.block.shortcut(x)

    def residual(self, x: Tensor) -> Tensor:
        b = self.block
        x = b.conv_dw(x)
        if b.use_conv_mlp:
            x = b.mlp(b.norm(x))
        else:
            x = b.mlp(b.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        if b.gamma is not None:
            x = x.mul(b.gamma.reshape(1, -1, 1, 1))
        return b.drop_path(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


@register(
    "timm ConvNeXt",
    "timm",
    ("ConvNeXt",),
    "ConvNeXt, ConvNeXt-V2; one block per ConvNeXtBlock, stage downsampling in front of a "
    "stage's first block",
)
def convnext_network(model: ConvNeXt) -> Network:
    """A timm ConvNeXt as a `Network`: stem; per stage its downsampling (norm + strided conv) in
    front of its first block, then its ConvNeXtBlocks; norm_pre + head."""
    blocks = []
    for stage, s in enumerate(model.stages):
        blocks += _stage_blocks(s.downsample, [ConvNeXtBlock(b, stage) for b in s.blocks])
    return Network(model.stem, blocks, nn.Sequential(model.norm_pre, model.head))


# --- ResNet (post-activation) ---


class ResNetBlock(Block):
    """Adapter around timm's post-activation BasicBlock / Bottleneck: act(shortcut + residual),
    the residual with the block's own drop_block, aa, se and drop_path."""

    def __init__(self, block: nn.Module, stage: int):
        super().__init__()
        self.block, self.stage = block, stage
        self.downsampling = block.downsample is not None
        self.act = block.act3 if isinstance(block, Bottleneck) else block.act2

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.block.downsample is None else self.block.downsample(x)

    def residual(self, x: Tensor) -> Tensor:
        b = self.block
        if isinstance(b, Bottleneck):
            x = b.act1(b.bn1(b.conv1(x)))
            x = b.aa(b.act2(b.drop_block(b.bn2(b.conv2(x)))))
            x = b.bn3(b.conv3(x))
        else:
            x = b.aa(b.act1(b.drop_block(b.bn1(b.conv1(x)))))
            x = b.bn2(b.conv2(x))
        if b.se is not None:
            x = b.se(x)
        return x if b.drop_path is None else b.drop_path(x)

    def merge(self, s: Tensor, r: Tensor) -> Tensor:
        return self.act(s + r)

    def skip(self, x: Tensor) -> Tensor:
        s = self.shortcut(x)
        return self.act(s.clone() if s is x else s)  # timm's activations work in place

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class ResNetHead(nn.Module):
    """timm ResNet's `forward_head`: global pool, dropout (drop_rate), fc."""

    forward_head = ResNet.forward_head

    def __init__(self, model: ResNet):
        super().__init__()
        _take(self, model, ("global_pool", "fc", "drop_rate"))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(x)


@register(
    "timm ResNet",
    "timm",
    ("ResNet",),
    "ResNet, ResNet-D/-T, SE-ResNet, ResNeXt, wide ResNet; one block per BasicBlock / Bottleneck",
)
def resnet_network(model: ResNet) -> Network:
    """A timm post-activation ResNet as a `Network`: stem (conv1, bn1, act1, maxpool), the
    blocks of layer1..layer4, head."""
    layers = (model.layer1, model.layer2, model.layer3, model.layer4)
    kinds = (BasicBlock, Bottleneck)
    other = {type(b).__name__ for layer in layers for b in layer if type(b) not in kinds}
    if other:
        raise ConfigError(
            f"timm ResNet blocks of type {', '.join(sorted(other))} are not supported: "
            "BasicBlock or Bottleneck"
        )
    blocks = [ResNetBlock(b, stage) for stage, layer in enumerate(layers) for b in layer]
    stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
    return Network(stem, blocks, ResNetHead(model))


# --- ResNetV2 (pre-activation) ---


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


@register(
    "timm ResNetV2",
    "timm",
    ("ResNetV2",),
    "pre-activation ResNetV2 (preact=True); one block per PreActBasic / PreActBottleneck",
)
def resnetv2_network(model: ResNetV2) -> Network:
    """A timm pre-activation ResNetV2 as a `Network`: stem, blocks of every stage, norm + head."""
    blocks = [ResNetV2Block(b, stage) for stage, s in enumerate(model.stages) for b in s.blocks]
    if not all(isinstance(b.block, (PreActBasic, PreActBottleneck)) for b in blocks):
        raise ConfigError("only pre-activation ResNetV2 models are supported: use preact=True")
    return Network(model.stem, blocks, nn.Sequential(model.norm, model.head))


# --- builders ---


def _load(model: nn.Module, weights: str | None, arch: str) -> None:
    if not weights:
        return
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"weights file {path} not found: pass model.weights=<a local {arch} state dict>"
        )
    timm.models.load_checkpoint(model, str(path))


def timm_model(
    arch: str = "resnet18",
    weights: str | None = None,
    in_channels: int = 3,
    num_classes: int = 10,
    granularity: str | None = None,
    **overrides,
) -> Network:
    """Any timm `arch` of a registered family, built with pretrained=False (`overrides` go to
    timm: img_size, patch_size, depth, embed_dim, ...), weights from a local file only, adapted
    and verified. `granularity` ("sublayer" / "layer") is for the transformer families; None:
    their default (sublayer)."""
    model = timm.create_model(
        arch, pretrained=False, in_chans=in_channels, num_classes=num_classes, **overrides
    )
    _load(model, weights, arch)
    family = family_of(model)
    if granularity is None:
        return adapt(model)
    if "granularity" not in inspect.signature(family.build).parameters:
        raise ConfigError(
            f"model.granularity={granularity}: {family.name} has one block per residual block "
            "and no sub-layers; leave model.granularity=null"
        )
    return adapt(model, granularity=granularity)


def timm_vit(
    arch: str = "vit_tiny_patch16_224",
    img_size: Annotated[int, POSITIVE] = 32,
    patch_size: Annotated[int, POSITIVE] = 4,
    granularity: Literal["sublayer", "layer"] = "sublayer",
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
    return adapt(vit, granularity=granularity)


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
    return adapt(model)
