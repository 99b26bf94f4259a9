"""The registered Hugging Face families (src/models/hf_adapters.py): for a tiny random model of
every model type they list, the adapted Network's full-plan logits equal the model's own; for each
layout beyond Llama's pre-norm (Granite's multipliers, Gemma-2/3's sandwich norms and sliding
windows, OLMo-2's post-norm sub-layers, OPT, BLOOM's ALiBi, Mamba's mixers) a deleted or swapped
sub-layer equals the model's modules run by hand with that change, and the gradient-path engines
work on it. Wrong mappings, unknown model types and variants a family cannot take apart are
refused in one line. Nothing downloaded (HF_HUB_OFFLINE is set before transformers loads)."""

# ruff: noqa: E402
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from src.engines.decomposition import decompose
from src.engines.paths import fast_path_grads, gated_grad, straightforward_path_grads
from src.errors import ConfigError
from src.models import Plan
from src.models.adapt import FAMILIES, adapt
from src.models.hf_adapters import causal_lm_network, hf_causal_lm

VOCAB = 40
T = 12  # longer than the sliding windows (4) below, so sliding-window masks matter
WINDOW = 4
LLAMA = dict(
    hidden_size=16,
    intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)
SLIDING = ["sliding_attention", "full_attention"]
MAMBA = dict(hidden_size=16, state_size=4, num_hidden_layers=2, vocab_size=VOCAB, conv_kernel=4)
# model_type -> a tiny config (every model_type a family lists: test_keys_are_the_tested_ones)
CONFIGS = {
    "gpt2": dict(n_layer=2, n_embd=16, n_head=2, n_positions=64, vocab_size=VOCAB),
    "llama": LLAMA,
    "mistral": dict(LLAMA, sliding_window=WINDOW),
    "qwen2": dict(
        LLAMA,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,  # layers from 1 on slide
        tie_word_embeddings=True,
    ),
    "qwen3": dict(LLAMA, head_dim=8),
    "qwen2_moe": dict(
        LLAMA,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=16,
    ),
    "gemma": dict(LLAMA, head_dim=8),
    "phi3": dict(LLAMA, sliding_window=WINDOW, pad_token_id=0),
    "mixtral": dict(LLAMA, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
    "olmo": LLAMA,
    "stablelm": LLAMA,
    "granite": dict(
        LLAMA,
        residual_multiplier=0.5,
        embedding_multiplier=3.0,
        logits_scaling=2.5,
        attention_multiplier=0.3,
    ),
    "gemma2": dict(
        LLAMA,
        head_dim=8,
        sliding_window=WINDOW,
        layer_types=SLIDING,
        final_logit_softcapping=3.0,
        attn_logit_softcapping=5.0,
    ),
    "gemma3_text": dict(
        LLAMA, head_dim=8, sliding_window=WINDOW, layer_types=SLIDING, final_logit_softcapping=3.0
    ),
    "olmo2": dict(LLAMA, tie_word_embeddings=True),
    "opt": dict(
        hidden_size=16,
        ffn_dim=32,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        word_embed_proj_dim=8,
    ),
    "bloom": dict(hidden_size=16, n_head=2, n_layer=2, vocab_size=VOCAB),
    "mamba": MAMBA,
    "mamba2": dict(MAMBA, num_heads=4, head_dim=8, n_groups=1, chunk_size=8),
}
SUBLAYERS = [(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")]


def tiny(model_type, dtype=torch.float32, **overrides):
    """A tiny random model with its norm weights moved off their initial values, so that two
    norms read the other way round give other logits."""
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **{**CONFIGS[model_type], **overrides})
    if getattr(cfg, "bos_token_id", None) is not None:  # GPT-2's 50256 lies outside VOCAB
        cfg.bos_token_id = cfg.eos_token_id = 0
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g).to(dtype))
    return model.eval()


def tokens(b=2, t=T, seed=2):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", CONFIGS)
def test_every_family_full_plan_equals_the_model(model_type):
    model, ids = tiny(model_type), tokens()
    net = adapt(model)  # verified on the (2, 8) probe
    mixer = model_type.startswith("mamba")
    rows = [(r["layer"], r["kind"]) for r in net.block_info()]
    assert rows == ([(0, "mixer"), (1, "mixer")] if mixer else SUBLAYERS)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    with torch.no_grad():
        want = model(ids).logits
        assert want.shape == (2, T, VOCAB)
        assert torch.equal(net(ids), want)
        assert torch.equal(net(ids, Plan(grad_scale=1.0)), want)  # branches run one by one
        assert torch.equal(net(tokens(3, 5)), model(tokens(3, 5)).logits)  # a new context


def test_keys_are_the_tested_ones():
    families = [f for f in FAMILIES.values() if f.build.__module__ == "src.models.hf_adapters"]
    assert {k for f in families for k in f.keys} == set(CONFIGS)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "phi3", "gemma2", "gemma3_text"])
def test_sliding_window_layers_see_the_sliding_mask(model_type):
    """Seen through full masks the logits differ: the probe above does exercise the windows."""
    model, ids = tiny(model_type), tokens()
    net = causal_lm_network(model)
    assert "sliding_attention" in {b.layer_type for b in net.blocks}
    for block in net.blocks:
        block.layer_type = "full_attention"
    with torch.no_grad():
        assert not torch.equal(net(ids), model(ids).logits)


# --- hand-written loops of the new layouts: HF's modules, an explicit mask, `order` ---


def causal_mask(t, dtype, window=None):
    q, k = torch.arange(t)[:, None], torch.arange(t)[None]
    allowed = (k <= q) & (k > q - window) if window else k <= q
    return torch.zeros(t, t, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def softcap(logits, cap):
    return logits if cap is None else torch.tanh(logits / cap) * cap


def decoder_by_hand(model, ids, order):
    """Granite, Gemma-2/3 and OLMo-2 written out (`model.model.layers`, rotary positions)."""
    m, c, t = model.model, model.config, ids.shape[1]
    kind = c.model_type
    h = m.embed_tokens.weight[ids]
    if kind.startswith("gemma"):  # Gemma's scaled embedding: x sqrt(hidden), in the weights' dtype
        h = h * torch.tensor(c.hidden_size**0.5).to(h.dtype)
    elif kind == "granite":
        h = h * c.embedding_multiplier
    pos = torch.arange(t)[None]
    kw = []
    for i in range(c.num_hidden_layers):
        layer_type = c.layer_types[i] if kind.startswith("gemma") else "full_attention"
        window = c.sliding_window if layer_type == "sliding_attention" else None
        rotary = m.rotary_emb(h, pos, layer_type) if kind == "gemma3_text" else m.rotary_emb(h, pos)
        mask = causal_mask(t, h.dtype, window)
        kw.append(dict(attention_mask=mask, position_ids=pos, position_embeddings=rotary))
    for i, branch in order:
        layer = m.layers[i]
        if kind == "granite":
            if branch == "attn":
                r = layer.self_attn(layer.input_layernorm(h), **kw[i])[0]
            else:
                r = layer.mlp(layer.post_attention_layernorm(h))
            h = h + r * c.residual_multiplier
        elif kind == "olmo2":
            if branch == "attn":
                h = h + layer.post_attention_layernorm(layer.self_attn(h, **kw[i])[0])
            else:
                h = h + layer.post_feedforward_layernorm(layer.mlp(h))
        elif branch == "attn":  # Gemma-2/3
            attn = layer.self_attn(layer.input_layernorm(h), **kw[i])[0]
            h = h + layer.post_attention_layernorm(attn)
        else:
            h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
    logits = model.lm_head(m.norm(h))
    if kind == "granite":
        return logits / c.logits_scaling
    return softcap(logits, getattr(c, "final_logit_softcapping", None))


def opt_by_hand(model, ids, order):
    d, (b, t) = model.model.decoder, ids.shape
    h = d.project_in(d.embed_tokens(ids))
    h = h + d.embed_positions(torch.ones(b, t, dtype=torch.long))  # OPT's own cumsum positions
    mask = causal_mask(t, h.dtype)
    for i, branch in order:
        layer = d.layers[i]
        if branch == "attn":
            h = h + layer.self_attn(layer.self_attn_layer_norm(h), attention_mask=mask)[0]
        else:
            h = h + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(h))))
    return model.lm_head(d.project_out(d.final_layer_norm(h)))


def bloom_by_hand(model, ids, order):
    """BLOOM's attention and MLP add their residual themselves: they are given h."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    tr, (b, t) = model.transformer, ids.shape
    h = tr.word_embeddings_layernorm(tr.word_embeddings(ids))
    alibi = build_alibi_tensor(torch.ones(b, t), model.config.n_head, h.dtype)
    mask = causal_mask(t, h.dtype)
    for i, branch in order:
        layer = tr.h[i]
        if branch == "attn":
            x = layer.input_layernorm(h)
            h = layer.self_attention(x, h, alibi=alibi, attention_mask=mask)[0]
        else:
            h = layer.mlp(layer.post_attention_layernorm(h), h)
    return model.lm_head(tr.ln_f(h))


def mamba_by_hand(model, ids, order):
    """Mamba's own layers (h + mixer(norm(h))) in `order`."""
    bb = model.backbone
    h = bb.embeddings(ids)
    for i, _ in order:
        h = bb.layers[i](h)
    return model.lm_head(bb.norm_f(h)).float()


BY_HAND = {
    "granite": decoder_by_hand,
    "gemma2": decoder_by_hand,
    "gemma3_text": decoder_by_hand,
    "olmo2": decoder_by_hand,
    "opt": opt_by_hand,
    "bloom": bloom_by_hand,
    "mamba": mamba_by_hand,
    "mamba2": mamba_by_hand,
}


@pytest.mark.parametrize("model_type", BY_HAND)
def test_deleted_and_swapped_sublayers_equal_a_hand_loop(model_type):
    model, ids, by_hand = tiny(model_type), tokens(), BY_HAND[model_type]
    net = adapt(model)
    order = [(r["layer"], r["kind"]) for r in net.block_info()]
    swap = (1, 0) if net.n_blocks == 2 else (2, 1, 0, 3)  # the first sub-layers trade places
    with torch.no_grad():
        assert torch.equal(by_hand(model, ids, order), model(ids).logits)
        for i in range(net.n_blocks):
            want = by_hand(model, ids, [s for j, s in enumerate(order) if j != i])
            assert torch.equal(net(ids, Plan(deleted=frozenset({i}))), want), order[i]
        want = by_hand(model, ids, [order[j] for j in swap])
        assert torch.equal(net(ids, Plan(order=swap)), want)


# float64 models, but RMSNorm (Gemma's, Granite's, OLMo-2's, Mamba's), the attention softmax
# (OPT's, BLOOM's) and Mamba's logits compute in float32 (Hugging Face's choice), so the engines
# agree to float32 rounding
TOL = dict(rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("model_type", ["granite", "gemma2", "olmo2", "opt", "bloom", "mamba"])
def test_gradient_paths_and_exact_decomposition(model_type):
    """Gradient per path at the embedding output: the fast engine equals a backward per path,
    and the per-length sums G_0..G_n add up to the full gradient."""
    extra = dict(residual_in_fp32=False) if model_type == "mamba" else {}
    model, ids, y = tiny(model_type, torch.float64, **extra), tokens(), tokens(seed=3)
    net = adapt(model)
    n = net.n_blocks
    paths = [frozenset(), frozenset({1}), frozenset({0, n - 1}), frozenset(range(n))]
    fast = fast_path_grads(net, ids, y, paths, wrt="stem")
    ref = straightforward_path_grads(net, ids, y, paths, wrt="stem")
    assert fast.shape[:2] == (len(paths), 2)
    torch.testing.assert_close(fast, ref, **TOL)
    g = decompose(net, ids, y, wrt="stem")
    torch.testing.assert_close(g.sum(0), gated_grad(net, ids, y, Plan(), wrt="stem"), **TOL)


# --- refusals: each one line ---


def test_a_wrong_mapping_is_refused_by_verification(monkeypatch):
    name = "Llama-style pre-norm"
    build = FAMILIES[name].build

    def swapped_norms(model):  # the MLP's norm before attention, and the other way round
        net = build(model)
        for attn, mlp in zip(net.blocks[::2], net.blocks[1::2]):
            attn.norm, mlp.norm = mlp.norm, attn.norm
        return net

    monkeypatch.setitem(FAMILIES, name, dataclasses.replace(FAMILIES[name], build=swapped_norms))
    with pytest.raises(ConfigError, match="failed verification") as err:
        adapt(tiny("llama"))
    assert "\n" not in str(err.value) and "LlamaForCausalLM" in str(err.value)
    adapt(tiny("llama"), verify=False)  # built, but never handed back by a verified adapt


def test_an_unsupported_model_type_is_refused_naming_the_families():
    cfg = AutoConfig.for_model(
        "xglm", d_model=16, num_layers=1, attention_heads=2, ffn_dim=32, vocab_size=VOCAB
    )
    with pytest.raises(ConfigError, match="transformers xglm .* is not a supported family") as err:
        adapt(AutoModelForCausalLM.from_config(cfg))
    assert "\n" not in str(err.value)
    assert "GPT-2" in str(err.value) and "Mamba / Mamba-2" in str(err.value)


REFUSED = {
    "opt": (dict(do_layer_norm_before=False), "do_layer_norm_before=False"),
    "bloom": (
        dict(apply_residual_connection_post_layernorm=True),
        "apply_residual_connection_post_layernorm",
    ),
    "stablelm": (dict(use_parallel_residual=True), "use_parallel_residual"),
    "gpt2": (dict(add_cross_attention=True), "add_cross_attention"),
    "gemma3_text": (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
}


@pytest.mark.parametrize("model_type", REFUSED)
def test_variants_a_family_cannot_take_apart_are_refused_in_one_line(model_type):
    overrides, flag = REFUSED[model_type]
    with pytest.raises(ConfigError, match=flag) as err:
        adapt(tiny(model_type, **overrides))
    assert "\n" not in str(err.value)


def test_hf_causal_lm_returns_the_verified_network():
    config = {"model_type": "gemma2", **CONFIGS["gemma2"]}
    net = hf_causal_lm(config=config)
    assert [(r["layer"], r["kind"]) for r in net.block_info()] == SUBLAYERS
    assert net.head.softcap == 3.0
