"""Lesions across training (issue 20, section 6): every analysis takes `every_n_steps` and then
also runs during fit on the weights of that step, without perturbing training; one table per
study with a `step` column; a block x step heatmap; the same over a run's checkpoints
(`train=false ckpt_path=a,b,...`), merged by the report into one group across steps."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from matplotlib.figure import Figure

from src import report, results
from src.analysis.base import AnalysisCallback
from src.errors import ConfigError
from src.schema import params
from src.studies import registry, step_figure
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent


def study_class(study):
    from hydra.utils import get_class

    conf = yaml.safe_load((ROOT / "conf" / f"{study.config}.yaml").read_text())
    return get_class(conf["_target_"])


@pytest.mark.parametrize("name", sorted(registry()))
def test_every_analysis_takes_every_n_steps(name):
    """Declared in the signature (so the config key is checked, src/schema.py), set on the
    instance, refused in one line unless a positive integer or null."""
    cls = study_class(registry()[name])
    assert issubclass(cls, AnalysisCallback)
    assert "every_n_steps" in params(cls)[0], name
    assert cls().every_n_steps is None
    assert cls(every_n_steps=7).every_n_steps == 7
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ConfigError, match="every_n_steps"):
            cls(every_n_steps=bad)


def test_the_shared_configs_declare_every_n_steps():
    lesion = yaml.safe_load((ROOT / "conf" / "lesion" / "base.yaml").read_text())
    paths = yaml.safe_load((ROOT / "conf" / "paths_analysis" / "gradient_paths.yaml").read_text())
    assert lesion["every_n_steps"] is None and paths["every_n_steps"] is None


def test_a_subclass_without_a_constructor_of_its_own_takes_it_too():
    class Bare(AnalysisCallback):
        name = "bare"

    class Own(AnalysisCallback):
        name = "own"

        def __init__(self, x: int = 1):  # no super().__init__, no **kwargs
            self.x = x

    assert Bare(every_n_steps=3).every_n_steps == 3
    own = Own(x=2, every_n_steps=4)
    assert (own.x, own.every_n_steps) == (2, 4)
    assert "every_n_steps" in params(Own)[0]


def rows(step, rise, blocks=3, run_dir=".", label="run", down=(1,)):
    return pd.DataFrame(
        {
            "run_dir": run_dir,
            "label": label,
            "metric": "error",
            "step": pd.array([step] * blocks, dtype="Int64"),
            "block": range(blocks),
            "stage": 0,
            "downsampling": [b in down for b in range(blocks)],
            "error": [0.1 + rise * (b + 1) for b in range(blocks)],
            "baseline": 0.1,
            "bn": "eval",
        }
    )


def test_with_earlier_steps_gathers_steps_and_a_step_measured_again_replaces_its_rows(tmp_path):
    meta = {"model": "m", "step": 0}
    path = tmp_path / "analysis" / "study"
    t0 = results.tidy("study", [{"block": 0, "error": 0.5}], meta)
    results.write_table(path, results.with_earlier_steps(path, t0))
    t5 = results.tidy("study", [{"block": 0, "error": 0.4}], meta | {"step": 5})
    results.write_table(path, results.with_earlier_steps(path, t5))
    again = results.tidy("study", [{"block": 0, "error": 0.3}], meta | {"step": 5})
    both = results.with_earlier_steps(path, again)
    assert both.step.tolist() == [0, 5] and both.error.tolist() == [0.5, 0.3]
    assert list(both.columns) == list(t0.columns) and both.step.dtype == "Int64"
    unknown = results.tidy("study", [{"block": 0, "error": 0.2}], meta | {"step": None})
    results.write_table(path, results.with_earlier_steps(path, unknown))
    assert results.with_earlier_steps(path, unknown).error.tolist() == [0.5, 0.4, 0.2]


def test_per_block_figures_draw_a_heatmap_across_steps_others_the_latest_step(monkeypatch):
    from src import figures

    table = pd.concat([rows(0, 0.0), rows(10, 0.1), rows(20, 0.2)], ignore_index=True)
    drawn = {}
    monkeypatch.setattr(
        figures, "damage_heatmap", lambda t, m, v: drawn.setdefault("heat", (t, m, v))
    )
    for name in ("delete_single", "duplicate", "half_strength"):
        drawn.clear()
        registry()[name].figure("error")(table)
        assert drawn["heat"][0].step.nunique() == 3, name
        assert drawn["heat"][1] == "error"
    seen = []
    step_figure(lambda t: seen.append(t))(table)  # a figure of one step's rows: the latest
    assert seen[0].step.unique().tolist() == [20]
    registry()["delete_single"].figure("error")(rows(20, 0.2))  # one step: Fig. 3 as before
    assert "heat" not in drawn or drawn["heat"][0].step.nunique() == 3


def test_the_heatmap_has_one_panel_per_label_block_by_step():
    from src.figures import damage_heatmap

    table = pd.concat(
        [rows(s, r, label=lab) for lab in ("a", "b") for s, r in ((0, 0.0), (50, 0.1))],
        ignore_index=True,
    )
    fig = damage_heatmap(table)
    assert isinstance(fig, Figure)
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["a", "b"]  # a label per panel
    grid = panels[0].images[0].get_array()
    assert grid.shape == (3, 2)  # blocks x steps
    assert grid[:, 0].tolist() == pytest.approx([0.0, 0.0, 0.0])
    assert grid[:, 1].tolist() == pytest.approx([10.0, 20.0, 30.0])  # pp over the baseline


def test_report_groups_one_setup_across_its_checkpoints():
    """A checkpoint per step (ckpt_path follows the step) is one group across steps; the run
    facts name the setups apart where no override does; a location that does not follow the
    step (one checkpoint per seed) still behaves as before."""
    ov = [
        {"ckpt_path": f"{t}/checkpoints/step-{s}.ckpt", "train": "false"}
        for t in ("std", "sd")
        for s in (50, 100)
    ]
    runs = pd.DataFrame(
        {
            "overrides": ov,
            "step": [50, 100, 50, 100],
            "training": ["standard"] * 2 + ["stochastic_depth"] * 2,
            "model": "resnet110",
        }
    )
    assert (
        report.groups(runs).tolist()
        == ["training=standard"] * 2 + ["training=stochastic_depth"] * 2
    )
    same_step = runs.assign(step=100)
    assert report.groups(same_step).nunique() == 4  # four checkpoints, as before: by location
    swept = pd.DataFrame(
        {
            "overrides": [
                {"trainer.max_steps": str(s), "seed": str(k)} for s in (10, 20) for k in (0, 1)
            ],
            "step": [10, 10, 20, 20],
            "model": "resnet20",
        }
    )
    assert report.groups(swept).tolist() == ["resnet20"] * 4


def test_headlines_and_claims_read_each_groups_latest_step():
    t = pd.concat([rows(0, 0.2), rows(10, 0.0)], ignore_index=True).assign(study="delete_single")
    last = report.at_latest_step(t)
    assert last.step.unique().tolist() == [10]
    old = t.drop(columns=["step"])  # tables written before the step column
    assert len(report.at_latest_step(old)) == len(old)


# --- end to end ---------------------------------------------------------------------------------


def state(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


@pytest.mark.slow
def test_analyses_during_fit_leave_training_bit_identical_and_match_the_checkpoints(tmp_path):
    """A block-subset ResNet-20 (random blocks per step, BN statistics re-estimated at test
    time) trained with delete_single every 4 steps and gradient paths every 6 ends with the
    weights and statistics of the same run without them; its table's rows at step 8 equal the
    analysis of the step-8 checkpoint; and the checkpoints' multirun reports one group."""
    common = [
        "preset=quick",
        "model=resnet20",
        "training=block_subset",
        "training.k=4",
        "training.test_mode=recalibrate",
        "training.bn_batches=2",
        "trainer.max_steps=12",
        "logger=csv",
    ]
    plain, lesioned = tmp_path / "plain", tmp_path / "lesioned"
    run_cli(*common, f"hydra.run.dir={plain}")
    run_cli(
        *common,
        f"hydra.run.dir={lesioned}",
        "+lesion@callbacks.delete_single=delete_single",
        "callbacks.delete_single.every_n_steps=4",
        "+paths_analysis@callbacks.gradient_paths=gradient_paths",
        "callbacks.gradient_paths.every_n_steps=6",
        "callbacks.gradient_paths.samples=2",
        "callbacks.gradient_paths.batches=1",
        "callbacks.gradient_paths.lengths=[1,2]",
        "callbacks.gradient_paths.decomposition=false",
        "callbacks=periodic",
        "callbacks.periodic_checkpoint.every_n_train_steps=4",
    )
    a, b = state(plain), state(lesioned)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    single = pd.read_parquet(lesioned / "analysis" / "delete_single.parquet")
    assert results.steps(single) == [0, 4, 8, 12] and len(single) == 4 * 9
    paths = pd.read_parquet(lesioned / "analysis" / "gradient_paths.parquet")
    assert results.steps(paths) == [0, 6, 12]
    assert json.loads((lesioned / "metrics.json").read_text())["step"] == 12
    # the same analysis after the fact, on the periodic checkpoints of steps 4 and 8
    ckpts = ",".join(str(lesioned / "checkpoints" / f"step-{s:06d}.ckpt") for s in (4, 8))
    sweep = tmp_path / "sweep"
    run_cli(
        "-m",
        "train=false",
        f"ckpt_path={ckpts}",
        "+lesion@callbacks.delete_single=delete_single",
        "logger=csv",
        f"hydra.sweep.dir={sweep}",
    )
    later = results.load(sweep, "delete_single")
    assert results.steps(later) == [4, 8]
    cols = ["step", "block", "error", "baseline"]
    during = single[single.step.isin([4, 8])][cols].reset_index(drop=True)
    after = later.sort_values(["step", "block"])[cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(during, after, check_dtype=False)
    md = (sweep / "report" / "report.md").read_text()
    assert "groups: resnet20." in md and "at step 8 (of 2 steps)" in md
    assert (sweep / "report" / "delete_single.png").stat().st_size > 0


def test_step_of_a_checkpoint_or_an_override(tmp_path):
    """`step` after testing: the run's fact (src/run.py sets it from the checkpoint or `step=`);
    without facts, the trainer's global step."""
    cb = AnalysisCallback()
    module = SimpleNamespace(facts={"step": 300})
    assert cb.step(SimpleNamespace(global_step=0), module) == 300
    assert cb.step(SimpleNamespace(global_step=7), SimpleNamespace(facts=None)) == 7
    assert cb.step(SimpleNamespace(), SimpleNamespace(facts={"step": None})) is None
