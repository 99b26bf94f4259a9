"""Studies as plug-ins: the registry (src/studies.py) is the one list of studies, every lesion
study fills in one skeleton (src/analysis/base.py), and every Plan field declares how the
engines treat it (Plan.FIELDS): handled or refused, never ignored."""

# ruff: noqa: E402
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from src.analysis.base import LesionStudy
from src.analysis.duplicate import Duplicate
from src.engines.lesion import lesion_errors, lesion_plan
from src.engines.paths import (
    BlockVJPs,
    fast_path_grads,
    gradient_plan,
    straightforward_path_grads,
)
from src.errors import ConfigError
from src.lm import LanguageModel
from src.models import FULL, Plan, preact_resnet_cifar
from src.models.hf_adapters import causal_lm_network
from src.studies import registry
from tests.conftest import own_columns
from tests.test_lm_lesions import VOCAB, tiny_gpt2, token_batches

ROOT = Path(__file__).resolve().parent.parent


def test_every_study_has_its_config_and_figures():
    studies = registry()
    assert {"delete_single", "delete_many", "reorder", "gradient_paths"} <= set(studies)
    for name, s in studies.items():
        conf = yaml.safe_load((ROOT / "conf" / f"{s.config}.yaml").read_text())
        assert conf["_target_"].startswith(f"src.analysis.{name}."), name
        assert s.figures and s.title and s.claim, name
    lesion = [s for s in studies.values() if s.config.startswith("lesion/")]
    assert all("error" in s.figures and "loss" in s.figures for s in lesion)
    sections = [s.section for s in studies.values()]  # the paper's order, then the rest
    assert sections == sorted(sections, key=lambda x: (x is None, x or ""))


def test_no_study_name_is_listed_outside_its_own_module():
    """src/ names a study only in its module (src/analysis/<name>.py): the report, the claims
    table and the figures find studies through the registry."""
    for path in (ROOT / "src").rglob("*.py"):
        text = path.read_text()
        for name in registry():
            if path.stem != name:
                assert not re.search(rf"[\"']{name}[\"']", text), (path, name)


def test_every_lesion_config_extends_the_shared_keys():
    base = yaml.safe_load((ROOT / "conf" / "lesion" / "base.yaml").read_text())
    for s in registry().values():
        if s.config.startswith("lesion/"):
            conf = yaml.safe_load((ROOT / "conf" / f"{s.config}.yaml").read_text())
            assert conf["defaults"] == ["base", "_self_"], s.name
            assert not set(conf) & set(base), s.name  # no shared key repeated


def lm_run(tmp_path, n_layer=2):
    """A tiny GPT-2 as the LightningModule, a trainer and data module stand-in for `analyse`."""
    data = token_batches(n=2)
    x, y = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    dm = SimpleNamespace(test_dataloader=lambda: DataLoader(TensorDataset(x, y), batch_size=4))
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), datamodule=dm, loggers=[])
    return trainer, LanguageModel(causal_lm_network(tiny_gpt2(n_layer)), num_classes=VOCAB), data


def test_duplicate_on_a_language_model_writes_a_loss_column(tmp_path):
    trainer, module, data = lm_run(tmp_path)
    study = Duplicate(progress=False)
    study.analyse(trainer, module)
    rows = pd.read_csv(tmp_path / "analysis" / "duplicate.csv")
    assert own_columns(rows.iloc[0].to_dict()) == [
        *("block", "stage", "downsampling", "layer", "kind"),
        *("loss", "perplexity", "baseline", "baseline_perplexity", "bn"),
    ]
    assert set(rows.metric) == {"loss"} and "error" not in rows
    assert own_columns(rows.iloc[0].to_dict())[:3] == list(registry()["duplicate"].columns)
    net = module.net
    plans = [lesion_plan(None, order=[*range(i + 1), i, *range(i + 1, 4)]) for i in range(4)]
    base, want = lesion_errors(net, plans, data, metric="loss", reuse=False)
    assert rows.loss.tolist() == pytest.approx(want, rel=1e-6)
    assert (rows.perplexity == rows.loss.map(math.exp)).all()
    summary = json.loads((tmp_path / "analysis" / "summary.json").read_text())
    assert summary["duplicate"]["baseline_loss"] == pytest.approx(base, rel=1e-6)
    assert summary["duplicate"]["median_increase"] == pytest.approx(rows.loss.median() - base)
    assert (tmp_path / "analysis" / "duplicate.png").stat().st_size > 0


def test_an_unregistered_lesion_study_records_without_a_figure(tmp_path):
    """The skeleton alone: a study is its plans; the table's value column follows the metric."""

    class DeleteFirst(LesionStudy):
        name = "delete_first"

        def lesions(self, net, base):
            return [({"block": 0}, lesion_plan(base, [0]))]

    trainer, module, _ = lm_run(tmp_path)
    DeleteFirst(progress=False, metric="error").analyse(trainer, module)
    rows = pd.read_csv(tmp_path / "analysis" / "delete_first.csv")
    assert own_columns(rows.iloc[0].to_dict()) == ["block", "error", "baseline", "bn"]
    assert not (tmp_path / "analysis" / "delete_first.png").exists()


# --- the Plan's field table ---------------------------------------------------------------------


def extended_plan(kind: str | None):
    """Plan with one more field, `echo`, of `kind` in the field table (None: no entry)."""
    table = dict(Plan.FIELDS) | ({"echo": kind} if kind else {})
    return dataclasses.make_dataclass(
        "EchoPlan",
        [("echo", float, 0.0)],
        bases=(Plan,),
        frozen=True,
        namespace={"FIELDS": table},
    )


def test_a_plan_field_without_a_kind_is_refused():
    EchoPlan = extended_plan(None)
    with pytest.raises(TypeError, match="'echo' has no kind in Plan.FIELDS"):
        EchoPlan()


@pytest.mark.parametrize("kind", ["forward", "training", "gate"])
def test_a_new_plan_field_is_refused_by_the_gradient_engines_and_never_reused(kind):
    net = preact_resnet_cifar(blocks_per_stage=2, in_channels=1).eval()
    EchoPlan = extended_plan(kind)
    base, plan = EchoPlan(), EchoPlan(echo=1.0, deleted=frozenset({4}))
    assert net.restart(base, plan) == 0  # a global change: the lesion engine reuses nothing
    assert net.restart(base, EchoPlan(deleted=frozenset({4}))) == 4
    assert not plan.plain
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ConfigError, match="not one with echo"):
        gradient_plan(plan)
    with pytest.raises(ConfigError, match="not one with echo"):
        BlockVJPs(net, x, y, plan=plan)
    gradient_plan(base)  # at its default the field changes nothing


def test_the_field_table_decides(monkeypatch):
    """branch_scale is a per-block scale the gradient engines apply through Network.scaled;
    declared training-only, it is refused."""
    net = preact_resnet_cifar(blocks_per_stage=2, in_channels=1).eval()
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    halved = Plan(branch_scale=(1.0, 1.0, 0.5, 1.0, 1.0, 1.0))
    assert net.restart(FULL, halved) == 2  # reused up to the first block whose scale differs
    assert net.restart(halved, lesion_plan(halved, [4])) == 4
    assert net.restart(Plan(branch_scale=(1.0,) * 6), FULL) is None
    paths = [frozenset({1, 2}), frozenset({2})]
    got = fast_path_grads(net, x, y, paths, plan=halved)
    assert torch.allclose(got, straightforward_path_grads(net, x, y, paths, plan=halved))
    assert not torch.allclose(got, fast_path_grads(net, x, y, paths))  # the scale applied
    monkeypatch.setitem(Plan.FIELDS, "branch_scale", "training")
    with pytest.raises(ConfigError, match="not one with branch_scale"):
        gradient_plan(halved)
