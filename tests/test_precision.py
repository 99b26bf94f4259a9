"""The CPU training fast path (src/precision.py, issue 21): bf16-mixed and channels_last where the
CPU has native bf16, fp32 elsewhere and whenever `trainer.precision` is set; one log line says
which and why; the analyses run outside autocast in fp32; a killed bf16 run resumes bit-identically.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

import src.run  # noqa: F401  (registers the resolvers)
from src import precision, schema
from src.errors import ConfigError
from src.models import preact_resnet_cifar
from tests.conftest import run_cli
from tests.test_config import CONF


@pytest.fixture
def native(monkeypatch):
    """Pretend the CPU has (flag) or lacks (None) native bf16."""

    def pretend(flag):
        monkeypatch.setattr(precision, "native_bf16", lambda: flag)

    return pretend


def composed(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("flag", ["amx_bf16", "avx512_bf16", None])
def test_cpu_training_is_bf16_where_the_cpu_has_it(native, flag):
    native(flag)
    expect = "bf16-mixed" if flag else "32-true"
    for trainer in ("cpu", "default", "ddp"):
        if trainer != "cpu" and torch.cuda.is_available():
            continue  # accelerator auto picks the GPU there
        cfg = composed("preset=quick", f"trainer={trainer}")
        assert cfg.trainer.precision == expect, trainer
    assert composed("trainer=gpu").trainer.precision == "bf16-mixed"  # set, not chosen
    assert precision.auto_precision("gpu") == "32-true"
    assert composed("trainer=cpu", "trainer.precision=32-true").trainer.precision == "32-true"


def test_the_choice_and_its_reason(native):
    net = preact_resnet_cifar(1, in_channels=1)
    native("amx_bf16")
    choice = precision.choose(composed("trainer=cpu"), net)
    assert (choice.precision, choice.memory_format) == ("bf16-mixed", "channels_last")
    assert "native bf16 (amx_bf16)" in str(choice) and "\n" not in str(choice)
    choice = precision.choose(composed("trainer=cpu", "trainer.precision=32-true"), net)
    assert (choice.precision, choice.memory_format) == ("32-true", "contiguous")
    assert "trainer.precision set" in choice.why
    native(None)
    choice = precision.choose(composed("trainer=cpu"), net)
    assert (choice.precision, choice.memory_format) == ("32-true", "contiguous")
    assert "no native bf16" in choice.why
    cfg = composed("trainer=cpu", "memory_format=channels_last")
    assert precision.choose(cfg, net).memory_format == "channels_last"
    with pytest.raises(ConfigError, match=r"^memory_format='nchw': one of auto, channels_last"):
        schema.check(composed("memory_format=nchw"))


def test_a_language_model_stays_contiguous(native):
    from src.models import hf_causal_lm

    native("amx_bf16")
    lm = hf_causal_lm(
        config={"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 16}
    )
    choice = precision.choose(composed("trainer=cpu"), lm)
    assert (choice.precision, choice.memory_format) == ("bf16-mixed", "contiguous")


def test_channels_last_changes_the_layout_not_the_function():
    torch.manual_seed(0)
    net = preact_resnet_cifar(1, in_channels=1).eval()
    x = torch.randn(4, 1, 8, 8)
    before = net(x)
    precision.Choice("32-true", "channels_last", "").apply(net)
    conv = net.blocks[0].layers[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert torch.allclose(net(x), before, atol=1e-5)


class Probe(L.Callback):
    """What an analysis sees at the end of testing (where AnalysisCallback runs)."""

    def on_test_end(self, trainer, pl_module):
        x = torch.randn(2, 1, 8, 8)
        self.autocast = torch.is_autocast_enabled("cpu")
        self.dtypes = {p.dtype for p in pl_module.net.parameters()}
        self.out = pl_module.net(x).dtype


def test_evaluation_and_analyses_run_in_fp32_after_bf16_training():
    from src.data import DigitsDataModule
    from src.module import Classifier

    L.seed_everything(0)
    net = precision.Choice("bf16-mixed", "channels_last", "").apply(
        preact_resnet_cifar(1, in_channels=1)
    )
    module, probe = Classifier(net, warmup_steps=0), Probe()
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=2,
        limit_test_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe],
    )
    seen = []  # (stage, autocast on) at every forward of the network
    net.register_forward_pre_hook(
        lambda *_: seen.append((str(trainer.state.stage), torch.is_autocast_enabled("cpu")))
    )
    dm = DigitsDataModule(batch_size=16)
    trainer.fit(module, dm)
    trainer.test(module, dm, verbose=False)
    assert not probe.autocast and probe.dtypes == {torch.float32} and probe.out == torch.float32
    # training steps ran under autocast, validation and testing outside it (test_error = baseline)
    assert {s for s, on in seen if on} == {"RunningStage.TRAINING"}, seen
    assert {"RunningStage.SANITY_CHECKING", "RunningStage.TESTING"} <= {s for s, on in seen}


@pytest.mark.slow
def test_the_log_names_the_choice_and_a_lesion_run_finishes(tmp_path):
    run = tmp_path / "run"
    run_cli(
        "experiment=delete_single",
        "preset=quick",
        "model=resnet20",
        "logger=csv",
        "callbacks.progress_bar=null",
        "trainer.max_steps=3",
        "trainer.precision=bf16-mixed",
        "hydra.mode=RUN",
        f"hydra.run.dir={run}",
    )
    log = (run / "run.log").read_text()
    assert "precision bf16-mixed, memory format channels_last: trainer.precision set" in log
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and metrics["precision"] == "bf16-mixed"
    assert list((run / "analysis").glob("delete_single*.csv"))
    # testing the checkpoint again, in fp32 this time, reports the precision it trained in: the
    # report compares arms by it (src/stats.py compare_arms)
    again = tmp_path / "again"
    run_cli(
        "train=false",
        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        "logger=csv",
        "trainer.precision=32-true",
        "hydra.mode=RUN",
        f"hydra.run.dir={again}",
    )
    assert json.loads((again / "metrics.json").read_text())["precision"] == "bf16-mixed"
    assert "precision 32-true" in (again / "run.log").read_text()


@pytest.mark.slow
def test_a_killed_bf16_channels_last_run_resumes_bit_identically(tmp_path, monkeypatch):
    """tests/test_resume.py's SIGKILL + resume=true, on the fast path (forced: this test's CPU
    may lack native bf16; bf16 then runs emulated, slower, with the same arithmetic)."""
    from tests import test_resume

    monkeypatch.setattr(test_resume, "ARGS", (*test_resume.ARGS, "trainer.precision=bf16-mixed"))
    test_resume.test_killed_run_resumes_bit_identically(tmp_path)
    log = (tmp_path / "whole" / "run.log").read_text()
    assert "precision bf16-mixed, memory format channels_last" in log


def test_the_default_config_says_auto():
    raw = OmegaConf.load(CONF / "trainer" / "default.yaml")
    assert OmegaConf.is_interpolation(raw, "precision")
    cfg = composed()
    with open_dict(cfg):
        cfg.trainer.precision = "32-true"
    assert not OmegaConf.is_interpolation(cfg.trainer, "precision")
