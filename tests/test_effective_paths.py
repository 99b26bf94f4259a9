"""Effective-path training report (paper Sec. 5): arms from run configs, scipy.stats tests."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf
from scipy import stats

from src.analysis.effective_paths import FULL, compare, load_runs, main, report
from src.errors import ConfigError
from tests.plots import colour_pixels

MODEL = {"_target_": "src.models.preact_resnet_cifar", "blocks_per_stage": 3}


def fake_sweep(root, errors: dict[str, list[float]], k_full: bool = False):
    """A multirun dir: one job per (arm, seed) with .hydra/config.yaml and metrics.json."""
    job = 0
    for arm, errs in errors.items():
        for seed, err in enumerate(errs):
            if arm == "subset":
                training = {"_target_": "src.training.BlockSubset", "k": 4, "test_mode": "full"}
            elif k_full:
                training = {"_target_": "src.training.BlockSubset", "k": 9, "test_mode": "full"}
            else:
                training = {"_target_": "src.training.Standard"}
            d = root / str(job)
            (d / ".hydra").mkdir(parents=True)
            cfg = {"model": MODEL, "training": training, "seed": seed}
            OmegaConf.save(OmegaConf.create(cfg), d / ".hydra" / "config.yaml")
            (d / "metrics.json").write_text(json.dumps({"test_error": err, "global_step": 400}))
            job += 1
    return root


@pytest.mark.parametrize("k_full", [False, True])
def test_report_compares_arms(tmp_path, k_full):
    sub, full = [0.10, 0.12, 0.11, 0.13], [0.08, 0.09, 0.085, 0.095]
    fake_sweep(tmp_path, {"subset": sub, "full": full}, k_full)
    runs = load_runs(tmp_path)
    assert sorted({r["arm"] for r in runs}) == ["full", "k=4/9"]
    res = report(tmp_path)
    assert res["welch_t"]["p_value"] == pytest.approx(
        stats.ttest_ind(sub, full, equal_var=False).pvalue
    )
    assert res["paired_t"]["p_value"] == pytest.approx(stats.ttest_rel(sub, full).pvalue)
    assert res["difference_subset_minus_full"] == pytest.approx(sum(sub) / 4 - sum(full) / 4)
    assert res["significant"] and res["same_step_budget"]
    saved = json.loads((tmp_path / "effective_paths.json").read_text())
    assert {k: v for k, v in saved.items() if k != "runs"} == json.loads(json.dumps(res))
    assert sorted((r["arm"], r["seed"], r["test_error"]) for r in saved["runs"]) == sorted(
        [("k=4/9", s, e) for s, e in enumerate(sub)] + [("full", s, e) for s, e in enumerate(full)]
    )
    md = (tmp_path / "effective_paths.md").read_text()
    assert f"| k=4/9 | 4 | {sum(sub) / 4:.4f} | {stats.tstd(sub):.4f} |" in md
    assert f"| full | 4 | {sum(full) / 4:.4f} | {stats.tstd(full):.4f} |" in md
    assert (
        f"| welch_t | {res['welch_t']['statistic']:.3f} | {res['welch_t']['p_value']:.4f} |" in md
    )
    for r in saved["runs"]:  # one row per job
        assert f"| {r['job']} | {r['arm']} | {r['seed']} | {r['test_error']:.4f} |" in md
    # one translucent dot per run, each arm in its own colour
    dots = {"subset": ("C0", 0.6), "full": ("C1", 0.6)}
    px = colour_pixels(tmp_path / "effective_paths.png", (4, 3.2), dots)
    assert px["subset"] > 50 and px["full"] > 50


def test_identical_arms_are_not_significant(tmp_path):
    fake_sweep(tmp_path, {"subset": [0.1, 0.2, 0.15], "full": [0.2, 0.1, 0.15]})
    res = compare(load_runs(tmp_path))
    assert not res["significant"] and res["arms"][FULL]["runs"] == 3


def test_bad_sweeps(tmp_path):
    fake_sweep(tmp_path / "one", {"subset": [0.1, 0.2]})
    with pytest.raises(ConfigError):
        report(tmp_path / "one")
    fake_sweep(tmp_path / "few", {"subset": [0.1], "full": [0.2]})
    with pytest.raises(ConfigError):
        report(tmp_path / "few")
    assert main([str(tmp_path / "missing")]) == 2
    assert main([]) == 2
