"""The one shape every network here has: stem -> ordered blocks -> head, run under a Plan.

Paper Sec. 3 ("unraveled view"): a residual block is y = shortcut(x) + residual(x). Every
experiment of the paper is a *plan* handed to `Network.forward` for that call only:

- delete blocks at test time (Sec. 4.1, 4.2): `Plan(deleted={i, ...})` keeps the shortcut;
- reorder blocks (Sec. 4.3): `Plan(order=(...))`;
- train k of n blocks per mini-batch (Sec. 5): `Plan(deleted=<the n-k others>)`;
- stochastic depth (Sec. 6), as trained: the drawn drops as a plan,
  `Plan(deleted=<dropped>, branch_scale=<1/survival>)`, so a dropped branch does not run;
  `Plan(drop_prob=(...))` computes every branch and zeroes the dropped ones
  (`torchvision.ops.stochastic_depth`; the reference the drawn plan is tested and timed against);
- gradient of one path (Sec. 5, Fig. 6b): `Plan(grad_path={blocks whose residual it crosses})`;
- backward-only residual scaling lambda (path decomposition): `Plan(grad_scale=lam)`.

The model object is never modified, so an interrupted sweep cannot leave a lesioned model behind.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import types
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torchvision.ops import stochastic_depth


class Block(nn.Module):
    """A block with two branches: `shortcut(x)` and `residual(x)`, merged by `merge(s, r)`.

    `skip(x)` is the block's output when its residual branch is deleted. A plain (VGG) layer is
    a block without a shortcut whose deletion is the identity (plus any pooling it owns).

    `parallel`: a branch of a parallel-residual layer (GPT-J, GPT-NeoX, Falcon, Phi, Cohere:
    h + attn(ln_1(h)) + mlp(ln_2(h))) carries its layer's key; see `Network.steps`.
    """

    has_shortcut: bool = True
    downsampling: bool = False
    stage: int = 0
    layer_index: int | None = None  # transformers: the layer this sub-layer block belongs to
    kind: str | None = None  # transformers: "attn", "mlp", "mixer" or "layer"
    parallel: int | None = None  # parallel residual: the layer whose input this branch shares

    def shortcut(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def residual(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def merge(self, s: Tensor, r: Tensor) -> Tensor:
        return s + r

    def skip(self, x: Tensor) -> Tensor:
        return self.shortcut(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.merge(self.shortcut(x), self.residual(x))


@dataclass(frozen=True)
class Plan:
    """What one call of the network runs. The default plan is the unmodified network.

    order:        block indices in execution order (None: 0..n-1). Blocks left out do not run.
    deleted:      blocks whose residual branch is removed; their shortcut (skip) still runs.
    residual_scale: forward multiplier on every residual branch that runs (test-time rescaling).
    branch_scale: per-block forward multiplier of the residual branch (stochastic depth's
                  1/survival on the branches a training step keeps).
    drop_prob:    per-block stochastic-depth drop probability (used in training mode only).
    grad_path:    backward only: gradient flows through the residual branch of these blocks and
                  through the shortcut of all others (one path of the unraveled view).
    grad_scale:   backward only: residual-branch gradients are multiplied by this scalar.

    `FIELDS` says how the engines treat each field, so that a new field is handled or refused,
    never ignored (a field without an entry is a TypeError):

    - "lesion": which blocks run, in which order, with or without their residual branch: the
      lesion engine reuses the cached prefix before the first position where two plans differ;
    - "block_scale": a per-block multiplier of the residual branch (None: 1.0 everywhere),
      applied by `Network.scaled`: reused likewise up to the first block whose value differs;
      the gradient engines apply it through `Network.scaled`;
    - "scale": a multiplier of every residual branch that runs, applied by `Network.scaled`: no
      prefix reuse; the gradient engines apply it through `Network.scaled`;
    - "forward": any other change of the forward pass: no prefix reuse; the gradient engines,
      which run the branches themselves, refuse it;
    - "training": used in training mode only: no reuse; refused by the gradient engines;
    - "gate": backward only, set by the gradient engines themselves: no reuse; refused in the
      plan they are given.
    """

    FIELDS: ClassVar[dict[str, str]] = {
        "order": "lesion",
        "deleted": "lesion",
        "residual_scale": "scale",
        "branch_scale": "block_scale",
        "drop_prob": "training",
        "grad_path": "gate",
        "grad_scale": "gate",
    }
    KINDS: ClassVar[tuple[str, ...]] = (
        "lesion",
        "block_scale",
        "scale",
        "forward",
        "training",
        "gate",
    )

    order: tuple[int, ...] | None = None
    deleted: frozenset[int] = frozenset()
    residual_scale: float = 1.0
    branch_scale: tuple[float, ...] | None = None
    drop_prob: tuple[float, ...] | None = None
    grad_path: frozenset[int] | None = None
    grad_scale: float | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if self.FIELDS.get(f.name) not in self.KINDS:
                raise TypeError(
                    f"Plan field {f.name!r} has no kind in Plan.FIELDS (one of {self.KINDS}): "
                    "declare how the lesion and gradient engines treat it"
                )

    @classmethod
    def of_kind(cls, *kinds: str) -> tuple[str, ...]:
        """The fields of these kinds, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls) if cls.FIELDS[f.name] in kinds)

    def changed(self, *kinds: str) -> tuple[str, ...]:
        """The fields of these kinds that differ from their defaults."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return tuple(f for f in self.of_kind(*kinds) if getattr(self, f) != defaults[f])

    def block_scale(self, field: str, i: int) -> float:
        """Block i's value of a "block_scale" field (1.0 where the field is None)."""
        values = getattr(self, field)
        return 1.0 if values is None else values[i]

    def sequence(self, n_blocks: int) -> tuple[int, ...]:
        return tuple(range(n_blocks)) if self.order is None else self.order

    @functools.cached_property
    def plain(self) -> bool:
        """True when every running block can use its fused `forward`: nothing but lesions."""
        return not self.changed(*(k for k in self.KINDS if k != "lesion"))

    def validate(self, n_blocks: int) -> None:
        bad = [i for i in (*self.sequence(n_blocks), *self.deleted) if not 0 <= i < n_blocks]
        if bad:
            raise ValueError(
                f"block index {bad[0]} out of range: this network has blocks 0..{n_blocks - 1}"
            )
        for name in ("drop_prob", "branch_scale"):
            values = getattr(self, name)
            if values is not None and len(values) != n_blocks:
                raise ValueError(f"{name} needs one value per block ({n_blocks})")


FULL = Plan()


def _fused(block: Block, h: Tensor) -> Tensor:
    return block(h)


def _branches(block: Block, h: Tensor) -> tuple[Tensor, Tensor]:
    return block.shortcut(h), block.residual(h)


def _skip(block: Block, h: Tensor) -> Tensor:
    return block.skip(h)


BLOCK_INFO = ("block", "stage", "downsampling", "layer", "kind")  # Network.block_info's keys


def _autocast(device: str):
    """The autocast dtype in effect on `device` (False: none)."""
    if not hasattr(torch, "get_autocast_dtype"):  # torch < 2.4
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)


class CompiledBlocks:
    """`torch.compile` of `_fused`, `_branches` and `_skip`, one compiled copy per kind of call.

    Dynamo keeps its graphs per code object and guards on the block it is given (its class, its
    submodules: a projection shortcut or none, parameter shapes and strides, `training`), so one
    compiled `_fused` for every block of a ResNet recompiles for each kind of block and mode and
    falls back to eager after `recompile_limit` (8). Here each kind gets a copy of the function
    with a code object of its own: the key is the block's class and structure (its `repr`, its
    plain attributes but the labels `METADATA`, its parameters' shapes, strides, dtypes and
    devices), its train/eval mode, the grad, inference and autocast state, and the input's
    dtype, rank and layout. A copy sees one kind of block only: it compiles once, and once more
    when the batch size changes (a dynamic batch dimension). Dynamo's own guards still check
    every call, so a key can never select a graph that does not fit; it only keeps each copy's
    recompiles few.
    """

    METADATA = ("training", "stage", "layer_index", "parallel")  # Block's labels; not structure

    def __init__(self, **options):
        self.options = options
        self.graphs: dict[tuple, Callable] = {}  # key -> compiled copy
        self.structure: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.kernels = tuple(functools.partial(self.call, fn) for fn in (_fused, _branches, _skip))

    def __deepcopy__(self, memo) -> CompiledBlocks:
        return self  # a copied network shares the graphs (they take the block as an argument)

    def key(self, fn: Callable, block: nn.Module, h: Tensor) -> tuple:
        structure = self.structure.get(block)
        if structure is None:
            plain = (bool, int, float, str, type(None))
            attrs = tuple(
                (k, v)
                for k, v in sorted(vars(block).items())
                if not k.startswith("_") and k not in self.METADATA and isinstance(v, plain)
            )
            structure = self.structure[block] = (type(block), repr(block), attrs)
        return (
            fn.__name__,
            structure,
            tuple((p.shape, p.stride(), p.dtype, p.device) for p in block.parameters()),
            block.training,
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            _autocast(h.device.type),
            (h.dtype, h.dim(), h.is_contiguous()),
        )

    def call(self, fn: Callable, block: nn.Module, h: Tensor):
        key = self.key(fn, block, h)
        compiled = self.graphs.get(key)
        if compiled is None:
            n = len(self.graphs)
            code = fn.__code__.replace(co_name=f"{fn.__name__}_{n}")  # its own dynamo cache
            copy = types.FunctionType(code, fn.__globals__, code.co_name)
            compiled = self.graphs[key] = torch.compile(copy, **self.options)
        return compiled(block, h)


def _backward_scale(t: Tensor, lam: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by `lam` in the backward pass."""
    d = t.detach()
    return d + lam * (t - d)


class Network(nn.Module):
    """stem -> blocks (an ordered ModuleList of `Block`) -> head, executed under a `Plan`.

    Parallel residual layers. The plan's sequence runs as *steps*: a step is one position,
    except that consecutive positions whose blocks share a `parallel` key (distinct blocks of
    one parallel-residual layer) form one step. All blocks of a step read the step's input h;
    its output is h + (sum of the residual branches that run), the shortcut being the
    identity. So `Plan(deleted={attention of layer i})` keeps layer i's MLP, which still reads
    the layer's input; deleting every branch of a layer leaves h. In the unraveled view a path
    enters at most one branch of a step (the layer's Jacobian is I + J_attn + J_mlp), so a
    path's length is the number of branches it enters and `path_groups` lists the choices.
    A reorder that moves one branch away from its layer makes it a step of its own; a block
    run twice in a row (duplicate) runs as two steps. Networks without `parallel` blocks have
    one step per position, as before.
    """

    inputs = "images"  # what the stem takes: "images" or "tokens" (a language model's ids)

    def __init__(self, stem: nn.Module, blocks: Sequence[Block], head: nn.Module):
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.has_parallel = any(b.parallel is not None for b in self.blocks)
        for b in self.blocks:
            if b.parallel is not None and not (b.has_shortcut and type(b).merge is Block.merge):
                raise ValueError(
                    f"{type(b).__name__}: a parallel branch needs an identity shortcut and an "
                    "additive merge"
                )

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def block_info(self) -> list[dict]:
        """Index, stage and downsampling flag of every block (for lesion tables); transformer
        blocks add their layer index and branch kind (the keys: BLOCK_INFO)."""
        rows = []
        for i, b in enumerate(self.blocks):
            row = {"block": i, "stage": b.stage, "downsampling": b.downsampling}
            if b.kind is not None:
                row.update(layer=b.layer_index, kind=b.kind)
            rows.append(row)
        return rows

    def steps(self, plan: Plan = FULL) -> list[tuple[int, ...]]:
        """The plan's positions grouped into steps (see the class doc): tuples of positions."""
        seq = plan.sequence(self.n_blocks)
        if not self.has_parallel:
            return [(p,) for p in range(len(seq))]
        out: list[list[int]] = []
        for p, i in enumerate(seq):
            key = self.blocks[i].parallel
            prev = out[-1] if out else None
            if (
                prev is not None
                and key is not None
                and self.blocks[seq[prev[0]]].parallel == key
                and i not in {seq[q] for q in prev}
            ):
                prev.append(p)
            else:
                out.append([p])
        return [tuple(s) for s in out]

    def path_groups(self, plan: Plan = FULL) -> list[tuple[int, ...]]:
        """Per step of `plan`, the blocks a path can enter there (one at most): the blocks that
        run with their residual branch."""
        seq = plan.sequence(self.n_blocks)
        groups = [tuple(seq[p] for p in s if seq[p] not in plan.deleted) for s in self.steps(plan)]
        return [g for g in groups if g]

    def restart(self, base: Plan, plan: Plan) -> int | None:
        """First position at which `plan`'s computation can differ from `base`'s, at a step
        boundary of both (so the cached input of `base` there is `plan`'s input too); None:
        `plan` computes what `base` does."""
        per_position = plan.of_kind("lesion", "block_scale")  # the rest is global (Plan.FIELDS)
        if dataclasses.replace(plan, **dict.fromkeys(per_position)) != dataclasses.replace(
            base, **dict.fromkeys(per_position)
        ):
            return 0  # a global change (scale, drop, gradient gates): nothing can be reused
        scales = plan.of_kind("block_scale")
        seq_b, seq_p = base.sequence(self.n_blocks), plan.sequence(self.n_blocks)
        first = None
        for pos, (i, j) in enumerate(zip(seq_b, seq_p)):
            if (
                i != j
                or (i in base.deleted) != (i in plan.deleted)
                or any(base.block_scale(f, i) != plan.block_scale(f, i) for f in scales)
            ):
                first = pos
                break
        if first is None:
            if len(seq_b) == len(seq_p):
                return None
            first = min(len(seq_b), len(seq_p))
        if not self.has_parallel:
            return first
        starts_b = {s[0] for s in self.steps(base)} | {len(seq_b)}
        starts_p = {s[0] for s in self.steps(plan)} | {len(seq_p)}
        return max(p for p in starts_b & starts_p if p <= first)

    def compile_blocks(self, **options) -> Network:
        """Compile the blocks, not the network: `torch.compile` of small functions that run a
        block given as an argument (`_fused`, `_branches`, `_skip`), one compiled copy per kind of
        block (`CompiledBlocks`), and the plan (which blocks run, in which order, deleted,
        scaled, gated) stays in eager Python around them. One set of graphs then serves every
        plan: a lesion sweep or block-subset training never recompiles (compiling `forward`
        itself guards on each plan and falls back to eager after eight). `options` go to
        `torch.compile` (e.g. backend, mode)."""
        self._compiled = CompiledBlocks(**options)
        return self

    def scaled(self, i: int, r: Tensor, plan: Plan) -> Tensor:
        """Block i's residual output `r` with the plan's stochastic-depth drop, forward scales
        and backward-only scale applied (the gradient-path gate is the caller's)."""
        if plan.drop_prob is not None:
            r = stochastic_depth(r, plan.drop_prob[i], "batch", self.training)
        for f in plan.of_kind("scale", "block_scale"):  # residual_scale, then branch_scale
            scale = getattr(plan, f) if plan.FIELDS[f] == "scale" else plan.block_scale(f, i)
            if scale != 1.0:
                r = r * scale
        if plan.grad_scale is not None:
            r = _backward_scale(r, plan.grad_scale)
        return r

    def run_block(self, i: int, h: Tensor, plan: Plan = FULL) -> Tensor:
        block = self.blocks[i]
        compiled = getattr(self, "_compiled", None)
        fused, branches, skip = (_fused, _branches, _skip) if compiled is None else compiled.kernels
        if i in plan.deleted:
            return skip(block, h)
        if plan.plain or not block.has_shortcut:
            if plan.drop_prob is not None and not block.has_shortcut:
                raise ValueError("stochastic depth needs residual blocks, not plain layers")
            if not block.has_shortcut and not plan.plain:
                raise ValueError("gradient/scale plans need residual blocks, not plain layers")
            return fused(block, h)
        s, r = branches(block, h)
        r = self.scaled(i, r, plan)
        if plan.grad_path is not None:
            if i in plan.grad_path:
                s = s.detach()
            else:
                r = r.detach()
        return block.merge(s, r)

    def run_step(self, blocks: Sequence[int], h: Tensor, plan: Plan = FULL) -> Tensor:
        """One step: a single block, or the branches of a parallel layer on one input h."""
        if len(blocks) == 1:
            return self.run_block(blocks[0], h, plan)
        running = [i for i in blocks if i not in plan.deleted]
        if not running:
            return h
        entered = [] if plan.grad_path is None else [i for i in running if i in plan.grad_path]
        if len(entered) > 1:
            raise ValueError(
                f"grad_path enters blocks {entered} of one parallel layer: a path enters at "
                "most one branch of a parallel layer"
            )
        rs = []
        for i in running:
            r = self.scaled(i, self.blocks[i].residual(h), plan)
            rs.append(r.detach() if plan.grad_path is not None and i not in entered else r)
        s = h.detach() if entered else h
        return s + functools.reduce(operator.add, rs)

    def trunk(self, h: Tensor, plan: Plan = FULL, start: int = 0) -> Tensor:
        """Run the plan's block sequence from position `start` (a step boundary) on the stem
        features `h`, or on the cached input of that position."""
        seq = plan.sequence(self.n_blocks)
        if not self.has_parallel:
            for i in seq[start:]:
                h = self.run_block(i, h, plan)
            return h
        steps = self.steps(plan)
        if start < len(seq) and start not in {s[0] for s in steps}:
            raise ValueError(f"position {start} lies inside a parallel layer: restart at its start")
        for step in steps:
            if step[0] >= start:
                h = self.run_step([seq[p] for p in step], h, plan)
        return h

    def block_inputs(self, x: Tensor, plan: Plan = FULL) -> list[Tensor]:
        """Cache of the network under `plan` (default: unlesioned): the input of every position
        of the plan's sequence (inside a parallel layer: the layer's input), then the trunk
        output. `cache[p]` is the input of position p; `cache[-1]` feeds the head."""
        h = self.stem(x)
        cache = []
        seq = plan.sequence(self.n_blocks)
        for step in self.steps(plan):
            cache += [h] * len(step)
            if plan == FULL and len(step) == 1:
                h = self.blocks[seq[step[0]]](h)
            else:
                h = self.run_step([seq[p] for p in step], h, plan)
        cache.append(h)
        return cache

    def forward(self, x: Tensor, plan: Plan | None = None) -> Tensor:
        plan = FULL if plan is None else plan
        return self.head(self.trunk(self.stem(x), plan))

    # --- models bigger than one device (src.models.hf_adapters.place) -----------------------
    # A network whose blocks accelerate's device_map spread over devices: each block moves its
    # input to its own device and its output back, so every activation the engines see lies on
    # the stem's device. Moving the whole network (Lightning's `module.to(device)`, the
    # engines' `net.to(device)`) must not gather it onto one device: it keeps every tensor
    # where the map put it (a dtype change along with a move is refused).
    dispatched = False

    def _apply(self, fn, recurse=True):
        if not self.dispatched:
            return super()._apply(fn, recurse)

        def keep(t: Tensor) -> Tensor:
            target = fn(t.new_empty(0))  # where (and as what) `fn` would put `t`
            if target.device == t.device:
                return fn(t)
            if target.dtype != t.dtype:
                from src.errors import ConfigError

                raise ConfigError(
                    f"a network dispatched over devices (model.device_map) moves as it is: "
                    f"set its dtype when loading (model.dtype), not with .to({target.dtype})"
                )
            return t  # a move to another device: stays where the device map put it

        return super()._apply(keep, recurse)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
