"""`compile=true` (`Network.compile_blocks`) over a whole run: training (full, block-subset and
stochastic-depth plans, fp32 and bf16 autocast, a short last batch), validation, BN
re-estimation and a lesion sweep compile a bounded number of graphs, none hits dynamo's recompile
limit, and a second pass compiles nothing (issue 21: `_fused` hit `recompile_limit` (8) on the
guard of `block.proj`)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from src.engines.lesion import lesion_errors, recalibrated_errors
from src.models import Plan, preact_resnet_cifar

BLOCK_KINDS = 5  # 2 blocks per stage: 16-channel identity; 32 and 64: projection, identity


def run(net, rng: random.Random) -> None:
    """What a train + lesion run does to the blocks, at toy sizes."""
    n = net.n_blocks
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    net.train()
    for batch, bf16 in ((8, False), (8, False), (8, True), (5, False), (5, True)):
        x, y = torch.randn(batch, 1, 8, 8), torch.randint(0, 10, (batch,))
        for plan in (  # block subsets that delete every block once, stochastic depth
            None,
            Plan(deleted=frozenset(range(0, n, 2))),
            Plan(deleted=frozenset(range(1, n, 2))),
            Plan(drop_prob=(0.2,) * n),
        ):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(net(x, plan), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():  # validation: a full and a short batch
        for batch in (16, 3):
            net(torch.randn(batch, 1, 8, 8))
    test = [(torch.randn(b, 1, 8, 8), torch.randint(0, 10, (b,))) for b in (16, 16, 7)]
    singles = [Plan(deleted=frozenset({i})) for i in range(n)]
    many = [Plan(deleted=frozenset(rng.sample(range(n), k))) for k in (2, 3, 4) for _ in range(3)]
    orders = [Plan(order=(1, 0, 2, 3, 4, 5)), Plan(order=(1, 1, 2, 3, 4, 5))]  # same shapes
    lesion_errors(net, singles + many + orders, test)
    recalibrated_errors(net, singles[:2], test[:1], bn_batches=test[:2])


@pytest.mark.slow  # ~3 min: dynamo traces some 70 graphs (backend="eager": no code generated)
def test_train_and_lesions_compile_a_bounded_number_of_graphs():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = preact_resnet_cifar(2, in_channels=1).compile_blocks(backend="eager")
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # a hit is an error
        run(net, random.Random(0))
    graphs, copies = counters["stats"]["unique_graphs"], len(net._compiled.graphs)
    # per kind of block: fused, branches and skip, in train (fp32, bf16) and eval modes
    print(f"{graphs} graphs in {copies} compiled copies")
    assert 0 < copies <= BLOCK_KINDS * 3 * 5
    assert graphs <= 2 * copies  # each copy: its first graph, and one with a dynamic batch
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        run(net, random.Random(1))  # other plans, the same kinds of call: nothing new
    assert counters["stats"]["unique_graphs"] == graphs and len(net._compiled.graphs) == copies
    assert not [k for k in counters["unimplemented"] if "recompile" in str(k).lower()]


def test_one_shared_function_hits_the_limit_the_copies_avoid():
    """The failure the copies fix: one compiled function for every block recompiles per kind of
    block and mode until it hits the limit."""
    from src.models import network

    torch._dynamo.reset()
    net = preact_resnet_cifar(2, in_channels=1)
    shared = torch.compile(network._fused, backend="eager")
    patch = torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
    with patch, pytest.raises(Exception, match="recompile"):
        for training in (True, False):
            net.train(training)
            h = net.stem(torch.randn(4, 1, 8, 8))
            for block in net.blocks:
                h = shared(block, h)
