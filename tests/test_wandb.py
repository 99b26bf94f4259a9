"""W&B (offline) per job: the run files hold the analysis tables and images, the run id lives in
`<run dir>/wandb_id`, and a resumed job continues the same W&B run."""

from __future__ import annotations

import json

import lightning as L
import pytest
from matplotlib.figure import Figure

from src.analysis.base import AnalysisCallback
from src.results import META
from src.rundir import wandb_id
from tests.conftest import run_cli

COLUMNS = ["tensor", "norm"]


class MediaProbe(AnalysisCallback):
    """A stand-in analysis that records like the real ones: its tidy table and figure, to files
    and to W&B."""

    name = "probe"

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = list(pl_module.net.parameters())[:4]
        rows = [{"tensor": i, "norm": float(p.detach().norm())} for i, p in enumerate(params)]
        fig = Figure()
        fig.subplots().plot([r["norm"] for r in rows])
        self.record(trainer, pl_module, rows, figure=fig)


def test_wandb_id_is_created_once_and_kept(tmp_path):
    first = wandb_id(str(tmp_path))
    assert first == wandb_id(str(tmp_path)) == (tmp_path / "wandb_id").read_text()
    assert len(first) == 16 and not list(tmp_path.glob(".wandb_id.*"))
    (tmp_path / "wandb_id").write_text("kept1234\n")
    assert wandb_id(str(tmp_path)) == "kept1234"


@pytest.mark.slow
def test_offline_run_holds_media_and_resume_continues_the_run(tmp_path):
    run = tmp_path / "run"
    common = (
        "preset=quick",
        "model=resnet20",
        "logger=wandb",
        "+callbacks.probe._target_=tests.test_wandb.MediaProbe",
        f"hydra.run.dir={run}",
    )
    run_cli(*common, "trainer.max_steps=10")
    run_id = (run / "wandb_id").read_text().strip()
    [first] = list((run / "wandb").glob("offline-run-*"))
    assert first.name.endswith(f"-{run_id}") and (first / f"run-{run_id}.wandb").is_file()
    tables = list((first / "files" / "media" / "table").rglob("*.table.json"))
    images = list((first / "files" / "media" / "images").rglob("*.png"))
    assert len(tables) == 1 and len(images) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == [*META, *COLUMNS] and len(table["data"]) == 4
    first_row = dict(zip(table["columns"], table["data"][0]))
    assert first_row["run_id"] == run_id and first_row["model"] == "resnet20"
    assert first_row["study"] == "probe" and first_row["tensor"] == 0

    # the job is resumed (as a requeued Slurm job would be): same W&B run id, training continues
    run_cli(*common, "trainer.max_steps=20", "resume=true")
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)
    assert (run / "wandb_id").read_text().strip() == run_id
    last = run / "checkpoints" / "last.ckpt"
    assert f"resuming from {last}" in (run / "run.log").read_text()
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 20
    # the logged config names the run's id and its group (`train` for a single run)
    logged = (runs[1] / "logs" / "debug.log").read_text()
    assert f"'id': '{run_id}'" in logged and "'group': 'train'" in logged
