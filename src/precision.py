"""Training at the CPU's real speed (issue 21): bf16 autocast and channels_last where the CPU runs
bf16 natively (AMX tiles, Intel since Sapphire Rapids; AVX512-BF16, also AMD since Zen 4), fp32
as before elsewhere.

- `trainer.precision: ${auto_precision:${.accelerator}}` (conf/trainer/default.yaml) resolves
  here: Lightning's `bf16-mixed` (weights and optimizer state stay fp32; the forward runs under
  `torch.autocast`) when a CPU with native bf16 trains, else `32-true`. Any explicit value
  (`trainer.precision=32-true`) is used as given.
- `memory_format` (conf/config.yaml): `auto` puts a convolutional network (image stem) in
  channels_last when it trains in bf16 mixed precision, the layout the CPU's bf16 convolutions
  are fast in; `channels_last` / `contiguous` force it. Language models stay as they are.

`choose` says which precision and layout a run uses and why, in one line that `src.run` logs.
Mixed precision is for training steps only: validation and testing run `evaluating()`, outside
autocast, as the analyses do on `pl_module.net` after testing (fp32 or fp64 weights), so the
run's `test_error` and every study's `baseline` are one number, on every device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

NATIVE_BF16 = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags: the CPU computes in bf16
MIXED = ("bf16-mixed", "bf16", "16-mixed", "16")  # autocast: the convolutions run in 16 bits


@functools.cache
def native_bf16() -> str | None:
    """The CPU feature that runs bf16 natively (a /proc/cpuinfo flag), or None."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = set()
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
        return next((f for f in NATIVE_BF16 if f in flags), None)
    import torch

    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    for name, probe in probes.items():  # not Linux: ask PyTorch's own CPU probe
        if getattr(torch.cpu, probe, lambda: False)():
            return name
    return None


def trains_on_cpu(accelerator: str) -> bool:
    """Whether Lightning's `accelerator` setting trains on the CPU on this machine."""
    if accelerator == "auto":
        import torch

        mps = getattr(torch.backends, "mps", None)
        return not torch.cuda.is_available() and not (mps is not None and mps.is_available())
    return accelerator == "cpu"


def auto_precision(accelerator: str = "auto") -> str:
    """`${auto_precision:<accelerator>}`: bf16-mixed for CPU training on a CPU with native bf16,
    else 32-true (accelerators are set explicitly: conf/trainer/gpu.yaml)."""
    return "bf16-mixed" if trains_on_cpu(str(accelerator)) and native_bf16() else "32-true"


OmegaConf.register_new_resolver("auto_precision", auto_precision, replace=True)


def evaluating(device):
    """The context of every validation and test step: autocast off on `device` (Lightning's
    mixed-precision plugin turns it on around each step), the network in its own dtype."""
    import torch

    return torch.autocast(torch.device(device).type, enabled=False)


def convolutional(net) -> bool:
    """A network on images with a convolution (not a language model, not a conv-free model)."""
    from torch import nn

    return getattr(net, "inputs", "images") == "images" and any(
        isinstance(m, nn.Conv2d) for m in net.modules()
    )


@dataclass(frozen=True)
class Choice:
    precision: str
    memory_format: str  # "channels_last" or "contiguous"
    why: str

    def apply(self, net):
        """`net` in the chosen memory format (in place: its parameters change layout only)."""
        import torch

        if self.memory_format == "channels_last":
            net.to(memory_format=torch.channels_last)
        return net

    def __str__(self) -> str:
        return f"precision {self.precision}, memory format {self.memory_format}: {self.why}"


def choose(cfg: DictConfig, net) -> Choice:
    """The run's precision (`trainer.precision`, resolved) and memory format, and why."""
    precision = str(cfg.trainer.get("precision") or "32-true")
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    auto = OmegaConf.is_interpolation(cfg.trainer, "precision")
    bf16 = native_bf16()
    if not auto:
        why = ["trainer.precision set"]
    elif not trains_on_cpu(accelerator):
        why = ["not CPU training: set trainer.precision for an accelerator (trainer=gpu: bf16)"]
    elif bf16:
        why = [f"the CPU has native bf16 ({bf16})"]
    else:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
        why = [f"the CPU has no native bf16 ({capability}, no {'/'.join(NATIVE_BF16)} flag)"]
    fmt = cfg.get("memory_format", "auto")
    if fmt == "auto":
        if not convolutional(net):
            fmt = "contiguous"
            why.append("not a convolutional network: contiguous")
        elif precision in MIXED:
            fmt = "channels_last"
            why.append("convolutions in bf16: channels_last")
        else:
            fmt = "contiguous"
    else:
        why.append(f"memory_format={fmt} set")
    return Choice(precision, fmt, "; ".join(why))
