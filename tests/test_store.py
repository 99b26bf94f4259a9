"""experiments/store.sh's `keep`: a finished run's results go to the committed store (metrics,
overrides, the precision it chose, the analysis tables and headline numbers), never its
checkpoints, logs or figures."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_keep_copies_results_and_never_checkpoints(tmp_path):
    run = tmp_path / "outputs/train/k23_seed0"
    for f, text in {
        "metrics.json": '{"test_error": 0.1}',
        ".hydra/overrides.yaml": "- seed=0\n",
        "run.log": "[t][src.run][INFO] - precision 32-true, memory format contiguous: no bf16\n",
        "analysis/delete_many.parquet": "PAR1",
        "analysis/delete_many.csv": "k,error\n",
        "analysis/delete_many.png": "png",
        "analysis/summary.json": '{"delete_many": {}}',
        "checkpoints/last.ckpt": "weights",
    }.items():
        (run / f).parent.mkdir(parents=True, exist_ok=True)
        (run / f).write_text(text)
    subprocess.run(
        ["bash", "-c", f"source {REPO}/experiments/store.sh && keep outputs store train/k23_seed0"],
        cwd=tmp_path,
        check=True,
    )
    kept = tmp_path / "store/train/k23_seed0"
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()) == [
        "analysis/delete_many.parquet",
        "analysis/summary.json",
        "metrics.json",
        "overrides.yaml",
        "precision.txt",
    ]
    assert (kept / "precision.txt").read_text() == (
        "precision 32-true, memory format contiguous: no bf16\n"
    )
