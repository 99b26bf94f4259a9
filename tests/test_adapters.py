"""timm (ViT, ResNetV2) and Hugging Face (GPT-2, Llama) adapters: under the full plan they compute
exactly what the original model does; a deleted or reordered branch equals the original model's
layers run by hand with that change; the lesion and gradient-path engines work on them unchanged.
Tiny random models, nothing downloaded (HF_HUB_OFFLINE is set before transformers loads)."""

# ruff: noqa: E402
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from src.engines.decomposition import decompose, enumerate_paths
from src.engines.lesion import lesion_logits, lesion_plan
from src.engines.paths import fast_path_grads, gated_grad, straightforward_path_grads
from src.errors import ConfigError
from src.models import Plan, preact_resnet_cifar
from src.models.hf_adapters import causal_lm_network, hf_causal_lm
from src.models.timm_adapters import resnetv2_network, vit_network
from tests.conftest import REPO

CONF = Path(__file__).resolve().parents[1] / "conf"
VOCAB = 40


def tiny_vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=8, patch_size=2, in_chans=1, num_classes=5, embed_dim=16, depth=3)
    args.update(num_heads=2, mlp_ratio=2.0, init_values=0.5, **kw)
    return timm.models.VisionTransformer(**args).eval()


def images(n=4):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def attn_branch(layer, x):
    return layer.drop_path1(layer.ls1(layer.attn(layer.norm1(x))))


def mlp_branch(layer, x):
    return layer.drop_path2(layer.ls2(layer.mlp(layer.norm2(x))))


def vit_by_hand(vit, x, deleted=()):
    """timm's forward written out, leaving out the (layer, kind) branches in `deleted`."""
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    for i, layer in enumerate(vit.blocks):
        if (i, "attn") not in deleted:
            h = h + attn_branch(layer, h)
        if (i, "mlp") not in deleted:
            h = h + mlp_branch(layer, h)
    return vit.forward_head(vit.norm(h))


VIT_VARIANTS = {
    "cls_token": {},
    "avg_pool_registers": dict(global_pool="avg", reg_tokens=2, no_embed_class=True),
}


@pytest.mark.parametrize("variant", VIT_VARIANTS)
@pytest.mark.parametrize("granularity", ["sublayer", "layer"])
def test_vit_full_plan_equals_timm(variant, granularity):
    vit, x = tiny_vit(**VIT_VARIANTS[variant]), images()
    net = vit_network(vit, granularity)
    with torch.no_grad():
        assert torch.equal(net(x), vit(x))
        assert torch.equal(vit_by_hand(vit, x), vit(x))  # the reference below is timm's forward
        separate = net(x, Plan(grad_scale=1.0))  # runs shortcut, residual, merge separately
    if granularity == "sublayer":
        assert torch.equal(separate, vit(x))
    else:  # x + (a + mlp(x + a)) vs (x + a) + mlp(x + a): float sums in another order
        torch.testing.assert_close(separate, vit(x), rtol=0, atol=1e-6)


def test_vit_deleting_a_branch_equals_timm_without_it():
    vit, x = tiny_vit(), images()
    net = vit_network(vit)
    assert net.n_blocks == 2 * len(vit.blocks)
    with torch.no_grad():
        for i, info in enumerate(net.block_info()):
            want = vit_by_hand(vit, x, deleted={(info["layer"], info["kind"])})
            assert torch.equal(net(x, Plan(deleted=frozenset({i}))), want), info
        both = net(x, Plan(deleted=frozenset({1, 4})))
        assert torch.equal(both, vit_by_hand(vit, x, deleted={(0, "mlp"), (2, "attn")}))


def test_vit_deleting_a_layer_leaves_its_input():
    vit, x = tiny_vit(), images()
    net = vit_network(vit, "layer")
    assert net.n_blocks == len(vit.blocks)
    with torch.no_grad():
        for i in range(net.n_blocks):
            want = vit_by_hand(vit, x, deleted={(i, "attn"), (i, "mlp")})
            assert torch.equal(net(x, Plan(deleted=frozenset({i}))), want)


def test_block_info_names_layers_and_branches():
    net = vit_network(tiny_vit())
    assert net.block_info() == [
        {"block": i, "stage": 0, "downsampling": False, "layer": i // 2, "kind": kind}
        for i, kind in enumerate(["attn", "mlp"] * 3)
    ]
    layers = vit_network(tiny_vit(), "layer").block_info()
    assert [(r["block"], r["layer"], r["kind"]) for r in layers] == [
        (i, i, "layer") for i in range(3)
    ]
    # CNN rows are unchanged
    rows = preact_resnet_cifar(blocks_per_stage=1).block_info()
    assert [list(r) for r in rows] == [["block", "stage", "downsampling"]] * 3


def test_lesion_engine_prefix_reuse_equals_fresh_forwards_on_vit():
    vit, x = tiny_vit(), images(8)
    net = vit_network(vit)
    plans = [lesion_plan(None, deleted=[i]) for i in range(net.n_blocks)]
    plans += [lesion_plan(None, deleted=[1, 4]), lesion_plan(None, order=[0, 1, 4, 3, 2, 5])]
    with torch.no_grad():
        reused = list(lesion_logits(net, x, plans, reuse=True))
        fresh = list(lesion_logits(net, x, plans, reuse=False))
    assert len(reused) == len(plans) + 1
    for a, b in zip(reused, fresh):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["block_subset", "stochastic_depth"])
def test_vit_training_plans_skip_branches_forward_and_backward(mode):
    """k-of-n training and stochastic depth on a ViT's sub-layers: a step's plan runs only its
    branches (the others get no gradient at all), with stochastic depth's 1/survival scaling."""
    from src.training import BlockSubset, StochasticDepth

    net = vit_network(tiny_vit()).train()
    n = net.n_blocks
    training = BlockSubset(k=2) if mode == "block_subset" else StochasticDepth(0.5)
    training.check(net)
    torch.manual_seed(3)
    plan = training.train_plan(n)
    while not 0 < len(plan.deleted) < n:
        plan = training.train_plan(n)
    net.zero_grad()
    net(images(), plan).logsumexp(-1).mean().backward()
    for i, block in enumerate(net.blocks):
        grads = [p.grad for p in block.parameters()]
        if i in plan.deleted:
            assert all(g is None for g in grads), i
        else:
            assert any(g is not None and g.abs().sum() > 0 for g in grads), i
    with torch.no_grad():  # the forward equals the hand-built sub-layers with those branches
        vit, x = tiny_vit(), images()
        h = vit._pos_embed(vit.patch_embed(x))
        for i in range(n):
            layer, branch = vit.blocks[i // 2], (attn_branch, mlp_branch)[i % 2]
            if i not in plan.deleted:
                h = h + branch(layer, h) * (plan.branch_scale[i] if plan.branch_scale else 1.0)
        want = vit.forward_head(vit.norm(h))
        torch.testing.assert_close(net.eval()(x, plan), want, rtol=1e-5, atol=1e-6)


def test_fast_path_grads_equal_straightforward_on_vit():
    net = vit_network(tiny_vit())
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    paths = [
        frozenset(),
        frozenset({0}),
        frozenset({1, 2}),
        frozenset({0, 3, 5}),
        frozenset(range(6)),
    ]
    fast = fast_path_grads(net, x, y, paths, wrt="stem")
    ref = straightforward_path_grads(net, x, y, paths, wrt="stem")
    assert fast.shape == (len(paths), 4, 17, 16)  # class token + 16 patches, width 16
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-8)


# --- timm ResNetV2 (pre-activation) ---


def tiny_resnetv2(arch):
    torch.manual_seed(0)
    kw = dict(layers=[1, 2], channels=(16, 32), stem_chs=8, in_chans=1, num_classes=5)
    model = timm.create_model(arch, pretrained=False, **kw).eval()
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def resnetv2_by_hand(model, x, deleted=()):
    """ResNetV2 written out: a deleted block keeps its shortcut, fed by its pre-activation."""
    h = model.stem(x)
    blocks = [b for s in model.stages for b in s.blocks]
    for i, b in enumerate(blocks):
        pre = b.norm1(h)
        shortcut = h if b.downsample is None else b.downsample(pre)
        if i in deleted:
            h = shortcut
            continue
        r = b.conv1(pre)
        for j in range(2, 4 if hasattr(b, "conv3") else 3):
            r = getattr(b, f"conv{j}")(getattr(b, f"norm{j}")(r))
        h = shortcut + b.drop_path(r)
    return model.forward_head(model.norm(h))


@pytest.mark.parametrize("arch", ["resnetv2_18", "resnetv2_50"])  # PreActBasic, PreActBottleneck
def test_resnetv2_equals_timm_and_deletes_blocks(arch):
    model, x = tiny_resnetv2(arch), images()
    net = resnetv2_network(model)
    assert [r["downsampling"] for r in net.block_info()] == [True, True, False]
    assert [r["stage"] for r in net.block_info()] == [0, 1, 1]
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
        assert torch.equal(resnetv2_by_hand(model, x), model(x))
        assert torch.equal(net(x, Plan(grad_scale=1.0)), model(x))
        for i in range(net.n_blocks):
            want = resnetv2_by_hand(model, x, deleted={i})
            assert torch.equal(net(x, Plan(deleted=frozenset({i}))), want)


# --- Hugging Face causal LMs ---


def tiny_lm(family, attn):
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=16, vocab_size=VOCAB)
        cfg.bos_token_id = cfg.eos_token_id = 0
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(
            num_hidden_layers=2,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=16,
        )
        model = LlamaForCausalLM(cfg)
    model.set_attn_implementation(attn)
    return model.eval()


def tokens(b=3, t=7, seed=2):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def lm_by_hand(model, ids, order):
    """The decoder written out with an explicit causal mask, running the sub-layers in `order`
    (a list of (layer, kind))."""
    t = ids.shape[1]
    pos = torch.arange(t).unsqueeze(0)
    gpt2 = hasattr(model, "transformer")
    body = model.transformer if gpt2 else model.model
    h = body.wte(ids) + body.wpe(pos) if gpt2 else body.embed_tokens(ids)
    kw = {"position_ids": pos}
    if model.config._attn_implementation == "eager":
        future = torch.ones(t, t, dtype=torch.bool).triu(1)
        kw["attention_mask"] = torch.zeros(t, t).masked_fill(future, torch.finfo(h.dtype).min)[
            None, None
        ]
    else:
        kw["attention_mask"] = None  # sdpa's own causal kernel (is_causal)
    if not gpt2:
        kw["position_embeddings"] = body.rotary_emb(h, pos)
    layers = body.h if gpt2 else body.layers
    for i, kind in order:
        layer = layers[i]
        if gpt2:
            norm, fn = (layer.ln_1, layer.attn) if kind == "attn" else (layer.ln_2, layer.mlp)
        elif kind == "attn":
            norm, fn = layer.input_layernorm, layer.self_attn
        else:
            norm, fn = layer.post_attention_layernorm, layer.mlp
        h = h + (fn(norm(h), **kw)[0] if kind == "attn" else fn(norm(h)))
    return model.lm_head((body.ln_f if gpt2 else body.norm)(h))


LMS = [(f, a) for f in ("gpt2", "llama") for a in ("eager", "sdpa")]
SUBLAYERS = [(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")]


@pytest.mark.parametrize("family,attn", LMS)
def test_causal_lm_full_plan_equals_hf(family, attn):
    model, ids = tiny_lm(family, attn), tokens()
    net = causal_lm_network(model)
    assert [(r["layer"], r["kind"]) for r in net.block_info()] == SUBLAYERS
    with torch.no_grad():
        want = model(ids).logits
        assert want.shape == (3, 7, VOCAB)
        assert torch.equal(net(ids), want)
        assert torch.equal(lm_by_hand(model, ids, SUBLAYERS), want)
        assert torch.equal(net(ids, Plan(grad_scale=1.0)), want)
        # another length, then the first again: the mask and positions follow the input
        assert torch.equal(net(tokens(2, 5)), model(tokens(2, 5)).logits)
        assert torch.equal(net(ids), want)


@pytest.mark.parametrize("family,attn", LMS)
def test_causal_lm_deleted_and_swapped_sublayers_equal_a_hand_loop(family, attn):
    model, ids = tiny_lm(family, attn), tokens()
    net = causal_lm_network(model)
    with torch.no_grad():
        for i in range(net.n_blocks):
            want = lm_by_hand(model, ids, [s for j, s in enumerate(SUBLAYERS) if j != i])
            assert torch.equal(net(ids, Plan(deleted=frozenset({i}))), want)
        swapped = net(ids, Plan(order=(2, 1, 0, 3)))  # the two attention sub-layers trade places
        want = lm_by_hand(model, ids, [(1, "attn"), (0, "mlp"), (0, "attn"), (1, "mlp")])
        assert torch.equal(swapped, want)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lesion_engine_on_lm_logits_and_context_across_modes(family):
    model, ids = tiny_lm(family, "eager"), tokens()
    net = causal_lm_network(model)
    plans = [lesion_plan(None, deleted=[i]) for i in range(net.n_blocks)]
    plans.append(lesion_plan(None, order=[2, 1, 0, 3]))
    with torch.inference_mode():
        reused = list(lesion_logits(net, ids, plans, reuse=True))
        fresh = list(lesion_logits(net, ids, plans, reuse=False))
    for a, b in zip(reused, fresh):
        assert a.shape == (3, 7, VOCAB) and torch.equal(a, b)
    # the context computed under inference mode is not reused where autograd needs it
    loss = net(ids).logsumexp(-1).mean()
    loss.backward()
    assert net.stem.embed.weight.grad is not None


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gradient_paths_and_exact_decomposition_on_lms(family):
    """Gradient per path at the embedding output (tokens have none): the fast engine equals a
    backward per path, and the exact per-length sums G_0..G_n add up to the full gradient."""
    model, ids = tiny_lm(family, "eager"), tokens()
    net = causal_lm_network(model).double()
    y = tokens()  # next-token targets, (B, T)
    paths = [frozenset(), frozenset({1}), frozenset({0, 3}), frozenset(range(4))]
    fast = fast_path_grads(net, ids, y, paths, wrt="stem")
    ref = straightforward_path_grads(net, ids, y, paths, wrt="stem")
    assert fast.shape == (len(paths), 3, 7, 16)
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-15)
    g = decompose(net, ids, y, wrt="stem")
    full = gated_grad(net, ids, y, Plan(), wrt="stem")
    # Llama's RMSNorm computes in float32 even in a float64 model (Hugging Face's choice), so
    # there the sums agree to float32 rounding; GPT-2 runs in float64 throughout
    tol = dict(rtol=1e-9, atol=1e-15) if family == "gpt2" else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g.sum(0), full, **tol)
    torch.testing.assert_close(g, enumerate_paths(net, ids, y, wrt="stem"), **tol)
    with pytest.raises(ConfigError, match="wrt=stem"):
        fast_path_grads(net, ids, y, paths, wrt="input")


def test_builders_from_config_and_local_directory(tmp_path):
    net = hf_causal_lm(
        config={
            "model_type": "llama",
            "num_hidden_layers": 2,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_attention_heads": 2,
            "vocab_size": VOCAB,
        }
    )
    assert net.n_blocks == 4 and net(tokens()).shape == (3, 7, VOCAB)
    model = tiny_lm("gpt2", "eager")
    model.save_pretrained(tmp_path / "gpt2")
    loaded = hf_causal_lm(path=str(tmp_path / "gpt2"))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(tokens()), model(tokens()).logits)


def test_missing_model_path_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model.path=.*save_pretrained") as err:
        hf_causal_lm(path=str(tmp_path / "missing"))
    assert "\n" not in str(err.value)
    overrides = ["model=hf_causal_lm", f"model.path={tmp_path / 'missing'}", "model.config=null"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with pytest.raises(InstantiationException) as err:  # src.run reports the cause in one line
        instantiate(cfg.model, _convert_="all", in_channels=1, num_classes=10)
    assert isinstance(err.value.__cause__, ConfigError)


HUB = """
from src.errors import ConfigError
from src.data.text import load_tokenizer
from src.models.hf_adapters import hf_causal_lm
for load, value in ((hf_causal_lm, "gpt2"), (load_tokenizer, "org/name")):
    try:
        load(value)
    except ConfigError as err:
        print(err)
"""


def test_a_hub_id_without_network_is_a_one_line_config_error():
    """`model.path=gpt2` / `data.tokenizer=org/name` go to the Hugging Face Hub (a path-like value
    never does); without network (HF_HUB_OFFLINE=1 here) each is one line naming the fix."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-c", HUB], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    lines = res.stdout.splitlines()
    assert len(lines) == 2, res.stdout + res.stderr
    for line, key in zip(lines, ("model.path=gpt2", "data.tokenizer=org/name")):
        assert line.startswith(f"{key} is not a local directory and the Hugging Face Hub")
        assert "save_pretrained" in line and "couldn't connect" in line


@pytest.mark.parametrize("model", ["vit_tiny", "vit_digits", "timm_resnetv2", "hf_causal_lm"])
def test_model_configs_build_networks(model):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}"])
    net = instantiate(cfg.model, _convert_="all", in_channels=1, num_classes=10).eval()
    with torch.no_grad():
        if model == "hf_causal_lm":
            assert net(tokens()).shape == (3, 7, 256)
        else:
            size = 8 if model in ("vit_digits", "timm_resnetv2") else 32
            assert net(torch.randn(2, 1, size, size)).shape == (2, 10)
