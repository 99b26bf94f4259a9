"""Every registered family, the same checks: a family added to the registry without a row here
fails `test_every_family_has_an_example`. For a tiny random model of each, `adapt` verifies, and
the plans of every lesion study (delete single / many, reorder, duplicate) give the same values
with the engine's prefix reuse as with fresh forwards; the gradient-path engines agree with a
backward per path on paths sampled as the gradient_paths study samples them (a path enters at
most one branch of a parallel layer), and the exact per-length sums add up to the full gradient.
The family-specific equalities with hand-written forwards live in test_adapters.py,
test_hf_families.py, test_hf_parallel.py and test_timm_adapters.py."""

# ruff: noqa: E402
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torchvision

from src.analysis.delete_many import sample_deletions
from src.analysis.duplicate import duplicated_order
from src.analysis.reorder import compatible_pairs, swapped_order
from src.engines.decomposition import propagate
from src.engines.lesion import lesion_errors, lesion_plan
from src.engines.paths import (
    fast_path_grads,
    gated_grad,
    path_counts,
    sample_paths,
    straightforward_path_grads,
)
from src.models import Plan
from src.models.adapt import adapt as adapt_model
from src.models.adapt import load_registry, probe_input
from tests import test_hf_families as hf
from tests import test_hf_parallel as par
from tests import test_timm_adapters as tm
from tests.test_adapters import tiny_resnetv2


def torchvision_resnet():
    torch.manual_seed(0)
    return tm.random_bn(torchvision.models.resnet18(num_classes=5)).eval()


# family -> a tiny random model of it (the other test files' builders)
EXAMPLES = {
    "torchvision ResNet": torchvision_resnet,
    "GPT-2": lambda: hf.tiny("gpt2"),
    "Llama-style pre-norm": lambda: hf.tiny("qwen2"),  # sliding-window layers among full ones
    "Granite": lambda: hf.tiny("granite"),
    "Gemma-2 / Gemma-3 (sandwich norms)": lambda: hf.tiny("gemma3_text"),
    "OLMo-2 (post-norm sub-layers)": lambda: hf.tiny("olmo2"),
    "OPT": lambda: hf.tiny("opt"),
    "BLOOM": lambda: hf.tiny("bloom"),
    "Mamba / Mamba-2": lambda: hf.tiny("mamba"),
    "GPT-J": lambda: par.tiny("gptj"),
    "GPT-NeoX / Pythia": lambda: par.tiny("gpt_neox"),
    "Falcon": lambda: par.tiny("falcon_new"),
    "Phi-1 / Phi-2": lambda: par.tiny("phi"),
    "Cohere": lambda: par.tiny("cohere"),
    "timm ViT": lambda: tm.tiny_vit(block_fn=tm.ParallelScalingBlock),
    "timm EVA": lambda: tm.tiny("vit_rope_mixed"),
    "timm BEiT": lambda: tm.tiny("beit_shared_rel_pos"),
    "timm ViT RelPos": lambda: tm.tiny("relpos_mlp"),
    "timm Swin": tm.tiny_swin,
    "timm ConvNeXt": tm.tiny_convnext,
    "timm ResNet": lambda: tm.tiny_resnet("bottleneck_se_aa_droppath"),
    "timm ResNetV2": lambda: tiny_resnetv2("resnetv2_50"),
}


def test_every_family_has_an_example():
    assert sorted(EXAMPLES) == sorted(load_registry())


def example(family):
    model = EXAMPLES[family]()
    with torch.no_grad():  # near-zero heads (timm's EVA) would hide every lesion
        for p in model.parameters():
            if p.dim() > 1 and p.abs().max() < 1e-2:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    net = adapt_model(model)  # verified against the model's own forward
    x = probe_input(model)
    with torch.no_grad():
        classes = net(x).shape[-1]
    g = torch.Generator().manual_seed(3)
    y = torch.randint(
        0, classes, x.shape[:2] if net.inputs == "tokens" else x.shape[:1], generator=g
    )
    return net, x, y


def study_plans(net):
    """The plans the four lesion studies build, as they build them."""
    n, seq = net.n_blocks, range(net.n_blocks)
    plans = [lesion_plan(None, deleted=[i]) for i in range(n)]  # delete_single
    plans += [
        lesion_plan(None, deleted=d) for _, _, d in sample_deletions(n, [2, min(3, n)], 2, seed=0)
    ]
    pairs = compatible_pairs(net)
    if pairs:  # reorder: a CNN with one block per stage has nothing to swap
        plans += [
            lesion_plan(None, order=swapped_order(seq, pairs[:1])),
            lesion_plan(None, order=swapped_order(seq, pairs[-2:])),
        ]
    eligible = [b["block"] for b in net.block_info() if not b["downsampling"]]
    plans += [lesion_plan(None, order=duplicated_order(seq, i)) for i in eligible[:2]]
    return plans


@pytest.mark.parametrize("family", sorted(EXAMPLES))
def test_every_lesion_study_runs_exactly_on_every_family(family):
    net, x, y = example(family)
    if net.inputs == "tokens":
        assert {r["kind"] for r in net.block_info()} <= {"attn", "mlp", "mixer"}
    plans = study_plans(net)
    batches = [(x, y)]
    reused = lesion_errors(net, plans, batches, metric="loss", reuse=True)
    fresh = lesion_errors(net, plans, batches, metric="loss", reuse=False)
    assert reused == fresh
    assert len(set(reused[1])) > 1  # the lesions change the network's output


@pytest.mark.parametrize("family", sorted(EXAMPLES))
def test_gradient_paths_and_exact_sums_on_every_family(family):
    net, x, y = example(family)
    groups = net.path_groups() if net.has_parallel else None
    counts = path_counts(net.n_blocks, groups)
    longest = max(k for k, c in enumerate(counts) if c)
    gen = torch.Generator().manual_seed(0)
    paths = [p for _, p in sample_paths(net.n_blocks, [1, 2, longest], 2, gen, groups)]
    fast = fast_path_grads(net, x, y, paths, wrt="stem")
    slow = straightforward_path_grads(net, x, y, paths, wrt="stem")
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-7)
    g = propagate(net.eval(), x, y, wrt="stem")  # float32: some families refuse float64
    assert g.shape[0] == net.n_blocks + 1 and not g[longest + 1 :].any()
    full = gated_grad(net, x, y, Plan(), wrt="stem")
    torch.testing.assert_close(g.sum(0), full, rtol=1e-3, atol=1e-6)
