"""Parallel-residual decoders (src/models/hf_parallel.py: GPT-J, GPT-NeoX / Pythia, Falcon, Phi-1/2,
Cohere, and the sequential GPT-NeoX and Falcon variants): the full plan is the model; a deleted or
reordered branch equals HF's modules run by hand with the Network's step semantics (branches of one
layer adjacent in the sequence read one input; a branch moved away runs as its own step); the
lesion engine, the gradient-path engines and the exact decomposition follow the parallel layers
(a path enters at most one branch per layer: 3^L paths). Tiny random models, nothing downloaded."""

# ruff: noqa: E402
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import itertools
import math
from collections import Counter

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.falcon.modeling_falcon import build_alibi_tensor

from src.engines.decomposition import decompose, enumerate_paths
from src.engines.lesion import lesion_logits, lesion_plan
from src.engines.paths import (
    fast_path_grads,
    gated_grad,
    path_counts,
    sample_paths,
    straightforward_path_grad,
    straightforward_path_grads,
)
from src.errors import ConfigError
from src.models import Plan
from src.models.adapt import adapt, load_registry

VOCAB, T = 40, 9
NEOX = dict(
    hidden_size=16,
    intermediate_size=32,
    num_attention_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)
FALCON = dict(hidden_size=16, num_attention_heads=4, vocab_size=VOCAB)
# variant -> (model_type, tiny config without the layer count)
VARIANTS = {
    "gptj": ("gptj", dict(n_embd=16, n_head=2, rotary_dim=4, n_positions=64, vocab_size=VOCAB)),
    "gpt_neox": ("gpt_neox", NEOX),
    "gpt_neox_sequential": ("gpt_neox", dict(NEOX, use_parallel_residual=False)),
    "falcon": ("falcon", FALCON),  # multi-query, one shared input_layernorm
    "falcon_new": ("falcon", dict(FALCON, new_decoder_architecture=True, num_kv_heads=2)),
    "falcon_new_one_norm": (
        "falcon",
        dict(FALCON, new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1),
    ),
    "falcon_sequential": ("falcon", dict(FALCON, parallel_attn=False)),
    "falcon_alibi": ("falcon", dict(FALCON, alibi=True, multi_query=False)),
    "falcon_rw": (  # Falcon-RW: sequential, ALiBi, biases
        "falcon",
        dict(FALCON, parallel_attn=False, alibi=True, bias=True, multi_query=False),
    ),
    "phi": ("phi", dict(NEOX, qk_layernorm=True)),
    "cohere": ("cohere", dict(NEOX, num_key_value_heads=1, use_qk_norm=True)),
}
SEQUENTIAL = ("gpt_neox_sequential", "falcon_sequential", "falcon_rw")
SUBLAYERS = [(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")]
SWAP = (2, 1, 0, 3)  # the attention branches trade places: layer 0 stays whole, layer 1 splits
SPLIT = (0, 2, 1, 3)  # both layers split: four sequential steps


def tiny(variant, attn="eager", layers=2, dtype=torch.float32, **overrides):
    """A tiny random model with its norm weights moved off their initial values, so that a norm
    read in the wrong place gives other logits."""
    torch.manual_seed(0)
    model_type, config = VARIANTS[variant]
    key = "n_layer" if model_type == "gptj" else "num_hidden_layers"
    cfg = AutoConfig.for_model(model_type, **{**config, key: layers, **overrides})
    if getattr(cfg, "bos_token_id", None) is not None:  # 50256 etc. lie outside VOCAB
        cfg.bos_token_id = cfg.eos_token_id = 0
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g).to(dtype))
    return model.eval()


def tokens(b=2, t=T, seed=2):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# --- the decoders written out: HF's modules, an explicit mask, the Network's step semantics ---


def parallel(model) -> bool:
    c = model.config
    if c.model_type == "gpt_neox":
        return c.use_parallel_residual
    if c.model_type == "falcon":
        return c.new_decoder_architecture or c.parallel_attn
    return True


def first(layer, *names):
    return next(getattr(layer, n) for n in names if hasattr(layer, n))


def branch(model, layer, kind, h, kw):
    """One branch's residual, by HF's module names (eval mode: dropout is the identity)."""
    mt = model.config.model_type
    attn = kind == "attn"
    if mt == "gptj":
        norm, fn = layer.ln_1, layer.attn if attn else layer.mlp
    elif mt == "gpt_neox":
        norm = layer.input_layernorm if attn else layer.post_attention_layernorm
        fn = layer.attention if attn else layer.mlp
    elif mt == "falcon":
        norms = ("ln_attn",) if attn else ("ln_mlp", "post_attention_layernorm")
        norm = first(layer, *norms, "input_layernorm")  # the first the layer has
        fn = layer.self_attention if attn else layer.mlp
    else:  # phi, cohere: one input_layernorm
        norm, fn = layer.input_layernorm, layer.self_attn if attn else layer.mlp
    return fn(norm(h), **kw)[0] if attn else fn(norm(h))


def by_hand(model, ids, deleted=frozenset(), order=None):
    """Logits with the (layer, kind) branches of `order` (default: all, in place) run as the
    Network runs them: consecutive branches of one layer of a parallel model form a step,
    h + (r_1 + r_2), leaving out the `deleted` ones; any other branch is h + r."""
    mt, c = model.config.model_type, model.config
    b, t = ids.shape
    body = model.gpt_neox if mt == "gpt_neox" else getattr(model, "transformer", None)
    body = model.model if body is None else body
    embed = {"gptj": "wte", "gpt_neox": "embed_in", "falcon": "word_embeddings"}
    h = getattr(body, embed.get(mt, "embed_tokens"))(ids)
    pos = torch.arange(t)[None]
    future = torch.ones(t, t, dtype=torch.bool).triu(1)[None, None]
    low = torch.finfo(h.dtype).min
    if c._attn_implementation == "eager":
        mask = torch.zeros(t, t, dtype=h.dtype)[None, None].masked_fill(future, low)
    else:  # sdpa: its own causal kernel, except Falcon's explicit boolean mask
        mask = ~future if mt == "falcon" else None
    kw = dict(attention_mask=mask, position_embeddings=body.rotary_emb(h, pos))
    if mt == "falcon":
        alibi = None
        if c.alibi:
            heads = c.num_attention_heads
            alibi = build_alibi_tensor(torch.ones(b, t), heads, h.dtype).reshape(b, heads, 1, t)
            bias = alibi / math.sqrt(c.hidden_size // heads)  # FalconModel folds it into the mask
            kw["attention_mask"] = bias.masked_fill(future, low)
        kw["alibi"] = alibi
    layers = body.h if mt in ("gptj", "falcon") else body.layers
    steps = []
    every = [(i, kind) for i in range(len(layers)) for kind in ("attn", "mlp")]
    for i, kind in every if order is None else order:
        if parallel(model) and steps and steps[-1][0][0] == i and (i, kind) not in steps[-1]:
            steps[-1].append((i, kind))
        else:
            steps.append([(i, kind)])
    for step in steps:
        rs = [branch(model, layers[i], kind, h, kw) for i, kind in step if (i, kind) not in deleted]
        if rs:
            h = h + (rs[0] if len(rs) == 1 else rs[0] + rs[1])
    final = {"gptj": "ln_f", "falcon": "ln_f", "gpt_neox": "final_layer_norm"}
    final = getattr(body, final.get(mt, "final_layernorm" if mt == "phi" else "norm"))
    logits = model.lm_head(final(h))
    return logits * c.logit_scale if mt == "cohere" else logits


def same_as_model(got, want, variant):
    """Bit for bit where the Network adds as HF does: h + (r_attn + r_mlp). Cohere's layer adds
    (h + r_attn) + r_mlp, another float rounding of the same sum: a few ulps apart. GPT-J's own
    forward (transformers 5.24) is 2e-8 from its modules run one by one, by hand or by the
    Network (which agree bit for bit: `by_hand` below): ulps of a rounding inside HF's layer."""
    if variant in ("cohere", "gptj"):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_full_plan_equals_the_model(variant, attn):
    model, ids = tiny(variant, attn), tokens()
    net = adapt(model)  # registered family, verified on the probe
    assert [(r["layer"], r["kind"]) for r in net.block_info()] == SUBLAYERS
    keys = [None] * 4 if variant in SEQUENTIAL else [0, 0, 1, 1]
    assert [b.parallel for b in net.blocks] == keys
    with torch.no_grad():
        want = model(ids).logits
        same_as_model(net(ids), want, variant)
        same_as_model(by_hand(model, ids), want, variant)  # the reference below is the model
        assert torch.equal(net(ids), by_hand(model, ids))  # the Network is its modules, exactly
        assert torch.equal(net(ids, Plan(grad_scale=1.0)), net(ids))  # branches one by one
        same_as_model(net(tokens(3, 5)), model(tokens(3, 5)).logits, variant)  # a new context


HAND = [(v, "eager") for v in VARIANTS] + [("gpt_neox", "sdpa"), ("falcon_alibi", "sdpa")]


@pytest.mark.parametrize("variant,attn", HAND)
def test_deleted_and_reordered_branches_equal_a_hand_loop(variant, attn):
    model, ids = tiny(variant, attn), tokens()
    net = adapt(model)
    with torch.no_grad():
        full = net(ids)
        for i in range(net.n_blocks):
            got = net(ids, Plan(deleted=frozenset({i})))
            assert torch.equal(got, by_hand(model, ids, {SUBLAYERS[i]})), SUBLAYERS[i]
            assert not torch.equal(got, full)
        for layer in (0, 1):
            got = net(ids, Plan(deleted=frozenset({2 * layer, 2 * layer + 1})))
            assert torch.equal(got, by_hand(model, ids, {(layer, "attn"), (layer, "mlp")}))
        for order in (SWAP, SPLIT):
            want = by_hand(model, ids, order=[SUBLAYERS[j] for j in order])
            assert torch.equal(net(ids, Plan(order=order)), want), order
        if variant not in SEQUENTIAL:  # splitting a parallel layer changes what it computes
            assert not torch.equal(net(ids, Plan(order=SPLIT)), full)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lesion_engine_reuses_the_cache_exactly(variant):
    model, ids = tiny(variant), tokens()
    net = adapt(model)
    plans = [lesion_plan(None, deleted=[i]) for i in range(net.n_blocks)]
    plans += [lesion_plan(None, deleted=[2, 3]), lesion_plan(None, order=SWAP)]
    plans.append(lesion_plan(None, order=SPLIT))
    with torch.inference_mode():
        reused = list(lesion_logits(net, ids, plans, reuse=True))
        fresh = list(lesion_logits(net, ids, plans, reuse=False))
    assert len(reused) == len(plans) + 1
    for a, b in zip(reused, fresh):
        assert a.shape == (2, T, VOCAB) and torch.equal(a, b)


def valid_paths(net) -> list[frozenset[int]]:
    """Every path by brute force over the layers: skip, or enter one branch of a parallel layer
    (in a sequential model each branch is a layer of its own)."""
    layers: dict = {}
    for i, b in enumerate(net.blocks):
        layers.setdefault((b.layer_index, b.kind if b.parallel is None else None), []).append(i)
    choices = [(None, *blocks) for blocks in layers.values()]
    return [frozenset(i for i in c if i is not None) for c in itertools.product(*choices)]


# float64 models and sdpa attention (eager attention softmaxes in float32 in most of these models)
TIGHT = dict(rtol=1e-9, atol=1e-12)
# ... but CohereLayerNorm computes in float32 whatever the model's dtype
FLOAT32 = dict(rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_path_gradients_equal_a_backward_per_path(variant):
    model, ids, y = tiny(variant, "sdpa", dtype=torch.float64), tokens(), tokens(seed=3)
    net = adapt(model)
    paths = valid_paths(net)
    assert len(paths) == (16 if variant in SEQUENTIAL else 9)
    fast = fast_path_grads(net, ids, y, paths, wrt="stem")
    ref = straightforward_path_grads(net, ids, y, paths, wrt="stem")
    torch.testing.assert_close(fast, ref, **TIGHT)
    assert fast.shape == (len(paths), 2, T, 16)
    both = [frozenset({0, 1})]  # both branches of layer 0
    if variant in SEQUENTIAL:
        torch.testing.assert_close(
            fast_path_grads(net, ids, y, both, wrt="stem"),
            straightforward_path_grads(net, ids, y, both, wrt="stem"),
            **TIGHT,
        )
    else:
        with pytest.raises(ConfigError, match="at most one branch"):
            fast_path_grads(net, ids, y, both, wrt="stem")
        with pytest.raises(ValueError, match="at most one branch"):
            straightforward_path_grads(net, ids, y, both, wrt="stem")


@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_decomposition_sums_every_path(variant):
    """G_k by propagation equals the engine's enumeration and a brute force written here, over
    the 3^3 paths of a 3-layer parallel model (2^4 of a 2-layer sequential one), and sums to
    the gradient."""
    sequential = variant in SEQUENTIAL
    layers = 2 if sequential else 3
    model = tiny(variant, "sdpa", layers=layers, dtype=torch.float64)
    ids, y, net = tokens(), tokens(seed=3), adapt(model)
    counts = path_counts(net.n_blocks, net.path_groups())
    if sequential:
        assert counts == [1, 4, 6, 4, 1]
    else:
        assert counts == [1, 6, 12, 8, 0, 0, 0] and sum(counts) == 3**3
    paths = valid_paths(net)
    assert len(paths) == sum(counts)
    brute = torch.zeros(net.n_blocks + 1, 2, T, 16, dtype=torch.float64)
    for path in paths:
        brute[len(path)] += straightforward_path_grad(net, ids, y, path, wrt="stem")
    g, tol = decompose(net, ids, y, wrt="stem"), FLOAT32 if variant == "cohere" else TIGHT
    torch.testing.assert_close(g, enumerate_paths(net, ids, y, wrt="stem"), **tol)
    torch.testing.assert_close(g, brute, **tol)
    torch.testing.assert_close(g.sum(0), gated_grad(net, ids, y, Plan(), wrt="stem"), **tol)
    longest = 4 if sequential else 3  # no path enters more branches than that
    assert g[longest].abs().max() > 0 and not g[longest + 1 :].any()


def test_sample_paths_are_valid_and_cover_every_path():
    net = adapt(tiny("gpt_neox", layers=3))
    groups = net.path_groups()
    assert groups == [(0, 1), (2, 3), (4, 5)]
    everything = valid_paths(net)
    gen = torch.Generator().manual_seed(0)
    samples = 2400
    drawn = sample_paths(net.n_blocks, [0, 1, 2, 3], samples, gen, groups=groups)
    for k in range(4):
        paths = [p for length, p in drawn if length == k]
        assert len(paths) == samples and all(len(p) == k for p in paths)
        assert all(p in everything for p in paths)  # at most one branch per layer
        counts = Counter(paths)
        assert set(counts) == {p for p in everything if len(p) == k}
        mean = samples / len(counts)  # 12 paths of length 2: 200 draws each
        assert all(0.7 * mean < c < 1.3 * mean for c in counts.values()), (k, counts)
    with pytest.raises(ConfigError, match="no path of length 4"):
        sample_paths(net.n_blocks, [4], 1, gen, groups=groups)


def test_registered_keys_are_the_tested_ones():
    mine = [f for f in load_registry().values() if f.build.__module__ == "src.models.hf_parallel"]
    here = {k for f in mine for k in f.keys}
    assert here == {model_type for model_type, _ in VARIANTS.values()}


@pytest.mark.parametrize(
    "overrides",
    [
        dict(new_decoder_architecture=True, parallel_attn=False),
        dict(num_ln_in_parallel_attn=2),  # two norms, but the old layer's forward reads one
    ],
)
def test_falcon_layouts_its_own_layer_cannot_run_are_refused_in_one_line(overrides):
    model = tiny("falcon", num_kv_heads=2, **overrides)
    with pytest.raises(ConfigError, match="FalconDecoderLayer itself cannot run") as err:
        adapt(model)
    assert "\n" not in str(err.value)
