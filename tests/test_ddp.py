"""`trainer=ddp` with 2 CPU processes (gloo): training and the analysis callbacks (a probe and the
real `experiment=delete_many`) run under DDP, each analysis runs once (rank 0) and its results
equal a single-process run on the same weights, and a Hydra sweep job gets exactly one run
directory (lightning-hydra-template #393)."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from src.analysis.io import AnalysisCallback, read_csv, write_json
from src.data.datamodules import batches
from tests.conftest import run_cli

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

PROBE = "+callbacks.probe._target_=tests.test_ddp.Probe"
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
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
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
    assert ddp_rows == read_csv(single_dir / "analysis" / "delete_many.csv")
    # The trainer's own test metric: evaluation sets are split across ranks without padding
    # (no image counted twice), so DDP's test_error equals the single-process one exactly.
    single_metrics = json.loads((single_dir / "metrics.json").read_text())
    assert single_metrics["test_error"] == pytest.approx(single["error"], abs=1e-6)
    ddp_metrics = json.loads((job / "metrics.json").read_text())
    assert ddp_metrics["test_error"] == pytest.approx(single_metrics["test_error"], abs=1e-6)
