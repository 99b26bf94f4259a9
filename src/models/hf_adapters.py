"""Hugging Face causal language models seen through the block interface: the paper's lesion and
path analyses (Secs. 4-5) on a transformer's (or a state-space model's) residual stream. Input:
token ids (B, T); output: logits (B, T, vocab).

Every decoder layer gives two blocks, its attention branch h + attn(norm_1(h)) and its MLP branch
h + mlp(norm_2(h)) (n = 2 x layers), or one (h + mixer(norm(h)), Mamba); stem = token (+ learned
position) embeddings, their scaling, norm and dropout; head = final norm + lm_head (+ the logit
scaling or soft-capping of the family). Each layout is one family registered with
src.models.adapt; `adapt(model)` builds it and checks that under the full plan the outputs equal
the model's own. A configuration a family cannot take apart is refused in one line.

The attention inputs every attention branch needs (causal mask, full or sliding-window; position
ids; rotary (cos, sin), per layer type for Gemma-3; BLOOM's ALiBi bias) live in one `LMContext`
shared by the stem and all blocks. They depend on the hidden state's (batch, length, dtype,
device) only; they are computed on first use, and a block that finds a hidden state of another
shape (or another inference mode) recomputes them. So blocks can run reordered, skipped, or from
the lesion engine's cached inputs without a stale mask. No padding mask: every sequence is full
length.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from src.errors import ConfigError
from src.hub import from_pretrained
from src.models.adapt import adapt, family_of, register
from src.models.network import Block, Network

# attention type (config.layer_types) -> the mask its layers see, as the models build them
MASKS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


class LMContext:
    """Causal mask (per attention type), position ids, rotary (cos, sin) and `extra` attention
    inputs for one hidden-state shape, computed on first use (once per device the hidden state
    arrives on) and kept until a hidden state of another (B, T, dtype, mode) arrives.
    `rotary_by_type`: the rotary embedding takes the layer type (Gemma-3's local and global
    RoPE); `extra(h, pos)` gives more keyword inputs."""

    def __init__(
        self,
        config,
        rotary: nn.Module | None = None,
        rotary_by_type: bool = False,
        extra: Callable[[Tensor, Tensor], dict] | None = None,
    ):
        self.config, self.rotary, self.rotary_by_type = config, rotary, rotary_by_type
        self.extra = extra
        self._key, self._kwargs = None, {}

    def __call__(self, h: Tensor, layer_type: str = "full_attention") -> dict:
        key = (tuple(h.shape[:2]), h.dtype, torch.is_inference_mode_enabled())
        if key != self._key:
            self._key, self._kwargs = key, {}
        slot = (h.device, layer_type)  # one set per device: blocks spread by a device_map
        if slot not in self._kwargs:
            pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
            # (config, inputs_embeds, attention_mask, cache, position_ids): no padding, no cache
            kwargs = {"attention_mask": MASKS[layer_type](self.config, h, None, None, pos)}
            kwargs["position_ids"] = pos
            if self.rotary is not None:
                by_type = (layer_type,) if self.rotary_by_type else ()
                kwargs["position_embeddings"] = self.rotary(h, pos, *by_type)
            if self.extra is not None:
                kwargs.update(self.extra(h, pos))
            # a dispatched rotary embedding answers on its own device: bring it to h's
            self._kwargs[slot] = {k: _to(v, h.device) for k, v in kwargs.items()}
        return self._kwargs[slot]


def _to(value, device: torch.device):
    """`value` (a tensor, a tuple of tensors, anything else) with its tensors on `device`."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


class LMStem(nn.Module):
    """Token embeddings (x `scale`; + learned position embeddings; `norm`), embedding dropout."""

    def __init__(
        self, embed, context, position=None, drop=None, rotary=None, scale=None, norm=None
    ):
        super().__init__()
        self.embed, self.position, self.rotary = embed, position, rotary  # rotary: moved by .to()
        self.drop = nn.Identity() if drop is None else drop
        self.norm = nn.Identity() if norm is None else norm
        self.context, self.scale = context, scale

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        if self.scale is not None:  # Granite's embedding_multiplier
            h = h * self.scale
        if self.position is not None:
            h = h + self.position(self.context(h)["position_ids"]).to(h.device)  # as HF does
        return self.drop(self.norm(h))


class LMBranch(Block):
    """One sub-layer of a decoder layer: h + scale * post(fn(norm(h))), fn = attention or MLP.

    Pre-norm: post = identity (or the layer's residual dropout); Gemma-2/3's sandwich norms: a
    norm on both sides; OLMo-2's post-norm sub-layers: norm = identity; Granite: its
    `residual_multiplier` as `scale`. Attention sees the context of its `layer_type`."""

    device: torch.device | None = None  # set by `place`: the residual runs there (None: on h's)

    def __init__(
        self,
        norm: nn.Module,
        fn: nn.Module,
        kind: str,
        index: int,
        context,
        post: nn.Module | None = None,
        scale: float | None = None,
        layer_type: str = "full_attention",
    ):
        super().__init__()
        self.norm, self.fn = norm, fn
        self.post = nn.Identity() if post is None else post
        self.kind, self.layer_index = kind, index
        self.context, self.scale, self.layer_type = context, scale, layer_type

    def shortcut(self, h: Tensor) -> Tensor:
        return h

    def residual(self, h: Tensor) -> Tensor:
        x = h if self.device is None else h.to(self.device)
        if self.kind == "attn":
            r = self.fn(self.norm(x), **self.context(x, self.layer_type))[0]
        else:
            r = self.fn(self.norm(x))
        r = self.post(r)
        r = r if self.scale is None else r * self.scale
        return r if self.device is None else r.to(h.device)


class MixerBranch(Block):
    """One Mamba / Mamba-2 layer: h + mixer(norm(h)); the shortcut in float32 where the model
    keeps its residual stream so (`residual_in_fp32`)."""

    kind = "mixer"

    device: torch.device | None = None  # set by `place`: the residual runs there (None: on h's)

    def __init__(self, layer: nn.Module, index: int):
        super().__init__()
        self.norm, self.mixer, self.fp32 = layer.norm, layer.mixer, layer.residual_in_fp32
        self.layer_index = index

    def shortcut(self, h: Tensor) -> Tensor:
        return h.to(torch.float32) if self.fp32 else h

    def residual(self, h: Tensor) -> Tensor:
        x = h if self.device is None else h.to(self.device)
        r = self.mixer(self.norm(x.to(self.norm.weight.dtype)))
        return r if self.device is None else r.to(h.device)


class LMHead(nn.Module):
    """Final norm, lm_head, then the family's logit transform: Granite's division by
    `logits_scaling`, Gemma-2's tanh soft-capping, Mamba's float32 logits (`mamba`)."""

    def __init__(self, norm, lm_head, divide=None, softcap=None, mamba=False):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head
        self.divide, self.softcap, self.mamba = divide, softcap, mamba

    def forward(self, h: Tensor) -> Tensor:
        h = self.norm(h)
        if self.mamba:
            return self.lm_head(h.to(self.lm_head.weight.dtype)).float()
        logits = self.lm_head(h)
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class OPTPositions(nn.Module):
    """OPT's learned positions (offset 2 inside) from position ids (B, T)."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, pos: Tensor) -> Tensor:
        return self.embed(None, 0, position_ids=pos)


class WithoutResidual(nn.Module):
    """BLOOM's attention and MLP add the residual themselves (`dropout_add`); given a zero
    residual they return their branch alone, bit for bit (0 + x = x)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, **kwargs):
        return self.fn(x, torch.zeros_like(x), **kwargs)


def _attr(layer: nn.Module, name: str | None) -> nn.Module:
    return nn.Identity() if name is None else getattr(layer, name)


def _sublayers(layers, spec, context, layer_types, scale=None) -> list[LMBranch]:
    """One LMBranch per (norm, fn, post, kind) of `spec` (attribute names of a layer, None:
    none) in every layer."""
    return [
        LMBranch(
            _attr(layer, norm),
            getattr(layer, fn),
            kind,
            i,
            context,
            post=_attr(layer, post),
            scale=scale,
            layer_type=layer_type,
        )
        for i, (layer, layer_type) in enumerate(zip(layers, layer_types))
        for norm, fn, post, kind in spec
    ]


def _refuse(model: PreTrainedModel, flag: str, why: str) -> None:
    if getattr(model.config, flag, False):
        raise ConfigError(f"{model.config.model_type} with {flag}=True {why}")


@register(
    "GPT-2",
    library="transformers",
    keys=("gpt2",),
    layout="h + attn(ln_1(h)), h + mlp(ln_2(h)) per layer; learned positions in the stem",
)
def gpt2_network(model: PreTrainedModel) -> Network:
    t = model.transformer
    _refuse(model, "add_cross_attention", "is no causal LM: use add_cross_attention=False")
    context = LMContext(model.config)
    stem = LMStem(t.wte, context, position=t.wpe, drop=t.drop)
    spec = [("ln_1", "attn", None, "attn"), ("ln_2", "mlp", None, "mlp")]
    blocks = _sublayers(t.h, spec, context, ["full_attention"] * len(t.h))
    return Network(stem, blocks, LMHead(t.ln_f, model.lm_head))


# model types whose layers pick their mask by config.layer_types (full or sliding window)
BY_LAYER_TYPE = ("qwen2", "qwen3", "qwen2_moe", "gemma2", "gemma3_text")
# model types whose every layer sees a sliding-window mask where config.sliding_window is set
WINDOWED = ("mistral", "phi3", "mixtral")
# residual dropouts of the attention and MLP branches, where a model has them
RESIDUAL_DROPOUT = {
    "phi3": ("resid_attn_dropout", "resid_mlp_dropout"),
    "stablelm": (None, "dropout"),
}


def _layer_types(config, n: int) -> list[str]:
    if config.model_type in BY_LAYER_TYPE:
        return list(config.layer_types[:n])
    window = config.model_type in WINDOWED and config.sliding_window is not None
    return ["sliding_attention" if window else "full_attention"] * n


def _pre_norm(attn_post: str | None = None, mlp_post: str | None = None) -> list[tuple]:
    return [
        ("input_layernorm", "self_attn", attn_post, "attn"),
        ("post_attention_layernorm", "mlp", mlp_post, "mlp"),
    ]


def _decoder(model: PreTrainedModel, spec, embed_scale=None, branch_scale=None, **head) -> Network:
    """A `model.model.layers` decoder with rotary positions: sub-layers by `spec`; Granite's
    multipliers of the embeddings and of every residual branch; `head` options to `LMHead`."""
    m, config = model.model, model.config
    context = LMContext(config, m.rotary_emb, rotary_by_type=config.model_type == "gemma3_text")
    stem = LMStem(m.embed_tokens, context, rotary=m.rotary_emb, scale=embed_scale)
    layers = m.layers[: config.num_hidden_layers]
    blocks = _sublayers(layers, spec, context, _layer_types(config, len(layers)), branch_scale)
    return Network(stem, blocks, LMHead(m.norm, model.lm_head, **head))


@register(
    "Llama-style pre-norm",
    library="transformers",
    keys=(
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "qwen2_moe",
        "gemma",
        "phi3",
        "mixtral",
        "olmo",
        "stablelm",
    ),
    layout="h + self_attn(input_layernorm(h)), h + mlp(post_attention_layernorm(h)) per layer "
    "(dense or sparse MoE MLP); rotary positions; full or sliding-window masks per layer",
)
def llama_network(model: PreTrainedModel) -> Network:
    _refuse(
        model,
        "use_parallel_residual",
        "adds attention and MLP to one residual (parallel): use use_parallel_residual=False",
    )
    return _decoder(model, _pre_norm(*RESIDUAL_DROPOUT.get(model.config.model_type, ())))


@register(
    "Granite",
    library="transformers",
    keys=("granite",),
    layout="Llama-style pre-norm with h + residual_multiplier x branch; embeddings x "
    "embedding_multiplier; logits / logits_scaling (attention_multiplier is attention's scale)",
)
def granite_network(model: PreTrainedModel) -> Network:
    c = model.config
    return _decoder(
        model,
        _pre_norm(),
        embed_scale=c.embedding_multiplier,
        branch_scale=c.residual_multiplier,
        divide=c.logits_scaling,
    )


@register(
    "Gemma-2 / Gemma-3 (sandwich norms)",
    library="transformers",
    keys=("gemma2", "gemma3_text"),
    layout="h + post_attention_layernorm(self_attn(input_layernorm(h))), h + "
    "post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h))); sliding-window layers; "
    "final logit soft-capping",
)
def gemma2_network(model: PreTrainedModel) -> Network:
    _refuse(model, "use_bidirectional_attention", "is no causal LM: use False")
    spec = [
        ("input_layernorm", "self_attn", "post_attention_layernorm", "attn"),
        ("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm", "mlp"),
    ]
    return _decoder(model, spec, softcap=model.config.final_logit_softcapping)


@register(
    "OLMo-2 (post-norm sub-layers)",
    library="transformers",
    keys=("olmo2",),
    layout="h + post_attention_layernorm(self_attn(h)), h + post_feedforward_layernorm(mlp(h))",
)
def olmo2_network(model: PreTrainedModel) -> Network:
    spec = [
        (None, "self_attn", "post_attention_layernorm", "attn"),
        (None, "mlp", "post_feedforward_layernorm", "mlp"),
    ]
    return _decoder(model, spec)


@register(
    "OPT",
    library="transformers",
    keys=("opt",),
    layout="h + dropout(self_attn(self_attn_layer_norm(h))), h + dropout(fc2(act(fc1("
    "final_layer_norm(h))))); learned positions (offset 2), project_in / project_out",
)
def opt_network(model: PreTrainedModel) -> Network:
    c, d = model.config, model.model.decoder
    if not c.do_layer_norm_before:
        raise ConfigError(
            "opt with do_layer_norm_before=False (OPT-350m) normalizes each residual sum "
            "(post-norm), so a sub-layer is no shortcut + branch: use a pre-norm OPT"
        )
    if c.layerdrop:
        raise ConfigError("opt with layerdrop > 0 drops layers in training: use layerdrop=0")
    context = LMContext(c)
    embed = d.embed_tokens if d.project_in is None else nn.Sequential(d.embed_tokens, d.project_in)
    stem = LMStem(embed, context, position=OPTPositions(d.embed_positions))
    blocks = []
    for i, layer in enumerate(d.layers):
        mlp = nn.Sequential(layer.fc1, layer.activation_fn, layer.fc2)
        for norm, fn, kind in (
            (layer.self_attn_layer_norm, layer.self_attn, "attn"),
            (layer.final_layer_norm, mlp, "mlp"),
        ):
            blocks.append(LMBranch(norm, fn, kind, i, context, post=nn.Dropout(layer.dropout)))
    final = nn.Sequential(*[m for m in (d.final_layer_norm, d.project_out) if m is not None])
    # the new dropouts follow the model's mode
    return Network(stem, blocks, LMHead(final, model.lm_head)).train(model.training)


def _alibi(num_heads: int) -> Callable[[Tensor, Tensor], dict]:
    """BLOOM's ALiBi bias for full-length sequences, as BloomModel builds it without a mask."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    def extra(h: Tensor, pos: Tensor) -> dict:
        slopes = _get_alibi_slopes(num_heads, h.device)
        alibi = slopes[:, None, None] * torch.arange(h.shape[1], device=h.device)
        return {"alibi": alibi.repeat(h.shape[0], 1, 1).to(h.dtype)}

    return extra


@register(
    "BLOOM",
    library="transformers",
    keys=("bloom",),
    layout="h + self_attention(input_layernorm(h)), h + mlp(post_attention_layernorm(h)); "
    "ALiBi bias; word_embeddings_layernorm in the stem",
)
def bloom_network(model: PreTrainedModel) -> Network:
    _refuse(
        model,
        "apply_residual_connection_post_layernorm",
        "adds each branch to the normalized input, not to h: use False",
    )
    t = model.transformer
    context = LMContext(model.config, extra=_alibi(model.config.n_head))
    stem = LMStem(t.word_embeddings, context, norm=t.word_embeddings_layernorm)
    blocks = [
        LMBranch(norm, WithoutResidual(fn), kind, i, context)
        for i, layer in enumerate(t.h)
        for norm, fn, kind in (
            (layer.input_layernorm, layer.self_attention, "attn"),
            (layer.post_attention_layernorm, layer.mlp, "mlp"),
        )
    ]
    return Network(stem, blocks, LMHead(t.ln_f, model.lm_head))


@register(
    "Mamba / Mamba-2",
    library="transformers",
    keys=("mamba", "mamba2"),
    layout="one block per layer: h + mixer(norm(h)); head norm_f + lm_head (float32 logits)",
)
def mamba_network(model: PreTrainedModel) -> Network:
    b = model.backbone
    blocks = [MixerBranch(layer, i) for i, layer in enumerate(b.layers)]
    return Network(LMStem(b.embeddings, None), blocks, LMHead(b.norm_f, model.lm_head, mamba=True))


def causal_lm_network(model: PreTrainedModel) -> Network:
    """A Hugging Face causal LM of a registered family as a `Network` sharing its modules (not
    verified: `adapt(model)` is)."""
    return family_of(model).build(model)


# --- models bigger than one device: model.device_map ----------------------------------------


def _device_of(module: nn.Module) -> torch.device | None:
    p = next(iter(module.parameters()), None)
    return None if p is None else p.device


def place(net: Network, force: bool = False) -> Network:
    """`net`, built on a model that accelerate's device_map spread over several devices, run
    with each block's residual branch, and the head, on the device of its parameters: each moves
    its input there and its output back to the stem's device, where the hidden stream, the
    lesion engine's cache and every engine's tensors stay (one device for all of them, at two
    transfers per block away from it). Inside a block or the head, the modules the map names
    move their own inputs (accelerate's hooks, as in the model's own forward). Moving the
    network as a whole leaves every tensor where the map put it (`Network.dispatched`).
    `adapt` calls it for a model on several devices, then verifies the network as usual.
    `force`: the moves on every block and the head, also where they share the stem's device (on
    one device they are no-ops: tests). Refused in one line: an offloaded parameter (on the
    meta device: offload is off), a block that cannot move its input."""
    offloaded = [n for n, p in net.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise ConfigError(
            f"{len(offloaded)} parameters (e.g. {offloaded[0]}) are offloaded to cpu or disk "
            "(the meta device): offload is off here; map every module to a device that holds "
            "it (more GPUs, a smaller model.dtype, or everything on cpu)"
        )
    main = _device_of(net)
    for i, block in enumerate(net.blocks):
        device = _device_of(block)
        if device is None or (device == main and not force):
            continue
        if not isinstance(block, (LMBranch, MixerBranch)):
            raise ConfigError(
                f"block {i} ({type(block).__name__}) lies on {device}, the stem on {main}, and "
                "cannot move its input there: map it with the stem (model.device_map)"
            )
        block.device = device
    head = _device_of(net.head)
    if head is not None and (force or head != main):
        net.head.register_forward_pre_hook(lambda m, args: _to(args, head))
        net.head.register_forward_hook(lambda m, args, out: _to(out, main))
    net.dispatched = True
    return net


DEVICES = "a GPU index, 'cuda:N' or 'cpu'"


def _check_offload(device_map: dict, said: str) -> None:
    """Refuse a map that offloads (one line): a module on "disk" or "meta", or on "cpu" next to
    GPUs (accelerate then keeps its weights on the CPU and streams them to a GPU each call)."""
    where = {k: str(v) for k, v in device_map.items()}
    off = [k for k, v in where.items() if v in ("disk", "meta")]
    if not off and any(v != "cpu" for v in where.values()):
        off = [k for k, v in where.items() if v == "cpu"]
    if off:
        more = f" and {len(off) - 3} more" if len(off) > 3 else ""
        raise ConfigError(
            f"{said} offloads {', '.join(off[:3])}{more} to {where[off[0]]}: offload is off "
            f"here; map every module to a device that holds it ({DEVICES}; every module on cpu "
            "runs on the CPU), e.g. with more GPUs or a smaller model.dtype"
        )


def check_device_map(device_map) -> str | dict:
    """`model.device_map` checked before any loading: "auto" or {module name: device}, with
    accelerate installed, nothing offloaded; else one line naming the fix."""
    if importlib.util.find_spec("accelerate") is None:
        raise ConfigError(
            "model.device_map needs accelerate, which is not installed: pip install accelerate "
            "(pip install -e '.[multi]'), or leave model.device_map=null (one device)"
        )
    if isinstance(device_map, str) and device_map == "auto":
        return device_map
    if not isinstance(device_map, Mapping) or not device_map:
        raise ConfigError(
            f"model.device_map={device_map!r}: give auto (accelerate spreads the layers over "
            f"the GPUs), a mapping {{module name: device}} ({DEVICES}), or null (one device)"
        )
    device_map = dict(device_map)
    for name, device in device_map.items():
        try:
            if isinstance(device, bool):
                raise TypeError
            if device != "disk":  # refused just below, with the other offloads
                torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise ConfigError(
                f"model.device_map: {name!r} -> {device!r} is no device: give {DEVICES}"
            ) from None
    _check_offload(device_map, "model.device_map")  # disk, meta, cpu next to GPUs
    return device_map


def dispatch(model: PreTrainedModel, device_map: str | dict) -> PreTrainedModel:
    """`model` (built on the CPU, e.g. from a config) spread over devices by `device_map` as
    `from_pretrained(device_map=...)` spreads the model it loads: "auto" is its own map (each
    decoder layer whole, the GPUs balanced), a mapping is taken as given."""
    from accelerate import dispatch_model
    from transformers.integrations.accelerate import _get_device_map

    said = "model.device_map" + ("=auto" if device_map == "auto" else "")
    if device_map == "auto":
        device_map = _get_device_map(model, "auto", None, None)
    _check_offload(device_map, said)
    try:
        dispatch_model(model, device_map, skip_keys=model._skip_keys_device_placement)
    except ValueError as err:  # e.g. modules the map leaves out
        raise ConfigError(f"model.device_map: {' '.join(str(err).split())}") from None
    return model


def hf_causal_lm(
    path: str | None = None,
    config: dict | None = None,
    attn_implementation: str = "eager",
    dtype: str = "float32",
    device_map: Literal["auto"] | dict[str, int | str] | None = None,
    in_channels: int | None = None,
    num_classes: int | None = None,
) -> Network:
    """A causal LM from a local `save_pretrained` directory or a Hugging Face Hub id (`path`,
    src/hub.py: downloaded only for a Hub id, where there is network; it wins over `config`),
    or with random weights from `config` (`model_type` plus its sizes, e.g. gpt2 with
    n_layer=2), adapted and verified (`adapt`). `in_channels`/`num_classes` (passed by the entry
    point for image data) are not used: the classes of an LM are its vocabulary.

    `device_map` (analysis only; needs accelerate): None, one device (as before); "auto", the
    layers spread over the GPUs by accelerate, as `from_pretrained(device_map="auto")` does; or
    {module name: device}. Offload (to the CPU next to GPUs, to disk) is refused, so is
    training (src/errors.py); the network runs each block where the map put it (`place`)."""
    if path is None and config is None:
        raise ConfigError(
            "a causal LM needs model.path=<local directory> or model.config={model_type: gpt2, ...}"
        )
    if device_map is not None:
        device_map = check_device_map(device_map)
    if path is None:
        config = dict(config)
        cfg = AutoConfig.for_model(config.pop("model_type"), **config)
        model = AutoModelForCausalLM.from_config(
            cfg, attn_implementation=attn_implementation, dtype=getattr(torch, dtype)
        )
        if device_map is not None:
            dispatch(model, device_map)
    else:
        spread = {} if device_map is None else {"device_map": device_map}
        model = from_pretrained(
            AutoModelForCausalLM.from_pretrained,
            path,
            "model.path",
            attn_implementation=attn_implementation,
            dtype=getattr(torch, dtype),
            **spread,
        )
        if device_map is not None:
            said = "model.device_map" + ("=auto" if device_map == "auto" else "")
            _check_offload(getattr(model, "hf_device_map", {}), said)
    return adapt(model)


if importlib.util.find_spec("src.models.hf_parallel") is not None:
    import src.models.hf_parallel  # noqa: E402,F401  (registers the parallel-residual families)
