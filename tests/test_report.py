"""The results layer and the sweep aggregator: tables written by `results.record` load back typed
from a folder of any shape; `python -m src.report` combines seeds into mean ± t-based 95% CI,
makes every other swept override a curve of its own, skips absent analyses, and compares the arms
of a Sec. 5 sweep with scipy.stats."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from scipy import stats

from src import report as rep
from src import results
from src.errors import ConfigError
from tests.conftest import run_cli
from tests.plots import colour_pixels

SEEDS = (0, 1, 2)
MODELS = ("resnet110", "vgg15")


def fake_run(job, overrides: list[str], metrics: dict, tables: dict[str, list[dict]]):
    """A run directory as src.run and the analysis callbacks leave it."""
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "metrics.json").write_text(json.dumps(metrics))
    keys = ("model", "data", "training", "n_blocks", "k", "seed", "run_id", "step")
    meta = {k: metrics.get(k) for k in keys}
    for study, rows in tables.items():
        results.write_table(job / "analysis" / study, results.tidy(study, rows, meta))


def fake_sweep(root):
    """A multirun dir: 2 models x 3 seeds, gradient paths measured for one model only."""
    num = 0
    for model in MODELS:
        for seed in SEEDS:
            base = 0.06 + 0.01 * seed + (0.3 if model == "vgg15" else 0.0)
            tables = {
                "delete_many": [
                    {"k": k, "trial": t, "deleted": "0", "error": base + 0.1 * k + 0.01 * t}
                    for k in (0, 1, 2)
                    for t in (0, 1)
                ],
                "delete_single": [
                    {"block": b, "stage": 0, "downsampling": b == 1, "error": base + 0.02}
                    for b in range(3)
                ],
            }
            for rows in tables.values():
                for r in rows:
                    r["baseline"] = base
            if model == "resnet110":
                tables["gradient_paths"] = [
                    {"length": n, "samples": 4, "grad_norm_mean": 0.5**n, "grad_norm_std": 0.0}
                    for n in range(1, 5)
                ]
            metrics = {"test_error": base, "global_step": 9, "model": model, "seed": seed}
            metrics |= {"training": "standard", "n_blocks": 4, "k": 4, "run_id": f"r{num}"}
            overrides = ["experiment=delete_many", f"model={model}", f"seed={seed}"]
            fake_run(root / str(num), overrides, metrics, tables)
            num += 1
    return root


def test_tables_load_typed_from_any_shape(tmp_path):
    """One call reads a single run, a sweep, or a tree of sweeps (Slurm arrays, DDP jobs: only
    rank 0 writes), with typed columns: booleans stay booleans, seeds integers."""
    sweep = fake_sweep(tmp_path / "outputs" / "delete_many" / "multirun_x")
    one = results.load(sweep / "4")
    assert set(one.study) == {"delete_many", "delete_single"} and set(one.run_dir) == {"."}
    df = results.load(sweep)
    assert len(df) == 6 * (6 + 3) + 3 * 4  # every row of every table of every job
    assert str(df.downsampling.dtype) == "boolean"
    assert df.loc[df.study == "delete_single", "downsampling"].sum() == 6  # block 1 of 6 runs
    assert str(df.seed.dtype) == "Int64" and df.error.dtype == float
    assert list(df.columns[: len(results.META) + 1]) == ["run_dir", *results.META]
    # job 10 sorts after job 2; the model column comes from the run, not from the path
    assert df.groupby("model").run_dir.nunique().to_dict() == {"resnet110": 3, "vgg15": 3}
    tree = results.load(tmp_path / "outputs", study="delete_many")
    assert len(tree) == 36 and set(tree.study) == {"delete_many"}
    assert tree.run_dir.iloc[0] == "delete_many/multirun_x/0"
    # the CSV beside each Parquet file holds the same rows
    csv = pd.read_csv(sweep / "0" / "analysis" / "delete_many.csv")
    pq = pd.read_parquet(sweep / "0" / "analysis" / "delete_many.parquet")
    assert csv.error.tolist() == pq.error.tolist() and list(csv.columns) == list(pq.columns)
    runs = results.runs(sweep)
    assert len(runs) == 6 and runs.overrides[0] == {
        "experiment": "delete_many",
        "model": "resnet110",
        "seed": "0",
    }


def test_curve_averages_trials_then_seeds(tmp_path):
    df = results.load(fake_sweep(tmp_path / "sweep"), study="delete_many")
    from src.stats import curve, mean_ci

    c = curve(df, "k", "error", by=["model"])
    r = c[c.model == "resnet110"]
    assert r.k.tolist() == [0, 1, 2] and r.n.tolist() == [3, 3, 3]
    # per seed: mean over trials = base + 0.1k + 0.005; over seeds base = 0.06 + 0.01 * mean(seed)
    assert r["mean"].iloc[2] == pytest.approx(0.07 + 0.2 + 0.005)
    assert r.ci.iloc[2] == pytest.approx(stats.t.ppf(0.975, 2) * 0.01 / math.sqrt(3))
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(stats.t.ppf(0.975, 2) / math.sqrt(3))
    assert math.isnan(mean_ci([4.0])[1])


def test_curve_labels_leave_out_where_runs_read_unless_it_tells_them_apart():
    ck = [f"/scratch/u/outputs/delete_single/multirun_{i}/0/checkpoints/last.ckpt" for i in (1, 2)]

    def labels(*overrides):
        return list(rep.groups(pd.DataFrame({"overrides": list(overrides)})))

    # a trained run beside a re-analysis of its checkpoint: the checkpoint is not what differs
    assert labels({"bn": "recalibrate", "ckpt_path": ck[0], "train": "false"}, {}) == [
        "bn=recalibrate, train=false",
        "defaults",
    ]
    # a label names only what its run set: keys others set are left out, not listed as unset
    assert labels({"bn": "recalibrate"}, {"data": "fashion_mnist"}, {}) == [
        "bn=recalibrate",
        "data=fashion_mnist",
        "defaults",
    ]
    # two checkpoints analysed alike: they are the curves, named by what tells them apart
    assert labels({"ckpt_path": ck[0]}, {"ckpt_path": ck[1]}) == [
        "ckpt_path=.../multirun_1/0/checkpoints/last.ckpt",
        "ckpt_path=.../multirun_2/0/checkpoints/last.ckpt",
    ]
    # ... also beside another override, where the checkpoint alone splits runs alike in it
    three = labels(
        {"bn": "eval", "ckpt_path": ck[0]},
        {"bn": "eval", "ckpt_path": ck[1]},
        {"bn": "recalibrate", "ckpt_path": ck[0]},
    )
    assert three[0] == "bn=eval, ckpt_path=.../multirun_1/0/checkpoints/last.ckpt"
    assert three[2] == "bn=recalibrate, ckpt_path=.../multirun_1/0/checkpoints/last.ckpt"
    # one checkpoint per seed: replicates of one curve
    same = labels({"ckpt_path": ck[0], "seed": "0"}, {"ckpt_path": ck[1], "seed": "1"})
    assert same == ["all runs", "all runs"]


def test_report_writes_figures_and_summary(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep")
    rep.report(sweep)
    out = sweep / "report"
    assert {p.name for p in out.iterdir()} == {
        "report.md",
        "claims.csv",
        "tables.parquet",
        "delete_many.png",
        "delete_single.png",
        "gradient_paths.png",  # no reorder table: no figure, no section
    }
    assert len(pd.read_parquet(out / "tables.parquet")) == len(results.load(sweep))
    # a curve per model; gradient paths were measured for resnet110 only
    sizes = {"delete_many": (5.5, 3.6), "delete_single": (7, 3.6), "gradient_paths": (5, 3.5)}
    curves = {"resnet110": "C0", "vgg15": "C1", "band": ("C0", 0.25)}
    for name, models in (("delete_many", 2), ("delete_single", 2), ("gradient_paths", 1)):
        px = colour_pixels(out / f"{name}.png", sizes[name], curves)
        assert px["resnet110"] > 100 and (px["vgg15"] > 100) == (models == 2), (name, px)
    assert colour_pixels(out / "delete_many.png", sizes["delete_many"], curves)["band"] > 1000
    md = (out / "report.md").read_text()
    assert "6 finished runs" in md and "groups: model=resnet110, model=vgg15" in md
    assert "**Paper:**" in md and "## Fig. 5b" not in md
    claims = pd.read_csv(out / "claims.csv").set_index("figure")  # no data set named: one column
    assert claims.loc["Fig. 6b", "measured"] == "x0.500 per block entered (3 runs)"
    assert claims.loc["Fig. 5b", "measured"] == "not measured"
    # test error of resnet110 over seeds 0..2: 7.00% ± t(0.975, 2) * 1% / sqrt(3)
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
    assert f"| model=resnet110 | 3 | 7.00% ± {half:.2f} pp | 6.00% | 8.00% |" in md
    # delete_single: non-downsampling blocks are 2 pp above each job's own baseline
    assert "(non-downsampling blocks): 2.00% ± 0.00 pp" in md
    assert "factor 0.500 per block" in md  # gradient norm halves per block of path length
    assert "## Sec. 5" not in md  # no block-subset runs


def test_report_cli_and_bad_input(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep")
    run_cli(str(sweep), "--out", str(tmp_path / "elsewhere"), module="src.report", timeout=300)
    assert (tmp_path / "elsewhere" / "report.md").is_file() and not (sweep / "report").exists()
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        res = subprocess.run(
            [sys.executable, "-m", "src.report", str(bad)], capture_output=True, text=True
        )
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
        assert res.stderr.startswith("error: ") and "outputs/" in res.stderr


def arms_sweep(
    root,
    errors: dict[str, list[float]],
    k_full: bool = False,
    test_mode="full",
    data=None,
    overrides=(),
    first_seed=0,
    steps=None,
    precision=None,
):
    """A Sec. 5 multirun: one job per (arm, seed), as metrics.json records it (`steps`: the
    training length, metrics.json's `step`; `precision`: the one each arm trained in, by arm)."""
    job = 0
    for arm, errs in errors.items():
        for seed, err in enumerate(errs, first_seed):
            training, k = ("block_subset", 4) if arm == "subset" else ("standard", 9)
            if arm == "full" and k_full:
                training = "block_subset"  # k = n: every block every step
            metrics = {"test_error": err, "global_step": steps or 400, "training": training, "k": k}
            metrics |= {} if steps is None else {"step": steps}
            metrics |= {"n_blocks": 9, "seed": seed, "model": "resnet20", "data": data}
            metrics |= {"test_mode": test_mode if training == "block_subset" else None}
            metrics |= {"precision": precision[arm]} if precision else {}
            args = [*overrides, f"training={training}", f"seed={seed}"]
            fake_run(root / str(job), args, metrics, {})
            job += 1
    return root


@pytest.mark.parametrize("k_full", [False, True])
def test_effective_paths_compares_arms(tmp_path, k_full):
    sub, full = [0.10, 0.12, 0.11, 0.13], [0.08, 0.09, 0.085, 0.095]
    arms_sweep(tmp_path, {"subset": sub, "full": full}, k_full)
    rep.report(tmp_path)
    out = tmp_path / "report"
    res = json.loads((out / "effective_paths.json").read_text())
    assert list(res["arms"]) == ["full", "k=4/9"] and list(res["comparisons"]) == ["k=4/9"]
    c = res["comparisons"]["k=4/9"]
    assert c["welch_t"]["p_value"] == pytest.approx(
        stats.ttest_ind(sub, full, equal_var=False).pvalue
    )
    assert c["paired_t"]["p_value"] == pytest.approx(stats.ttest_rel(sub, full).pvalue)
    assert c["wilcoxon"]["p_value"] == pytest.approx(stats.wilcoxon(sub, full).pvalue)
    assert c["difference_subset_minus_full"] == pytest.approx(sum(sub) / 4 - sum(full) / 4)
    assert c["significant"] and res["same_step_budget"]
    assert sorted((r["arm"], r["seed"], r["test_error"]) for r in res["runs"]) == sorted(
        [("k=4/9", s, e) for s, e in enumerate(sub)] + [("full", s, e) for s, e in enumerate(full)]
    )
    md = (out / "effective_paths.md").read_text()
    assert f"| full | 4 | {sum(full) / 4:.4f} | {stats.tstd(full):.4f} |" in md
    diff = sum(sub) / 4 - sum(full) / 4
    row = f"| k=4/9 | 4 | {sum(sub) / 4:.4f} | {stats.tstd(sub):.4f} | {diff:+.4f} |"
    assert row in md and md.split(row)[1].split("\n")[0].endswith("| yes |")
    for r in res["runs"]:  # one row per job
        assert f"| {r['run_dir']} | {r['arm']} | {r['seed']} | {r['test_error']:.4f} |" in md
    assert "## Sec. 5" in (out / "report.md").read_text()
    dots = {"full": ("C0", 0.6), "subset": ("C1", 0.6)}
    px = colour_pixels(out / "effective_paths.png", (4, 3.2), dots)
    assert px["subset"] > 50 and px["full"] > 50


def test_effective_paths_one_arm_per_test_rule(tmp_path):
    """Checkpoints tested under several rules (train=false runs, each with the checkpoint's own
    seed) become arms of their own, each compared with full training; ensembles get error vs M."""
    full = [0.08, 0.09, 0.085]
    arms_sweep(tmp_path / "sweep", {"subset": [0.5, 0.6, 0.55], "full": full})
    arms_sweep(tmp_path / "rescale", {"subset": [0.081, 0.092, 0.086]}, test_mode="rescale")
    ens = arms_sweep(tmp_path / "ensemble", {"subset": [0.2, 0.3, 0.25]}, test_mode="ensemble")
    for job, m1 in zip(sorted(ens.iterdir()), (0.4, 0.5, 0.45)):
        metrics = json.loads((job / "metrics.json").read_text())
        metrics |= {"test_error_m1": m1, "test_error_m2": m1 - 0.1}
        (job / "metrics.json").write_text(json.dumps(metrics))
    arms_sweep(tmp_path / "a_lesion_study", {"full": [0.5]})  # full training of another sweep
    rep.report(tmp_path)
    res = json.loads((tmp_path / "report" / "effective_paths.json").read_text())
    assert sorted(res["comparisons"]) == ["k=4/9", "k=4/9 ensemble", "k=4/9 rescale"]
    assert res["arms"]["full"]["errors"] == full  # only the Sec. 5 sweep's own full arm
    assert res["comparisons"]["k=4/9"]["significant"]
    rescale = res["comparisons"]["k=4/9 rescale"]
    assert not rescale["significant"] and rescale["paired_t"]["seeds"] == 3
    assert rescale["paired_t"]["p_value"] == pytest.approx(
        stats.ttest_rel([0.081, 0.092, 0.086], full).pvalue
    )
    md = (tmp_path / "report" / "effective_paths.md").read_text()
    assert "| M=1 | M=2 |" in md and "| k=4/9 ensemble | 0.4500 | 0.3500 |" in md


def test_seeds_added_to_the_full_arm_later_join_it(tmp_path):
    """Full-training seeds run later in a sweep of their own (`experiment=effective_paths
    training=standard seed=3,4`) join the full arm; full-training runs of another experiment
    do not."""
    exp = ["experiment=effective_paths"]
    subset = [0.5, 0.6, 0.55, 0.52, 0.58]
    arms_sweep(tmp_path / "sweep", {"subset": subset, "full": [0.1, 0.12, 0.11]}, overrides=exp)
    arms_sweep(tmp_path / "later", {"full": [0.13, 0.09]}, overrides=exp, first_seed=3)
    arms_sweep(tmp_path / "lesions", {"full": [0.7, 0.8]}, overrides=["experiment=delete_single"])
    rep.report(tmp_path)
    res = json.loads((tmp_path / "report" / "effective_paths.json").read_text())
    assert sorted(res["arms"]["full"]["errors"]) == [0.09, 0.1, 0.11, 0.12, 0.13]
    assert res["comparisons"]["k=4/9"]["paired_t"]["seeds"] == 5


def test_effective_paths_one_comparison_per_data_set(tmp_path):
    """A results folder holding the Sec. 5 sweeps of two data sets: each is compared on its own
    (seed 0 of one data set is not paired with seed 0 of the other)."""
    digits = {"subset": [0.5, 0.6, 0.55], "full": [0.02, 0.03, 0.025]}
    fashion = {"subset": [0.13, 0.14, 0.15], "full": [0.12, 0.13, 0.14]}
    arms_sweep(tmp_path / "a", digits, data="digits")
    arms_sweep(tmp_path / "b", fashion, data="fashion_mnist")
    md = rep.report(tmp_path).read_text()
    for data, errors in (("digits", digits), ("fashion_mnist", fashion)):
        assert f"## Sec. 5: effective-path training ({data})" in md
        res = json.loads((tmp_path / "report" / f"effective_paths_{data}.json").read_text())
        assert res["arms"]["full"]["errors"] == errors["full"]
        assert res["arms"]["k=4/9"]["errors"] == errors["subset"]
        assert res["comparisons"]["k=4/9"]["paired_t"]["seeds"] == 3
    assert (tmp_path / "report" / "effective_paths_fashion_mnist.png").is_file()
    assert not (tmp_path / "report" / "effective_paths.json").exists()


def test_effective_paths_one_comparison_per_training_length(tmp_path):
    """Sec. 5 at two training lengths in one folder: each length is compared on its own (seed 0
    at 400 steps is no replicate of seed 0 at 1,600), and the claim reads the longest."""
    short = {"subset": [0.5, 0.6, 0.55], "full": [0.02, 0.03, 0.025]}
    long = {"subset": [0.031, 0.02, 0.03], "full": [0.02, 0.03, 0.025]}
    arms_sweep(tmp_path / "400", short, steps=400, overrides=["trainer.max_steps=400"])
    arms_sweep(tmp_path / "1600", long, steps=1600, overrides=["trainer.max_steps=1600"])
    md = rep.report(tmp_path).read_text()
    for steps, errors in ((400, short), (1600, long)):
        assert f"## Sec. 5: effective-path training ({steps:,} steps)" in md
        res = json.loads((tmp_path / "report" / f"effective_paths_{steps}.json").read_text())
        assert res["arms"]["k=4/9"]["errors"] == errors["subset"] and res["steps"] == [steps]
        assert res["comparisons"]["k=4/9"]["paired_t"]["seeds"] == 3
    assert not (tmp_path / "report" / "effective_paths.json").exists()
    claims = pd.read_csv(tmp_path / "report" / "claims.csv").set_index("figure")
    assert claims.loc["Sec. 5", "measured"].startswith("at 1,600 steps: k=4/9: 2.7% vs 2.5%")
    assert claims.loc["Sec. 5", "verdict"] == "measured: holds at 1,600 steps (400 steps: fails)"


def test_effective_paths_never_pools_a_length_full_training_lacks(tmp_path):
    """Block-subset runs at 400 and 1,600 steps, full training at 400 only (the long schedule's
    23-block arm kept before its full arm): the 1,600-step runs are no extra seeds of the 400-step
    comparison; they are left out, and the report and the claim say which length they compare."""
    short = {"subset": [0.5, 0.6, 0.55], "full": [0.02, 0.03, 0.025]}
    arms_sweep(tmp_path / "400", short, steps=400, overrides=["trainer.max_steps=400"])
    arms_sweep(tmp_path / "1600", {"subset": [0.02, 0.03, 0.025]}, steps=1600)
    md = rep.report(tmp_path).read_text()
    res = json.loads((tmp_path / "report" / "effective_paths_400.json").read_text())
    assert res["arms"]["k=4/9"]["errors"] == short["subset"]
    assert res["comparisons"]["k=4/9"]["paired_t"]["seeds"] == 3
    assert "block-subset runs trained for 1,600 steps are left out" in md
    claims = pd.read_csv(tmp_path / "report" / "claims.csv").set_index("figure")
    assert claims.loc["Sec. 5", "measured"].startswith("at 400 steps: k=4/9: 55.0% vs 2.5%")


def test_effective_paths_arms_of_different_budgets_compare_once(tmp_path):
    """Block-subset training for 800 steps against full training for 400 (one compute budget):
    one comparison, and the claim reads the same one (not each length alone, arm-less)."""
    sweep = arms_sweep(
        tmp_path, {"subset": [0.03, 0.02, 0.025], "full": [0.02, 0.03, 0.025]}, steps=800
    )
    for job in (3, 4, 5):  # the full arm's jobs: 400 steps
        f = sweep / str(job) / "metrics.json"
        f.write_text(json.dumps(json.loads(f.read_text()) | {"step": 400, "global_step": 400}))
    rep.report(tmp_path)
    res = json.loads((tmp_path / "report" / "effective_paths.json").read_text())
    assert res["steps"] == [400, 800] and not res["same_step_budget"]
    claims = pd.read_csv(tmp_path / "report" / "claims.csv").set_index("figure")
    assert claims.loc["Sec. 5", "measured"].startswith("k=4/9: 2.5% vs 2.5%")
    assert claims.loc["Sec. 5", "verdict"] == "measured: holds"


def test_effective_paths_needs_two_arms_and_seeds(tmp_path):
    arms_sweep(tmp_path / "same", {"subset": [0.1, 0.2, 0.15], "full": [0.2, 0.1, 0.15]})
    rep.report(tmp_path / "same")
    res = json.loads((tmp_path / "same" / "report" / "effective_paths.json").read_text())
    assert not res["comparisons"]["k=4/9"]["significant"] and res["arms"]["full"]["runs"] == 3
    arms_sweep(tmp_path / "few", {"subset": [0.1], "full": [0.2]})
    md = rep.report(tmp_path / "few").read_text()
    assert "Not compared: need at least 2 seeds per arm" in md
    claims = pd.read_csv(tmp_path / "few" / "report" / "claims.csv").set_index("figure")
    assert claims.loc["Sec. 5", "measured"].startswith("no test (full: 1 seed, k=4/9: 1 seed)")
    assert claims.loc["Sec. 5", "verdict"] == "measured: untested"
    with pytest.raises(ConfigError, match="alpha"):
        rep.report(tmp_path / "few", alpha=1.5)
    # 2 seeds per arm: a gap no test can call significant decides nothing; a significant one does
    arms_sweep(tmp_path / "two", {"subset": [0.1, 0.3], "full": [0.02, 0.03]})
    rep.report(tmp_path / "two")
    claims = pd.read_csv(tmp_path / "two" / "report" / "claims.csv").set_index("figure")
    assert "(not decided: 2 seeds per arm" in claims.loc["Sec. 5", "measured"]
    assert claims.loc["Sec. 5", "verdict"] == "measured: untested"
    arms_sweep(tmp_path / "gap", {"subset": [0.5, 0.51], "full": [0.02, 0.03]})
    rep.report(tmp_path / "gap")
    claims = pd.read_csv(tmp_path / "gap" / "report" / "claims.csv").set_index("figure")
    assert claims.loc["Sec. 5", "verdict"] == "measured: fails"


def test_effective_paths_never_compares_arms_trained_in_different_precisions(tmp_path):
    """The arms of a comparison may train on different CPUs, and `trainer.precision`'s auto
    choice differs between them (bf16 where the CPU has it natively): such arms are not
    compared, and the report says why; arms trained alike (or of runs that predate the record)
    are."""
    sub, full = [0.10, 0.12, 0.11], [0.08, 0.09, 0.085]
    mixed = {"subset": "bf16-mixed", "full": "32-true"}
    arms_sweep(tmp_path / "mixed", {"subset": sub, "full": full}, precision=mixed)
    md = rep.report(tmp_path / "mixed").read_text()
    assert (
        "Not compared: the runs trained in different precisions (32-true: full; bf16-mixed: "
        "k=4/9): retrain one arm with the other's trainer.precision." in md
    )
    assert not (tmp_path / "mixed" / "report" / "effective_paths.json").exists()
    alike = {"subset": "bf16-mixed", "full": "bf16-mixed"}
    arms_sweep(tmp_path / "alike", {"subset": sub, "full": full}, precision=alike)
    rep.report(tmp_path / "alike")
    res = json.loads((tmp_path / "alike" / "report" / "effective_paths.json").read_text())
    assert res["comparisons"]["k=4/9"]["significant"]


def test_claims_table_per_data_set(tmp_path):
    """The claims table: measured values from the tables, one column per data set, verdicts by
    the stated rules; a data set without a study says so."""
    job = 0

    def run(data, model, rows, study="delete_single", **facts):
        nonlocal job
        metrics = {"test_error": rows[0]["baseline"], "model": model, "seed": 0, "data": data}
        metrics |= {"training": "standard", "n_blocks": len(rows), "k": len(rows)} | facts
        fake_run(tmp_path / f"{data}_{job}", [f"model={model}"], metrics, {study: rows})
        job += 1

    def single(errors, base, down=(1,)):
        return [
            {"block": b, "stage": 0, "downsampling": b in down, "error": e, "baseline": base}
            for b, e in enumerate(errors)
        ]

    run("digits", "resnet110", single([0.03, 0.4, 0.031, 0.05], 0.025))
    run("digits", "vgg15", single([0.85, 0.9, 0.88], 0.011, down=()))
    run("fashion_mnist", "resnet110", single([0.2, 0.5, 0.3, 0.25], 0.1))
    # Fig. 8 compares one network under both trainings: ResNet-200's mild downsampling deletions
    # (no stochastic-depth run of it) must not dilute standard training's side
    run(
        "fashion_mnist",
        "resnet110",
        single([0.2, 0.3, 0.3, 0.25], 0.1),
        training="stochastic_depth",
    )
    run("fashion_mnist", "resnet200", single([0.11, 0.11, 0.15, 0.15], 0.1, down=(0, 1)))
    many = [
        {"k": k, "trial": 0, "deleted": "", "error": 0.05 + 0.04 * k, "baseline": 0.05}
        for k in range(6)
    ]
    run("digits", "resnet110", many, study="delete_many")
    # a ViT on the same data (its blocks name a kind): not one of the paper's networks, left out
    vit = [
        dict(r, kind=("attn", "mlp")[b % 2], layer=b // 2)
        for b, r in enumerate(single([0.9, 0.95, 0.9, 0.9], 0.02, down=()))
    ]
    run("digits", "vit_tiny", vit)
    rep.report(tmp_path)
    claims = pd.read_csv(tmp_path / "report" / "claims.csv").set_index("figure")
    assert list(claims.columns) == ["paper", "test", "digits", "fashion_mnist", "verdict"]
    # ResNet: median rise over blocks 0, 2, 3 = 0.031 - 0.025 on digits, 0.25 - 0.1 on Fashion
    assert claims.loc["Fig. 3/4", "digits"].startswith("median rise +0.6 pp (1 run)")
    assert "downsampling blocks up to +37.5 pp" in claims.loc["Fig. 3/4", "digits"]
    # Fashion: the mean over runs of the median rise, 0.15 (ResNet-110) and 0.05 (ResNet-200)
    assert claims.loc["Fig. 3/4", "fashion_mnist"].startswith("median rise +10.0 pp (2 runs)")
    assert claims.loc["Fig. 8", "fashion_mnist"] == (
        "downsampling deletions: +20.0 pp (stochastic depth) vs +40.0 pp (standard)"
    )
    assert claims.loc["Fig. 8", "verdict"] == "-; fashion_mnist: holds"
    assert claims.loc["Fig. 3/4", "verdict"] == "digits: holds; fashion_mnist: fails"
    vgg = claims.loc[claims.paper.str.contains("VGG")].iloc[0]
    assert vgg.digits == "every deletion: error >= 85.0% (chance 90%)"
    assert vgg.fashion_mnist == "not measured" and vgg.verdict == "digits: holds; -"
    assert "largest step +4.0 pp" in claims.loc["Fig. 5a", "digits"]
    assert claims.loc["Fig. 5a", "verdict"].startswith("digits: holds")
    assert claims.loc["Sec. 5", "digits"] == "not measured"
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Claims" in md and "| figure | paper | digits | fashion_mnist | verdict |" in md


def test_figures_leave_the_matplotlib_backend_alone():
    """Importing and drawing changes no global matplotlib state (a notebook keeps its backend)."""
    code = (
        "import matplotlib, sys; before = matplotlib.rcParams._get_backend_or_none(); "
        "import src.figures, src.report, src.analysis.delete_single, src.analysis.path_stats; "
        "import pandas as pd; "
        "t = pd.DataFrame({'block': [0, 1], 'downsampling': [False, True], 'error': [0.1, 0.5], "
        "'baseline': [0.05, 0.05]}); src.figures.delete_single(t); "
        "assert matplotlib.rcParams._get_backend_or_none() == before, before; "
        "print(before)"
    )
    env = {"MPLBACKEND": "svg", "PATH": ""}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "svg"


def test_claims_at_the_longest_training(tmp_path):
    """Runs of several training lengths: each claim states its value and verdict at the longest
    length that decides it, the other lengths' verdicts beside it; block-subset training with
    k = n (every block every step) is full training for the lesion claims."""
    job = 0

    def many(steps, jump, training="standard", k=6, seeds=(0,)):
        nonlocal job
        for seed in seeds:
            errors = [0.05 + 0.02 * i for i in range(6)]
            errors[3:] = [e + jump for e in errors[3:]]  # one k where the error jumps
            rows = [
                {"k": i, "trial": 0, "deleted": "", "error": e, "baseline": 0.05}
                for i, e in enumerate(errors)
            ]
            metrics = {"test_error": 0.05, "model": "resnet20", "seed": seed, "data": "digits"}
            metrics |= {"training": training, "n_blocks": 6, "k": k, "step": steps}
            overrides = ["model=resnet20", f"trainer.max_steps={steps}"]
            fake_run(tmp_path / f"job{job}", overrides, metrics, {"delete_many": rows})
            job += 1

    many(400, 0.30)  # not smooth after 400 steps
    many(1600, 0.0, training="block_subset")  # k = n = 6: full training, smooth
    many(6400, 0.0, training="block_subset", k=2)  # 2 of 6 blocks per step: not the claim's
    rep.report(tmp_path)
    claims = pd.read_csv(tmp_path / "report" / "claims.csv").set_index("figure")
    assert claims.loc["Fig. 5a", "digits"].startswith("at 1,600 steps: error 5.0% at k=0")
    assert "largest step +2.0 pp" in claims.loc["Fig. 5a", "digits"]
    assert claims.loc["Fig. 5a", "verdict"] == "digits: holds at 1,600 steps (400 steps: fails)"
    assert claims.loc["Fig. 6b", "digits"] == "not measured"
