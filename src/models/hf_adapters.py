"""Hugging Face causal language models (GPT-2; Llama-style: Llama, Mistral, ...) seen through the
block interface: the paper's lesion and path analyses (Secs. 4-5) on a transformer's residual
stream. Input: token ids (B, T); output: logits (B, T, vocab).

Every decoder layer gives two blocks, its attention branch h + attn(norm_1(h)) and its MLP branch
h + mlp(norm_2(h)) (n = 2 x layers); stem = token (+ GPT-2's position) embeddings and embedding
dropout; head = final norm + lm_head. Under the full plan the outputs equal the model's own.

The attention inputs every attention branch needs (causal mask, position ids and, for rotary
models, (cos, sin)) live in one `LMContext` shared by the stem and all blocks. They depend on the
hidden state's (batch, length, dtype, device) only; the stem computes them once per call, and a
block that finds a hidden state of another shape (or another inference mode) recomputes them. So
blocks can run reordered, skipped, or from the lesion engine's cached inputs without a stale mask.
No padding mask: every sequence is full length.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.masking_utils import create_causal_mask

from src.errors import ConfigError
from src.hub import from_pretrained
from src.models.network import Block, Network


class LMContext:
    """Causal mask, position ids and rotary (cos, sin) for one hidden-state shape, computed on
    first use and kept until a hidden state of another (B, T, dtype, device, mode) arrives."""

    def __init__(self, config, rotary: nn.Module | None = None):
        self.config, self.rotary = config, rotary
        self._key, self._kwargs = None, {}

    def __call__(self, h: Tensor) -> dict:
        key = (tuple(h.shape[:2]), h.dtype, h.device, torch.is_inference_mode_enabled())
        if key != self._key:
            pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
            # (config, inputs_embeds, attention_mask, cache, position_ids): no padding, no cache
            mask = create_causal_mask(self.config, h, None, None, pos)
            kwargs = {"attention_mask": mask, "position_ids": pos}
            if self.rotary is not None:
                kwargs["position_embeddings"] = self.rotary(h, pos)
            self._key, self._kwargs = key, kwargs
        return self._kwargs


class LMStem(nn.Module):
    """Token embeddings (+ learned position embeddings), embedding dropout; primes the context."""

    def __init__(self, embed, context, position=None, drop=None, rotary=None):
        super().__init__()
        self.embed, self.position, self.rotary = embed, position, rotary  # rotary: moved by .to()
        self.drop = nn.Identity() if drop is None else drop
        self.context = context

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        pos = self.context(h)["position_ids"]
        if self.position is not None:
            h = h + self.position(pos)
        return self.drop(h)


class LMBranch(Block):
    """One sub-layer of a pre-norm decoder layer: h + fn(norm(h)), fn = attention or MLP."""

    def __init__(self, norm: nn.Module, fn: nn.Module, kind: str, index: int, context):
        super().__init__()
        self.norm, self.fn = norm, fn
        self.kind, self.layer_index = kind, index
        self.context = context

    def shortcut(self, h: Tensor) -> Tensor:
        return h

    def residual(self, h: Tensor) -> Tensor:
        if self.kind == "mlp":
            return self.fn(self.norm(h))
        return self.fn(self.norm(h), **self.context(h))[0]


def causal_lm_network(model: PreTrainedModel) -> Network:
    """A GPT-2 (`model.transformer.h`) or Llama-style (`model.model.layers`) causal LM as a
    `Network` sharing its modules."""
    if hasattr(model, "transformer") and hasattr(model.transformer, "h"):  # GPT-2
        t = model.transformer
        if model.config.add_cross_attention:
            raise ConfigError(
                "GPT-2 with cross-attention is no causal LM: use add_cross_attention=False"
            )
        context = LMContext(model.config)
        stem = LMStem(t.wte, context, position=t.wpe, drop=t.drop)
        names = [("ln_1", "attn", "attn"), ("ln_2", "mlp", "mlp")]
        layers, final_norm = t.h, t.ln_f
    elif hasattr(model, "model") and hasattr(model.model, "layers"):  # Llama-style
        m = model.model
        context = LMContext(model.config, m.rotary_emb)
        stem = LMStem(m.embed_tokens, context, rotary=m.rotary_emb)
        names = [
            ("input_layernorm", "self_attn", "attn"),
            ("post_attention_layernorm", "mlp", "mlp"),
        ]
        layers, final_norm = m.layers[: model.config.num_hidden_layers], m.norm
    else:
        raise ConfigError(
            f"{type(model).__name__} is neither GPT-2-like (transformer.h) nor Llama-like "
            "(model.layers): use a GPT-2 or Llama-style causal LM"
        )
    blocks = [
        LMBranch(getattr(layer, norm), getattr(layer, fn), kind, i, context)
        for i, layer in enumerate(layers)
        for norm, fn, kind in names
    ]
    return Network(stem, blocks, nn.Sequential(final_norm, model.lm_head))


def hf_causal_lm(
    path: str | None = None,
    config: dict | None = None,
    attn_implementation: str = "eager",
    dtype: str = "float32",
    in_channels: int | None = None,
    num_classes: int | None = None,
) -> Network:
    """A causal LM from a local `save_pretrained` directory or a Hugging Face Hub id (`path`,
    src/hub.py: downloaded only for a Hub id, where there is network; it wins over `config`),
    or with random weights from `config` (`model_type` plus its sizes, e.g. gpt2 with
    n_layer=2). `in_channels`/`num_classes` (passed by the entry point for image data)
    are not used: the classes of an LM are its vocabulary."""
    if path is None and config is None:
        raise ConfigError(
            "a causal LM needs model.path=<local directory> or model.config={model_type: gpt2, ...}"
        )
    if path is None:
        config = dict(config)
        cfg = AutoConfig.for_model(config.pop("model_type"), **config)
        model = AutoModelForCausalLM.from_config(
            cfg, attn_implementation=attn_implementation, dtype=getattr(torch, dtype)
        )
    else:
        model = from_pretrained(
            AutoModelForCausalLM.from_pretrained,
            path,
            "model.path",
            attn_implementation=attn_implementation,
            dtype=getattr(torch, dtype),
        )
    return causal_lm_network(model)
