"""The composed config checked against where each key is declared, before any work: a node with a
`_target_` against its target's signature (a class's `__init__`, and its bases' where `**kwargs`
passes on), `optim` against `src.module.Recipe`, the top-level keys against `Run`. A key the
target does not take, a value that does not fit the annotation, or one outside its declared
range (`Annotated[int, POSITIVE]` next to the parameter; Lightning's classes: `LIGHTNING`) is a
`ConfigError` whose one line names the key, the value and what is accepted."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import inspect
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """A number's accepted range, declared next to the parameter; `note` says what an edge means."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    note: str = ""

    def holds(self, v: float) -> bool:
        low_ok = self.low is None or (v > self.low if self.open_low else v >= self.low)
        high_ok = self.high is None or (v < self.high if self.open_high else v <= self.high)
        return low_ok and high_ok

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            said = f"in {left}{self.low:g}, {self.high:g}{right}"
        elif self.low is not None:
            said = f"{'>' if self.open_low else '>='} {self.low:g}"
        else:
            said = f"{'<' if self.open_high else '<='} {self.high:g}"
        return f"{said} ({self.note})" if self.note else said


POSITIVE = Range(0, open_low=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, open_low=True, open_high=True)  # a share strictly between 0 and 1
UNIT = Range(0, 1, open_low=True)  # (0, 1]
NO_LIMIT = Range(-1, note="-1: no limit")


@dataclass
class LMSize:
    """`lm_size`: the LM's size, read by the LM model configs through interpolations."""

    layers: Annotated[int, POSITIVE]
    width: Annotated[int, POSITIVE]
    heads: Annotated[int, POSITIVE]
    mlp: Annotated[int, POSITIVE]
    context: Annotated[int, POSITIVE]


MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


@dataclass
class Run:
    """The top-level keys without a `_target_` (conf/config.yaml, experiments, training modes)."""

    experiment_name: str
    seed: Annotated[int, NON_NEGATIVE] | None  # null: no seeding (0 is a real seed)
    train: bool
    ckpt_path: str | None
    resume: bool | str  # or a .ckpt path
    compile: bool
    memory_format: Literal[MEMORY_FORMATS] = "auto"  # src/precision.py
    module: str | None = None  # the LightningModule's class
    step: Annotated[int, NON_NEGATIVE] | None = None  # train=false: the weights' optimizer step
    data_name: str | None = None
    ddp_strategy: str | None = None
    paths: dict[str, str] | None = None
    lm_size: LMSize | None = None


# Lightning's classes are not ours to annotate: the ranges of the keys the conf sets, by target.
LIGHTNING = {
    "lightning.Trainer": {
        "max_steps": NO_LIMIT,
        "max_epochs": NO_LIMIT,
        "devices": Range(-1, note="-1: every device"),
        "log_every_n_steps": POSITIVE,
        "num_sanity_val_steps": Range(-1, note="-1: every batch"),
        "check_val_every_n_epoch": POSITIVE,
        "val_check_interval": POSITIVE,
        "limit_train_batches": NON_NEGATIVE,
        "limit_val_batches": NON_NEGATIVE,
        "limit_test_batches": NON_NEGATIVE,
        "accumulate_grad_batches": POSITIVE,
        "num_nodes": POSITIVE,
    },
    "lightning.pytorch.callbacks.ModelCheckpoint": {
        "save_top_k": Range(-1, note="-1: every checkpoint"),
        "every_n_train_steps": NON_NEGATIVE,
        "every_n_epochs": NON_NEGATIVE,
    },
}


def type_hints(fn: Any) -> dict[str, Any]:
    """`fn`'s annotations, evaluated one by one where some name only exists for type checkers
    (those stay unchecked)."""
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:
        pass
    hints = {}
    for name, note in getattr(fn, "__annotations__", {}).items():
        try:
            hints[name] = (
                eval(note, getattr(fn, "__globals__", {})) if isinstance(note, str) else note
            )
        except Exception:
            continue
    return hints


@functools.cache
def params(target: Any) -> tuple[dict[str, Any], bool]:
    """name -> annotation of what `target` accepts, and whether it takes any other key too."""
    if isinstance(target, type) and dataclasses.is_dataclass(target):
        hints = typing.get_type_hints(target, include_extras=True)
        return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(target)}, False
    functions = [target]
    if isinstance(target, type):  # __init__ of the class, then of the bases **kwargs reaches
        functions = [k.__dict__["__init__"] for k in target.__mro__ if "__init__" in k.__dict__]
    found: dict[str, Any] = {}
    for fn in functions:
        hints = type_hints(fn)
        signature = inspect.signature(fn)
        for name, p in signature.parameters.items():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "self":
                found.setdefault(name, hints.get(name, Any))
        if not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
            return found, False
    return found, True


def describe(tp: Any) -> str:
    """What an annotation accepts, in words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return " ".join([describe(args[0]), *(str(a) for a in args[1:] if isinstance(a, Range))])
    if origin in (Union, types.UnionType):
        chosen = [v for a in args if typing.get_origin(a) is Literal for v in typing.get_args(a)]
        words = [describe(Literal[tuple(chosen)])] if chosen else []
        words += [describe(a) for a in args if typing.get_origin(a) is not Literal]
        return " or ".join(w for w in words if w != "null") + (
            " or null" if type(None) in args else ""
        )
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        return f"a list, each element {describe(args[0])}" if args else "a list"
    if origin in (dict, Mapping) or tp in (dict, Mapping, datetime.timedelta):
        return "a mapping"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "a mapping"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return (names | {type(None): "null"}).get(tp, getattr(tp, "__name__", str(tp)))


def kind(value: Any) -> str:
    """What a value is, in words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float" if value.is_integer() else "a fraction"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple, ListConfig)):
        return "a list"
    return "a mapping" if isinstance(value, (dict, DictConfig)) else type(value).__name__


def fits(value: Any, tp: Any, ranges: bool = True) -> bool:
    """Whether `value` fits `tp` (and its declared ranges); a type not checked here fits."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        if not fits(value, args[0], ranges):
            return False
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return not (ranges and number) or all(
            r.holds(value) for r in args[1:] if isinstance(r, Range)
        )
    if origin in (Union, types.UnionType):
        return any(fits(value, a, ranges) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        return not args or all(fits(v, args[0], ranges) for v in value)
    if origin in (dict, Mapping) or tp in (dict, Mapping, datetime.timedelta):
        return isinstance(value, (dict, DictConfig))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return isinstance(value, (dict, DictConfig))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp in (str, os.PathLike, Path):
        return isinstance(value, str)
    return True  # Any, or a class of its own (an Accelerator, a Strategy ...): not checked here


def literal_types(tp: Any) -> set[type]:
    """The types of the values a Literal anywhere in `tp` lists."""
    if typing.get_origin(tp) is Literal:
        return {type(a) for a in typing.get_args(tp)}
    return {t for a in typing.get_args(tp) for t in literal_types(a)}


def mismatch(value: Any, tp: Any) -> str | None:
    """Why `value` does not fit `tp`, in words (None: it fits)."""
    if fits(value, tp):
        return None
    if fits(value, tp, ranges=False) or type(value) in literal_types(tp):
        return f"{describe(tp)}; got {value!r}"
    if isinstance(value, (list, tuple)):
        bad = next((v for v in value if not fits([v], tp, ranges=False)), None)
        if bad is not None and fits([], tp):
            return f"{describe(tp)}; got a list holding {kind(bad)} ({bad!r})"
    return f"{describe(tp)}; got {kind(value)}"


def leaves(node: DictConfig) -> dict[str, Any]:
    """key -> resolved value (a `${hydra:...}` that cannot resolve outside a run: left out)."""
    out = {}
    for key in node:
        try:
            out[str(key)] = node[key]
        except OmegaConfBaseException:
            continue
    return out


def check_node(
    node: DictConfig, path: str, accepted: dict[str, Any], open_: bool, owner: str
) -> None:
    """Each key of `node` against `accepted` (name -> annotation); `open_`: others pass."""
    for key, value in leaves(node).items():
        full = f"{path}.{key}" if path else key
        if key.startswith("_"):  # _target_, _convert_, ...: Hydra's own
            continue
        if key not in accepted:
            if not open_:
                raise ConfigError(
                    f"{full}: {owner} takes no parameter {key!r}; it takes {', '.join(accepted)}"
                )
            continue
        tp = accepted[key]
        nested = [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]
        if nested and isinstance(value, DictConfig):
            check_node(value, full, *params(nested[0]), owner=f"{full} ({nested[0].__name__})")
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            try:
                value = OmegaConf.to_container(value, resolve=True)
            except OmegaConfBaseException:
                continue
        why = mismatch(value, tp)
        if why is not None:
            raise ConfigError(f"{full}={value!r}: {why}")


def check_target(node: DictConfig, path: str) -> None:
    from hydra.utils import get_object

    target = node.get("_target_")
    try:
        obj = get_object(target)
    except Exception as err:
        raise ConfigError(f"{path}._target_={target!r} cannot be imported: {err}") from None
    accepted, open_ = params(obj)
    accepted = dict(accepted)
    for key, r in LIGHTNING.get(target, {}).items():
        if key in accepted:
            accepted[key] = Annotated[accepted[key], r]
    check_node(node, path, accepted, open_, owner=target)


def check(cfg: DictConfig) -> None:
    """Raise ConfigError on the first key of `cfg` that its declaration does not accept. Writes
    nothing: resolving `${wandb_id:}` here creates no id file (src/rundir.py)."""
    from src.rundir import no_new_ids

    with no_new_ids():
        check_keys(cfg)


def check_keys(cfg: DictConfig) -> None:
    check_node(cfg, "", params(Run)[0], True, owner="the run")  # other keys: checked below
    from src.module import Recipe

    if cfg.get("optim") is not None:
        check_node(cfg.optim, "optim", *params(Recipe), owner="optim (src.module.Recipe)")
    for key in ("data", "model", "training", "task", "trainer"):
        node = cfg.get(key)
        if isinstance(node, DictConfig) and "_target_" in node:
            check_target(node, key)
    for group in ("callbacks", "logger"):
        for name, node in (cfg.get(group) or {}).items():
            if isinstance(node, DictConfig) and "_target_" in node:
                check_target(node, f"{group}.{name}")


def schedule_warning(cfg: DictConfig) -> str | None:
    """One line when the lr schedule cannot fit in `trainer.max_steps` (warm-up longer than the
    run, or milestones at or past its end: the lr never decays there); None when it fits."""
    steps, optim = cfg.trainer.get("max_steps", -1), cfg.get("optim") or {}
    if not cfg.get("train") or steps is None or steps < 0:
        return None
    warmup, milestones = optim.get("warmup_steps", 0), list(optim.get("milestones") or [])
    late = [m for m in milestones if m >= steps]
    if warmup < steps and not late:
        return None
    said = []
    if warmup >= steps:
        said.append(f"optim.warmup_steps={warmup} covers the whole run")
    if late:
        said.append(f"optim.milestones {late} fall at or after its end (no lr decay there)")
    return (
        f"trainer.max_steps={steps}: {' and '.join(said)}; scale optim.warmup_steps and "
        "optim.milestones with trainer.max_steps"
    )
