"""Every leaf key of every composed config refuses a wrong-typed value, and a number that must be
positive refuses a negative one, in one line naming the key (src/schema.py); the CLI turns such a
value into `error: ...` and exit 2 before any work."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

import src.run  # noqa: F401  (registers the ${uid:} and W&B resolvers)
from src import rundir, schema
from src.errors import ConfigError, unknown_key
from tests.conftest import run_cli

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# Numbers whose annotation also takes a float (a fraction is no wrong type for them).
FLOAT_OK = {
    "callbacks.progress_bar.interval",
    "trainer.limit_val_batches",
    "trainer.val_check_interval",
}
# Keys whose annotation also takes a string: a checkpoint path, Lightning's "auto" / "0,1" devices,
# its "DD:HH:MM:SS" validation interval.
STRING_OK = {"resume", "trainer.devices", "trainer.val_check_interval"}
# -1 is documented as meaningful (Lightning: no limit / every device / every batch / keep all).
MINUS_ONE = {
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.devices",
    "trainer.num_sanity_val_steps",
    "callbacks.model_checkpoint.save_top_k",
}
# Where a negative number is a real value: a seed of the data split or a token id is any int.
NEGATIVE_OK = {"model.config.bos_token_id", "model.config.eos_token_id"}
# The analytic tasks' functions (src/analysis/path_stats.py) declare types but no ranges yet:
# they refuse a negative value themselves, in one line through src/run.py. Every analysis
# callback declares its ranges in its signature (src/analysis/*).
RANGE_IN_CONSTRUCTOR = ("task.",)


@functools.cache
def composed() -> dict[str, DictConfig]:
    """name -> the composed config (with Hydra's runtime set, so `${hydra:...}` resolves)."""
    cfgs = {}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name in [None, *EXPERIMENTS]:
            overrides = [] if name is None else [f"experiment={name}", "preset=quick"]
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
            with open_dict(cfg):
                cfg.paths.output_dir = cfg.hydra.runtime.output_dir = "/nonexistent/run"
            cfgs[name or "default"] = cfg
    return cfgs


def leaves(node, path: str = ""):
    """(key, value) of every leaf under `node` but Hydra's own; lists count as leaves."""
    for key in node:
        full = f"{path}.{key}" if path else str(key)
        if full == "hydra" or str(key).startswith("_"):
            continue
        try:
            value = node[key]
        except Exception:  # an interpolation that needs a running job
            continue
        if isinstance(value, DictConfig):
            yield from leaves(value, full)
        else:
            yield full, value


def wrong_values(key: str, value) -> list:
    """A word for a number, a fraction for an integer, a word for a boolean or a list."""
    if isinstance(value, bool):
        return [] if key in STRING_OK else ["maybe"]
    if isinstance(value, int):
        words = [] if key in STRING_OK else ["abc"]
        return words if key in FLOAT_OK else [*words, 1.5]
    if isinstance(value, float):
        return ["abc"]
    if isinstance(value, ListConfig):
        return ["abc"]
    return []  # a string or null: any word may be right


def cases():
    """(config name, key, bad value, whether it must be refused), each key and value once."""
    seen, out = set(), []
    for name, cfg in composed().items():
        for key, value in leaves(cfg):
            if key.startswith("model.config."):  # transformers' own config, set as one mapping
                continue
            target = (
                OmegaConf.select(cfg, key.rsplit(".", 1)[0] + "._target_") if "." in key else None
            )
            bad = [(v, True) for v in wrong_values(key, value)]
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and value > 0 and key not in NEGATIVE_OK:
                ranged = not key.startswith(RANGE_IN_CONSTRUCTOR)
                bad.append((-5 if isinstance(value, int) else -0.5, ranged))
                if key in MINUS_ONE:
                    bad.append((-1, False))
            for v, refused in bad:
                if (key, target, repr(v)) not in seen:
                    seen.add((key, target, repr(v)))
                    out.append((name, cfg, key, v, refused))
    return out


def test_every_leaf_key_refuses_a_wrong_value_in_one_line():
    checked, accepted = 0, []
    for name, cfg, key, value, refused in cases():
        bad = copy.deepcopy(cfg)
        with open_dict(bad):
            OmegaConf.update(bad, key, value, merge=False)
        HydraConfig.instance().set_config(bad)
        try:
            schema.check(bad)
        except ConfigError as err:
            line = str(err)
            assert "\n" not in line and line.startswith(f"{key}={value!r}"), (name, key, line)
            assert refused, (name, key, value, line)
            checked += 1
        else:
            if refused:
                accepted.append((name, key, value))
    assert not accepted, accepted
    assert checked > 100


def test_composed_configs_pass_and_a_short_schedule_is_named():
    for name, cfg in composed().items():
        HydraConfig.instance().set_config(cfg)
        schema.check(cfg)
        assert schema.schedule_warning(cfg) is None, name
    cfg = copy.deepcopy(composed()["default"])
    cfg.trainer.max_steps = 150
    line = schema.schedule_warning(cfg)
    assert "optim.warmup_steps=400" in line and "optim.milestones [32000, 48000]" in line


def test_an_unknown_key_names_what_the_target_takes():
    cfg = copy.deepcopy(composed()["default"])
    with open_dict(cfg):
        cfg.model.foo = 1
    with pytest.raises(ConfigError, match="model.foo: .* takes no parameter 'foo'; it takes"):
        schema.check(cfg)


def test_a_builders_value_error_becomes_one_line_naming_its_node():
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    cfg = OmegaConf.create({"model": {"_target_": "src.models.torchvision_resnet", "arch": "x"}})
    with pytest.raises(InstantiationException) as caught:
        instantiate(cfg.model)
    err = src.run.reported(caught.value)
    assert isinstance(err, ConfigError) and str(err).startswith("model: unknown torchvision arch")


CLI = {
    ("seed=abc",): "seed='abc': an integer >= 0 or null; got a string",
    ("seed=1.5",): "seed=1.5: an integer >= 0 or null; got a fraction",
    ("optim.lr=abc",): "optim.lr='abc': a number > 0; got a string",
    ("model.shortcut=C",): "model.shortcut='C': one of A, B; got 'C'",
    ("trainer.max_steps=-5",): "trainer.max_steps=-5: an integer >= -1 (-1: no limit)",
    ("train=maybe",): "train='maybe': true or false; got a string",
    ("data.eval_batch_size=-7",): "data.eval_batch_size=-7: an integer > 0 or null",
    ("model=hf_causal_lm",): "the model takes tokens, the data takes images",
    ("model=torchvision", "model.arch=resnet7"): "model: unknown torchvision arch 'resnet7'",
}


@pytest.mark.slow
@pytest.mark.parametrize("overrides", list(CLI), ids=lambda o: " ".join(o))
def test_cli_reports_a_bad_value_in_one_line_before_any_work(overrides, tmp_path):
    res = run_cli(*overrides, "preset=quick", f"hydra.run.dir={tmp_path}/x", check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines[-1] == f"error: {CLI[overrides]}" or (
        lines[-1].startswith("error: ") and CLI[overrides] in lines[-1]
    ), res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "Error executing job" not in res.stderr
    assert not list(tmp_path.glob("x/checkpoints/*"))


@pytest.mark.parametrize(
    "experiment, key, value, said",
    [
        ("delete_many", "callbacks.delete_many.ks", [2, -1], "each element an integer >= 0"),
        ("delete_many", "callbacks.delete_many.trials", 0, "an integer > 0; got 0"),
        ("reorder", "callbacks.reorder.swaps", [-2], "each element an integer >= 0"),
        ("reorder", "callbacks.reorder.trials", 0, "an integer > 0; got 0"),
        ("duplicate", "callbacks.duplicate.blocks", [-1], "each element an integer >= 0"),
        ("gradient_paths", "callbacks.gradient_paths.lengths", [0, 3], "an integer > 0"),
        ("gradient_paths", "callbacks.gradient_paths.chunk", 0, "an integer > 0; got 0"),
        ("gradient_paths", "callbacks.gradient_paths.share", 1.5, "a number in (0, 1]; got 1.5"),
        ("gradient_paths", "callbacks.gradient_paths.engine", "nope", "one of fast, straightfor"),
    ],
)
def test_the_analyses_declare_their_ranges(experiment, key, value, said):
    """Ranges in the studies' signatures (not only in their constructors): refused by the check,
    before any work, in one line naming the key."""
    cfg = copy.deepcopy(composed()[experiment])
    with open_dict(cfg):
        OmegaConf.update(cfg, key, value, merge=False)
    HydraConfig.instance().set_config(cfg)
    with pytest.raises(ConfigError) as caught:
        schema.check(cfg)
    assert str(caught.value).startswith(f"{key}={value!r}: ") and said in str(caught.value)


UNKNOWN = {
    ("preset=quick", "trainer.max_stepz=5"): "trainer.max_stepz is not a config key (did you "
    "mean trainer.max_steps?): fix the spelling, or add it with +trainer.max_stepz=5 if it is new",
    ("experiment=delete_single", "preset=quick", "callbacks.delete_single.blokcs=[1]"): (
        "callbacks.delete_single.blokcs is not a config key (did you mean "
        "callbacks.delete_single.blocks?): fix the spelling, or add it with "
        "+callbacks.delete_single.blokcs=[1] if it is new"
    ),
    ("trainr.max_steps=5",): "trainr.max_steps is not a config key (did you mean "
    "trainer.max_steps?): fix the spelling, or add it with +trainr.max_steps=5 if it is new",
    ("presett=quick",): "presett is not a config key (did you mean preset?)",
    ("trainer.zzzzzz=1",): "trainer.zzzzzz is not a config key: fix the spelling, or add it "
    "with +trainer.zzzzzz=1 if it is new",
}


def test_an_unknown_key_without_plus_is_one_line_naming_the_nearest_key():
    from hydra.errors import ConfigCompositionException

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for overrides, said in UNKNOWN.items():
            with pytest.raises(ConfigCompositionException) as caught:
                compose("config", overrides=list(overrides))
            line = str(unknown_key(caught.value))
            assert line.startswith(said) and "\n" not in line, (overrides, line)
    assert unknown_key(ValueError("Could not override 'x'.")) is None  # not Hydra's refusal


@pytest.mark.slow
@pytest.mark.parametrize("multirun", [False, True], ids=["run", "multirun"])
def test_cli_reports_an_unknown_key_in_one_line(multirun, tmp_path):
    where = ["-m", "seed=1,2", f"hydra.sweep.dir={tmp_path}/s"] if multirun else []
    overrides = (*where, "preset=quick", "trainer.max_stepz=5", f"hydra.run.dir={tmp_path}/x")
    res = run_cli(*overrides, check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    said = UNKNOWN[("preset=quick", "trainer.max_stepz=5")]
    assert res.stderr.strip().splitlines()[-1] == f"error: {said}", res.stderr[-2000:]
    assert "HYDRA_FULL_ERROR" not in res.stderr and "Could not override" not in res.stderr
    assert not list(tmp_path.iterdir())  # refused while composing: no run directory


def test_checking_a_config_writes_no_wandb_id(tmp_path):
    cfg = copy.deepcopy(composed()["default"])
    assert "wandb" in cfg.logger
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    schema.check(cfg)  # resolves logger.wandb.id
    assert not list(tmp_path.iterdir())
    assert cfg.logger.wandb.id == (tmp_path / "wandb_id").read_text().strip()  # once it runs


def test_a_refused_run_puts_back_the_records_hydra_rewrote(tmp_path, monkeypatch):
    from hydra.core import utils

    monkeypatch.setattr(utils, "_save_config", utils._save_config)  # undone after the test
    monkeypatch.setattr(rundir, "_EARLIER", {})
    records = tmp_path / "run" / ".hydra"
    records.mkdir(parents=True)
    (records / "overrides.yaml").write_text("- seed=0\n")
    rundir.keep_earlier_records()
    for name in ("overrides.yaml", "hydra.yaml"):  # one there before, one new
        utils._save_config(OmegaConf.create(["seed=1"]), name, records)
    utils._save_config(OmegaConf.create(["seed=1"]), "overrides.yaml", tmp_path / "other")
    assert (records / "overrides.yaml").read_text() == "- seed=1\n"
    assert rundir.restore_earlier_records(tmp_path / "run") == [records / "overrides.yaml"]
    assert (records / "overrides.yaml").read_text() == "- seed=0\n"


def fake_finished_run(run_dir: Path) -> dict[Path, bytes]:
    """A run directory as a finished run leaves it; each file with its bytes."""
    files = {
        "metrics.json": '{"test_error": 0.1}\n',
        "checkpoints/last.ckpt": "weights",
        ".hydra/config.yaml": "seed: 0\n",
        ".hydra/hydra.yaml": "hydra: {}\n",
        ".hydra/overrides.yaml": "- seed=0\n",
        "run.log": "the first run\n",
    }
    for name, text in files.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(text)
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_refused_run_leaves_no_wandb_id_and_a_run_dir_as_it_was(tmp_path):
    res = run_cli("preset=quick", "seed=abc", f"hydra.run.dir={tmp_path}/new", check=False)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: seed=")
    assert not (tmp_path / "new" / "wandb_id").exists()  # (the W&B logger is the default)
    old = tmp_path / "old"
    kept = fake_finished_run(old)
    for overrides in (["seed=1"], ["seed=abc", "resume=true"]):  # a re-run; a refused resume
        res = run_cli("preset=quick", *overrides, f"hydra.run.dir={old}", check=False)
        assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: ")
        assert {p: p.read_bytes() for p in kept} == kept, overrides
        assert not (old / "wandb_id").exists()
