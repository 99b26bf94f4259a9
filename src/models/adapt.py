"""One entry point for networks we did not write: `adapt(model) -> Network`.

`adapt` takes a Hugging Face causal LM, a timm model or a torchvision ResNet, finds its family in
one registry (`FAMILIES`), builds the `Network` that shares the model's modules, and **verifies
it before returning**: the Network's full-plan output on a small seeded probe input (token ids
for a language model, images for a vision model) must equal the model's own forward, in the
model's dtype, within `TOLERANCE`. A mismatch stops with one line naming the architecture, the
largest difference and the supported families; an unknown family is refused in one line too. A
table computed on a network that is not the user's model is never handed back.

A new family is one adapter function decorated with `@register(...)` in its library's module
(src/models/hf_adapters.py, src/models/timm_adapters.py, src/models/torchvision_resnet.py), one
row of the README's table of supported families (a test checks that both agree), and a test row.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from src.errors import ConfigError
from src.models.network import Network

# library (top-level package of the model's class) -> the module that registers its families
LIBRARIES = {
    "transformers": "src.models.hf_adapters",
    "timm": "src.models.timm_adapters",
    "torchvision": "src.models.torchvision_resnet",
}
# max |net - model| allowed, as atol + rtol * |model| (torch.allclose), per dtype of the model
TOLERANCE = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
PROBE_SEED = 0


@dataclass(frozen=True)
class Family:
    """A family of models one adapter takes apart.

    name:    the README table's name (e.g. "GPT-NeoX / Pythia").
    library: "transformers", "timm" or "torchvision".
    keys:    what identifies a model of the family: Hugging Face `config.model_type` values, or
             the timm / torchvision model class names.
    layout:  how a model of the family becomes blocks, in a few words (the README table).
    build:   model, **options -> Network (sharing the model's modules; raises ConfigError on a
             configuration of the family it cannot take apart).
    """

    name: str
    library: str
    keys: tuple[str, ...]
    layout: str
    build: Callable[..., Network]


FAMILIES: dict[str, Family] = {}


def register(name: str, library: str, keys: tuple[str, ...], layout: str):
    """Decorator: register `build` as the adapter of the family `name`."""
    if library not in LIBRARIES:
        raise ValueError(f"unknown library {library!r}: one of {', '.join(LIBRARIES)}")

    def deco(build: Callable[..., Network]) -> Callable[..., Network]:
        taken = [k for f in FAMILIES.values() if f.library == library for k in f.keys if k in keys]
        if name in FAMILIES or taken:
            raise ValueError(f"family {name!r} or key {taken} registered twice")
        FAMILIES[name] = Family(name, library, tuple(keys), layout, build)
        return build

    return deco


def load_registry() -> dict[str, Family]:
    """Every family of every library (imports transformers and timm: seconds)."""
    for module in LIBRARIES.values():
        importlib.import_module(module)
    return FAMILIES


def library_of(model: nn.Module) -> str | None:
    top = type(model).__module__.split(".")[0]
    return top if top in LIBRARIES else None


def model_key(model: nn.Module) -> str:
    """What the registry's `keys` match: a Hugging Face model's `config.model_type`, else the
    model's class name."""
    if library_of(model) == "transformers":
        return str(getattr(model.config, "model_type", type(model).__name__))
    return type(model).__name__


def supported(library: str | None = None) -> str:
    fams = load_registry().values()
    return "; ".join(
        f"{lib}: " + ", ".join(f.name for f in fams if f.library == lib)
        for lib in LIBRARIES
        if library in (None, lib)
    )


def family_of(model: nn.Module) -> Family:
    """The registered family of `model`, or a one-line ConfigError naming the supported ones."""
    library = library_of(model)
    if library is None:
        raise ConfigError(
            f"{type(model).__name__} is neither a Hugging Face, timm nor torchvision model: "
            f"adapt() supports {supported()}"
        )
    importlib.import_module(LIBRARIES[library])
    key = model_key(model)
    for family in FAMILIES.values():
        if family.library == library and key in family.keys:
            return family
    raise ConfigError(
        f"{library} {key} ({type(model).__name__}) is not a supported family: adapt() supports "
        f"{supported(library)}"
    )


def describe(model: nn.Module) -> str:
    return f"{library_of(model) or 'torch'} {model_key(model)} ({type(model).__name__})"


def adapt(model: nn.Module, verify: bool = True, **options) -> Network:
    """`model` as a `Network` sharing its modules, verified against the model's own forward
    (`verify=False` skips the check: for tests of the check itself, never for analyses).
    `options` go to the family's adapter (e.g. granularity="layer"). A Hugging Face model that
    accelerate's device_map spread over several devices runs its blocks where they lie
    (`hf_adapters.place`), verified the same way."""
    family = family_of(model)
    net = family.build(model, **options)
    net.inputs = "tokens" if family.library == "transformers" else "images"
    # the model itself, not registered as a submodule (no second copy in the state dict):
    # src/export.py saves a Hugging Face model with layers removed from it
    object.__setattr__(net, "source", model)
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:  # spread over devices by accelerate's device_map (model.device_map)
        if family.library != "transformers":
            raise ConfigError(
                f"{describe(model)} lies on {len(devices)} devices: only a Hugging Face causal "
                "LM runs spread over devices (model.device_map); put the model on one device"
            )
        importlib.import_module(LIBRARIES["transformers"]).place(net)  # refuses an offload
    if verify:
        check_equal(net, model)
    return net


def first_param(model: nn.Module) -> Tensor:
    p = next(iter(model.parameters()), None)
    if p is None:
        raise ConfigError(f"{type(model).__name__} has no parameters: nothing to adapt")
    return p


def probe_input(model: nn.Module) -> Tensor:
    """A small seeded input the model accepts: (2, 8) token ids within the vocabulary for a
    language model; (2, C, H, W) images for a vision model (C from its first convolution, H x W
    from its patch embedding's fixed size where it has one, else 32 x 32)."""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    device = first_param(model).device
    if library_of(model) == "transformers":
        vocab = int(model.get_input_embeddings().num_embeddings)
        return torch.randint(0, vocab, (2, 8), generator=gen).to(device)
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = conv.in_channels if conv is not None else 3
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or (32, 32)
    size = (size, size) if isinstance(size, int) else tuple(size)
    dtype = first_param(model).dtype
    return torch.randn(2, channels, *size, generator=gen).to(device, dtype)


def own_output(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def check_equal(net: Network, model: nn.Module, x: Tensor | None = None) -> float:
    """Compare `net`'s full-plan output with `model`'s own on the probe input `x` (None: the
    seeded `probe_input`), both in eval mode (dropout off; the training flags are restored).
    Returns the largest absolute difference; raises a one-line ConfigError beyond `TOLERANCE`."""
    x = probe_input(model) if x is None else x
    modes = [(m, m.training) for m in (net, model)]
    try:
        with torch.no_grad():
            net.eval(), model.eval()
            want, got = own_output(model, x), net(x)
    finally:
        for m, training in modes:
            m.train(training)
    atol, rtol = TOLERANCE.get(want.dtype, TOLERANCE[torch.float32])
    if got.shape != want.shape:
        raise ConfigError(
            f"adapting {describe(model)} gave outputs of shape {tuple(got.shape)}, the model "
            f"{tuple(want.shape)}: refusing a network that is not the model; supported: "
            f"{supported()}"
        )
    diff = (got.double() - want.double()).abs()
    bound = atol + rtol * want.double().abs()
    if not torch.isfinite(got).all() or (diff > bound).any():
        raise ConfigError(
            f"adapting {describe(model)} failed verification: the Network's output differs "
            f"from the model's own by up to {diff.max().item():.3g} (tolerance {atol:g} + "
            f"{rtol:g} x |output|, {want.dtype}); refusing a network that is not the model. "
            f"Supported families: {supported()}"
        )
    return float(diff.max())


def families_table() -> str:
    """The README's table of supported families, from the registry (`python -m
    src.models.adapt` prints it; tests/test_docs.py checks that the README has it)."""
    lines = ["| family | library | matched by | blocks |", "|---|---|---|---|"]
    for f in load_registry().values():
        keys = ", ".join(f"`{k}`" for k in f.keys)
        lines.append(f"| {f.name} | {f.library} | {keys} | {f.layout} |")
    return "\n".join(lines)


if __name__ == "__main__":  # the registry lives in the imported module, not in __main__
    print(importlib.import_module("src.models.adapt").families_table())
