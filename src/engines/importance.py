"""Cheap block-importance scores from one pass, and how well each ranks the real lesions.

Per test batch the network runs once, block by block, under the base plan (the trained network's
eval plan), and each block's shortcut output s, residual output r (with the plan's scales) and
output o = merge(s, r) are compared, per position (pixel of a feature map, token of a sequence)
over the feature dimension, then averaged over positions:

- `block_influence`: 1 - cos(s, o) (ShortGPT's Block Influence, 1 - cos(h_in, h_out), where the
  shortcut is the identity; a projection shortcut compares the projected input);
- `relative_contribution`: |r| / |s|, the residual branch's size beside the stream it joins;
- `angular_distance`: arccos(cos(s, o)) / pi (Gromov et al.'s distance for a run of one block).

A branch of a parallel-residual layer is scored alone: s is the layer's input, o = s + r of that
branch. A plain layer (VGG) has no shortcut: 1 - cos(h_in, h_out) where the shapes agree, the
other scores missing; blocks that do not run under the base plan have no score.

`runs`: the angular distance between the residual stream before block l and after block
l + m - 1, for every run of m consecutive steps (m = 1..max_run), averaged over examples:
Gromov's heatmap (missing where a downsampling block changes the shape in between).

`deletions`: each block's single deletion (the lesion engine's plans and prefix reuse), measured
per example, so that `spearman` can resample test examples (bootstrap) and give each score's
Spearman rank correlation with the measured damage a confidence interval.

The block-by-block pass checks itself on the first batch: its logits must equal the network's
own forward under the plan (`src.models.adapt.TOLERANCE`), else it stops with a ValueError.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor

from src.engines.lesion import check_metric, check_plans, eval_mode, lesion_logits, lesion_plan
from src.errors import ConfigError
from src.models.network import FULL, Network, Plan

SCORES = ("block_influence", "relative_contribution", "angular_distance")
EPS = 1e-12


def feature_dim(net: Network, h: Tensor) -> int:
    """The stream's feature dimension: the network's `feature_dim` where it declares one (a
    channels-last stream such as Swin's (B, H, W, C)), else 1 for (B, C, H, W) maps and the last
    for token streams (B, T, D) and vectors."""
    declared = getattr(net, "feature_dim", None)
    if declared is not None:
        return declared
    return 1 if h.ndim == 4 else -1


def _per_example(values: Tensor) -> Tensor:
    """Mean over every position of each example: (B, ...) -> (B,), float64."""
    return values.double().reshape(len(values), -1).mean(1)


def _cos(a: Tensor, b: Tensor, dim: int) -> Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=dim, eps=EPS).clamp(-1.0, 1.0)


def compare(net: Network, s: Tensor, o: Tensor, r: Tensor | None) -> dict[str, Tensor]:
    """The three scores (per example) of a block with shortcut output `s`, output `o` and
    residual output `r` (None: a plain layer)."""
    missing = torch.full((len(o),), math.nan, dtype=torch.float64, device=o.device)
    if s.shape != o.shape:
        return dict.fromkeys(SCORES, missing)
    dim = feature_dim(net, o)
    cos = _cos(s, o, dim)
    out = {
        "block_influence": _per_example(1 - cos),
        "angular_distance": _per_example(torch.arccos(cos) / math.pi),
        "relative_contribution": missing,
    }
    if r is not None:
        ratio = r.float().norm(dim=dim) / s.float().norm(dim=dim).clamp_min(EPS)
        out["relative_contribution"] = _per_example(ratio)
    return out


def scored_pass(
    net: Network, x: Tensor, plan: Plan, max_run: int
) -> tuple[Tensor, dict[int, dict[str, Tensor]], dict[tuple[int, int], Tensor]]:
    """One forward of `x` under `plan`, block by block: (logits, {block: scores per example},
    {(first step, m): angular distance per example of the run of m steps from there})."""
    seq = plan.sequence(net.n_blocks)
    if len(set(seq)) != len(seq):
        raise ConfigError(
            "importance scores one block once: the base plan runs a block twice; score the "
            "network under a plan without repeated blocks"
        )
    h = net.stem(x)
    stream, scores = [h], {}
    for step in net.steps(plan):
        blocks = [seq[p] for p in step]
        running = [i for i in blocks if i not in plan.deleted]
        if len(blocks) > 1:  # the branches of a parallel layer, each scored on the layer input
            rs = {i: net.scaled(i, net.blocks[i].residual(h), plan) for i in running}
            for i, r in rs.items():
                scores[i] = compare(net, h, h + r, r)
            out = h + sum(rs.values()) if rs else h
        elif running and net.blocks[blocks[0]].has_shortcut:
            i, block = blocks[0], net.blocks[blocks[0]]
            s, r = block.shortcut(h), net.scaled(i, block.residual(h), plan)
            out = block.merge(s, r)
            scores[i] = compare(net, s, out, r)
        else:  # a plain layer, or a deleted block (no score: it has no branch that runs)
            out = net.run_step(blocks, h, plan)
            if running:
                scores[blocks[0]] = compare(net, h, out, None)
        h = out
        stream.append(h)
    runs = {}
    for a in range(len(stream) - 1):
        for m in range(1, min(max_run, len(stream) - 1 - a) + 1):
            u, v = stream[a], stream[a + m]
            if u.shape == v.shape:
                runs[(a, m)] = _per_example(torch.arccos(_cos(u, v, feature_dim(net, v))) / math.pi)
    return net.head(h), scores, runs


def per_example_metric(metric: str, logits: Tensor, y: Tensor) -> Tensor:
    """`metric` of each example (mean over its targets: a sequence's tokens), float64."""
    if metric == "error":
        wrong = (logits.argmax(-1) != y).double()
        return wrong.reshape(len(y), -1).mean(1)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    loss = F.cross_entropy(flat, y.reshape(-1), reduction="none").double()
    return loss.reshape(len(y), -1).mean(1)


@dataclass
class Scores:
    """blocks: the scored blocks (the base's running blocks, by index); scores: name ->
    (examples, blocks) array; base: the unlesioned metric per example; deleted: (examples,
    blocks) metric under each block's single deletion (None: not measured); runs: {(first block,
    last block, m): mean angular distance} of the stream's runs."""

    blocks: list[int]
    scores: dict[str, np.ndarray]
    base: np.ndarray
    deleted: np.ndarray | None
    runs: dict[tuple[int, int, int], float]


def check_equal(net: Network, logits: Tensor, x: Tensor, plan: Plan) -> None:
    from src.models.adapt import TOLERANCE

    own = net(x, plan)
    rtol, atol = TOLERANCE.get(own.dtype, TOLERANCE[torch.float32])
    if not torch.allclose(logits, own, rtol=rtol, atol=atol):
        diff = (logits.float() - own.float()).abs().max().item()
        raise ValueError(
            f"importance: the block-by-block pass of this {type(net.blocks[0]).__name__} network "
            f"differs from its own forward by {diff:.3g}: its blocks' shortcut/residual/merge do "
            "not compose to its forward, so its scores would be wrong"
        )


def block_scores(
    net: Network,
    batches: Iterable[tuple[Tensor, Tensor]],
    base: Plan | None = None,
    device: torch.device | str | None = None,
    metric: str = "error",
    max_run: int | None = None,
    deletions: bool = True,
    reuse: bool = True,
) -> Scores:
    """The scores of every running block of `net` under `base`, per test example, over
    `batches`; with `deletions`, each block's single deletion measured per example too (the
    lesion engine's prefix reuse with `reuse`). `max_run`: the longest run of Gromov's angular
    distance (None: half the steps)."""
    pieces = batch_scores(net, batches, base, device, metric, max_run, deletions, reuse)
    return combine(net, base, pieces)


def _max_run(net: Network, base: Plan, max_run: int | None) -> int:
    return max(1, len(net.steps(base)) // 2) if max_run is None else int(max_run)


def batch_scores(
    net: Network,
    batches: Iterable[tuple[Tensor, Tensor]],
    base: Plan | None = None,
    device: torch.device | str | None = None,
    metric: str = "error",
    max_run: int | None = None,
    deletions: bool = True,
    reuse: bool = True,
    owned: Callable[[int], bool] | None = None,
) -> dict[int, dict]:
    """`block_scores`' measurements per test batch ({batch index: piece}), of the batches
    `owned` takes (None: all; the others are read, not computed): a batch's piece depends on
    that batch alone, so batches can be scored apart (across ranks) and `combine`d."""
    check_metric(metric)
    base = FULL if base is None else base
    check_plans(net, [base])
    max_run = _max_run(net, base, max_run)
    seq = base.sequence(net.n_blocks)
    pieces = {}
    with eval_mode(net, device) as dev:
        for b, (x, y) in enumerate(batches):
            if owned is not None and not owned(b):
                continue
            x, y = x.to(dev), y.to(dev)
            logits, per_block, runs = scored_pass(net, x, base, max_run)
            if not pieces:  # the first batch scored here (a shard's may not be batch 0)
                check_equal(net, logits, x, base)
            blocks = [i for i in seq if i in per_block]
            piece = {
                "blocks": blocks,
                "n": len(y),
                "scores": {
                    k: torch.stack([per_block[i][k] for i in blocks], 1).cpu() for k in SCORES
                },
                "runs": {key: float(v.sum()) for key, v in runs.items()},
                "deleted": None,
            }
            if deletions:
                plans = [lesion_plan(base, [i]) for i in blocks]
                values = [
                    per_example_metric(metric, out, y)
                    for out in lesion_logits(net, x, plans, base, reuse)
                ]
                piece["base"] = values[0].cpu()
                piece["deleted"] = torch.stack(values[1:], 1).cpu()
            else:
                piece["base"] = per_example_metric(metric, logits, y).cpu()
            pieces[b] = piece
    return pieces


def run_key(net: Network, base: Plan | None) -> Callable[[tuple[int, int]], tuple[int, int, int]]:
    """A piece's run key (first step, m) -> (first block, last block, m), under `base`."""
    base = FULL if base is None else base
    seq = base.sequence(net.n_blocks)
    steps = net.steps(base)
    first = [seq[s[0]] for s in steps]
    last = [seq[s[-1]] for s in steps]
    return lambda key: (first[key[0]], last[key[0] + key[1] - 1], key[1])


def combine(net: Network, base: Plan | None, pieces: dict[int, dict]) -> Scores:
    """The `Scores` of every batch's piece (`batch_scores`) of `net` under `base`."""
    return combine_pieces(pieces, run_key(net, base))


def combine_pieces(pieces: dict[int, dict], key: Callable[[tuple], tuple] | None = None) -> Scores:
    """The `Scores` of pieces, in batch order (the sums of the runs' distances accumulated in
    that order, as one pass over the batches does). `key`: a piece's run key -> the Scores' (first
    block, last block, m) (None: the pieces' runs are keyed so already)."""
    if not pieces or sum(p["n"] for p in pieces.values()) == 0:
        raise ConfigError("the test split is empty: nothing to score blocks on")
    order = [pieces[b] for b in sorted(pieces)]
    run_sums: dict[tuple, float] = {}
    for piece in order:
        for k, v in piece["runs"].items():
            k = k if key is None else key(k)
            run_sums[k] = run_sums.get(k, 0.0) + v
    total = sum(p["n"] for p in order)
    deletions = order[0]["deleted"] is not None
    return Scores(
        blocks=order[0]["blocks"],
        scores={k: torch.cat([p["scores"][k] for p in order]).numpy() for k in SCORES},
        base=torch.cat([p["base"] for p in order]).numpy(),
        deleted=torch.cat([p["deleted"] for p in order]).numpy() if deletions else None,
        runs={k: s / total for k, s in run_sums.items()},
    )


def column_means(a: np.ndarray) -> np.ndarray:
    """Mean of each column over examples; missing where a block has no score."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-missing columns: NaN, quietly
        return np.nanmean(a, 0)


def spearman(score: np.ndarray, damage: np.ndarray) -> float:
    """Spearman's rank correlation across blocks of the mean score and the mean damage (blocks
    with a missing score left out)."""
    s, d = column_means(score), damage.mean(0)
    keep = ~np.isnan(s)
    if keep.sum() < 3 or np.ptp(s[keep]) == 0 or np.ptp(d[keep]) == 0:
        return math.nan
    return float(stats.spearmanr(s[keep], d[keep]).statistic)


def spearman_ci(
    score: np.ndarray, damage: np.ndarray, resamples: int = 1000, level: float = 0.95, seed=0
) -> dict:
    """Spearman's rho of `score` (examples x blocks) against `damage` (examples x blocks; the
    metric's rise under each block's deletion), with a percentile bootstrap interval over test
    examples (`resamples` draws with replacement, from `seed`)."""
    rho = spearman(score, damage)
    rng = np.random.default_rng(seed)
    n = len(damage)
    draws = [spearman(score[idx], damage[idx]) for idx in rng.integers(0, n, (resamples, n))]
    draws = np.array([d for d in draws if not math.isnan(d)])
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail]) if len(draws) else (math.nan, math.nan)
    blocks = int((~np.isnan(column_means(score))).sum()) if len(score) else 0
    return {"rho": rho, "low": float(low), "high": float(high), "blocks": blocks, "examples": n}
