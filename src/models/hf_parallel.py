"""Hugging Face decoders with parallel residual layers (GPT-J, GPT-NeoX / Pythia, Falcon, Phi-1/2,
Cohere): h + attn(norm_a(h)) + mlp(norm_m(h)) per layer, both branches reading the layer's input.

Every layer gives two blocks, its attention branch and its MLP branch, each carrying the layer's
index as its `parallel` key: `Network` runs them as one step on one input and adds both residuals
(src/models/network.py), so deleting the attention of layer i keeps its MLP, which still reads the
layer's input, and a path of the unraveled view enters at most one branch per layer (3^L paths).
A norm shared by both branches (GPT-J, Phi, Cohere, Falcon-7B) is applied by each branch itself.
Sequential variants (GPT-NeoX with use_parallel_residual=False, Falcon with parallel_attn=False,
e.g. Falcon-RW) give the usual h + attn(norm_1(h)), h + mlp(norm_2(h)) blocks. Registered with
src.models.adapt, which checks the full-plan logits against the model's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask
from transformers.models.falcon.modeling_falcon import build_alibi_tensor

from src.errors import ConfigError
from src.models.adapt import register
from src.models.hf_adapters import LMBranch, LMContext, LMStem
from src.models.network import Network

# a layer -> its (norm, fn, post, kind) branches: post is the dropout the model puts on the branch
Branches = Callable[[nn.Module], list[tuple[nn.Module, nn.Module, nn.Module | None, str]]]


def _blocks(layers, branches: Branches, context, parallel: bool) -> list[LMBranch]:
    """The branches of every layer as blocks; `parallel`: keyed by their layer (one step)."""
    blocks = []
    for i, layer in enumerate(layers):
        for norm, fn, post, kind in branches(layer):
            block = LMBranch(norm, fn, kind, i, context, post=post)
            block.parallel = i if parallel else None
            blocks.append(block)
    return blocks


class LogitScale(nn.Module):
    """Cohere's logits x logit_scale after lm_head."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, logits: Tensor) -> Tensor:
        return logits * self.scale


@register(
    "GPT-J",
    library="transformers",
    keys=("gptj",),
    layout="h + attn(ln_1(h)) + mlp(ln_1(h)) per layer (parallel branches, one shared norm); "
    "rotary positions",
)
def gptj_network(model: PreTrainedModel) -> Network:
    t = model.transformer
    context = LMContext(model.config, t.rotary_emb)
    stem = LMStem(t.wte, context, drop=t.drop, rotary=t.rotary_emb)

    def branches(layer):
        return [(layer.ln_1, layer.attn, None, "attn"), (layer.ln_1, layer.mlp, None, "mlp")]

    blocks = _blocks(t.h, branches, context, True)
    return Network(stem, blocks, nn.Sequential(t.ln_f, model.lm_head))


@register(
    "GPT-NeoX / Pythia",
    library="transformers",
    keys=("gpt_neox",),
    layout="h + attention(input_layernorm(h)) + mlp(post_attention_layernorm(h)) per layer "
    "(parallel branches; sequential with use_parallel_residual=False); partial rotary",
)
def gpt_neox_network(model: PreTrainedModel) -> Network:
    m = model.gpt_neox
    context = LMContext(model.config, m.rotary_emb)
    stem = LMStem(m.embed_in, context, drop=m.emb_dropout, rotary=m.rotary_emb)

    def branches(layer):
        return [
            (layer.input_layernorm, layer.attention, layer.post_attention_dropout, "attn"),
            (layer.post_attention_layernorm, layer.mlp, layer.post_mlp_dropout, "mlp"),
        ]

    blocks = _blocks(m.layers, branches, context, model.config.use_parallel_residual)
    return Network(stem, blocks, nn.Sequential(m.final_layer_norm, model.lm_head))


def _falcon_inputs(config) -> Callable[[Tensor, Tensor], dict]:
    """Falcon's attention inputs as FalconModel builds them without padding: an explicit causal
    mask (never sdpa's is_causal shortcut) and, with alibi=True, the ALiBi bias, also folded
    into the mask."""

    def extra(h: Tensor, pos: Tensor) -> dict:
        mask = create_causal_mask(config, h, None, None, pos, allow_is_causal_skip=False)
        if not config.alibi:
            return {"attention_mask": mask, "alibi": None}
        b, t = h.shape[:2]
        ones = torch.ones(b, t, device=h.device, dtype=torch.long)
        alibi = build_alibi_tensor(ones, config.num_attention_heads, dtype=h.dtype)
        low = torch.finfo(h.dtype).min
        if mask.dtype == torch.bool:
            mask = torch.where(mask, torch.full((), 0.0, device=h.device, dtype=h.dtype), low)
        alibi = alibi.reshape(b, -1, *alibi.shape[1:])
        head_dim = config.hidden_size // config.num_attention_heads
        mask = torch.masked_fill(alibi / math.sqrt(head_dim), mask < -1, low)
        return {"attention_mask": mask, "alibi": alibi}

    return extra


@register(
    "Falcon",
    library="transformers",
    keys=("falcon",),
    layout="h + self_attention(ln_attn(h)) + mlp(ln_mlp(h)) per layer (new_decoder_architecture;"
    " one shared input_layernorm with num_ln_in_parallel_attn=1 or parallel_attn); sequential "
    "with parallel_attn=False; rotary or ALiBi",
)
def falcon_network(model: PreTrainedModel) -> Network:
    """Falcon's layer as its forward reads the config. In training a parallel layer drops out
    each branch on its own (the model drops their sum once; the default hidden_dropout is 0)."""
    t, c = model.transformer, model.config
    parallel = c.new_decoder_architecture or c.parallel_attn
    if c.new_decoder_architecture and c.num_ln_in_parallel_attn == 2:
        norms = ("ln_attn", "ln_mlp")
    elif parallel:
        norms = ("input_layernorm", "input_layernorm")
    else:
        norms = ("input_layernorm", "post_attention_layernorm")
    missing = [n for n in norms if not all(hasattr(layer, n) for layer in t.h)]
    if missing or (c.new_decoder_architecture and not c.parallel_attn):
        raise ConfigError(
            f"falcon with new_decoder_architecture={c.new_decoder_architecture}, parallel_attn="
            f"{c.parallel_attn}, num_ln_in_parallel_attn={c.num_ln_in_parallel_attn} is a layout "
            "FalconDecoderLayer itself cannot run: use parallel_attn=True with "
            "new_decoder_architecture, num_ln_in_parallel_attn=2 only with it"
        )
    context = LMContext(c, t.rotary_emb, extra=_falcon_inputs(c))
    stem = LMStem(t.word_embeddings, context, rotary=t.rotary_emb)
    attn_drop = c.hidden_dropout if parallel else c.attention_dropout

    def branches(layer):
        return [
            (getattr(layer, norms[0]), layer.self_attention, nn.Dropout(attn_drop), "attn"),
            (getattr(layer, norms[1]), layer.mlp, nn.Dropout(c.hidden_dropout), "mlp"),
        ]

    blocks = _blocks(t.h, branches, context, parallel)
    return Network(stem, blocks, nn.Sequential(t.ln_f, model.lm_head))


@register(
    "Phi-1 / Phi-2",
    library="transformers",
    keys=("phi",),
    layout="h + resid_dropout(self_attn(input_layernorm(h))) + resid_dropout(mlp("
    "input_layernorm(h))) per layer (parallel branches, one shared norm); partial rotary",
)
def phi_network(model: PreTrainedModel) -> Network:
    m = model.model
    context = LMContext(model.config, m.rotary_emb)
    stem = LMStem(m.embed_tokens, context, drop=m.embed_dropout, rotary=m.rotary_emb)

    def branches(layer):
        return [
            (layer.input_layernorm, layer.self_attn, layer.resid_dropout, "attn"),
            (layer.input_layernorm, layer.mlp, layer.resid_dropout, "mlp"),
        ]

    layers = m.layers[: model.config.num_hidden_layers]
    blocks = _blocks(layers, branches, context, True)
    return Network(stem, blocks, nn.Sequential(m.final_layernorm, model.lm_head))


@register(
    "Cohere",
    library="transformers",
    keys=("cohere",),
    layout="h + self_attn(input_layernorm(h)) + mlp(input_layernorm(h)) per layer (parallel "
    "branches, one shared norm; qk-norm inside attention); logits x logit_scale",
)
def cohere_network(model: PreTrainedModel) -> Network:
    m = model.model
    context = LMContext(model.config, m.rotary_emb)
    stem = LMStem(m.embed_tokens, context, rotary=m.rotary_emb)

    def branches(layer):
        return [
            (layer.input_layernorm, layer.self_attn, None, "attn"),
            (layer.input_layernorm, layer.mlp, None, "mlp"),
        ]

    layers = m.layers[: model.config.num_hidden_layers]
    blocks = _blocks(layers, branches, context, True)
    head = nn.Sequential(m.norm, model.lm_head, LogitScale(model.config.logit_scale))
    return Network(stem, blocks, head)
