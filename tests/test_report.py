"""`python -m src.report <multirun dir>`: seeds are combined into mean ± t-based 95% CI bands,
other swept overrides become separate curves, absent analyses are skipped."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from scipy import stats

from src import report as rep
from src.analysis.io import write_csv
from tests.conftest import run_cli
from tests.plots import colour_pixels

SEEDS = (0, 1, 2)
MODELS = ("resnet110", "vgg15")


def fake_sweep(root):
    """A multirun dir as Hydra + the analysis callbacks leave it: 2 models x 3 seeds."""
    num = 0
    for model in MODELS:
        for seed in SEEDS:
            job = root / str(num)
            num += 1
            (job / ".hydra").mkdir(parents=True)
            (job / ".hydra" / "overrides.yaml").write_text(
                yaml.safe_dump(["experiment=delete_many", f"model={model}", f"seed={seed}"])
            )
            base = 0.06 + 0.01 * seed + (0.3 if model == "vgg15" else 0.0)
            (job / "metrics.json").write_text(json.dumps({"test_error": base, "global_step": 9}))
            rows = [
                {"k": k, "trial": t, "deleted": "0", "error": base + 0.1 * k + 0.01 * t}
                for k in (0, 1, 2)
                for t in (0, 1)
            ]
            write_csv(
                job / "analysis" / "delete_many.csv", rows, ["k", "trial", "deleted", "error"]
            )
            single = [
                {"block": b, "stage": 0, "downsampling": b == 1, "error": base + 0.02}
                for b in range(3)
            ]
            cols = ["block", "stage", "downsampling", "error"]
            write_csv(job / "analysis" / "delete_single.csv", single, cols)
            if model == "resnet110":  # gradient paths for one model only
                grad = [
                    {"length": n, "samples": 4, "grad_norm_mean": 0.5**n, "grad_norm_std": 0.0}
                    for n in range(1, 5)
                ]
                cols = ["length", "samples", "grad_norm_mean", "grad_norm_std"]
                write_csv(job / "analysis" / "gradient_paths.csv", grad, cols)
    (root / "multirun.yaml").write_text("{}\n")
    return root


def test_mean_ci_is_t_based():
    mean, half = rep.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3))
    assert math.isnan(rep.mean_ci([4.0])[1])


def test_curves_average_trials_then_seeds(tmp_path):
    jobs = rep.load_jobs(fake_sweep(tmp_path / "sweep"))
    swept = rep.swept_keys(jobs)
    assert swept == ["model"]  # seed is a replicate, experiment is constant
    data = rep.curves(jobs, swept, rep.ANALYSES[1])  # delete_many
    assert set(data) == {"model=resnet110", "model=vgg15"}
    d = data["model=resnet110"]
    assert d["x"] == [0.0, 1.0, 2.0] and d["n"] == [3, 3, 3]
    # per seed: mean over trials = base + 0.1k + 0.005; over seeds base = 0.06 + 0.01 * mean(seed)
    assert d["mean"][2] == pytest.approx(0.07 + 0.2 + 0.005)
    assert d["ci"][2] == pytest.approx(stats.t.ppf(0.975, 2) * 0.01 / math.sqrt(3))


def test_plot_draws_a_band_per_curve(tmp_path, monkeypatch):
    jobs = rep.load_jobs(fake_sweep(tmp_path / "sweep"))
    data = rep.curves(jobs, ["model"], rep.ANALYSES[1])
    figures = []
    monkeypatch.setattr(rep, "save_figure", lambda fig, path: figures.append(fig) or path)
    rep.plot(rep.ANALYSES[1], data, tmp_path)
    [ax] = figures[0].axes
    assert len(ax.lines) == 2 and len(ax.collections) == 2  # a line and a filled CI band each


@pytest.mark.slow
def test_report_cli_writes_figures_and_summary(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep")
    run_cli(str(sweep), module="src.report", timeout=300)
    out = sweep / "report"
    assert {p.name for p in out.iterdir()} == {
        "report.md",
        "delete_many.png",
        "delete_single.png",
        "gradient_paths.png",  # reorder.csv is absent: no figure, no section
    }
    # a curve (and its CI band) per model; gradient paths were measured for resnet110 only
    for name, models in (("delete_many", 2), ("delete_single", 2), ("gradient_paths", 1)):
        curves = {"resnet110": "C0", "vgg15": "C1", "band": ("C0", 0.25)}
        px = colour_pixels(out / f"{name}.png", (5, 3.5), curves)
        assert px["resnet110"] > 100 and (px["vgg15"] > 100) == (models == 2), (name, px)
    assert colour_pixels(out / "delete_many.png", (5, 3.5), curves)["band"] > 1000  # 3 seeds
    md = (out / "report.md").read_text()
    assert "6 finished jobs" in md and "swept: model" in md
    assert "**Paper:**" in md and "Fig. 5b" not in md
    # test error of resnet110 over seeds 0..2: 7.00% ± t(0.975, 2) * 1% / sqrt(3)
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
    assert f"| model=resnet110 | 3 | 7.00% ± {half:.2f} pp | 6.00% | 8.00% |" in md
    # delete_single: non-downsampling blocks are 2 pp above each job's own baseline
    assert "(non-downsampling blocks): 2.00% ± 0.00 pp" in md
    # gradient norm halves per block of path length
    assert "factor 0.500 per block" in md


def test_report_rejects_a_dir_without_jobs(tmp_path):
    with pytest.raises(SystemExit, match="no job with metrics.json"):
        rep.main([str(tmp_path)])
