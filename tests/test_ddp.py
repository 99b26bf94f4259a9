"""`trainer=ddp` with 2 CPU processes (gloo): training and the analysis callbacks (a probe and the
real `experiment=delete_many`) run under DDP, each analysis runs once (rank 0) and its results
equal a single-process run on the same weights, and a Hydra sweep job gets exactly one run
directory (lightning-hydra-template #393). Block-subset training (paper Sec. 5) trains under DDP
with one subset per step across all ranks."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from src.analysis.base import AnalysisCallback
from src.data.datamodules import batches
from src.results import read_csv, write_json
from tests.conftest import run_cli, same_run_aside

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

PROBE = "+callbacks.probe._target_=tests.test_ddp.Probe"
BLOCKS = "+callbacks.blocks._target_=tests.test_ddp.BlocksPerStep"
SMALL = (
    "experiment=delete_many",
    "preset=quick",
    "model=resnet20",
    "callbacks.delete_many.ks=[0,1,3]",
    "callbacks.delete_many.trials=2",
    "callbacks.delete_many.progress=false",
    PROBE,
)


class Probe(AnalysisCallback):
    """A stand-in analysis in plain PyTorch: the trained net's test error (and whether it gets the
    first test image wrong) and its logits on the first test batch, written as
    `probe_rank<r>.json` by whichever rank runs it."""

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = pl_module.net.eval()
        wrong, first_wrong, logits = [], None, None
        with torch.no_grad():
            for x, y in batches(trainer.datamodule, "test"):
                out = net(x)
                if logits is None:
                    logits, first_wrong = out.tolist(), bool(out[0].argmax() != y[0])
                wrong.append(out.argmax(1) != y)
        wrong = torch.cat(wrong)
        result = {"world_size": trainer.world_size, "n": len(wrong), "wrong": int(wrong.sum())}
        result |= {"error": result["wrong"] / len(wrong), "first_wrong": first_wrong}
        write_json(
            self.analysis_dir(trainer) / f"probe_rank{trainer.global_rank}.json",
            {**result, "logits": logits},
        )


class BlocksPerStep(L.Callback):
    """Per training step on this rank: the blocks whose residual branch ran forward, and those
    whose residual parameters have a gradient after backward (and DDP's all-reduce); written as
    `blocks_rank<r>.json` in the run dir."""

    def on_train_start(self, trainer, pl_module):
        self.ran, self.grad = [], []
        self.hooks = [
            b.layers.register_forward_hook(lambda m, i, o, k=k: m.training and self.ran[-1].add(k))
            for k, b in enumerate(pl_module.net.blocks)
        ]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ran.append(set())

    def on_after_backward(self, trainer, pl_module):
        blocks = pl_module.net.blocks
        self.grad.append({k for k, b in enumerate(blocks) if b.layers[0].weight.grad is not None})

    def on_train_end(self, trainer, pl_module):
        for hook in self.hooks:
            hook.remove()
        steps = {"ran": [sorted(s) for s in self.ran], "grad": [sorted(s) for s in self.grad]}
        write_json(Path(trainer.default_root_dir) / f"blocks_rank{trainer.global_rank}.json", steps)


def test_ddp_sweep_job_equals_single_process(tmp_path):
    logs = tmp_path / "logs"
    run_cli(
        "-m",
        *SMALL,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.max_steps=10",
        "logger=wandb",
        "seed=0,1",
        f"paths.log_dir={logs}",
    )
    # one sweep dir holding its two job dirs: the second rank of a job did not start a sweep of
    # its own (#393), and job 1 started fresh ranks after job 0's had gone
    [sweep] = list((logs / "delete_many").iterdir())
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml", "report"]
    for job in (sweep / "0", sweep / "1"):
        [wandb_run] = list((job / "wandb").glob("offline-run-*"))  # one W&B run, from rank 0
        logged = (wandb_run / "logs" / "debug.log").read_text()
        assert f"'group': 'delete_many/{sweep.name}'" in logged
        probe = json.loads((job / "analysis" / "probe_rank0.json").read_text())
        assert probe["world_size"] == 2
    job = sweep / "0"

    # the analysis ran once, on rank 0 of a 2-process world
    analysis = {p.name for p in (job / "analysis").iterdir()}
    assert "probe_rank0.json" in analysis and "probe_rank1.json" not in analysis
    ddp = json.loads((job / "analysis" / "probe_rank0.json").read_text())
    assert ddp["world_size"] == 2

    # the same analysis in one process on the DDP-trained weights gives the same numbers
    single_dir = tmp_path / "single"
    run_cli(
        *SMALL,
        "logger=csv",
        "train=false",
        f"ckpt_path={job / 'checkpoints' / 'last.ckpt'}",
        f"hydra.run.dir={single_dir}",
    )
    single = json.loads((single_dir / "analysis" / "probe_rank0.json").read_text())
    assert single["world_size"] == 1
    assert ddp["error"] == single["error"]
    torch.testing.assert_close(torch.tensor(ddp["logits"]), torch.tensor(single["logits"]))
    # the paper's Fig. 5a analysis: the same rows, the same errors
    ddp_rows = read_csv(job / "analysis" / "delete_many.csv")
    assert [r["k"] for r in ddp_rows] == ["0", "0", "1", "1", "3", "3"]
    assert same_run_aside(ddp_rows) == same_run_aside(
        read_csv(single_dir / "analysis" / "delete_many.csv")
    )
    # The trainer's own test metric: evaluation sets are split across ranks without padding
    # (no image counted twice), so DDP's test_error equals the single-process one exactly.
    single_metrics = json.loads((single_dir / "metrics.json").read_text())
    assert single_metrics["test_error"] == pytest.approx(single["error"], abs=1e-6)
    ddp_metrics = json.loads((job / "metrics.json").read_text())
    assert ddp_metrics["test_error"] == pytest.approx(single_metrics["test_error"], abs=1e-6)


def test_ddp_block_subset_runs_one_subset_per_step_on_every_rank(tmp_path):
    """Skipped blocks leave parameters without gradient: DDP finds them (the block_subset config
    picks `ddp_find_unused_parameters_true`), every rank runs the same k blocks, those blocks
    alone get gradients (the others stay untouched, as in one process), and the analyses on the
    DDP-trained weights equal a single-process run."""
    subset = ("training=block_subset", "training.k=3", "training.test_mode=rescale")
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    run_cli(
        *SMALL,
        *subset,
        BLOCKS,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.max_steps=4",
        "logger=csv",
        f"hydra.run.dir={ddp_dir}",
    )
    rank0, rank1 = (json.loads((ddp_dir / f"blocks_rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1
    assert len(rank0["ran"]) == 4 and all(len(s) == 3 for s in rank0["ran"])
    assert rank0["grad"] == rank0["ran"]
    assert len({tuple(s) for s in rank0["ran"]}) > 1  # a new subset each step

    run_cli(
        *SMALL,
        *subset,
        "logger=csv",
        "train=false",
        f"ckpt_path={ddp_dir / 'checkpoints' / 'last.ckpt'}",
        f"hydra.run.dir={single_dir}",
    )
    ddp = json.loads((ddp_dir / "analysis" / "probe_rank0.json").read_text())
    single = json.loads((single_dir / "analysis" / "probe_rank0.json").read_text())
    assert (ddp["world_size"], single["world_size"]) == (2, 1)
    assert ddp["error"] == single["error"]
    ddp_rows = read_csv(ddp_dir / "analysis" / "delete_many.csv")
    assert same_run_aside(ddp_rows) == same_run_aside(
        read_csv(single_dir / "analysis" / "delete_many.csv")
    )
