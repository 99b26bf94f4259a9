"""Whole preset trainings (issue 21): fp32 against the precision `src/precision.py` chooses, the
arms alternating seed by seed in one run, each `python -m src.run` as a user runs it.

    python benchmarks/preset_training.py --presets quick --seeds 0,1,2       # ~10 min, 2 cores
    python benchmarks/preset_training.py --presets medium --seeds 0          # ~20 min

Arms: `fp32` (`trainer.precision=32-true`: fp32, contiguous) and `auto` (the default: on a CPU
with native bf16, `bf16-mixed` + channels_last; elsewhere the same as fp32, which the table then
says). Each run trains the preset's ResNet-110 and tests it (no analyses); the wall time is the
whole command's, imports and testing included. Prints one row per preset and arm: what the run
log says it chose, minutes per run, test error (mean and seed-to-seed std) and auto/fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARMS = {"fp32": ["trainer.precision=32-true"], "auto": []}


def train(preset: str, seed: int, arm: str, out: Path, extra: list[str]) -> dict:
    run = out / f"{preset}_{arm}_seed{seed}"
    cmd = [sys.executable, "-m", "src.run", f"preset={preset}", f"seed={seed}", *ARMS[arm]]
    cmd += ["logger=csv", "callbacks.progress_bar=null", "hydra.mode=RUN", f"hydra.run.dir={run}"]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    res = subprocess.run([*cmd, *extra], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[1:])} failed: {res.stderr.strip().splitlines()[-1:]}")
    log = (run / "run.log").read_text()
    chosen = next(line.split("] - ", 1)[1] for line in log.splitlines() if "] - precision " in line)
    error = json.loads((run / "metrics.json").read_text())["test_error"]
    return {"seconds": seconds, "error": error, "chosen": chosen.split(":")[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="quick", help="comma-separated: quick,medium")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=None, help="run dirs (default: a temporary folder)")
    p.add_argument("extra", nargs="*", help="overrides for every run (e.g. trainer.max_steps=3)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        rows = []
        for preset in args.presets.split(","):
            runs = {arm: [] for arm in ARMS}
            for seed in seeds:  # the arms alternate: load changes hit both
                for arm in ARMS:
                    r = train(preset, seed, arm, out, args.extra)
                    runs[arm].append(r)
                    print(
                        f"{preset} seed {seed} {arm}: {r['seconds'] / 60:.2f} min, "
                        f"test error {r['error']:.4f} ({r['chosen']})",
                        file=sys.stderr,
                        flush=True,
                    )
            fp32 = statistics.mean(r["seconds"] for r in runs["fp32"])
            for arm, rs in runs.items():
                errors = [r["error"] for r in rs]
                sd = statistics.stdev(errors) if len(errors) > 1 else float("nan")
                minutes = [r["seconds"] / 60 for r in rs]
                rows.append(
                    f"| {preset} | {arm}: {rs[0]['chosen']} | "
                    + ", ".join(f"{m:.2f}" for m in minutes)
                    + f" | {100 * statistics.mean(errors):.2f} +- {100 * sd:.2f} % | "
                    + f"{statistics.mean(r['seconds'] for r in rs) / fp32:.2f} |"
                )
    print(f"{os.cpu_count()} CPUs, seeds {args.seeds}")
    print("| preset | arm: chosen | minutes per run | test error (mean +- sd) | time / fp32 |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
