"""Export of a network with blocks removed (src/export.py, src/models/prune.py; issue 20, Sec. 5):
a Hugging Face causal LM without whole layers loads with plain `transformers` and gives the logits
of its Network under `Plan(deleted=<the layers' blocks>)`, for every registered family; a pruned
CNN / timm network (fewer blocks) equals the original under the plan, and its checkpoint is
tested by `python -m src.run train=false ckpt_path=...` like any other. Sub-layer deletions,
families without a layer list and exports that do not reproduce the plan are refused in one line.
Nothing downloaded (HF_HUB_OFFLINE)."""

# ruff: noqa: E402
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from src import export
from src.errors import ConfigError
from src.models import preact_resnet_cifar, timm_vit, vgg15
from src.models.adapt import TOLERANCE, adapt, probe_input
from src.models.network import Plan
from src.models.prune import Skipped, assemble, probe, prune, pruned_network
from src.models.timm_adapters import timm_model
from tests import test_hf_families as families
from tests import test_hf_parallel as parallel
from tests.conftest import run_cli

ATOL, RTOL = TOLERANCE[torch.float32]
# every registered Hugging Face family's tiny models (tests/test_hf_families.py, _parallel.py)
MODELS = {t: (lambda t=t: families.tiny(t)) for t in families.CONFIGS}
MODELS |= {v: (lambda v=v: parallel.tiny(v, layers=3)) for v in parallel.VARIANTS}
MODELS["qwen2_moe_sparse_step"] = lambda: families.tiny(
    "qwen2_moe", decoder_sparse_step=2, num_hidden_layers=3
)


def layer_blocks(net, *layers):
    return frozenset(r["block"] for r in net.block_info() if r["layer"] in layers)


def planned(net, plan, x):
    with torch.no_grad():
        return net.eval()(x, plan)


def one_line(err) -> str:
    line = str(err.value)
    assert "\n" not in line
    return line


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_plain_transformers_loads_the_export_with_the_plans_logits(model_type, tmp_path):
    model = families.tiny(model_type, num_hidden_layers=4)
    net = adapt(model)
    blocks = layer_blocks(net, 0, 2)
    out = export.export_hf_network(net, blocks, tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    assert loaded.config.num_hidden_layers == 2
    assert (
        json.loads((out / "config.json").read_text())[
            "n_layer" if model_type == "gpt2" else "num_hidden_layers"
        ]
        == 2
    )
    x = families.tokens()
    with torch.no_grad():
        got = loaded(x).logits
    torch.testing.assert_close(got, planned(net, Plan(deleted=blocks), x), atol=ATOL, rtol=RTOL)
    attns = [m for m in loaded.modules() if hasattr(m, "layer_idx")]
    assert sorted({m.layer_idx for m in attns}) == [0, 1]
    assert export.layers_of(net, blocks) == [0, 2]


@pytest.mark.parametrize("name", list(MODELS))
def test_every_family_exports_without_a_layer(name, tmp_path):
    """Layer 0 of every registered family removed: per-layer config lists (Qwen2's and Gemma's
    layer_types, Qwen2-MoE's sparse layers) follow their layers."""
    model = MODELS[name]()
    net = adapt(model)
    blocks = layer_blocks(net, 0)
    out = export.export_hf(model, [0], tmp_path / "pruned", net=net)
    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    n = model.config.num_hidden_layers
    assert loaded.config.num_hidden_layers == n - 1
    if isinstance(getattr(model.config, "layer_types", None), list):
        assert loaded.config.layer_types == model.config.layer_types[1:]
    x = probe_input(model)
    with torch.no_grad():
        got = loaded(x).logits
    torch.testing.assert_close(got, planned(net, Plan(deleted=blocks), x), atol=ATOL, rtol=RTOL)


def test_a_healed_copy_exports_its_own_weights(tmp_path):
    from src.healing import heal

    net = adapt(families.tiny("gpt2"))
    plan = Plan(deleted=layer_blocks(net, 0))
    ids = families.tokens(4, seed=7)
    healed = heal(net, plan, [(ids[:, :-1], ids[:, 1:])], steps=3, lr=0.1)
    out = export.export_hf_network(healed, plan.deleted, tmp_path / "healed")  # checks itself
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    x = families.tokens()
    with torch.no_grad():
        got = loaded(x).logits
    torch.testing.assert_close(got, planned(healed, plan, x), atol=ATOL, rtol=RTOL)
    assert not torch.allclose(got, planned(net, plan, x), atol=ATOL, rtol=RTOL)


def test_a_sub_layer_deletion_is_refused_naming_the_layer(tmp_path):
    net = adapt(families.tiny("llama"))
    with pytest.raises(ConfigError) as err:
        export.export_hf_network(net, [2], tmp_path / "x")  # layer 1's attention only
    line = one_line(err)
    assert line.startswith("layer 1 would lose its attn (block 2) but keep its mlp (block 3)")
    assert not (tmp_path / "x").exists()


def test_refusals_are_one_line(tmp_path, monkeypatch):
    model = families.tiny("gpt2")
    cases = {
        "out of range": (lambda: export.export_hf(model, [5], tmp_path / "a"), "layer 5 is out"),
        "all layers": (lambda: export.export_hf(model, [0, 1], tmp_path / "b"), "leaves no model"),
        "cnn": (
            lambda: export.export_hf_network(preact_resnet_cifar(1), [0], tmp_path / "c"),
            "not adapted from a Hugging Face model",
        ),
    }
    vit = timm_vit(img_size=8, patch_size=2, depth=2, embed_dim=16, num_heads=2)
    cases["timm"] = (
        lambda: export.export_hf_network(vit, [0, 1], tmp_path / "t"),
        "is no Hugging Face model",
    )
    inverse = families.tiny("gpt2", scale_attn_by_inverse_layer_idx=True)
    cases["inverse idx"] = (
        lambda: export.export_hf(inverse, [0], tmp_path / "d"),
        "scale_attn_by_inverse_layer_idx=True",
    )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    cases["not empty"] = (lambda: export.export_hf(model, [0], tmp_path / "full"), "not empty")
    for name, (call, said) in cases.items():
        with pytest.raises(ConfigError) as err:
            call()
        assert said in one_line(err), name
    layerless = families.tiny("llama")
    monkeypatch.setattr(layerless, "_no_split_modules", set())
    with pytest.raises(ConfigError) as err:
        export.export_hf(layerless, [0], tmp_path / "e", net=adapt(families.tiny("llama")))
    assert "has no single list of decoder layers" in one_line(err)
    with pytest.raises(ConfigError) as err:
        export.layers_of(preact_resnet_cifar(1), [0])
    assert "belongs to no decoder layer" in one_line(err)


def test_an_export_that_differs_from_the_plan_is_refused_and_not_kept(tmp_path, monkeypatch):
    """Qwen2's layer 1 slides, layer 0 does not: an export that carried the wrong `layer_types`
    along gives the kept layer a full mask, other logits, and is refused."""
    renumber = export._renumber

    def forgetful(config, kept, n):
        types = list(config.layer_types)
        renumber(config, kept, n)
        config.layer_types = types[: len(kept)]  # the first layers' types, not the kept ones'

    monkeypatch.setattr(export, "_renumber", forgetful)
    model = families.tiny("qwen2")
    with pytest.raises(ConfigError) as err:
        export.export_hf(model, [0], tmp_path / "pruned")
    assert "outputs differ by up to" in one_line(err)
    assert list(tmp_path.iterdir()) == []


VISION = {
    "preact_B": lambda: preact_resnet_cifar(3, in_channels=1),
    "preact_A": lambda: preact_resnet_cifar(3, shortcut="A"),
    "vgg15": lambda: vgg15(width=8),
    "timm_resnet18": lambda: timm_model("resnet18"),
    "timm_convnext": lambda: timm_model("convnext_atto"),
    "vit_digits": lambda: timm_vit(img_size=8, patch_size=2, depth=3, embed_dim=32, num_heads=2),
}


@pytest.mark.parametrize("name", list(VISION))
def test_a_pruned_network_equals_the_plan(name):
    """Fewer blocks; a deleted downsampling block (or pooling VGG layer) stays as its skip; the
    same model config rebuilt by `pruned_network` takes the pruned state dict."""
    torch.manual_seed(0)
    net = VISION[name]().eval()
    downsampling = [r["block"] for r in net.block_info() if r["downsampling"]][:2]
    deleted = sorted({0, 3, net.n_blocks - 1, *downsampling})
    pruned = prune(net, deleted)
    removed, skipped = pruned.pruned["removed"], pruned.pruned["skipped"]
    assert sorted(removed + skipped) == deleted
    assert pruned.n_blocks == net.n_blocks - len(removed)
    assert set(skipped) <= set(downsampling) and (name == "vit_digits") == (not skipped)
    assert sum(isinstance(b, Skipped) for b in pruned.blocks) == len(skipped)
    x = torch.randn(3, *probe(net).shape[1:], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x, Plan(deleted=frozenset(deleted))))
        # a Skipped block deleted again changes nothing
        torch.testing.assert_close(
            pruned(x, Plan(deleted=frozenset(range(pruned.n_blocks)))),
            net(x, Plan(deleted=frozenset(range(net.n_blocks)))),
        )
    rebuilt = assemble(VISION[name](), removed, skipped)  # what pruned_network builds
    rebuilt.load_state_dict(pruned.state_dict())  # strict: the same keys


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox"])
def test_a_pruned_language_model_equals_the_plan_sub_layers_too(name):
    """A pruned checkpoint of an LM trained here may drop one sub-layer: GPT-NeoX's parallel MLP
    left alone in its layer still reads the layer's input."""
    model = families.tiny(name) if name in families.CONFIGS else parallel.tiny(name, layers=3)
    net = adapt(model)
    deleted = {0, *layer_blocks(net, 1)}  # layer 0's attention, all of layer 1
    pruned = prune(net, deleted)
    assert pruned.n_blocks == net.n_blocks - 3 and not pruned.pruned["skipped"]
    x = families.tokens()
    torch.testing.assert_close(planned(pruned, Plan(), x), planned(net, Plan(deleted=deleted), x))


def test_the_model_config_of_a_pruned_checkpoint_builds_the_pruned_network():
    config = {"_target_": "src.models.preact_resnet_cifar", "blocks_per_stage": 2}
    net = pruned_network(config, removed=[0], skipped=[2], in_channels=1, num_classes=7)
    assert net.n_blocks == 5 and isinstance(net.blocks[1], Skipped)
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 7)
    with pytest.raises(ConfigError, match="^model.removed / model.skipped: block 6 is out"):
        pruned_network(config, removed=[6])


def test_pruning_refuses_a_bad_block_in_one_line():
    with pytest.raises(ConfigError) as err:
        prune(preact_resnet_cifar(1), [7])
    assert one_line(err) == "prune: block 7 is out of range: this network has blocks 0..2"


def test_a_pruned_checkpoint_keeps_the_runs_test_plan_or_refuses():
    net = preact_resnet_cifar(2)
    desc = {
        "choices": {"model": "resnet", "data": "digits", "training": "block_subset"},
        "model": {"_target_": "src.models.preact_resnet_cifar", "blocks_per_stage": 2},
        "data": {},
        "training": {"_target_": "src.training.BlockSubset", "k": 3, "test_mode": "rescale"},
    }
    with pytest.raises(ConfigError) as err:
        export.save_pruned(net, [1], "/nonexistent/x.ckpt", desc)
    assert one_line(err).startswith("training=block_subset tests with Plan(")
    desc["training"] = {"_target_": "src.training.Pruned", "deleted": [4]}
    assert export._tested_deletions(desc, net.n_blocks) == {4}


@pytest.mark.slow
def test_src_run_tests_a_pruned_checkpoint_as_the_plan(tmp_path):
    """ResNet-20 trained 20 steps; blocks 1, 3 (downsampling) and 7 removed: `train=false
    ckpt_path=<pruned.ckpt>` reports the test error of the trained network under the plan, as
    does the whole network saved with training=pruned."""
    from hydra.utils import instantiate

    from src import checkpoint

    short = ["preset=quick", "logger=csv", "callbacks.progress_bar=null"]
    train = tmp_path / "train"
    run_cli(
        "model=resnet20",
        *short,
        "trainer.max_steps=20",
        "optim.milestones=[10,15]",
        "optim.warmup_steps=2",
        f"hydra.run.dir={train}",
    )
    last = train / "checkpoints" / "last.ckpt"
    deleted = [1, 3, 7]
    ckpt = checkpoint.load(last)
    saved = ckpt[checkpoint.KEY]
    data = instantiate(saved["data"], _convert_="all")
    net = instantiate(
        saved["model"], _convert_="all", in_channels=data.channels, num_classes=data.num_classes
    )
    net.load_state_dict({k[4:]: v for k, v in ckpt["state_dict"].items()})
    data.setup("test")
    wrong = total = 0
    with torch.no_grad():
        for x, y in data.test_dataloader():
            logits = net.eval()(data.transform(x, False), Plan(deleted=frozenset(deleted)))
            wrong += int((logits.argmax(1) != y).sum())
            total += len(y)
    for remove, n_blocks, training in ((True, 7, "standard"), (False, 9, "pruned")):
        out = export.prune_checkpoint(last, deleted, tmp_path / f"{remove}.ckpt", remove=remove)
        run = tmp_path / f"test_{remove}"
        run_cli("train=false", f"ckpt_path={out}", *short, f"hydra.run.dir={run}")
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["n_blocks"] == n_blocks and metrics["training"] == training
        assert metrics["model"] == "resnet20"
        assert metrics["test_error"] == pytest.approx(wrong / total, abs=1e-6)
