"""Export of a network with blocks removed (issue 20, section 5), each file checked against the
plan it stands for before it is kept.

- `export_hf(model, layers, out_dir)`: a Hugging Face causal LM without whole decoder layers, as a
  `save_pretrained` directory that plain `transformers` loads (`AutoModelForCausalLM
  .from_pretrained(out_dir)`): the config's layer count (the family's own key, e.g. GPT-2's
  `n_layer`), its per-layer lists (`layer_types`; Qwen2-MoE's sparse layers) and the layers'
  `layer_idx` renumbered. `export_hf_network(net, blocks, out_dir)` takes the Network's block ids;
  a sub-layer deletion (attention without its layer's MLP) is refused: no family's decoder layer
  can drop one.
- `save_pruned(net, deleted, path, description)`: a checkpoint this project loads
  (`python -m src.run train=false ckpt_path=<path>`) of `prune(net, deleted)` (src/models/prune.py:
  fewer blocks), or, with `remove=False`, of the whole network tested under `Plan(deleted=...)`
  (`training=pruned`). `prune_checkpoint(ckpt, deleted, out)` does it for a run's checkpoint file.

Either output equals the network under `Plan(deleted=...)` on a seeded probe, or nothing is written
and a one-line ConfigError says why.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from src.checkpoint import KEY, RunConfig
from src.errors import ConfigError
from src.models.adapt import adapt, describe, first_param, library_of, own_output, probe_input
from src.models.network import FULL, Network, Plan
from src.models.prune import check_blocks, compare, prune

PRUNED = "src.models.prune.pruned_network"
PER_LAYER = ("layer_types",)  # config lists with one entry per layer


def layers_of(net: Network, blocks: Iterable[int]) -> list[int]:
    """The decoder layers whose blocks are exactly `blocks`, or a one-line ConfigError naming a
    layer that `blocks` would cut in half (or a block that belongs to no layer)."""
    blocks = check_blocks(net, blocks, "export")
    info = net.block_info()
    layers: dict[int, list[dict]] = {}
    for row in info:
        if row.get("layer") is not None:
            layers.setdefault(row["layer"], []).append(row)
    for i in sorted(blocks):
        if info[i].get("layer") is None:
            raise ConfigError(
                f"block {i} belongs to no decoder layer: only language models export as Hugging "
                "Face models; save a pruned checkpoint instead (src.export.save_pruned)"
            )
    out = []
    for layer, rows in sorted(layers.items()):
        gone = [r for r in rows if r["block"] in blocks]
        if gone and len(gone) < len(rows):
            kept = next(r for r in rows if r["block"] not in blocks)
            raise ConfigError(
                f"layer {layer} would lose its {gone[0]['kind']} (block {gone[0]['block']}) but "
                f"keep its {kept['kind']} (block {kept['block']}): a Hugging Face decoder layer "
                "cannot drop one sub-layer, so only whole layers export (delete both, or keep "
                "the plan)"
            )
        if gone:
            out.append(layer)
    return out


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's one list of decoder layers (name, list), or a one-line ConfigError."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) and all(type(c).__name__ in classes for c in m)
    ]
    n = getattr(model.config, "num_hidden_layers", None)
    if len(found) != 1 or n is None or len(found[0][1]) != n:
        raise ConfigError(
            f"{describe(model)} has no single list of decoder layers matching its config's layer "
            "count: export_hf takes families with one (model.layers, transformer.h, ...)"
        )
    return found[0]


def _renumber(config, kept: list[int], n: int) -> None:
    """The config of the model that keeps layers `kept` (old ids) of `n`."""
    config.num_hidden_layers = len(kept)  # the family's own key through config.attribute_map
    for name in PER_LAYER:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == n:
            setattr(config, name, [values[i] for i in kept])
    if getattr(config, "decoder_sparse_step", None):  # Qwen2-MoE: which layers are sparse
        dense = set(config.mlp_only_layers or ())
        step, experts = config.decoder_sparse_step, config.num_experts
        sparse = [i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(n)]
        config.mlp_only_layers = [j for j, i in enumerate(kept) if not sparse[i]]
        config.decoder_sparse_step = 1


def without_layers(model: nn.Module, layers: Iterable[int]) -> nn.Module:
    """A copy of the Hugging Face `model` without the decoder layers `layers` (not verified)."""
    name, modules = decoder_layers(model)
    n, layers = len(modules), {int(i) for i in layers}
    bad = sorted(i for i in layers if not 0 <= i < n)
    if bad:
        raise ConfigError(f"export_hf: layer {bad[0]} is out of range: this model has 0..{n - 1}")
    if len(layers) == n:
        raise ConfigError(f"export_hf: deleting all {n} layers leaves no model to export")
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise ConfigError(
            "gpt2 with scale_attn_by_inverse_layer_idx=True scales each layer by its index: a "
            "renumbered layer would compute something else, so it cannot be exported"
        )
    kept = [i for i in range(n) if i not in layers]
    out = copy.deepcopy(model)
    old = out.get_submodule(name)
    parent, _, attr = name.rpartition(".")
    setattr(out.get_submodule(parent), attr, nn.ModuleList([old[i] for i in kept]))
    for new, i in enumerate(kept):
        for m in old[i].modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new
    _renumber(out.config, kept, n)
    return out


def _fresh(out_dir: Path) -> Path:
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} exists and is not empty: export into a new directory")
    tmp = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _planned(net: Network, plan: Plan, x: torch.Tensor) -> torch.Tensor:
    training = net.training
    try:
        with torch.no_grad():
            return net.eval()(x, plan)
    finally:
        net.train(training)


def export_hf(
    model: nn.Module, layers: Iterable[int], out_dir: str | Path, net: Network | None = None
) -> Path:
    """`save_pretrained` of the Hugging Face causal LM `model` without the decoder layers
    `layers` (0-based) into the new directory `out_dir`, then reloaded with
    `AutoModelForCausalLM.from_pretrained` and its logits on the seeded probe compared with
    `net(x, Plan(deleted=<the layers' blocks>))` (`net`: the model's Network, None: `adapt`ed
    here); on a mismatch nothing is kept and a one-line ConfigError says so."""
    if library_of(model) != "transformers":
        raise ConfigError(
            f"{describe(model)} is no Hugging Face model: only those export with "
            "save_pretrained; save a pruned checkpoint instead (src.export.save_pruned)"
        )
    from transformers import AutoModelForCausalLM

    layers = sorted({int(i) for i in layers})
    net = adapt(model) if net is None else net
    pruned = without_layers(model, layers)
    blocks = [r["block"] for r in net.block_info() if r.get("layer") in set(layers)]
    x = probe_input(model)
    want = _planned(net, Plan(deleted=frozenset(blocks)), x)
    out_dir = Path(out_dir).expanduser()
    tmp = _fresh(out_dir)
    what = f"exporting {describe(model)} without layers {layers}"
    try:
        pruned.save_pretrained(tmp)
        impl = getattr(model.config, "_attn_implementation", None)
        try:
            reloaded = AutoModelForCausalLM.from_pretrained(
                tmp, dtype=first_param(model).dtype, attn_implementation=impl
            ).to(x.device)
        except Exception as err:
            said = (str(err).strip().splitlines() or [""])[-1]
            raise ConfigError(f"{what}: the saved model does not load ({said})") from None
        with torch.no_grad():
            got = own_output(reloaded.eval(), x)
        compare(got, want, what)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():  # an empty directory
        out_dir.rmdir()
    tmp.replace(out_dir)
    return out_dir


def export_hf_network(net: Network, blocks: Iterable[int], out_dir: str | Path) -> Path:
    """`export_hf` of the model `net` was adapted from, without the layers whose blocks are
    `blocks` (whole layers only: see `layers_of`)."""
    model = getattr(net, "source", None)
    if model is None:
        raise ConfigError(
            "this network was not adapted from a Hugging Face model (src.models.adapt): only "
            "those export with save_pretrained; save a pruned checkpoint instead (save_pruned)"
        )
    return export_hf(model, layers_of(net, blocks), out_dir, net=net)


def run_description(trainer) -> dict:
    """The run's description (src/checkpoint.py) that its checkpoints carry, from `trainer`'s
    `RunConfig` callback."""
    found = [c.description for c in trainer.callbacks if isinstance(c, RunConfig)]
    if not found:
        raise ConfigError("this trainer has no RunConfig callback: run it with python -m src.run")
    return found[0]


def _tested_deletions(description: dict, n_blocks: int) -> frozenset[int]:
    """The blocks the run's own test plan deletes; a ConfigError where it does more."""
    from hydra.utils import instantiate

    base = instantiate(description["training"]).eval_plan(n_blocks) or FULL
    if dataclasses.replace(base, deleted=frozenset()) != FULL:
        choice = (description.get("choices") or {}).get("training")
        raise ConfigError(
            f"training={choice} tests with {base}, more than deleted blocks: a pruned copy "
            "equals only a network tested with deletions (test it with training.test_mode=full)"
        )
    return base.deleted


def save_pruned(
    net: Network,
    deleted: Iterable[int],
    path: str | Path,
    description: dict,
    remove: bool = True,
    global_step: int | None = None,
) -> Path:
    """A checkpoint at `path` of `net` without the blocks `deleted` (and those its run's test plan
    deletes), which `python -m src.run train=false ckpt_path=<path>` tests and analyses.
    `description`: the run's (`run_description(trainer)`, or a checkpoint's `run_config`).

    remove=True: the network of `prune` (fewer blocks; ids renumbered), tested in full
    (`training: standard`); its model config is `pruned_network` of the original one.
    remove=False: the whole network, tested under `Plan(deleted=...)` (`training: pruned`), so
    its blocks keep their ids. `global_step`: the optimizer step of the weights, if known (the
    tables' `step`)."""
    deleted = check_blocks(net, deleted, "save_pruned") | _tested_deletions(
        description, net.n_blocks
    )
    desc = copy.deepcopy(description)
    choices = desc.setdefault("choices", {})
    desc["pruned"] = {"deleted": sorted(deleted), "training": choices.get("training")}
    if remove:
        kept = prune(net, deleted)
        desc["model"] = {"_target_": PRUNED, "_recursive_": False, "model": desc["model"]}
        desc["model"] |= kept.pruned
        desc["training"], choices["training"] = {"_target_": "src.training.Standard"}, "standard"
    else:
        kept = net
        desc["training"] = {"_target_": "src.training.Pruned", "deleted": sorted(deleted)}
        choices["training"] = "pruned"
    state = {f"net.{k}": v.detach().cpu() for k, v in kept.state_dict().items()}
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    extra = {} if global_step is None else {"global_step": int(global_step)}
    torch.save({"state_dict": state, KEY: desc, **extra}, tmp)
    tmp.replace(path)
    return path


def prune_checkpoint(
    ckpt_path: str | Path, deleted: Iterable[int], out_path: str | Path, remove: bool = True
) -> Path:
    """`save_pruned` of the network in the checkpoint `ckpt_path` (written by src.run)."""
    from hydra.utils import instantiate

    from src import checkpoint

    ckpt = checkpoint.load(ckpt_path)
    saved = ckpt.get(KEY)
    if saved is None:
        raise ConfigError(f"{ckpt_path} carries no run config: pass a checkpoint of src.run")
    data = instantiate(saved["data"], _convert_="all")
    net = instantiate(
        saved["model"], _convert_="all", in_channels=data.channels, num_classes=data.num_classes
    )
    state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    step = ckpt.get("global_step")
    return save_pruned(net, deleted, out_path, saved, remove=remove, global_step=step)
