"""timm families of the adapter registry (ResNet, ConvNeXt, EVA / RoPE ViTs, BEiT, ViT-RelPos,
Swin, ViT variants and parallel ViT layers): under the full plan a Network equals the timm model;
deleting a block equals timm's own forward with that branch removed (the branch's last module
replaced by zeros: x + 0 = x exactly); the lesion engine's prefix reuse equals fresh forwards;
unknown classes and wrong adapters are refused. Tiny random models, nothing downloaded."""

import copy
import dataclasses
import functools
from pathlib import Path

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from timm.models.beit import Beit
from timm.models.convnext import ConvNeXt
from timm.models.eva import Eva
from timm.models.mlp_mixer import MlpMixer
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import (
    ParallelScalingBlock,
    ParallelThingsBlock,
    ResPostBlock,
    VisionTransformer,
)
from timm.models.vision_transformer_relpos import ResPostRelPosBlock, VisionTransformerRelPos
from torch import nn

from src.engines.lesion import lesion_logits, lesion_plan
from src.errors import ConfigError
from src.models import Plan
from src.models.adapt import FAMILIES, adapt, load_registry, probe_input
from src.models.timm_adapters import timm_model

CONF = Path(__file__).resolve().parents[1] / "conf"
TOKENS = dict(img_size=8, patch_size=2, in_chans=1, num_classes=5, embed_dim=16, depth=2)
TOKENS.update(num_heads=2)


class Zeroed(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return torch.zeros_like(x if self.module is None else self.module(x))


def removed(model, *sites):
    """A copy of `model` whose (module path, attribute) `sites` output zeros: timm's own forward
    with the branches they end removed."""
    model = copy.deepcopy(model)
    for path, attr in sites:
        parent = model.get_submodule(path)
        setattr(parent, attr, Zeroed(getattr(parent, attr)))
    return model


def random_bn(model):
    torch.manual_seed(1)
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def check_deletions(net, model, sites, atol=0.0):
    """Deleting block i equals `model` with `sites[i]` removed (deleting a layer: all of its)."""
    x = probe_input(model)
    with torch.no_grad():
        for i in range(net.n_blocks):
            want = removed(model, *sites[i])(x)
            got = net(x, Plan(deleted=frozenset({i})))
            torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=f"block {i}")


def token_sites(net, path="blocks"):
    """Per block of a token transformer, the sites its deletion removes."""
    sites = []
    for row in net.block_info():
        kinds = ("attn", "mlp") if row["kind"] == "layer" else (row["kind"],)
        sites.append([(f"{path}.{row['layer']}", f"drop_path{1 + (k == 'mlp')}") for k in kinds])
    return sites


def test_registry_has_the_timm_families():
    timm_families = {f.name for f in load_registry().values() if f.library == "timm"}
    assert timm_families == {
        "timm ViT",
        "timm ResNetV2",
        "timm ResNet",
        "timm ConvNeXt",
        "timm EVA",
        "timm BEiT",
        "timm ViT RelPos",
        "timm Swin",
    }


# --- ResNet (post-activation) ---

RESNETS = {
    "basic": dict(block=BasicBlock),
    "bottleneck_se_aa_droppath": dict(
        block=Bottleneck,
        aa_layer=nn.AvgPool2d,
        block_args=dict(attn_layer="se"),
        drop_path_rate=0.1,
        drop_block_rate=0.1,
    ),
}


def tiny_resnet(variant):
    torch.manual_seed(0)
    kw = dict(layers=[1, 2, 1, 1], channels=(8, 8, 8, 8), stem_width=8, in_chans=1)
    return random_bn(ResNet(num_classes=5, zero_init_last=False, **kw, **RESNETS[variant]))


@pytest.mark.parametrize("variant", RESNETS)
def test_resnet_equals_timm_and_deletes_blocks(variant):
    model = tiny_resnet(variant)
    net, x = adapt(model), probe_input(model)
    assert [r["stage"] for r in net.block_info()] == [0, 1, 1, 2, 3]
    assert [r["downsampling"] for r in net.block_info()] == [1, 1, 0, 1, 1]  # timm's stem: 64
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
        assert torch.equal(net(x, Plan(grad_scale=1.0)), model(x))
    paths = [f"layer{s + 1}.{j}" for s, n in enumerate([1, 2, 1, 1]) for j in range(n)]
    check_deletions(net, model, [[(p, "drop_path")] for p in paths])


# --- ConvNeXt ---


def tiny_convnext(**kw):
    torch.manual_seed(0)
    args = dict(in_chans=1, num_classes=5, depths=(1, 2, 1, 1), dims=(8, 8, 16, 16))
    return ConvNeXt(**args, ls_init_value=0.3, **kw).eval()


@pytest.mark.parametrize("conv_mlp", [False, True])
def test_convnext_keeps_stage_downsampling_in_front_of_the_first_block(conv_mlp):
    model = tiny_convnext(conv_mlp=conv_mlp)
    net, x = adapt(model), probe_input(model)
    assert [r["stage"] for r in net.block_info()] == [0, 1, 1, 2, 3]
    assert [r["downsampling"] for r in net.block_info()] == [False, True, False, True, True]
    assert net.blocks[1].downsample is model.stages[1].downsample  # shared, not copied
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
        assert torch.equal(net(x, Plan(grad_scale=1.0)), model(x))
        h = net.stem(x)  # deleting a stage's first block leaves its downsampling
        assert torch.equal(
            net.run_block(1, h, Plan(deleted=frozenset({1}))), net.blocks[1].downsample(h)
        )
    paths = [f"stages.{s}.blocks.{j}" for s, n in enumerate([1, 2, 1, 1]) for j in range(n)]
    check_deletions(net, model, [[(p, "drop_path")] for p in paths])


# --- EVA / RoPE ViTs, BEiT, ViT-RelPos ---

TOKEN_MODELS = {
    "eva02_rope_swiglu": lambda: timm.create_model(
        "eva02_tiny_patch14_224", **TOKENS, init_values=0.3
    ),
    "vit_rope_mixed": lambda: timm.create_model("vit_small_patch16_rope_mixed_224", **TOKENS),
    "vit_rope_reg_gap": lambda: timm.create_model("vit_medium_patch16_rope_reg1_gap_256", **TOKENS),
    "eva_post_norm": lambda: Eva(**TOKENS, use_post_norm=True, use_rot_pos_emb=True),
    "beit_rel_pos": lambda: Beit(**TOKENS, use_rel_pos_bias=True, init_values=0.3),
    "beit_shared_rel_pos": lambda: Beit(
        **TOKENS, use_shared_rel_pos_bias=True, use_abs_pos_emb=False, init_values=0.3
    ),
    "relpos_mlp": lambda: VisionTransformerRelPos(**TOKENS, init_values=0.3),
    "relpos_shared_bias": lambda: VisionTransformerRelPos(
        **TOKENS, shared_rel_pos=True, rel_pos_type="bias", class_token=True, global_pool="token"
    ),
    "relpos_post_norm": lambda: VisionTransformerRelPos(**TOKENS, block_fn=ResPostRelPosBlock),
}


def tiny(name):
    torch.manual_seed(0)
    return TOKEN_MODELS[name]().eval()


@pytest.mark.parametrize("name", TOKEN_MODELS)
@pytest.mark.parametrize("granularity", ["sublayer", "layer"])
def test_token_families_equal_timm_and_delete_branches(name, granularity):
    model = tiny(name)
    net, x = adapt(model, granularity=granularity), probe_input(model)
    kinds = ["attn", "mlp"] if granularity == "sublayer" else ["layer"]
    assert [(r["layer"], r["kind"]) for r in net.block_info()] == [
        (i, k) for i in range(2) for k in kinds
    ]
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
        separate = net(x, Plan(grad_scale=1.0))  # shortcut, residual and merge separately
        if granularity == "sublayer":
            assert torch.equal(separate, model(x))
        else:  # x + (a + m(x + a)) vs (x + a) + m(x + a): float sums in another order
            torch.testing.assert_close(separate, model(x), rtol=0, atol=1e-6)
    check_deletions(net, model, token_sites(net))


def test_rope_and_shared_bias_come_from_the_stem_once_per_input():
    """One context per network, filled by the stem, read by every attention block: BEiT's shared
    bias serves every layer; mixed RoPE gives each layer its own embedding."""
    for name, arg in (("vit_rope_mixed", "rope"), ("beit_shared_rel_pos", "shared_rel_pos_bias")):
        model = tiny(name)
        net = adapt(model)
        context = net.blocks[0].context
        assert context.name == arg and all(b.context is context for b in net.blocks[::2])
        assert all(b.context is None for b in net.blocks[1::2])  # MLPs take no argument
        net.stem(probe_input(model))
        if name == "vit_rope_mixed":
            assert model.rope_mixed and torch.equal(net.blocks[2].kwargs()[arg], context.value[1])
        else:
            assert net.blocks[2].kwargs()[arg] is context.value is net.blocks[0].kwargs()[arg]


# --- ViT variants and parallel layers ---

VITS = {
    "deit3": dict(no_embed_class=True, init_values=0.3),
    "dinov2_registers": dict(reg_tokens=2, init_values=0.3),
    "siglip_map": dict(global_pool="map", class_token=False),
    "gap_fc_norm": dict(global_pool="avg", class_token=False, fc_norm=True),
    "res_post": dict(block_fn=ResPostBlock),
}


def tiny_vit(**kw):
    torch.manual_seed(0)
    return VisionTransformer(**TOKENS, mlp_ratio=2.0, **kw).eval()


@pytest.mark.parametrize("variant", VITS)
def test_vit_variants_equal_timm_and_delete_branches(variant):
    model = tiny_vit(**VITS[variant])
    net, x = adapt(model), probe_input(model)
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
        assert torch.equal(net(x, Plan(grad_scale=1.0)), model(x))
    check_deletions(net, model, token_sites(net))


def parallel_sites(model, net):
    """Per block of a parallel ViT, the sites its deletion removes: a ParallelScalingBlock
    branch's output projection, a ParallelThingsBlock branch's drop_path."""
    groups = {"attn": "attns", "mlp": "ffns"}
    sites = []
    for b, row in zip(net.blocks, net.block_info()):
        layer, path = model.blocks[row["layer"]], f"blocks.{row['layer']}"
        kinds = ("attn", "mlp") if row["kind"] == "layer" else (row["kind"],)
        if isinstance(layer, ParallelScalingBlock):
            sites.append([(path, f"{k}_out_proj") for k in kinds])
            continue
        runs = [
            f"{path}.{groups[k]}.{j}"
            for k in kinds
            for j, m in enumerate(getattr(layer, groups[k]))
            if row["kind"] == "layer" or m is b.branch
        ]
        sites.append([(r, "drop_path") for r in runs])
    return sites


PARALLEL = {"things": ParallelThingsBlock, "scaling": ParallelScalingBlock}


@pytest.mark.parametrize("kind", PARALLEL)
@pytest.mark.parametrize("granularity", ["sublayer", "layer"])
def test_parallel_vit_layers_equal_timm_and_delete_branches(kind, granularity):
    """ParallelThingsBlock: one branch per parallel attention / MLP; ParallelScalingBlock: its
    attention and MLP branches of one parallel group (Block.parallel); layer: one block."""
    model = tiny_vit(block_fn=PARALLEL[kind], init_values=0.3)
    net, x = adapt(model, granularity=granularity), probe_input(model)
    rows = [(r["layer"], r["kind"], b.parallel) for b, r in zip(net.blocks, net.block_info())]
    if granularity == "layer":
        assert rows == [(0, "layer", None), (1, "layer", None)]
    elif kind == "things":
        assert rows == [
            (i, k, 2 * i + (k == "mlp")) for i in range(2) for k in 2 * ["attn"] + 2 * ["mlp"]
        ]
    else:
        assert rows == [(i, k, i) for i in range(2) for k in ("attn", "mlp")]
    with torch.no_grad():
        got, want = net(x), model(x)
        if kind == "scaling" and granularity == "sublayer":
            # per-branch layer scale: ls(a) + ls(m) vs timm's ls(a + m)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        else:
            assert torch.equal(got, want)
    # the deleted branch's layer: ls(m) = ls(0 + m); the others as above
    atol = 1e-6 if kind == "scaling" and granularity == "sublayer" else 0.0
    check_deletions(net, model, parallel_sites(model, net), atol)


def test_parallel_scaling_with_a_fused_output_projection_splits_at_layer_granularity_only():
    model = tiny_vit(block_fn=functools.partial(ParallelScalingBlock, fuse_out_proj=True))
    with pytest.raises(ConfigError, match="fuse_out_proj"):
        adapt(model)
    net, x = adapt(model, granularity="layer"), probe_input(model)
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
        torch.testing.assert_close(net(x, Plan(grad_scale=1.0)), model(x), rtol=0, atol=1e-6)


# --- Swin ---


def tiny_swin():
    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=2, in_chans=1, num_classes=5, embed_dim=8)
    return SwinTransformer(**args, depths=(2, 2), num_heads=(2, 2), window_size=2).eval()


@pytest.mark.parametrize("granularity", ["sublayer", "layer"])
def test_swin_equals_timm_with_patch_merging_in_front_of_a_stage(granularity):
    model = tiny_swin()
    assert all(any(b.shift_size) for b in model.layers[1].blocks[1:])  # shifted windows
    net, x = adapt(model, granularity=granularity), probe_input(model)
    per = 2 if granularity == "sublayer" else 1
    assert [r["stage"] for r in net.block_info()] == [0] * 2 * per + [1] * 2 * per
    assert [r["downsampling"] for r in net.block_info()].index(True) == 2 * per
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
        separate = net(x, Plan(grad_scale=1.0))
        torch.testing.assert_close(separate, model(x), rtol=0, atol=0 if per == 2 else 1e-6)
    paths = [f"layers.{s}.blocks.{j}" for s in range(2) for j in range(2)]
    sites = token_sites(net)
    sites = [[(paths[int(p.split(".")[1])], a) for p, a in s] for s in sites]
    check_deletions(net, model, sites)


# --- engines, refusals, builders ---

FAMILY_MODELS = {
    "resnet": lambda: tiny_resnet("bottleneck_se_aa_droppath"),
    "convnext": tiny_convnext,
    "eva": lambda: tiny("vit_rope_mixed"),
    "beit": lambda: tiny("beit_shared_rel_pos"),
    "relpos": lambda: tiny("relpos_mlp"),
    "swin": tiny_swin,
    "vit_things": lambda: tiny_vit(block_fn=ParallelThingsBlock),
    "vit_scaling": lambda: tiny_vit(block_fn=ParallelScalingBlock),
}


@pytest.mark.parametrize("family", FAMILY_MODELS)
def test_lesion_engine_prefix_reuse_equals_fresh_forwards(family):
    model = FAMILY_MODELS[family]()
    net, x = adapt(model), probe_input(model)
    n = net.n_blocks
    plans = [lesion_plan(None, deleted=[i]) for i in range(n)]
    dup = [i for i in range(n) if not net.blocks[i].downsampling][-1]  # runs twice
    order = [*range(dup + 1), *range(dup, n)]
    plans += [lesion_plan(None, deleted=[1, n - 1]), lesion_plan(None, order=order)]
    with torch.no_grad():
        reused = list(lesion_logits(net, x, plans, reuse=True))
        fresh = list(lesion_logits(net, x, plans, reuse=False))
    assert len(reused) == len(plans) + 1
    for a, b in zip(reused, fresh):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "make",
    [
        lambda: MlpMixer(num_classes=5, img_size=32, patch_size=8, num_blocks=1, embed_dim=16),
        lambda: timm.create_model("mobilenetv3_small_050", num_classes=5),
    ],
)
def test_an_unsupported_timm_class_is_refused_in_one_line(make):
    model = make()
    with pytest.raises(ConfigError, match=f"timm {type(model).__name__} .* supports") as err:
        adapt(model)
    msg = str(err.value)
    assert "\n" not in msg and "timm ViT" in msg and "timm ConvNeXt" in msg and "timm Swin" in msg


def test_a_wrong_adapter_is_refused_by_verification(monkeypatch):
    family = FAMILIES["timm ConvNeXt"]

    def swapped(model, **options):
        net = family.build(model, **options)
        net.blocks[1], net.blocks[2] = net.blocks[2], net.blocks[1]
        return net

    monkeypatch.setitem(FAMILIES, family.name, dataclasses.replace(family, build=swapped))
    with pytest.raises(ConfigError, match="failed verification") as err:
        adapt(tiny_convnext())
    assert "\n" not in str(err.value)


def test_timm_model_builds_any_registered_arch_verified():
    net = timm_model(
        "vit_tiny_patch16_224",
        in_channels=1,
        num_classes=5,
        granularity="layer",
        img_size=8,
        patch_size=2,
        depth=2,
        embed_dim=16,
        num_heads=2,
    )
    assert [r["kind"] for r in net.block_info()] == ["layer", "layer"]
    assert timm_model("resnet18", in_channels=1, num_classes=5).n_blocks == 8
    with pytest.raises(ConfigError, match="granularity=layer: timm ResNet has one block per"):
        timm_model("resnet18", in_channels=1, num_classes=5, granularity="layer")
    with pytest.raises(ConfigError, match="model.weights"):
        timm_model("resnet18", weights="/nonexistent/resnet18.pth")


@pytest.mark.parametrize("size", [8, 32])
def test_timm_config_builds_a_network_for_digits_and_cifar(size):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["model=timm"])
    net = instantiate(cfg.model, _convert_="all", in_channels=1, num_classes=10).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, size, size)).shape == (2, 10)


@pytest.mark.slow
def test_a_lesion_experiment_runs_on_a_timm_arch_from_the_command_line(tmp_path):
    """`model=timm model.arch=<name>` with timm's own keys: a RoPE ViT (EVA family) trained on
    digits, then every block duplicated in place, one row per sub-layer with its layer and kind."""
    import pandas as pd

    from tests.conftest import run_cli

    sizes = ["+model.img_size=8", "+model.patch_size=2", "+model.depth=2", "+model.embed_dim=16"]
    run_cli(
        "experiment=duplicate",
        "preset=quick",
        "model=timm",
        "model.arch=vit_small_patch16_rope_mixed_224",
        *sizes,
        "+model.num_heads=2",
        "trainer.max_steps=10",
        f"hydra.run.dir={tmp_path}",
        "logger=csv",
    )
    rows = pd.read_csv(tmp_path / "analysis" / "duplicate.csv")
    assert rows[["layer", "kind"]].values.tolist() == [
        [0, "attn"],
        [0, "mlp"],
        [1, "attn"],
        [1, "mlp"],
    ]
    assert rows.model.unique().tolist() == ["timm"]
