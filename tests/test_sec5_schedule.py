"""experiments/sec5_schedule.py on a synthetic results store (the layout
experiments/sec5_schedule.sh keeps): per-seed gaps, their paired test, Fig. 5a's largest step and
the trend across lengths come out as computed by hand."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "sec5_schedule", REPO / "experiments/sec5_schedule.py"
)
sec5 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sec5)

# per length: full training's error per seed, and rescale's gap per seed (pp)
FULL = {100: [0.02, 0.03, 0.04], 1000: [0.01, 0.02, 0.03]}
RESCALE = {100: [4.0, 5.0, 6.0], 1000: [1.0, 2.0, 3.0]}


def run(d: Path, error: float, lesion: list[float] | None = None) -> None:
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"test_error": error}))
    (d / "precision.txt").write_text("precision 32-true, memory format contiguous: no bf16\n")
    if lesion is not None:  # delete_many's rows: mean error per k = lesion[k]
        (d / "analysis").mkdir()
        rows = [
            {"k": k, "trial": t, "error": e + (t - 0.5) * 1e-3}
            for k, e in enumerate(lesion)
            for t in (0, 1)
        ]
        pd.DataFrame(rows).to_parquet(d / "analysis" / "delete_many.parquet")


@pytest.fixture
def store(tmp_path):
    for steps, errors in FULL.items():
        root = tmp_path / "store" / f"quick_{steps}"
        for s, e in enumerate(errors):
            run(root / f"train/k54_seed{s}", e, [e, e + 0.05, e + 0.30])  # largest step 25 pp
            run(root / f"retest/k54_seed{s}_delete_many_recalibrate", e, [e, e + 0.02, e + 0.04])
            run(root / f"train/k23_seed{s}", 0.9)
            run(root / f"retest/k23_seed{s}_rescale", e + RESCALE[steps][s] / 100)
            run(root / f"retest/k23_seed{s}_recalibrate", e + 0.01 * (s + 1))
            run(root / f"retest/k23_seed{s}_ensemble", e + 0.02 + 0.003 * s)
        run(root / "train/k54_seed3", 0.05)  # an unfinished seed: counted nowhere
    return tmp_path


def test_table_and_trend(store, capsys):
    out = store / "out"
    sec5.main(["--root", str(store / "store"), "--out", str(out)])
    t = pd.read_csv(out / "sec5_schedule.csv").set_index(["steps", "arm"])
    assert t.loc[(100, "full training")].error == pytest.approx(0.03)
    assert t.loc[(100, "full training")].seeds == 3
    assert t.loc[(100, "full training")].precision == "32-true"
    r = t.loc[(100, "23/54 rescale")]
    # mean 5 pp, sd 1: CI half-width t(0.975, 2) / sqrt(3); one-sample t = 5 sqrt(3)
    assert r.gap_pp == pytest.approx(5.0)
    assert r.gap_ci_pp == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert r.paired_p == pytest.approx(2 * (1 - sec5.sps.t.cdf(5 * math.sqrt(3), 2)), rel=1e-4)
    assert t.loc[(1000, "23/54 full")].gap_pp == pytest.approx(100 * (0.9 - 0.02))
    assert t.loc[(1000, "Fig. 5a largest step, bn=eval")].gap_pp == pytest.approx(25.0)
    assert t.loc[(1000, "Fig. 5a largest step, bn=recalibrate")].gap_pp == pytest.approx(2.0)

    f = pd.read_csv(out / "sec5_schedule_trend.csv").set_index("arm")
    r = f.loc["23/54 rescale"]  # means 5 and 2 pp a decade apart: -3 pp per decade
    assert r.slope_pp_per_decade == pytest.approx(-3.0)
    assert r.at_64k_pp == pytest.approx(11.0 - 3.0 * math.log10(64_000))
    assert r.points == 6 and r.slope_p < 0.05 and r.at_64k_ci_pp > 0
    assert f.loc["Fig. 5a largest step, bn=eval"].slope_pp_per_decade == pytest.approx(
        0.0, abs=1e-9
    )
    assert (out / "sec5_schedule_quick.png").stat().st_size > 10_000

    table = capsys.readouterr().out
    assert "| full training | 3.00% (3 seeds) | 2.00% (3 seeds) |" in table
    assert (
        "| 23/54 rescale | +5.00 ± 2.48 pp, p=0.013 | +2.00 ± 2.48 pp, p=0.074 | -3.00 ±" in table
    )


def test_rows_count_the_seeds_that_finished_them(tmp_path, capsys):
    """A seed whose re-estimated lesion sweep has not run counts in the Sec. 5 rows and in
    Fig. 5a with trained statistics, not in Fig. 5a with re-estimated ones, whose cell says so."""
    root = tmp_path / "store/medium_700"
    for s in range(3):
        run(root / f"train/k54_seed{s}", 0.1, [0.1, 0.2])
        if s < 2:
            run(root / f"retest/k54_seed{s}_delete_many_recalibrate", 0.1, [0.1, 0.1 + 0.01 * s])
        run(root / f"train/k23_seed{s}", 0.9)
        for rule, gap in (("rescale", 0.05), ("recalibrate", 0.04), ("ensemble", 0.03)):
            run(root / f"retest/k23_seed{s}_{rule}", 0.1 + gap + 0.01 * s)
    out = tmp_path / "out"
    sec5.main(["--root", str(tmp_path / "store"), "--out", str(out)])
    t = pd.read_csv(out / "sec5_schedule.csv").set_index("arm")
    assert t.loc["full training"].seeds == 3 and t.loc["23/54 rescale"].seeds == 3
    assert t.loc["23/54 rescale"].gap_pp == pytest.approx(6.0)
    assert t.loc["Fig. 5a largest step, bn=eval"].seeds == 3
    r = t.loc["Fig. 5a largest step, bn=recalibrate"]
    assert r.seeds == 2 and r.gap_pp == pytest.approx(0.5)
    table = capsys.readouterr().out
    assert "| Fig. 5a largest step, bn=recalibrate | +0.50 ± 6.35 pp (2 seeds) |" in table
    assert "| Fig. 5a largest step, bn=eval | +10.00 ± 0.00 pp |" in table


def test_no_finished_length(tmp_path):
    run(tmp_path / "quick_400/train/k54_seed0", 0.02)
    with pytest.raises(SystemExit, match="no length with 2 finished seeds"):
        sec5.main(["--root", str(tmp_path), "--out", str(tmp_path / "out")])


def test_committed_table_is_the_stores(tmp_path):
    """`python experiments/sec5_schedule.py` (its defaults: the committed store in, figures
    out) rebuilds experiments/figures/sec5_schedule.csv as committed: the table the docs quote
    is the store's."""
    res = subprocess.run(
        [sys.executable, str(REPO / "experiments/sec5_schedule.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    built = pd.read_csv(tmp_path / "experiments/figures/sec5_schedule.csv")
    committed = pd.read_csv(REPO / "experiments/figures/sec5_schedule.csv")
    pd.testing.assert_frame_equal(built, committed, rtol=1e-5)
    assert "| full training |" in res.stdout


def test_store_keeps_results_and_skips_finished_runs(tmp_path):
    """experiments/store.sh, which the measurement scripts source: `keep` copies a run's
    metrics, overrides, chosen precision, analysis tables and headline numbers (never its
    checkpoints, logs or figures) into the store; `run` starts nothing for a run that has
    finished."""
    r = tmp_path / "outputs/a/k54_seed0"
    (r / ".hydra").mkdir(parents=True)
    (r / "analysis").mkdir()
    (r / "checkpoints").mkdir()
    (r / "metrics.json").write_text('{"test_error": 0.02}')
    (r / ".hydra/overrides.yaml").write_text("- seed=0\n")
    (r / "run.log").write_text(
        "[t][src.run][INFO] - precision 32-true, memory format contiguous: no bf16\n"
    )
    (r / "analysis/delete_many.parquet").write_bytes(b"table")
    (r / "analysis/delete_many.png").write_bytes(b"figure")
    (r / "analysis/delete_many.csv").write_bytes(b"k,error\n")
    (r / "analysis/summary.json").write_text('{"delete_many": {}}')
    (r / "checkpoints/last.ckpt").write_bytes(b"weights")
    script = (
        f"source {REPO / 'experiments/store.sh'}; python() {{ echo started; }}; "
        "keep outputs/a store/a k54_seed0; run outputs/a/k54_seed0 seed=0; run outputs/a/new seed=1"
    )
    res = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert res.stdout == "started\n"  # the finished run is skipped, the new one starts
    kept = tmp_path / "store/a/k54_seed0"
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()) == [
        "analysis/delete_many.parquet",
        "analysis/summary.json",
        "metrics.json",
        "overrides.yaml",
        "precision.txt",
    ]
    assert (kept / "precision.txt").read_text() == (
        "precision 32-true, memory format contiguous: no bf16\n"
    )


def test_arms_kept_apart_count_once_both_are_there(store, capsys):
    """experiments/sec5_schedule.sh keeps each arm of a seed as soon as it finishes (ARMS=23 in
    one session, ARMS=54 in another): a length holding only 23-block arms is left out, and a seed
    whose 23-block arm is kept without its full arm counts in no Sec. 5 row."""
    root = store / "store" / "quick_1000"
    for s in (5, 6):  # two more seeds at 1,000 steps: only their 23-block arm is kept
        run(root / f"train/k23_seed{s}", 0.9)
        for rule in ("rescale", "recalibrate", "ensemble"):
            run(root / f"retest/k23_seed{s}_{rule}", 0.5)
    only23 = store / "store" / "quick_4000"
    for s in range(3):
        run(only23 / f"train/k23_seed{s}", 0.9)
        for rule in ("rescale", "recalibrate", "ensemble"):
            run(only23 / f"retest/k23_seed{s}_{rule}", 0.02)
    out = store / "out"
    sec5.main(["--root", str(store / "store"), "--out", str(out)])
    t = pd.read_csv(out / "sec5_schedule.csv").set_index(["steps", "arm"])
    assert sorted(set(t.index.get_level_values("steps"))) == [100, 1000]
    assert t.loc[(1000, "23/54 rescale")].seeds == 3
    assert t.loc[(1000, "23/54 rescale")].gap_pp == pytest.approx(2.0)


def test_seed_whose_arms_trained_in_different_precisions_is_left_out(store, capsys):
    """The arms of a seed may be trained on different CPUs: a 23-block arm trained in bf16
    beside an fp32 full arm is no paired comparison, so that seed leaves the Sec. 5 rows (with
    a line that names it) and keeps its Fig. 5a rows, which use the full arm alone."""
    root = store / "store" / "quick_100"
    (root / "train/k23_seed2/precision.txt").write_text(
        "precision bf16-mixed, memory format channels_last: the CPU has native bf16\n"
    )
    out = store / "out"
    sec5.main(["--root", str(store / "store"), "--out", str(out)])
    t = pd.read_csv(out / "sec5_schedule.csv").set_index(["steps", "arm"])
    assert t.loc[(100, "full training")].seeds == 2
    assert t.loc[(100, "full training")].error == pytest.approx(0.025)
    assert t.loc[(100, "23/54 rescale")].gap_pp == pytest.approx(4.5)  # seeds 0, 1: 4 and 5 pp
    assert t.loc[(100, "Fig. 5a largest step, bn=eval")].seeds == 3
    assert t.loc[(1000, "23/54 rescale")].seeds == 3  # the other length is untouched
    err = capsys.readouterr().err
    assert "quick_100 seed 2 left out of Sec. 5: its arms trained in 32-true and bf16-mixed" in err
