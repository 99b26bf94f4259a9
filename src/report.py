"""The sweep aggregator: one results folder in, figures with confidence bands and a markdown report
out.

    python -m src.report <run or sweep dir> [--out DIR] [--alpha 0.05]

Every multirun also calls it once when its last job has finished (`SweepReport`, a Hydra callback
in conf/hydra/default.yaml), so a sweep's overlay figures are drawn once, not once per job.

It loads every run below the folder (`src.results.runs`: metrics.json and overrides) and every
analysis table (`src.results.load`). Runs that differ only in `seed` are replicates; every other
override that varies between runs (`model=`, `training=`, ...) makes a group, drawn as a curve of
its own. Each point is the mean over seeds (trials within a run averaged first) with a t-based 95%
confidence interval. Writes into `<out>` (default `<dir>/report/`): `report.md` (the paper's
claim beside our measured value and its spread), one figure per study of the registry
(src/studies.py: `delete_single.png`, ..., `gradient_paths.png`), `tables.parquet` (every table,
one DataFrame), and for a sweep of block-subset vs full training (paper Sec. 5)
`effective_paths.{md,json,png}` with Welch's, the paired t- and Wilcoxon's tests (one set per
data set, `effective_paths_<data>.*`, when the folder holds several), and the claims
table (`claims.csv`, and in report.md): each of the paper's claims beside what the folder measured,
one column per data set, with a verdict (src/claims.py). Point it at `outputs/` to see every data
set side by side.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import pandas as pd

from src import figures, results, stats
from src.claims import markdown as markdown_claims
from src.claims import table as claims_table
from src.distributed import merge_shards
from src.errors import ConfigError
from src.stats import fmt
from src.studies import registry

REPLICATE_KEYS = {"seed"}
# The optimizer step of the weights a run analysed (`step=`, metrics.json's `step`): runs at
# several steps are one curve's points in time (a heatmap across steps), not curves of their own.
STEP_KEYS = {"step"}
FACTS = ("model", "data", "training")  # what a run's metrics.json says it was
# Overrides that say where a run read or wrote, not what it measured (a checkpoint analysed with
# train=false, a data folder): left out of curve labels unless they are all that differs.
LOCATION_KEYS = {"ckpt_path", "resume"}


def _is_location(key: str) -> bool:
    return key in LOCATION_KEYS or key.endswith("_dir") or key.startswith(("paths.", "hydra."))


def _short_paths(values: list[str]) -> dict[str, str]:
    """Each path as its shortest trailing part that still tells it from the others."""
    parts = {v: v.split("/") for v in values}
    short = {}
    for v, p in parts.items():
        n = 1
        while n < len(p) and any(q[-n:] == p[-n:] for w, q in parts.items() if w != v):
            n += 1
        short[v] = "/".join(p[-n:]) if n == len(p) else ".../" + "/".join(p[-n:])
    return short


def _one_name(runs: pd.DataFrame) -> str:
    if "model" in runs and runs.model.nunique() == 1:
        return str(runs.model.iloc[0])
    return "all runs"


def _step_keys(runs: pd.DataFrame, ov: pd.Series, swept: list[str]) -> set[str]:
    """The swept keys that only say which step's weights a run analysed: `step=`, and a key
    whose values follow the step one to one among runs alike in everything else (one checkpoint
    per step: `ckpt_path=<run>/checkpoints/step-*.ckpt`, or `trainer.max_steps=100,200`)."""
    step = runs["step"] if "step" in runs else None
    if step is None or step.nunique() < 2:
        return set()
    facts = [c for c in FACTS if c in runs]
    found = set(swept) & STEP_KEYS
    for key in sorted(set(swept) - found):
        others = [k for k in swept if k != key and k not in STEP_KEYS and not _is_location(k)]
        others += sorted(REPLICATE_KEYS)
        alike = [
            (*(str(o.get(k)) for k in others), *(str(runs[c].iloc[i]) for c in facts))
            for i, o in enumerate(ov)
        ]
        values = [str(o.get(key)) for o in ov]
        pairs = pd.DataFrame({"alike": alike, "v": values, "s": step.to_numpy()}).dropna()
        per = pairs.groupby("alike")
        if ((per.v.nunique() == per.s.nunique()) & (per.size() == per.s.nunique())).all():
            found.add(key)
    return found


def groups(runs: pd.DataFrame) -> pd.Series:
    """A label per run: the overrides that vary between runs and that it set ("defaults" where it
    set none of them), other than the seed; where a run read or wrote (`ckpt_path`, `*_dir`)
    only when nothing else varies, shortened. Runs of one setup analysed at several steps
    (`_step_keys`) share a label, which names the run facts (model, data, training) that tell
    setups apart where no override does."""
    ov = runs.overrides if "overrides" in runs else pd.Series([{}] * len(runs))
    keys = sorted({k for o in ov for k in o} - REPLICATE_KEYS)
    swept = [k for k in keys if len({o.get(k) for o in ov}) > 1]
    by_step = _step_keys(runs, ov, swept)
    if by_step:
        swept = [k for k in swept if k not in by_step]
        facts = [c for c in FACTS if c in runs and runs[c].nunique() > 1 and c not in swept]
        ov = pd.Series(
            [{**o, **{c: runs[c].iloc[i] for c in facts}} for i, o in enumerate(ov)], runs.index
        )
        swept = sorted(swept + facts)
    # A location names a curve only where runs alike in everything else (seed included) differ in
    # it; otherwise it follows from the other overrides, e.g. one checkpoint per seed.
    alike = [k for k in swept if not _is_location(k)] + sorted(REPLICATE_KEYS)
    same = ov.map(lambda o: tuple(str(o.get(k)) for k in alike))

    def splits(key: str) -> bool:
        return ov.map(lambda o: str(o.get(key))).groupby(same).nunique().max() > 1

    swept = [k for k in swept if not _is_location(k) or splits(k)]
    if not swept:
        return pd.Series([_one_name(runs)] * len(runs), index=runs.index)
    short = {k: _short_paths([str(o[k]) for o in ov if k in o]) for k in swept if _is_location(k)}
    # only the keys a run set: the set of them tells groups apart as well as every key would
    return ov.map(
        lambda o: (
            ", ".join(f"{k}={short.get(k, {}).get(str(o[k]), o[k])}" for k in swept if k in o)
            or "defaults"
        )
    )


def effective_paths(runs: pd.DataFrame, out: Path, alpha: float) -> list[str]:
    """Sec. 5 (block-subset vs full training) when the runs hold both arms: every block-subset
    checkpoint tested under each rule it was tested with (test_mode) is an arm of its own, paired
    with full training by seed. One comparison per data set (`effective_paths.*`; with several
    data sets `effective_paths_<data>.*`) and per training length where full training ran for
    several (`..._<steps>.*`: 400 steps are not replicates of 6,400). Report lines."""
    data = runs.data if "data" in runs else pd.Series([None] * len(runs), runs.index, object)
    sets = sorted(data.dropna().unique())
    per_set = [(None, runs)] if len(sets) <= 1 else [(d, runs[data == d]) for d in sets]
    lines = []
    for d, r in per_set:
        for n, rn in stats.sec5_lengths(r):
            name = "_".join(["effective_paths", *([d] if d else []), *([str(n)] if n else [])])
            of = ", ".join([*([d] if d else []), *([f"{n:,} steps"] if n else [])])
            lines += _effective_paths(rn, out, alpha, name, f" ({of})" if of else "")
        if left := stats.sec5_unmatched(r):
            steps = ", ".join(f"{n:,}" for n in left)
            lines += [
                f"Sec. 5{f' ({d})' if d else ''}: block-subset runs trained for {steps} steps "
                "are left out: full training has no runs of that length to compare them with.",
                "",
            ]
    return lines


def _effective_paths(runs: pd.DataFrame, out: Path, alpha: float, name: str, of: str) -> list[str]:
    title = f"## Sec. 5: effective-path training{of}"
    arms = stats.sec5_arms(runs)
    if arms.empty:
        return []
    try:
        res = stats.compare_arms(arms, alpha)
    except ConfigError as err:
        return ["", title, "", f"Not compared: {err}."]
    # trained runs only: testing a checkpoint again (train=false) takes no steps
    steps = arms.get("global_step", pd.Series([-1]))
    steps = sorted(int(s) for s in steps[steps != 0].unique())
    res |= {"steps": steps, "same_step_budget": len(steps) == 1}
    ensemble = sorted((c for c in arms if c.startswith("test_error_m")), key=lambda c: int(c[12:]))
    columns = ["run_dir", "arm", "seed", "test_error", *ensemble]
    records = arms[columns].astype(object).where(arms[columns].notna(), None)
    results.write_json(out / f"{name}.json", {**res, "runs": records.to_dict("records")})
    md = effective_paths_markdown(arms[columns], res, ensemble, title)
    results.atomic_write(out / f"{name}.md", md)
    results.save_figure(figures.effective_paths(arms, res), out / f"{name}.png")
    lines = md.splitlines()
    return ["", lines[0], "", f"![effective paths]({name}.png)", "", *lines[2:]]


def _p(test: dict | None) -> str:
    if not test or test["p_value"] is None:
        return "-"
    return f"{test['p_value']:.4f}"


def effective_paths_markdown(
    runs: pd.DataFrame,
    res: dict,
    ensemble: list[str],
    title: str = "## Sec. 5: effective-path training",
) -> str:
    full = res["arms"][stats.FULL]
    lines = [
        title,
        "",
        "Block-subset training (k of n blocks per mini-batch), tested under each rule it was "
        f"tested with, against full training; steps per run: {res['steps']}. p-values of the "
        f"difference from full training (alpha={res['alpha']}).",
        "",
        "| arm | runs | mean test error | std | subset - full | Welch p | paired t p | "
        "Wilcoxon p | significant |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| full | {full['runs']} | {full['mean_error']:.4f} | {full['std_error']:.4f} | | | | | |",
    ]
    for a, c in res["comparisons"].items():
        s = res["arms"][a]
        lines.append(
            f"| {a} | {s['runs']} | {s['mean_error']:.4f} | {s['std_error']:.4f} "
            f"| {c['difference_subset_minus_full']:+.4f} | {_p(c['welch_t'])} "
            f"| {_p(c.get('paired_t'))} | {_p(c.get('wilcoxon'))} "
            f"| {'yes' if c['significant'] else 'no'} |"
        )
    if ensemble:  # Monte-Carlo ensembles: error against the number of members
        ms = [c[12:] for c in ensemble]
        lines += [
            "",
            "Monte-Carlo ensembles of random k-subsets: mean test error over seeds against the "
            "number of members M.",
            "",
            "| arm | " + " | ".join(f"M={m}" for m in ms) + " |",
            "|---|" + "---|" * len(ms),
        ]
        for a, g in runs.dropna(subset=ensemble[:1]).groupby("arm"):
            lines.append(f"| {a} | " + " | ".join(f"{g[c].mean():.4f}" for c in ensemble) + " |")
    lines += ["", "| run | arm | seed | test error |", "|---|---|---|---|"]
    lines += [
        f"| {r.run_dir} | {r.arm} | {r.seed} | {r.test_error:.4f} |" for r in runs.itertuples()
    ]
    return "\n".join(lines) + "\n"


def at_latest_step(tables: pd.DataFrame, by: str = "label") -> pd.DataFrame:
    """Each group's (label's, or with `by="run_dir"` each run's) rows of its latest step per
    study: what the trained networks measured, where analyses ran across training or over a
    run's checkpoints."""
    if "step" not in tables or tables.step.isna().all():
        return tables
    last = tables.groupby([by, "study"]).step.transform("max")
    keep = (tables.step == last).astype("boolean").fillna(True) | tables.step.isna()
    return tables[keep.to_numpy(dtype=bool)]


def headline(study, t: pd.DataFrame) -> str:
    """The study's headline of a group's rows; a headline written for an `error` column reads a
    language model's `loss` column in its place, its numbers in nats and its words "loss"."""
    if "error" in t or "loss" not in t:
        return study.headline(t)
    with stats.measured_in("loss"):
        return study.headline(t.rename(columns={"loss": "error"})).replace("error", "loss")


def report(path: str | Path, out: str | Path | None = None, alpha: float = 0.05) -> Path:
    """Aggregate every run below `path` into `<out>/report.md` and figures; returns report.md."""
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha={alpha} must lie in (0, 1)")
    path = Path(path)
    runs, tables = results.runs(path), results.load(path)
    merges = [s.merge for s in registry().values() if s.merge is not None]
    runs, tables = merge_shards(runs, tables, merges)  # the shards of a study: one table
    if runs.empty and tables.empty:
        raise ConfigError(
            f"no finished run (metrics.json) or analysis table under {path}: pass a run or "
            "multirun directory under outputs/"
        )
    out = Path(out) if out else path / "report"
    label = dict(zip(runs.run_dir, groups(runs))) if not runs.empty else {}
    tables["label"] = tables.run_dir.map(label).fillna("all runs")
    if not tables.empty:
        buf = io.BytesIO()
        tables.drop(columns=["label"]).to_parquet(buf, index=False)
        results.atomic_write(out / "tables.parquet", buf.getvalue())
    swept = sorted(set(label.values()))
    lines = [
        f"# Report: {path.name}",
        "",
        f"{len(runs)} finished runs in `{path}`; groups: {', '.join(swept) or 'none'}. Values "
        "are mean ± half-width of the t-based 95% confidence interval over seeds, in percentage "
        "points for error rates (no interval with one seed).",
    ]
    if "test_error" in runs:
        lines += ["", "## Test error", "", "| group | seeds | test error | min | max |"]
        lines.append("|---|---|---|---|---|")
        named = groups(runs)
        if "step" in runs and (runs.groupby(named).step.nunique() > 1).any():
            named = named + runs.step.map(lambda s: "" if pd.isna(s) else f", step {int(s)}")
        for group, errs in runs.groupby(named).test_error:
            e = errs.dropna().tolist()
            lines.append(
                f"| {group} | {len(e)} | {fmt(*stats.mean_ci(e))} | {min(e) * 100:.2f}% "
                f"| {max(e) * 100:.2f}% |"
            )
    final = at_latest_step(tables)  # the trained networks: headlines and claims
    for s in registry().values():
        t = tables[tables.study == s.name].dropna(axis=1, how="all")
        if t.empty:
            continue
        metrics = t.metric.dropna().unique() if "metric" in t else []
        figure = s.figure(metrics[0] if len(metrics) == 1 else "error")  # several steps: a heatmap
        png = results.save_figure(figure(t), out / f"{s.name}.png")
        lines += ["", f"## {s.title}", "", f"**Paper:** {s.claim}", "", f"![{s.name}]({png.name})"]
        lines += ["", "| group | seeds | measured |", "|---|---|---|"]
        last = final[final.study == s.name].dropna(axis=1, how="all")
        for group, g in last.groupby("label", sort=True):
            at = results.steps(t[t.label == group])
            when = f"at step {at[-1]} (of {len(at)} steps): " if len(at) > 1 else ""
            lines.append(f"| {group} | {g.run_dir.nunique()} | {when}{headline(s, g)} |")
    if not runs.empty:
        lines += effective_paths(runs, out, alpha)
    # each run's trained network: the claims compare training lengths themselves (src/claims.py)
    claims = claims_table(runs, at_latest_step(tables, by="run_dir"))
    results.atomic_write(out / "claims.csv", claims.to_csv(index=False, lineterminator="\n"))
    rules = "; ".join(f"{f}: {t}" for f, t in zip(claims.figure, claims.test))
    lines += ["", "## Claims", "", f"Verdict rules: {rules}.", ""]
    lines += markdown_claims(claims)
    return results.atomic_write(out / "report.md", "\n".join(lines) + "\n")


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object


class SweepReport(_HydraCallback):
    """Hydra callback: aggregate a multirun once, when its last job has finished (local or
    Slurm: the launcher returns after every job), into `<sweep dir>/report/`."""

    def __init__(self, alpha: float = 0.05):
        self.alpha = alpha

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        try:
            print(f"sweep report: {report(sweep, alpha=self.alpha)}")
        except ConfigError as err:
            print(f"error: sweep report: {err}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", type=Path, help="a run or multirun dir under outputs/")
    parser.add_argument("--out", type=Path, default=None, help="default: <path>/report")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (Sec. 5)")
    args = parser.parse_args(argv)
    try:
        print(report(args.path, args.out, args.alpha))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
