"""The results layer: every analysis is one tidy table, written and read back in one place.

A run's analysis writes `<run dir>/analysis/<study>.parquet` (typed columns) and `<study>.csv`
(the same rows), with the run's metadata columns (`META`: run id, study, model, data, training
mode, n_blocks, blocks per training step, seed, metric) beside the study's own; its headline
numbers go to `analysis/summary.json`, its figure to `analysis/<study>.png`, and the same table
and figure to every attached W&B logger.

`load(<dir>)` reads a results folder of any shape (one run, a local multirun, a Slurm array, DDP
jobs: whatever lies below `<dir>`) into one DataFrame; `runs(<dir>)` gives one row per run
(`metrics.json` and the run's command-line overrides). In a notebook:

    from src.results import load, runs
    df = load("outputs/delete_many/multirun_2026-11-27_10-00-00_ab12cd")
    df.groupby(["model", "k"]).error.mean()
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import yaml

# Metadata columns of every table, in this order. `blocks_per_step` is metrics.json's `k` (blocks
# each training step ran; empty when it varies, as under stochastic depth), named apart from
# delete_many's own column `k`; `metric` names what the value column measures (classification
# error here; a language model's analyses measure loss); `step` is the optimizer step of the
# weights a row measured (an analysis during training records one set of rows per step).
META = (
    "run_id",
    "study",
    "model",
    "data",
    "training",
    "n_blocks",
    "blocks_per_step",
    "seed",
    "metric",
    "step",
)
DPI = 150


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write via a temp file + rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path


def write_json(path: Path, obj) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")


def update_json(path: Path, updates: dict) -> Path:
    """Merge `updates` into the JSON object at `path` (created if missing)."""
    path = Path(path)
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(updates)
    return write_json(path, current)


def save_figure(fig, path: Path) -> Path:
    """A matplotlib `Figure` (object API, no pyplot state) as a PNG, written atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return atomic_write(path, buf.getvalue())


def write_table(path: Path, table: pd.DataFrame) -> Path:
    """`table` as `<path>.parquet` and `<path>.csv` (same rows and columns); returns the CSV."""
    path = Path(path)
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    atomic_write(path.with_suffix(".parquet"), buf.getvalue())
    return atomic_write(path.with_suffix(".csv"), table.to_csv(index=False, lineterminator="\n"))


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV as dicts of strings (for a quick look; tables load typed with `load`)."""
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tidy(study: str, rows: Sequence[dict] | pd.DataFrame, meta: dict) -> pd.DataFrame:
    """The study's rows with the run's metadata columns in front (`META` order)."""
    table = pd.DataFrame(rows).reset_index(drop=True)
    meta = dict(meta)
    if "k" in meta:  # a run's facts name it `k`, as metrics.json does
        meta["blocks_per_step"] = meta.pop("k")
    front = dict.fromkeys(META) | {"metric": "error"} | meta | {"study": study}
    cols = {c: front[c] for c in META}
    meta_frame = pd.DataFrame({c: [v] * len(table) for c, v in cols.items()})
    meta_frame = meta_frame.astype(
        {"n_blocks": "Int64", "blocks_per_step": "Int64", "seed": "Int64", "step": "Int64"}
        | {c: "string" for c in STRINGS}
    )
    clash = sorted(set(table.columns) & set(META))
    if clash:
        raise ValueError(f"{study}'s columns {clash} would shadow the run's metadata columns")
    return pd.concat([meta_frame, table], axis=1)


STRINGS = ("run_id", "study", "model", "data", "training", "metric")


def steps(table: pd.DataFrame) -> list[int]:
    """The optimizer steps a table's rows measured, in order (none: no `step` column or no
    value in it)."""
    if "step" not in table:
        return []
    return sorted(int(s) for s in table["step"].dropna().unique())


def latest_step(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the table's latest step (a table of one step, or of none: all rows)."""
    found = steps(table)
    if len(found) < 2:
        return table
    return table[table["step"] == found[-1]]


def with_earlier_steps(path: Path, table: pd.DataFrame) -> pd.DataFrame:
    """`table` (one step's rows) after the rows of the other steps already in `<path>.parquet`
    (an analysis during training, src/analysis/base.py), ordered by step: a step measured again
    replaces its rows."""
    file = Path(path).with_suffix(".parquet")
    if not file.is_file():
        return table
    old = pd.read_parquet(file)
    if "step" not in old or list(old.columns[: len(META)]) != list(META):
        return table  # a table of an older layout: this call's rows stand alone
    new = table["step"].dropna().unique()
    same = old["step"].isna() if not len(new) else old["step"].isin(new)
    old = old[~same.fillna(False).astype(bool)]
    if old.empty:
        return table
    both = pd.concat([old, table], ignore_index=True)
    return both.sort_values("step", kind="stable", na_position="last", ignore_index=True)


def record(
    out_dir: Path,
    study: str,
    table: pd.DataFrame,
    summary: dict | None = None,
    figure=None,
    loggers: Iterable = (),
) -> pd.DataFrame:
    """Write one study's tidy table (Parquet + CSV), its headline numbers (`summary.json` entry
    `study`), its figure (`<study>.png`), and send table and figure to every WandbLogger."""
    out_dir = Path(out_dir)
    write_table(out_dir / study, table)
    if summary is not None:
        update_json(out_dir / "summary.json", {study: summary})
    image = save_figure(figure, out_dir / f"{study}.png") if figure is not None else None
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            cells = table.astype(object).where(table.notna(), None)  # W&B's JSON has no NA
            logger.log_table(key=f"{study}/table", dataframe=cells)
            if image is not None:
                logger.log_image(key=f"{study}/figure", images=[str(image)])
    return table


# --- reading results back -----------------------------------------------------------------------


def _check_dir(path: Path) -> Path:
    from src.errors import ConfigError

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(
            f"{path} is not a directory: pass a run or sweep directory under outputs/"
        )
    return path


def _natural(p: Path) -> tuple:
    """Sweep order: job 2 before job 10."""
    return tuple((0, int(x), "") if x.isdigit() else (1, 0, x) for x in p.parts)


def load(path: str | Path, study: str | None = None) -> pd.DataFrame:
    """Every analysis table below `path` (a run, a sweep, a Slurm array, ...) as one DataFrame,
    with a `run_dir` column (relative to `path`); only `study`'s rows when given. Columns that a
    study does not have are missing values in its rows."""
    path = _check_dir(path)
    pattern = f"analysis/{study}.parquet" if study else "analysis/*.parquet"
    files = sorted(path.rglob(pattern), key=_natural)
    tables = []
    for f in files:
        t = pd.read_parquet(f)
        # nullable booleans and integers: a study's columns stay typed where another study's
        # rows leave them missing
        t = t.astype({c: "boolean" for c in t if t[c].dtype == bool})
        t = t.astype({c: "Int64" for c in t if pd.api.types.is_integer_dtype(t[c].dtype)})
        t.insert(0, "run_dir", str(f.parent.parent.relative_to(path)))
        tables.append(t)
    if not tables:
        return pd.DataFrame(columns=["run_dir", *META])
    return pd.concat(tables, ignore_index=True)


def overrides(run_dir: Path) -> dict[str, str]:
    """The run's command-line overrides (`.hydra/overrides.yaml`, or `overrides.yaml` where a
    results store keeps a run without its .hydra folder) as {key: value}."""
    f = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not f.is_file():
        f = Path(run_dir) / "overrides.yaml"
    items = yaml.safe_load(f.read_text()) if f.is_file() else []
    return dict(o.lstrip("+~").split("=", 1) for o in items or [] if "=" in o)


def runs(path: str | Path) -> pd.DataFrame:
    """One row per finished run below `path` (a `metrics.json`): its metrics and run facts, a
    `run_dir` column (relative to `path`) and its overrides as `overrides` ({key: value})."""
    path = _check_dir(path)
    rows = []
    for f in sorted(path.rglob("metrics.json"), key=_natural):
        run_dir = f.parent
        rows.append(
            {
                "run_dir": str(run_dir.relative_to(path)),
                **json.loads(f.read_text()),
                "overrides": overrides(run_dir),
            }
        )
    return pd.DataFrame(rows)
