"""W&B (offline) per job: the run files hold the analysis tables and images, the run id lives in
`<run dir>/wandb_id`, and a resumed job continues the same W&B run."""

from __future__ import annotations

import json

import lightning as L
import matplotlib
import pytest

from src.analysis.io import AnalysisCallback, log_to_wandb, save_figure, write_csv
from src.rundir import wandb_id
from tests.conftest import run_cli

matplotlib.use("Agg")

COLUMNS = ["tensor", "norm"]


class MediaProbe(AnalysisCallback):
    """A stand-in analysis that reports like the real ones: CSV + PNG, and table + image to W&B."""

    def analyse(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import matplotlib.pyplot as plt

        params = list(pl_module.net.parameters())[:4]
        rows = [{"tensor": i, "norm": float(p.detach().norm())} for i, p in enumerate(params)]
        out = self.analysis_dir(trainer)
        write_csv(out / "probe.csv", rows, COLUMNS)
        fig, ax = plt.subplots()
        ax.plot([r["norm"] for r in rows])
        png = save_figure(fig, out / "probe.png")
        log_to_wandb(trainer, "probe", rows, COLUMNS, image=png)


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
    assert table["columns"] == COLUMNS and len(table["data"]) == 4

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
