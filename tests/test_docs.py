"""Every command the docs show, run as a user types it.

The commands are read from README.md and experiments/*.md (so docs and tests cannot drift apart)
and run in a fresh copy of the repository as working directory, with no `hydra.run.dir`,
`hydra.sweep.dir` or `paths.*` overrides. A test appends only overrides that shorten a run
(`SHORTEN`); placeholders such as `<sweep dir>` become the results of an earlier command. Commands
that need a GPU, CIFAR or ImageNet run until their documented one-line error. Each command must
match exactly one rule below: a new documented command without a rule fails
`test_every_documented_command_has_a_rule`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd
import pytest
import torch
import yaml

from src.results import read_csv
from tests.conftest import (
    QUICKSTART,
    REPO,
    fresh_copy,
    newest,
    once,
    own_columns,
    quickstart_jobs,
    run_cli,
    same_run_aside,
)
from tests.plots import colour_pixels

DOCS = [REPO / "README.md", *sorted((REPO / "experiments").glob("*.md"))]
HAS_SLURM = shutil.which("sinfo") is not None and (
    subprocess.run(["sinfo"], capture_output=True).returncode == 0
)
INSTALL = "python -m venv .venv && . .venv/bin/activate && pip install -e '.[dev]' && "


def documented_commands() -> list[str]:
    """`python -m src...` commands of the docs: bash blocks (with `\\` continuations joined,
    comments dropped and `$VAR` set earlier in the block expanded) and inline code spans."""
    found: list[str] = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            env: dict[str, str] = {}
            for line in block.replace("\\\n", " ").splitlines():
                if m := re.fullmatch(r'\s*([A-Z_]+)="(.*)"\s*', line):
                    env[m[1]] = m[2]
                    continue
                line = re.sub(r"\s+#.*$", "", line)
                for name, value in env.items():
                    line = line.replace(f"${name}", value)
                if "python -m src" in line:
                    found.append(" ".join(line.split()))
        found += [" ".join(s.split()) for s in re.findall(r"`(python -m src[^`]*)`", text)]
    return list(dict.fromkeys(found))


def words(command: str, subs: dict[str, str] | None = None) -> list[str]:
    """The arguments after `python -m <module>`, placeholders (`<sweep dir>`) replaced first."""
    for placeholder, value in (subs or {}).items():
        command = command.replace(placeholder, value)
    return command.split()[3:]


# Overrides a test may append: they shorten a run, never change where it writes or its defaults.
SHORTEN = {
    "train": ["trainer.max_steps=20"],
    "delete_many": ["callbacks.delete_many.trials=2"],
    "bn": ["callbacks.delete_many.bn_batches=2"],  # BN re-estimated on 2 batches, not 20
    "reorder": ["callbacks.reorder.trials=2"],
    "gradient_paths": ["callbacks.gradient_paths.samples=2", "callbacks.gradient_paths.batches=1"],
}


def shortened(command: str, *studies: str) -> list[str]:
    extra = [o for s in ("train", *studies) for o in SHORTEN[s]]
    return [*words(command), *extra]


def analysis(run: Path, name: str) -> list[dict]:
    return read_csv(run / "analysis" / f"{name}.csv")


def assert_figure(path: Path, min_pixels: int = 300) -> None:
    """A real plot: a PNG of sensible size with more than one colour."""
    image = mpimg.imread(path)
    assert min(image.shape[:2]) >= min_pixels, (path, image.shape)
    assert len({tuple(p) for p in image.reshape(-1, image.shape[-1])[::97]}) > 2, path


def one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), res.stderr[-3000:]
    for needle in needles:
        assert needle in line, line
    return line


def single_run(copy: Path, experiment: str) -> Path:
    """The one run directory a command left in outputs/<experiment>/ (docs: <time>_<id>/)."""
    runs = [p for p in (copy / "outputs" / experiment).iterdir() if p.is_dir()]
    assert len(runs) == 1 and re.fullmatch(
        r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}", runs[0].name
    )
    return runs[0]


def sweep_dir(copy: Path, experiment: str) -> Path:
    [sweep] = (copy / "outputs" / experiment).glob("multirun_*")
    return sweep


# --------------------------------------------------------------------------------------------
# Commands whose results later commands read (each runs once per session, in its own copy)


def ran(tmp_path_factory, name: str, *args: str, module: str = "src.run") -> Path:
    """A fresh copy in which `python -m <module> <args>` ran (once per session)."""

    def make(copy: Path) -> None:
        fresh_copy(copy)
        run_cli(*args, module=module, cwd=copy)

    return once(tmp_path_factory, name, make)


def gradient_paths_quick(tmp_path_factory) -> Path:
    cmd = "python -m src.run experiment=gradient_paths preset=quick"
    return ran(tmp_path_factory, "doc_gradient_paths", *shortened(cmd, "gradient_paths"))


def effective_paths_quick(tmp_path_factory) -> Path:
    cmd = "python -m src.run experiment=effective_paths preset=quick"
    return ran(tmp_path_factory, "doc_effective_paths", *shortened(cmd))


def slurm_sweep(tmp_path_factory) -> Path:
    [cmd] = [c for c in documented_commands() if "hydra/launcher=slurm " in c and "shard=" not in c]
    return ran(tmp_path_factory, "doc_slurm_sweep", *words(cmd))


# --------------------------------------------------------------------------------------------
# Rules: what running a documented command must leave where the docs say


def check_quickstart(command, tmp_path_factory, tmp_path):
    """README quick start: ResNet-110 and VGG-15 trained on digits, then Fig. 3. The install
    prefix runs verbatim in .ci/run; here the command itself, unshortened."""
    assert command in (QUICKSTART, INSTALL + QUICKSTART)
    copy = once(tmp_path_factory, "quickstart", lambda c: None)  # made by the fixture
    sweep = newest("outputs/delete_single/multirun_*", copy)
    jobs = quickstart_jobs(copy)
    assert sorted(jobs) == ["resnet110", "vgg15"]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "report"]
    res, vgg = (json.loads((jobs[m] / "metrics.json").read_text()) for m in ("resnet110", "vgg15"))
    assert res["global_step"] == vgg["global_step"] == 400
    assert (res["n_blocks"], vgg["n_blocks"], res["data"], res["training"]) == (
        54,
        13,
        "digits",
        "standard",
    )
    # measured 0.014 (ResNet-110) and 0.014 (VGG-15), 5 of 359 digits each: experiments/lesions.md
    assert res["test_error"] <= 0.03 and vgg["test_error"] <= 0.05
    assert len(analysis(jobs["resnet110"], "delete_single")) == 54
    vgg_rows = analysis(jobs["vgg15"], "delete_single")
    assert len(vgg_rows) == 13 and min(float(r["error"]) for r in vgg_rows) > 0.5
    # the sweep's report, drawn once when the last job finished: both networks in one figure
    assert_figure(sweep / "report" / "delete_single.png")
    md = (sweep / "report" / "report.md").read_text()
    assert "2 finished runs" in md and "| model=vgg15 | 1 |" in md
    for job in jobs.values():
        assert (job / "checkpoints" / "last.ckpt").is_file() and (job / "run.log").is_file()
        [wandb_run] = (job / "wandb").glob("offline-run-*")
        assert list(wandb_run.glob("run-*.wandb"))


def check_quick_experiment(command, tmp_path_factory, tmp_path):
    """`experiment=<figure> preset=quick`: trains on digits, writes the figure's table."""
    experiment = re.search(r"experiment=(\w+)", command)[1]
    copy = fresh_copy(tmp_path)
    studies = [s for s in ("delete_many", "reorder") if s == experiment]
    run_cli(*shortened(command, *studies), cwd=copy)
    if experiment == "stochastic_depth":  # a multirun: both trainings, one overlay figure
        sweep = sweep_dir(copy, experiment)
        trainings, labels = set(), set()
        for job in (sweep / "0", sweep / "1"):
            trainings.add(json.loads((job / "metrics.json").read_text())["training"])
            summary = json.loads((job / "analysis" / "summary.json").read_text())
            labels.add(summary["delete_single"]["label"])
            assert len(analysis(job, "delete_single")) == 54
        assert trainings == {"standard", "stochastic_depth"}
        assert labels == {"resnet110, standard training", "resnet110, stochastic_depth training"}
        assert_figure(sweep / "report" / "delete_single.png")
        assert "training=stochastic_depth" in (sweep / "report" / "report.md").read_text()
        return
    run = single_run(copy, experiment)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 20 and metrics["data"] == "digits"
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    assert summary["baseline_error"] == pytest.approx(metrics["test_error"], abs=1e-6)
    if experiment == "delete_many":
        rows = analysis(run, "delete_many")
        assert own_columns(rows[0]) == ["k", "trial", "deleted", "error", "baseline", "bn"]
        assert len(rows) == 21 * 2
    elif experiment == "reorder":
        rows = analysis(run, "reorder")
        assert own_columns(rows[0]) == ["swaps", "trial", "kendall_tau", "error", "baseline", "bn"]
        assert len(rows) == 8 * 2
        assert {float(r["kendall_tau"]) for r in rows if r["swaps"] == "0"} == {1.0}
    elif experiment == "imagenet_delete_single":  # ResNet-200's 3/24/36/3 bottleneck blocks
        rows = analysis(run, "delete_single")
        assert metrics["n_blocks"] == 66 and len(rows) == 66
        assert sorted({r["stage"] for r in rows}) == ["0", "1", "2", "3"]
        assert sum(r["downsampling"] == "True" for r in rows) == 4
    elif experiment == "duplicate":  # every block that keeps its shape, run twice in place
        rows = analysis(run, "duplicate")
        assert [int(r["block"]) for r in rows] == [i for i in range(54) if i not in (18, 36)]
        assert all(r["downsampling"] == "False" for r in rows)
    assert_figure(run / "analysis" / f"{experiment.replace('imagenet_', '')}.png")


def check_vit_lesions(command, tmp_path_factory, tmp_path):
    """`experiment=vit_lesions preset=quick`: a ViT arm and a ResNet-110 arm on the same digits,
    every study on both, overlays once per sweep."""
    copy = fresh_copy(tmp_path)
    run_cli(*shortened(command, "delete_many", "reorder", "gradient_paths"), cwd=copy)
    sweep = sweep_dir(copy, "vit_lesions")
    vit, resnet = (json.loads((sweep / j / "metrics.json").read_text()) for j in ("0", "1"))
    assert (vit["model"], vit["n_blocks"], resnet["model"], resnet["n_blocks"]) == (
        "vit_tiny",
        24,
        "resnet110",
        54,
    )
    assert vit["data"] == resnet["data"] == "digits" and vit["global_step"] == 20
    single = analysis(sweep / "0", "delete_single")
    assert [(int(r["layer"]), r["kind"]) for r in single] == [
        (b // 2, ("attn", "mlp")[b % 2]) for b in range(24)
    ]
    assert len(analysis(sweep / "0", "reorder")) == 8 * 2
    lengths = {int(r["length"]) for r in analysis(sweep / "0", "gradient_paths")}
    assert lengths == set(range(1, 25))
    assert len(analysis(sweep / "1", "delete_single")) == 54
    md = (sweep / "report" / "report.md").read_text()
    assert "| arm=resnet110 | 1 |" in md and "| arm=vit | 1 |" in md
    for study in ("delete_single", "delete_many", "reorder", "gradient_paths"):
        assert_figure(sweep / "report" / f"{study}.png")


def check_gradient_paths(command, tmp_path_factory, tmp_path):
    copy = gradient_paths_quick(tmp_path_factory)
    run = single_run(copy, "gradient_paths")
    if "train=false" in command:  # the same analysis on that run's checkpoint
        ckpt = run / "checkpoints" / "last.ckpt"
        args = words(command, {"<last.ckpt>": str(ckpt)})
        out = tmp_path / "analyse"
        shutil.copytree(copy, out, ignore=shutil.ignore_patterns("outputs"))
        run_cli(*args, *SHORTEN["gradient_paths"], cwd=out)
        again = single_run(out, "gradient_paths")
        assert same_run_aside(analysis(again, "gradient_paths")) == same_run_aside(
            analysis(run, "gradient_paths")
        )
        metrics = json.loads((again / "metrics.json").read_text())
        assert metrics["model"] == "resnet110" and metrics["global_step"] == 0
        check_gradient_outputs(again / "analysis", samples=2)
        return
    rows = analysis(run, "gradient_paths")
    assert [int(r["length"]) for r in rows] == list(range(1, 55))
    assert len(analysis(run, "path_decomposition")) == 55
    assert_figure(run / "analysis" / "gradient_paths.png")


def check_gradient_outputs(out: Path, samples: int) -> None:
    """Figs 6b/6c's tables, summary and figure of a 54-block ResNet: the gradient falls with
    path length, the exact per-length sums sit beside the sampled estimate (count x mean)."""
    rows = read_csv(out / "gradient_paths.csv")
    assert own_columns(rows[0]) == ["length", "samples", "grad_norm_mean", "grad_norm_std", "paths"]
    assert [int(r["length"]) for r in rows] == list(range(1, 55))
    assert all(int(r["samples"]) == samples for r in rows)
    summary = json.loads((out / "summary.json").read_text())["gradient_paths"]
    assert summary["decay_rate"] < 0
    lo, hi = summary["effective_window"]
    assert 1 <= lo <= hi <= 54 and summary["effective_window_share"] >= 0.9
    assert summary["residual_scale"] == 1.0 and summary["samples_per_length"] == samples
    exact = read_csv(out / "path_decomposition.csv")
    assert [int(r["length"]) for r in exact] == list(range(55))
    assert [int(r["count"]) for r in exact] == [math.comb(54, k) for k in range(55)]
    assert float(exact[0]["grad_norm_exact"]) > 0 and exact[0]["count_x_mean_norm"] == ""
    for r, e in zip(rows, exact[1:]):  # Fig 6c's estimate beside the exact norm
        want = math.comb(54, int(r["length"])) * float(r["grad_norm_mean"])
        assert float(e["count_x_mean_norm"]) == pytest.approx(want, rel=1e-12)
    assert summary["exact_peak_length"] == max(
        range(55), key=lambda k: float(exact[k]["grad_norm_exact"])
    )
    # (a) path-length bars, (b) mean norms and the red decay fit, (c) shares incl. the exact G_k
    colours = {"bars and means": "C0", "fit": "r", "exact": "C1"}
    px = colour_pixels(out / "gradient_paths.png", (13, 3.4), colours)
    assert px["bars and means"] > 1000 and px["fit"] > 200 and px["exact"] > 100, px


def check_effective_paths(command, tmp_path_factory, tmp_path, sweep=None):
    """The Sec. 5 sweep's report, written when the sweep ended (or rebuilt into `sweep`)."""
    if sweep is None:
        sweep = sweep_dir(effective_paths_quick(tmp_path_factory), "effective_paths")
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [
        *(str(i) for i in range(8)),
        "report",
    ]
    report = json.loads((sweep / "report" / "effective_paths.json").read_text())
    assert len(report["runs"]) == 8 and report["steps"] == [20]
    assert sorted(report["arms"]) == ["full", "k=4/9"]
    assert all(arm["runs"] == 4 for arm in report["arms"].values())
    assert "Welch" in (sweep / "report" / "effective_paths.md").read_text()
    assert_figure(sweep / "report" / "effective_paths.png", min_pixels=200)


def check_analytic(command, tmp_path_factory, tmp_path):
    """Figs 6a and 7: no training, exact numbers."""
    experiment = re.search(r"experiment=(\w+)", command)[1]
    copy = fresh_copy(tmp_path)
    run_cli(*words(command), cwd=copy)
    run = single_run(copy, experiment)
    rows = analysis(run, experiment)
    if experiment == "path_lengths":  # binomial(54, 1/2): 55 lengths, fractions sum to 1
        assert len(rows) == 55
        assert sum(float(r["fraction"]) for r in rows) == pytest.approx(1.0)
    else:  # Eq. 8 for d = 1, 10, 20
        assert sorted({int(r["deleted"]) for r in rows}) == [1, 10, 20]
    assert_figure(run / "analysis" / f"{experiment}.png")


def check_needs_gpu(command, tmp_path_factory, tmp_path):
    """Paper setup on one GPU: on this CPU-only machine, its documented one-line error."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the command would train for real")
    copy = fresh_copy(tmp_path)
    res = run_cli(*words(command), cwd=copy, check=False, timeout=300)
    one_line_error(res, "trainer=gpu needs a CUDA GPU")


def check_missing_inputs(command, tmp_path_factory, tmp_path):
    """Fig. 4 on a user's ResNet-200 and ImageNet: without them, a one-line error naming them."""
    copy = fresh_copy(tmp_path)
    inputs = {"<resnet200.ckpt>": "resnet200.ckpt", "<imagenet>": "imagenet"}
    args = words(command, {**inputs, "<folder with train/ and val/>": "imagenet"})
    res = run_cli(*args, cwd=copy, check=False, timeout=300)
    one_line_error(res, "ckpt_path=resnet200.ckpt", "no such file")


def check_slurm_sweep(command, tmp_path_factory, tmp_path):
    if not HAS_SLURM:
        pytest.skip("no Slurm cluster: run `scripts/slurm_local.sh start` (as root) first")
    sweep = sweep_dir(slurm_sweep(tmp_path_factory), "train")
    seeds = set()
    for job in (sweep / "0", sweep / "1"):
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["global_step"] == 20 and metrics["model"] == "resnet20"
        seeds.add(metrics["seed"])
        assert "in Slurm job" in (job / "run.log").read_text()  # ran inside Slurm
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert f"seed={metrics['seed']}" in overrides
    assert seeds == {0, 1}


def check_slurm_gpu_request(command, tmp_path_factory, tmp_path):
    """The paper's figures on GPU nodes: a partition without GPUs (this machine's) is refused
    before anything is submitted, with the override to change."""
    if not HAS_SLURM:
        pytest.skip("no Slurm cluster: run `scripts/slurm_local.sh start` (as root) first")
    default = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True)
    partition = next(p for p in default.stdout.split() if p.endswith("*")).rstrip("*")
    copy = fresh_copy(tmp_path)
    args = words(
        command,
        {
            "<your GPU partition>": partition,
            "<resnet200.ckpt>": "resnet200.ckpt",
            "<imagenet>": "imagenet",
        },
    )
    res = run_cli(*args, cwd=copy, check=False, timeout=300)
    one_line_error(res, "GPUs", "hydra.launcher.partition=")
    assert not list(copy.glob("outputs/*/multirun_*/.submitit/*")), "a job was submitted"


def check_lm_lesions(command, tmp_path_factory, tmp_path):
    """A GPT-style LM on Python's pydoc text: lesions measured in next-token loss; or the same
    lesions of a user's pretrained model directory (with its tokenizer) on a user's text file."""
    import pandas as pd

    copy = fresh_copy(tmp_path)
    if "preset=quick" in command:
        run_cli(*shortened(command, "delete_many", "reorder", "gradient_paths"), cwd=copy)
        blocks = 16
    else:  # a saved model and tokenizer, made here as a user's would be
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

        from src.data.text import pydoc_text

        text = pydoc_text()[:60_000]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(
            [text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"])
        )
        PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path / "tok")
        cfg = GPT2Config(n_layer=8, n_embd=16, n_head=2, n_positions=256, vocab_size=300)
        GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
        (tmp_path / "text.txt").write_text(text)
        subs = {
            "<save_pretrained dir>": str(tmp_path / "gpt2"),
            "<its tokenizer dir>": str(tmp_path / "tok"),
            "<a UTF-8 file>": str(tmp_path / "text.txt"),
        }
        run_cli(*words(command, subs), *SHORTEN["gradient_paths"], cwd=copy)
        blocks = 16
    run = single_run(copy, "lm_lesions")
    # GPT-NeoX's parallel layers: a path enters at most one of a layer's two branches
    longest = blocks // 2 if "model=gpt_neox" in command else blocks
    single = pd.read_csv(run / "analysis" / "delete_single.csv")
    if "every_n_steps" in command:  # lesions across training: step 0 and the trained network's
        assert sorted(set(single.step)) == [0, 20]
        single = single[single.step == 20]
    assert len(single) == blocks and set(single.metric) == {"loss"}
    assert sorted(set(single.kind)) == ["attn", "mlp"]
    assert (
        single.perplexity - single.loss.map(math.exp)
    ).abs().max() < 1e-6 * single.perplexity.max()
    for study in ("delete_many", "reorder"):
        assert set(pd.read_csv(run / "analysis" / f"{study}.csv").metric) == {"loss"}
    # gradient per path length at the embedding output, and its exact per-length sums
    paths = pd.read_csv(run / "analysis" / "gradient_paths.csv")
    assert sorted(paths.length) == list(range(1, longest + 1))
    assert (paths.grad_norm_mean > 0).all()
    exact = pd.read_csv(run / "analysis" / "path_decomposition.csv")
    assert sorted(exact.length) == list(range(blocks + 1))
    per_layer = blocks // longest  # branches a path can choose from at each step
    counts = [math.comb(longest, k) * per_layer**k for k in range(blocks + 1)]
    assert exact["count"].astype(int).tolist() == counts  # C(n, k); C(L, k) 2^k for parallel
    # their values are norms of the loss's gradient, for a language model as for a classifier
    assert set(paths.metric) == set(exact.metric) == {"grad_norm"}


def check_families_table(command, tmp_path_factory, tmp_path):
    """`python -m src.models.adapt` prints the registry's table, the one the README shows."""
    from src.models.adapt import families_table

    res = run_cli(*words(command), module="src.models.adapt", cwd=fresh_copy(tmp_path))
    assert res.stdout.strip() == families_table()


def check_test_rules(command, tmp_path_factory, tmp_path):
    """The block-subset checkpoints of the Sec. 5 sweep tested under every other rule, then the
    report of the whole outputs/ folder compares each rule with full training, paired by seed."""
    sweep = sweep_dir(effective_paths_quick(tmp_path_factory), "effective_paths")
    copy = tmp_path / "copy"
    shutil.copytree(sweep.parents[2], copy)
    sweep = copy / sweep.relative_to(sweep.parents[2])
    subsets = {}
    for job in sweep.iterdir():
        if (job / "metrics.json").is_file():
            m = json.loads((job / "metrics.json").read_text())
            if m["k"] == 4:
                subsets[m["seed"]] = job / "checkpoints" / "last.ckpt"
    assert sorted(subsets) == [0, 1, 2, 3]
    for ckpt in (subsets[0], subsets[1]):  # two seeds: enough for the paired comparison
        for rule in ("rescale", "recalibrate", "ensemble"):
            subs = {"<last.ckpt>": str(ckpt.relative_to(copy)), "<rule>": rule}
            run_cli(*words(command, subs), cwd=copy)
    runs = [json.loads(p.read_text()) for p in (copy / "outputs" / "train").glob("*/metrics.json")]
    assert len(runs) == 6 and all(r["k"] == 4 and r["training"] == "block_subset" for r in runs)
    for rule in ("rescale", "recalibrate", "ensemble"):  # each checkpoint keeps its own seed
        assert sorted(r["seed"] for r in runs if r["test_mode"] == rule) == [0, 1]
    assert all(
        {"test_error_m1", "test_error_m16"} <= set(r) for r in runs if r["test_mode"] == "ensemble"
    )
    run_cli("outputs", module="src.report", cwd=copy)
    res = json.loads((copy / "outputs" / "report" / "effective_paths.json").read_text())
    rules = ["k=4/9", "k=4/9 ensemble", "k=4/9 recalibrate", "k=4/9 rescale"]
    assert sorted(res["comparisons"]) == rules
    assert res["comparisons"]["k=4/9"]["paired_t"]["seeds"] == 4  # the sweep's own four
    assert all(res["comparisons"][r]["paired_t"]["seeds"] == 2 for r in rules[1:])
    md = (copy / "outputs" / "report" / "effective_paths.md").read_text()
    assert "| M=1 | M=2 | M=4 | M=8 | M=16 |" in md


def check_report(command, tmp_path_factory, tmp_path):
    """`python -m src.report <sweep>` on the sweep the docs name."""
    [target] = words(command, {"<multirun dir>": "any"})
    if target.startswith("outputs/train/"):  # after the README's Slurm sweep
        if not HAS_SLURM:
            pytest.skip("no Slurm cluster: run `scripts/slurm_local.sh start` (as root) first")
        copy = slurm_sweep(tmp_path_factory)
        sweep, analyses, jobs = sweep_dir(copy, "train"), [], 2
    elif target == "outputs":  # every data set's sweeps side by side, with the claims table
        copy = once(tmp_path_factory, "quickstart", lambda c: None)
        work = tmp_path / "copy"
        shutil.copytree(copy, work)
        run_cli("outputs", module="src.report", cwd=work)
        claims = (work / "outputs" / "report" / "claims.csv").read_text().splitlines()
        assert claims[0] == "figure,paper,test,digits,verdict"
        fig3 = next(line for line in claims if line.startswith("Fig. 3/4,"))
        assert fig3.endswith("digits: holds")  # ResNet-110 barely notices a deleted block
        assert "## Claims" in (work / "outputs" / "report" / "report.md").read_text()
        return
    elif target.startswith("experiments/results/"):  # a committed store's Sec. 5 runs
        copy = fresh_copy(tmp_path)
        run_cli(target, module="src.report", cwd=copy)
        store = copy / target
        trained = [json.loads(f.read_text()) for f in store.rglob("train/k*_seed*/metrics.json")]
        full = [m for m in trained if m["k"] == m["n_blocks"]]
        sets = sorted({m["data"] for m in full})  # one comparison per data set and length
        claims = {r["figure"]: r for r in read_csv(store / "report" / "claims.csv")}
        per_arm = {}  # an arm kept at several lengths: one comparison per length
        for m in trained:
            per_arm.setdefault((m["data"], m["k"]), set()).add(m["step"])
        for d in sets:
            lengths = sorted({m["step"] for m in full if m["data"] == d})
            several = any(len(v) > 1 for (data, _), v in per_arm.items() if data == d)
            for n in lengths:
                name = "_".join(["effective_paths"] + [d] * (len(sets) > 1) + [str(n)] * several)
                md = (store / "report" / f"{name}.md").read_text()
                seeds = sum(m["step"] == n and m["data"] == d for m in full)
                assert f"| full | {seeds} |" in md and f"| k=23/54 recalibrate | {seeds} |" in md
                assert_figure(store / "report" / f"{name}.png")
            if several:  # a verdict per length: at the longest that decides, the others beside
                verdicts = re.split(r"; (?=[a-z_]+: )", claims["Sec. 5"]["verdict"])
                [said] = [v for v in verdicts if v.startswith(f"{d}: ")]
                assert all(f"{n:,} steps" in said for n in lengths), said
                assert re.search(r"(holds|fails) at [\d,]+ steps", said), said
        return
    elif target.startswith("outputs/effective_paths/"):  # rebuild a copy of the Sec. 5 report
        sweep = sweep_dir(effective_paths_quick(tmp_path_factory), "effective_paths")
        work = tmp_path / "outputs" / "effective_paths" / sweep.name
        shutil.copytree(sweep, work)
        shutil.rmtree(work / "report")
        run_cli(str(work.relative_to(tmp_path)), module="src.report", cwd=tmp_path)
        check_effective_paths(command, tmp_path_factory, tmp_path, sweep=work)
        return
    elif target.startswith("outputs/delete_many/"):  # Fig. 5a over seeds, as on the GPU nodes
        copy = fresh_copy(tmp_path)
        run_cli(
            "-m",
            *shortened(
                "python -m src.run experiment=delete_many preset=quick seed=0,1", "delete_many"
            ),
            cwd=copy,
        )
        sweep, analyses, jobs = sweep_dir(copy, "delete_many"), ["delete_many"], 2
    else:  # any multirun dir: the quick start's
        copy = once(tmp_path_factory, "quickstart", lambda c: None)
        sweep, analyses, jobs = newest("outputs/delete_single/multirun_*", copy), [], 2
        analyses = ["delete_single"]
        work = tmp_path / "copy"  # the report writes into the sweep: leave the shared one be
        shutil.copytree(copy, work)
        copy, sweep = work, work / sweep.relative_to(copy)
    run_cli(str(sweep.relative_to(copy)), module="src.report", cwd=copy)
    md = (sweep / "report" / "report.md").read_text()
    assert f"{jobs} finished runs" in md
    for name in analyses:
        assert_figure(sweep / "report" / f"{name}.png")


def check_analyse_checkpoint(command, tmp_path_factory, tmp_path):
    """`train=false ckpt_path=outputs/.../last.ckpt`: no model=/data=/preset= repeated."""
    copy = once(tmp_path_factory, "quickstart", lambda c: None)
    ckpt = quickstart_jobs(copy)["resnet110"] / "checkpoints" / "last.ckpt"
    args = [
        w.replace("outputs/.../checkpoints/last.ckpt", str(ckpt.relative_to(copy)))
        for w in words(command)
    ]
    work = tmp_path / "copy"
    shutil.copytree(copy, work)
    bn = "recalibrate" if "bn=recalibrate" in command else "eval"
    run_cli(
        *args, *SHORTEN["delete_many"], *(SHORTEN["bn"] if bn == "recalibrate" else []), cwd=work
    )
    run = single_run(work, "delete_many")
    metrics = json.loads((run / "metrics.json").read_text())
    trained = json.loads((ckpt.parent.parent / "metrics.json").read_text())
    assert (metrics["model"], metrics["data"]) == ("resnet110", "digits")
    assert metrics["test_error"] == pytest.approx(trained["test_error"], abs=1e-6)
    rows = analysis(run, "delete_many")
    assert len(rows) == 21 * 2
    assert {r["bn"] for r in rows} == {bn}
    if bn == "recalibrate":  # statistics re-estimated per lesion: 10 deleted blocks barely hurt
        ten = [float(r["error"]) for r in rows if r["k"] == "10"]
        assert sum(ten) / len(ten) < 0.2


def check_slurm_shards(command, tmp_path_factory, tmp_path):
    """A study cut into shards, one Slurm job each, on the quick start's ResNet-110: the sweep's
    report merges them into the table the quick start's own (unsharded) run wrote."""
    if not HAS_SLURM:
        pytest.skip("no Slurm cluster: run `scripts/slurm_local.sh start` (as root) first")
    copy = once(tmp_path_factory, "quickstart", lambda c: None)
    job = quickstart_jobs(copy)["resnet110"]
    ckpt = job / "checkpoints" / "last.ckpt"
    args = [
        w.replace("outputs/.../checkpoints/last.ckpt", str(ckpt.relative_to(copy)))
        for w in words(command)
    ]
    work = tmp_path / "copy"
    shutil.copytree(copy, work)
    run_cli(*args, "callbacks.delete_single.progress=false", cwd=work, timeout=1800)
    sweep = newest("outputs/train/multirun_*", work)
    assert sorted(p.name for p in sweep.iterdir() if (p / "metrics.json").exists()) == list("0123")
    parts = [pd.read_parquet(sweep / j / "analysis" / "delete_single.parquet") for j in "0123"]
    assert [set(p.shard) for p in parts] == [{f"{i}/4"} for i in range(4)]
    assert sum(len(p) for p in parts) == 54 and all(len(p) < 54 for p in parts)
    merged = pd.read_parquet(sweep / "report" / "tables.parquet")
    merged = merged[merged.study == "delete_single"].drop(columns=["run_id", "run_dir"])
    whole = pd.read_parquet(job / "analysis" / "delete_single.parquet").drop(columns="run_id")
    got = merged.dropna(axis=1, how="all")[list(whole.dropna(axis=1, how="all").columns)]
    want = whole.dropna(axis=1, how="all")
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want, check_dtype=False)


def check_resume(command, tmp_path_factory, tmp_path):
    """`<same overrides> hydra.run.dir=<its run dir> resume=true` continues a run in place."""
    copy = fresh_copy(tmp_path)
    same = ["preset=quick", "model=resnet20", "logger=csv"]
    run_cli(*same, "trainer.max_steps=20", cwd=copy)
    run = single_run(copy, "train")
    args = words(
        command, {"<same overrides>": " ".join(same), "<its run dir>": str(run.relative_to(copy))}
    )
    run_cli(*args, "trainer.max_steps=40", cwd=copy)
    assert single_run(copy, "train") == run
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 40


def check_lesions_over_training(command, tmp_path_factory, tmp_path):
    """ResNet-110 (or, with arm=vit, the ViT's 24 sub-layers) trained three ways, each block
    deleted every 50 steps (and at step 0): one table per run with a `step` column, and the
    sweep's heatmap, one panel per training."""
    import pandas as pd

    vit = "arm=vit" in command
    copy = fresh_copy(tmp_path)
    run_cli(*shortened(command), cwd=copy)
    sweep = sweep_dir(copy, "lesions_over_training")
    trainings = set()
    for job in (sweep / "0", sweep / "1", sweep / "2"):
        t = pd.read_parquet(job / "analysis" / "delete_single.parquet")
        n = 24 if vit else 54
        assert sorted(t.step.unique()) == [0, 20] and len(t) == 2 * n  # step 0 and the end
        assert set(t.model) == {"vit_tiny" if vit else "resnet110"}
        if vit:
            assert set(t.kind) == {"attn", "mlp"}
        trainings |= set(t.training)
    assert trainings == {"standard", "stochastic_depth", "block_subset"}
    assert_figure(sweep / "report" / "delete_single.png")
    md = (sweep / "report" / "report.md").read_text()
    assert "at step 20 (of 2 steps)" in md


PERIODIC = "every_n_train_steps=50"


def periodic_run(tmp_path_factory) -> Path:
    """The README's periodic-checkpoint training, shortened: a checkpoint every 10 of 20 steps."""
    [cmd] = [c for c in documented_commands() if PERIODIC in c]
    args = [w.replace(PERIODIC, "every_n_train_steps=10") for w in shortened(cmd)]
    return ran(tmp_path_factory, "doc_periodic", *args)


def check_periodic_checkpoints(command, tmp_path_factory, tmp_path):
    run = single_run(periodic_run(tmp_path_factory), "train")
    found = sorted(p.name for p in (run / "checkpoints").glob("step-*.ckpt"))
    assert found == ["step-000010.ckpt", "step-000020.ckpt"]


def check_lesions_over_checkpoints(command, tmp_path_factory, tmp_path):
    """A multirun over a run's periodic checkpoints: each job's table carries its checkpoint's
    step, and the sweep's report is one group across steps (a heatmap), not one per file."""
    import pandas as pd

    copy = periodic_run(tmp_path_factory)
    work = tmp_path / "copy"
    shutil.copytree(copy, work)
    run = single_run(work, "train")
    listed = re.search(r'"ckpt_path=\$\(ls (\S+) \| paste -sd,\)"', command)
    pattern = listed[1].replace("outputs/train/<time>_<id>", str(run.relative_to(work)))
    ckpts = ",".join(str(p.relative_to(work)) for p in sorted(work.glob(pattern)))
    args = command.replace(listed[0], f"ckpt_path={ckpts}").split()[3:]
    run_cli(*args, cwd=work)
    sweep = sweep_dir(work, "train")
    t = pd.read_parquet(sweep / "report" / "tables.parquet")
    assert sorted(t.step.unique()) == [10, 20] and len(t) == 2 * 54
    md = (sweep / "report" / "report.md").read_text()
    assert "groups: resnet110." in md and "at step 20 (of 2 steps)" in md
    assert_figure(sweep / "report" / "delete_single.png")


def check_importance(command, tmp_path_factory, tmp_path):
    """`experiment=importance preset=quick`: scores, deletions and their rank correlations for
    ResNet-110 and the ViT arm, Gromov's heatmap per run, the overlay in the sweep's report."""
    import pandas as pd

    copy = fresh_copy(tmp_path)
    run_cli(*shortened(command), "callbacks.importance.resamples=50", cwd=copy)
    sweep = sweep_dir(copy, "importance")
    for job, blocks in (("0", 54), ("1", 24)):
        run = sweep / job / "analysis"
        rows = pd.read_csv(run / "importance.csv")
        assert rows.block.tolist() == list(range(blocks))
        assert rows[["block_influence", "angular_distance", "error"]].notna().all().all()
        corr = pd.read_csv(run / "importance_correlation.csv")
        if rows.error.nunique() == 1:  # 20 steps: every deletion alike, no ranking to compare
            assert corr.rho.isna().all(), corr
        else:
            assert ((corr.low <= corr.rho) & (corr.rho <= corr.high)).all(), corr
        assert_figure(run / "angular_distance.png")
    assert "kind" in pd.read_csv(sweep / "1" / "analysis" / "importance.csv")  # the ViT
    assert_figure(sweep / "report" / "importance.png")


def check_prune(command, tmp_path_factory, tmp_path):
    """`experiment=prune preset=quick`: every strategy's sets and values, healed networks kept as
    checkpoints that `train=false ckpt_path=` tests to the table's own healed value."""
    import pandas as pd

    copy = fresh_copy(tmp_path)
    short = ["callbacks.prune.max_k=2", "callbacks.prune.trials=2", "callbacks.prune.heal_steps=3"]
    short += ["callbacks.prune.heal_ks=[2]", "callbacks.prune.export_k=2"]  # within max_k
    run_cli(*shortened(command), *short, cwd=copy)
    sweep = sweep_dir(copy, "prune")
    rows = pd.read_csv(sweep / "0" / "analysis" / "prune.csv")
    assert set(rows.strategy) == {
        "random", "block_influence", "relative_contribution", "angular_distance",
        "angular_run", "greedy",
    }  # fmt: skip
    healed = rows[rows.healed.notna()]
    assert set(healed.k) == {2} and len(healed) == 6
    greedy = healed[healed.strategy == "greedy"].iloc[0]
    ckpt = sweep / "0" / "analysis" / "prune" / "greedy_k2.ckpt"
    run_cli("train=false", f"ckpt_path={ckpt}", "logger=csv", cwd=copy)
    metrics = json.loads((single_run(copy, "train") / "metrics.json").read_text())
    assert metrics["n_blocks"] == 54 - len(str(greedy.deleted).split())
    assert metrics["test_error"] == pytest.approx(greedy.healed, abs=1e-6)  # float32; 1 image: 3e-3
    summary = json.loads((sweep / "0" / "analysis" / "summary.json").read_text())
    exported = summary["prune"]["export"]  # greedy's healed network at k=2: the same weights
    assert exported.endswith("analysis/prune/export_greedy_k2.ckpt")
    assert (sweep / "0" / "analysis" / "prune" / "export_greedy_k2.ckpt").is_file()
    assert_figure(sweep / "report" / "prune.png")


def check_lm_which_blocks(command, tmp_path_factory, tmp_path):
    """The quick GPT with `importance` and `prune` added: sub-layer scores, whole-layer pruning,
    and the greedy set at k=2 exported as a 6-layer GPT-2 that plain transformers loads."""
    import pandas as pd
    from transformers import AutoModelForCausalLM

    copy = fresh_copy(tmp_path)
    run_cli(*shortened(command), "callbacks.prune.max_k=2", "callbacks.prune.trials=2", cwd=copy)
    run = single_run(copy, "lm_lesions") / "analysis"
    assert len(pd.read_csv(run / "importance.csv")) == 16
    rows = pd.read_csv(run / "prune.csv")
    assert set(rows.unit) == {"layer"} and set(rows.metric) == {"loss"}
    two = rows[(rows.strategy == "greedy") & (rows.k == 2)].deleted.iloc[0].split()
    assert len(two) == 4  # two whole layers: attention and MLP of each
    model = AutoModelForCausalLM.from_pretrained(run / "prune" / "export_greedy_k2")
    assert model.config.n_layer == 6
    summary = json.loads((run / "summary.json").read_text())
    assert summary["prune"]["export"].endswith("export_greedy_k2")


@dataclass(frozen=True)
class Rule:
    pattern: str
    check: Callable
    marks: tuple = (pytest.mark.slow,)


SLURM = (pytest.mark.slow, pytest.mark.slurm, pytest.mark.xdist_group("slurm"))
RULES = [
    Rule(r"python -m src\.models\.adapt", check_families_table),
    Rule(
        r"(python -m venv .*&& )?python -m src\.run experiment=delete_single preset=quick",
        check_quickstart,
    ),
    Rule(r"python -m src\.run -m hydra/launcher=slurm_gpu .*", check_slurm_gpu_request, SLURM),
    Rule(r"python -m src\.run -m hydra/launcher=slurm (?!.*shard=).*", check_slurm_sweep, SLURM),
    Rule(r"python -m src\.run -m hydra/launcher=slurm .*\.shard=\S+", check_slurm_shards, SLURM),
    Rule(r"python -m src\.run (?!-m ).*trainer=gpu.*", check_needs_gpu),
    Rule(
        r"python -m src\.run experiment=imagenet_delete_single train=false .*", check_missing_inputs
    ),
    Rule(
        r"python -m src\.run experiment=(delete_many|reorder|stochastic_depth"
        r"|imagenet_delete_single|duplicate) preset=quick",
        check_quick_experiment,
    ),
    Rule(
        r"python -m src\.run experiment=gradient_paths preset=quick( train=false .*)?",
        check_gradient_paths,
    ),
    Rule(
        r"python -m src\.run experiment=effective_paths preset=quick",
        check_effective_paths,
    ),
    Rule(r"python -m src\.run experiment=(path_lengths|remaining_paths)", check_analytic),
    Rule(r"python -m src\.report (\S+|<multirun dir>)", check_report),
    Rule(r"python -m src\.run experiment=vit_lesions preset=quick", check_vit_lesions),
    Rule(
        r"python -m src\.run experiment=lm_lesions "
        r"(preset=quick( model=gpt_neox| callbacks\.delete_single\.every_n_steps=\d+)?"
        r"|train=false model\.path=.*)",
        check_lm_lesions,
    ),
    Rule(
        r"python -m src\.run train=false ckpt_path=<last\.ckpt> training=block_subset "
        r"training\.test_mode=<rule>",
        check_test_rules,
    ),
    Rule(
        r"python -m src\.run experiment=delete_many train=false ckpt_path=\S+"
        r"( callbacks\.delete_many\.bn=recalibrate| trainer=ddp trainer\.devices=2)?",
        check_analyse_checkpoint,
    ),
    Rule(
        r"python -m src\.run <same overrides> hydra\.run\.dir=<its run dir> resume=true",
        check_resume,
    ),
    Rule(
        r"python -m src\.run experiment=lesions_over_training preset=quick( arm=vit)?",
        check_lesions_over_training,
    ),
    Rule(
        r"python -m src\.run preset=quick callbacks=periodic "
        r"callbacks\.periodic_checkpoint\.every_n_train_steps=50",
        check_periodic_checkpoints,
    ),
    Rule(
        r'python -m src\.run -m train=false "ckpt_path=\$\(ls \S+ \| paste -sd,\)" '
        r"\+lesion@callbacks\.delete_single=delete_single",
        check_lesions_over_checkpoints,
    ),
    Rule(r"python -m src\.run experiment=importance preset=quick", check_importance),
    Rule(r"python -m src\.run experiment=prune preset=quick", check_prune),
    Rule(
        r"python -m src\.run experiment=lm_lesions preset=quick hydra\.mode=RUN "
        r"\+lesion@callbacks\.importance=importance \+lesion@callbacks\.prune=prune .*",
        check_lm_which_blocks,
    ),
]


def rules_for(command: str) -> list[Rule]:
    return [r for r in RULES if re.fullmatch(r.pattern, command)]


def test_the_readme_lists_the_registered_families():
    """The README's table of supported families is the registry's (`python -m src.models.adapt`
    prints it): a family added without its row, or a row without its family, fails here."""
    from src.models.adapt import families_table

    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- families: python -m src.models.adapt -->\n") + 46
    documented = readme[start : readme.index("\n<!-- /families -->")]
    assert documented == families_table()


def test_the_docs_name_every_registered_study():
    """Every study of the registry (src/studies.py) is documented: in the README or, for one
    beyond it, in CONTRIBUTING.md (the worked example)."""
    from src.studies import registry

    docs = "".join(p.read_text() for p in (*DOCS, REPO / "CONTRIBUTING.md"))
    assert [name for name in registry() if f"`{name}`" not in docs] == []


def test_every_documented_command_has_a_rule():
    commands = documented_commands()
    assert len(commands) >= 25 and any(c.startswith(INSTALL) for c in commands)
    for command in commands:
        assert len(rules_for(command)) == 1, f"{len(rules_for(command))} rules for: {command}"
        for override in ("hydra.sweep.dir=", " paths."):
            assert override not in command, command


def _params():
    out = []
    for command in documented_commands():
        rules = rules_for(command)
        marks = rules[0].marks if len(rules) == 1 else ()
        out.append(pytest.param(command, marks=marks, id=command.replace("python -m ", "")))
    return out


@pytest.mark.parametrize("command", _params())
def test_documented_command(command, request, tmp_path_factory, tmp_path):
    [rule] = rules_for(command)
    if rule.check in (
        check_quickstart,
        check_report,
        check_analyse_checkpoint,
    ):
        request.getfixturevalue("quickstart")
    rule.check(command, tmp_path_factory, tmp_path)
