"""Sec. 5 and Fig. 5a against training length: the table and figure of the runs that
experiments/sec5_schedule.sh keeps in experiments/results/sec5_schedule/<preset>_<steps>/
(metrics and analysis tables, no checkpoints; the same layout as its outputs/ folder).

    python experiments/sec5_schedule.py [--root experiments/results/sec5_schedule]
        [--out experiments/figures]

Per preset, length and seed: for each test-time rule of the 23-of-54 block-subset network, its
test error minus full training's (the two arms of a seed share initial weights and data order:
paired), and Fig. 5a's largest rise of the mean error between neighbouring k on the fully
trained network, with its trained statistics (bn=eval) and re-estimated ones (bn=recalibrate).
Per length: the mean over seeds with its t-based 95% CI and the paired t-test's p. Per row
across lengths: the trend, a least-squares line through every (log10(steps), seed's value)
point, its slope per decade of steps with a 95% CI and the p of "no trend" (slope 0), and the
line's value at the paper's 64,000 iterations with its 95% CI: an extrapolation, labelled as one.

Writes `sec5_schedule.csv` (one row per preset, length and arm), `sec5_schedule_trend.csv`
(one row per preset and arm) and `sec5_schedule_<preset>.png` (the gaps and the largest step
against length, log axis, with the fitted lines), and prints a markdown table per preset. A
length counts where at least 2 seeds have finished some row; each row counts the seeds whose
runs for it have finished (a row with fewer seeds than full training says how many).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src import stats  # noqa: E402

RULES = ("full", "rescale", "recalibrate", "ensemble")
FULL = "full training"
PAPER_STEPS = 64_000


def metrics(run: Path) -> dict | None:
    f = run / "metrics.json"
    return json.loads(f.read_text()) if f.is_file() else None


def largest_step(run: Path) -> float | None:
    f = run / "analysis" / "delete_many.parquet"
    return stats.largest_step(pd.read_parquet(f), "k") if f.is_file() else None


def seed_values(root: Path) -> pd.DataFrame:
    """One preset and length's per-seed values (columns preset, steps, seed, arm, value, in
    test error for full training and in pp otherwise). A row counts the seeds whose runs for it
    finished: the Sec. 5 rows those with both trainings and every re-test, a Fig. 5a row those
    with its lesion sweep."""
    preset, steps = root.name.rsplit("_", 1)
    seeds = sorted(int(p.name.split("seed")[1]) for p in root.glob("train/k54_seed*"))
    rows = []
    for s in seeds:
        full = metrics(root / f"train/k54_seed{s}")
        tested = {
            rule: metrics(
                root / (f"train/k23_seed{s}" if rule == "full" else f"retest/k23_seed{s}_{rule}")
            )
            for rule in RULES
        }
        lesioned = {
            "eval": root / f"train/k54_seed{s}",
            "recalibrate": root / f"retest/k54_seed{s}_delete_many_recalibrate",
        }
        jumps = {bn: largest_step(run) for bn, run in lesioned.items()}
        trained = chosen(root.glob(f"train/k*_seed{s}/precision.txt"))
        paired = full is not None and None not in tested.values()
        if paired and len(trained) > 1:
            print(  # a paired gap is only a gap between arms trained alike
                f"sec5_schedule: {root.name} seed {s} left out of Sec. 5: its arms trained in "
                f"{' and '.join(sorted(trained))}; retrain one (experiments/sec5_schedule.sh "
                "pins PRECISION)",
                file=sys.stderr,
            )
        elif paired:
            rows.append((s, FULL, full["test_error"]))
            rows += [
                (s, f"23/54 {r}", 100 * (tested[r]["test_error"] - full["test_error"]))
                for r in RULES
            ]
        rows += [
            (s, f"Fig. 5a largest step, bn={bn}", 100 * v)
            for bn, v in jumps.items()
            if v is not None
        ]
    t = pd.DataFrame(rows, columns=["seed", "arm", "value"])
    return t.assign(preset=preset, steps=int(steps))


def chosen(files) -> set[str]:
    """The precisions recorded in these `precision.txt` files, e.g. {"32-true"}."""
    read = (f.read_text().split(",")[0].removeprefix("precision ").strip() for f in files)
    return {c for c in read if c}


def precision(root: Path, seeds) -> str:
    """The precisions the kept runs chose (`precision.txt`), e.g. `32-true`."""
    found = chosen(f for s in seeds for f in root.glob(f"*/k*_seed{s}/precision.txt"))
    return ",".join(sorted(found)) or "unrecorded"


def summary(values: pd.DataFrame, root: Path) -> list[dict]:
    """Mean, CI and paired p per arm of one length's per-seed values."""
    out = []
    for arm, g in values.groupby("arm", sort=False):
        m, h = stats.mean_ci(g.value.tolist())
        row = {
            "preset": g.preset.iloc[0],
            "steps": g.steps.iloc[0],
            "arm": arm,
            "seeds": len(g),
        }
        if arm == FULL:
            row |= {"precision": precision(root, g.seed), "error": m, "error_std": g.value.std()}
        else:
            row |= {"gap_pp": m, "gap_ci_pp": h}
            if arm.startswith("23/54") and g.value.std() > 0:  # paired t-test of the gap (a
                # one-sample test of the differences; none where every seed's gap is the same)
                row["paired_p"] = float(sps.ttest_1samp(g.value, 0.0).pvalue)
        out.append(row)
    return out


def trend(values: pd.DataFrame, level: float = 0.95) -> dict | None:
    """The least-squares line value ~ log10(steps) through every seed's point of one arm:
    slope per decade with its CI, the p of slope 0, and the line at PAPER_STEPS with the CI
    of the line there (an extrapolation). None with fewer than two lengths."""
    if values.steps.nunique() < 2 or len(values) < 3:
        return None
    x, y = np.log10(values.steps.to_numpy(float)), values.value.to_numpy(float)
    fit = sps.linregress(x, y)
    n = len(x)
    q = sps.t.ppf(0.5 + level / 2, n - 2)
    resid = y - (fit.intercept + fit.slope * x)
    s = math.sqrt(float(resid @ resid) / (n - 2))
    x0 = math.log10(PAPER_STEPS)
    se0 = s * math.sqrt(1 / n + (x0 - x.mean()) ** 2 / float(((x - x.mean()) ** 2).sum()))
    return {
        "slope_pp_per_decade": float(fit.slope),
        "slope_ci_pp": float(q * fit.stderr),
        "slope_p": float(fit.pvalue),
        "intercept": float(fit.intercept),
        "at_64k_pp": float(fit.intercept + fit.slope * x0),
        "at_64k_ci_pp": float(q * se0),
        "points": n,
    }


def figure(t: pd.DataFrame, fits: pd.DataFrame, preset: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    grid = np.geomspace(t.steps.min(), t.steps.max(), 20)

    def draw(ax, arm, label, shift=1.0):
        r = t[t.arm == arm]
        line = ax.errorbar(
            r.steps * shift,
            r.gap_pp,
            yerr=r.gap_ci_pp.fillna(0),
            marker="o",
            capsize=3,
            label=label,
        )
        f = fits[fits.arm == arm]
        if not f.empty:
            f = f.iloc[0]
            ax.plot(
                grid,
                f.intercept + f.slope_pp_per_decade * np.log10(grid),
                ls="--",
                lw=0.8,
                color=line[0].get_color(),
            )

    for i, rule in enumerate(RULES):  # rules side by side at each length
        draw(a, f"23/54 {rule}", rule, 1.04 ** (i - 1.5))
    a.axhline(0, color="grey", lw=0.8)
    gaps = t[t.arm.str.startswith("23/54")]
    a.set_ylim(
        min(-1.0, (gaps.gap_pp - gaps.gap_ci_pp.fillna(0)).min() * 1.5),
        (gaps.gap_pp + gaps.gap_ci_pp.fillna(0)).max() * 1.5,
    )
    a.set(
        xscale="log",
        yscale="symlog",
        xlabel="training steps",
        ylabel="gap to full training (pp)",
        title="Sec. 5: 23 of 54 blocks per step, by test-time rule",
    )
    a.legend()
    for bn in ("eval", "recalibrate"):
        draw(b, f"Fig. 5a largest step, bn={bn}", f"bn={bn}")
    b.axhline(15, color="grey", lw=0.8, ls=":")  # the claim's smoothness rule
    b.set(
        xscale="log",
        xlabel="training steps",
        ylabel="largest rise between neighbouring k (pp)",
        title="Fig. 5a: deleting k blocks of the fully trained network",
    )
    b.legend()
    lengths = sorted(t.steps.unique())
    for ax in (a, b):
        ax.set_xlim(t.steps.min() / 2, t.steps.max() * 2)
        ax.set_xticks(lengths, [f"{n:,}" for n in lengths])
        ax.minorticks_off()
    fig.suptitle(f"ResNet-110, {preset} preset; mean and 95% CI over seeds, dashed: fitted trend")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cell(x: pd.Series, seeds: int | None = None) -> str:
    """One arm at one length; `seeds`: full training's there (a row with other seeds says so)."""
    if x.arm == FULL:
        return f"{100 * x.error:.2f}% ({x.seeds} seeds)"
    ci = "" if pd.isna(x.gap_ci_pp) else f" ± {x.gap_ci_pp:.2f}"
    p = "" if pd.isna(x.get("paired_p")) else f", p={x.paired_p:.2g}"
    n = "" if x.seeds == seeds else f" ({x.seeds} seed{'s' if x.seeds > 1 else ''})"
    return f"{x.gap_pp:+.2f}{ci} pp{p}{n}"


def markdown(t: pd.DataFrame, fits: pd.DataFrame) -> list[str]:
    lengths = sorted(t.steps.unique())
    lines = [
        "| arm | "
        + " | ".join(f"{s:,} steps" for s in lengths)
        + " | trend per decade (95% CI, p) | at 64k (extrapolated, 95% CI) |",
        "|---" * (len(lengths) + 3) + "|",
    ]
    full = t[t.arm == FULL].set_index("steps").seeds
    for arm in t.arm.unique():
        r = t[t.arm == arm].set_index("steps")
        cells = [cell(r.loc[s], full.get(s)) if s in r.index else "" for s in lengths]
        f = fits[fits.arm == arm]
        if f.empty:
            cells += ["", ""]
        else:
            f = f.iloc[0]
            cells += [
                f"{f.slope_pp_per_decade:+.2f} ± {f.slope_ci_pp:.2f} pp, p={f.slope_p:.2g}",
                f"{f.at_64k_pp:+.1f} ± {f.at_64k_ci_pp:.1f} pp",
            ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(__file__).parent / "results" / "sec5_schedule")
    p.add_argument("--out", type=Path, default=Path("experiments/figures"))
    args = p.parse_args(argv)
    values, rows = [], []
    for d in sorted(args.root.glob("*_*")):
        v = seed_values(d) if d.is_dir() else pd.DataFrame()
        if v.empty or v.seed.nunique() < 2:
            continue
        values.append(v)
        rows += summary(v, d)
    if not rows:
        sys.exit(
            f"error: no length with 2 finished seeds under {args.root}: run "
            "experiments/sec5_schedule.sh"
        )
    t = pd.DataFrame(rows).sort_values(["preset", "steps"], kind="stable")
    v = pd.concat(values)
    fits = pd.DataFrame(
        [
            {"preset": preset, "arm": arm} | f
            for (preset, arm), g in v[v.arm != FULL].groupby(["preset", "arm"], sort=False)
            if (f := trend(g)) is not None
        ],
        columns=[
            "preset",
            "arm",
            "slope_pp_per_decade",
            "slope_ci_pp",
            "slope_p",
            "intercept",
            "at_64k_pp",
            "at_64k_ci_pp",
            "points",
        ],
    )
    args.out.mkdir(parents=True, exist_ok=True)
    t.to_csv(args.out / "sec5_schedule.csv", index=False, float_format="%.6g")
    fits.to_csv(args.out / "sec5_schedule_trend.csv", index=False, float_format="%.6g")
    for preset, g in t.groupby("preset"):
        figure(g, fits[fits.preset == preset], preset, args.out / f"sec5_schedule_{preset}.png")
        print(f"\n{preset} preset\n")
        print("\n".join(markdown(g, fits[fits.preset == preset])))


if __name__ == "__main__":
    main()
