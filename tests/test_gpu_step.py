"""The training step on a GPU makes no host synchronisation (issue 10 §5): data already on the
device, augmentation drawn there from a seeded device generator, normalisation statistics cached
there, plan draws on the host, fused SGD. Needs CUDA; skipped (with its reason) elsewhere."""

from __future__ import annotations

import pytest
import torch

from src.data import DigitsDataModule
from src.models import preact_resnet_cifar
from src.module import Classifier
from src.training import BlockSubset, StochasticDepth

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (a host sync only exists there)"
)


@pytest.mark.parametrize("mode", [None, BlockSubset(k=4), StochasticDepth()])
def test_a_training_step_makes_no_host_sync(mode):
    dev = torch.device("cuda")
    dm = DigitsDataModule(batch_size=32, augment=True)
    dm.setup()
    x, y = (t[:32].to(dev) for t in dm.splits["train"].tensors)
    module = Classifier(preact_resnet_cifar(blocks_per_stage=2, in_channels=1), mode=mode)
    module.to(dev)
    module.net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, fused=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    for step in range(3):  # the first step warms caches (statistics on the device, kernels)
        sync = "error" if step else "default"
        torch.cuda.set_sync_debug_mode(sync)
        try:
            batch = dm.transform(x, True, gen), y
            loss = module.training_step(batch, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(loss).item()


def test_small_datasets_are_held_on_the_gpu_when_training_there(tmp_path):
    """Under a GPU trainer the tensor splits move to the device once; batches come out there."""
    import lightning as L

    dm = DigitsDataModule(batch_size=32, augment=True)
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=1, logger=False,
                        default_root_dir=tmp_path)  # fmt: skip
    dm.trainer = trainer
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.is_cuda and y.is_cuda
    assert all(t.is_cuda for split in dm.splits.values() for t in split.tensors)
