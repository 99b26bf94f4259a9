"""The registry of studies: every analysis table the report, the claims table and the docs know.

A study module under src/analysis/ declares `STUDY = Study(...)`: its name (the table's, the
figure's and the `callbacks.<name>` key's), its default config, its table's own columns, its
figures per metric, its headline in the report and, where the paper makes one, its claim and the
claims-table rules. `registry()` imports every module of src/analysis/ and collects them, so a new
study is one module (and its config): nothing else lists study names (CONTRIBUTING.md).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

CONF = Path(__file__).resolve().parent.parent / "conf"


@dataclass(frozen=True)
class Study:
    """name:     the table (`analysis/<name>.parquet`), figure and `callbacks.<name>` key.
    config:      its default config under conf/ (a group and option: "lesion/delete_single").
    columns:     the table's own columns before the value column (the metric's: `error`, or
                 `loss` and `perplexity`); a transformer's per-block rows add layer,kind.
    figures:     metric -> figure of the study's table (src/figures.py for error,
                 src/lm_figures.py for loss). A table of several steps (an analysis during
                 training) is drawn by a figure marked `draws_steps` as it is (the per-block
                 figures: a block x step heatmap), by any other as its latest step's rows.
    headline:    the report's headline of one group of runs (a table with run_dir, baseline).
    title:       the report's section title.
    claim:       the paper's claim about it (beyond the paper: what the unraveled view predicts),
                 beside our measurement in the report.
    claims:      src/claims.py `Claim`s measured on this study's tables (the claims table).
    section:     the paper's section, the report's order (None: beyond the paper, last).
    merge:       how the report turns the tables of one run's shards (`shard=i/n`; {table:
                 rows of every shard, in item order}) into those the unsharded run writes
                 (src/distributed.py); None: they are those tables already (one row per item,
                 as the lesion studies' plans).
    """

    name: str
    config: str
    columns: tuple[str, ...]
    figures: Mapping[str, Callable]
    headline: Callable[[pd.DataFrame], str]
    title: str
    claim: str | None = None
    claims: tuple = ()
    section: str | None = None
    merge: Callable[[dict], dict] | None = None

    def figure(self, metric: str) -> Callable:
        """The figure of a table measured in `metric`: its own, else the study's first (of the
        latest step's rows, unless it draws several steps: `step_figure`)."""
        return step_figure(self.figures.get(metric) or next(iter(self.figures.values())))


def draws_steps(fn: Callable) -> Callable:
    """Mark a figure function that draws a table of several steps itself (lesions across
    training); `step_figure` hands it every step's rows."""
    fn.draws_steps = True
    return fn


def step_figure(fn: Callable) -> Callable:
    """`fn` for a table that may hold several steps: as it is when it draws steps itself (marked
    by `draws_steps`, also through a `functools.partial`), else drawing the latest step's rows."""
    if getattr(fn, "draws_steps", False) or getattr(getattr(fn, "func", None), "draws_steps", 0):
        return fn
    from src.results import latest_step

    @functools.wraps(fn)
    def figure(table: pd.DataFrame, *args, **kwargs):
        return fn(latest_step(table), *args, **kwargs)

    return draws_steps(figure)


@functools.cache
def registry() -> dict[str, Study]:
    """Every study of src/analysis/ by name, in the report's order (the paper's sections, then
    the studies beyond the paper by name)."""
    import src.analysis

    found = []
    for m in pkgutil.iter_modules(src.analysis.__path__):
        study = getattr(importlib.import_module(f"src.analysis.{m.name}"), "STUDY", None)
        if study is not None:
            found.append(study)
    found.sort(key=lambda s: (s.section is None, s.section or "", s.name))
    return {s.name: s for s in found}
