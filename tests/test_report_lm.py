"""The sweep report over a language model's tables: headlines written for an `error` column read
its `loss` column, in nats, instead of failing on the missing column (issue 19)."""

from __future__ import annotations

import pandas as pd

from src import results
from src.report import report


def test_report_of_a_language_model_reads_loss_in_nats(tmp_path):
    rows = pd.DataFrame(
        {
            "block": range(4),
            "stage": 0,
            "downsampling": False,
            "layer": [0, 0, 1, 1],
            "kind": ["attn", "mlp"] * 2,
            "loss": [2.6, 2.7, 2.5, 2.6],
            "baseline": 2.5,
        }
    )
    meta = {"model": "hf_causal_lm", "data": "text", "metric": "loss", "n_blocks": 4}
    t = results.tidy("delete_single", rows, meta)
    results.write_table(tmp_path / "run" / "analysis" / "delete_single.parquet", t)
    md = report(tmp_path).read_text()
    assert "mean loss rise over baseline (non-downsampling blocks): 0.100 nats" in md
    assert "%" not in md.split("## Fig. 3")[1].split("## Claims")[0]
