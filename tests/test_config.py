"""Every config group option and every experiment composes, resolves and instantiates."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

import src.run  # noqa: F401  (registers the ${uid:} and W&B resolvers)
from src.models import Network

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(overrides, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig.instance().set_config(cfg)
    job = cfg.copy()
    with open_dict(job):
        del job["hydra"]
    resolved = OmegaConf.to_container(job, resolve=True)  # every interpolation resolves
    assert resolved["experiment_name"]
    return cfg


@pytest.mark.parametrize("data", options("data"))
def test_data_options_instantiate(data, tmp_path):
    cfg = compose_cfg([f"data={data}"], tmp_path)
    dm = instantiate(cfg.data, _convert_="all")
    assert dm.num_classes >= 2 and dm.channels >= 1


@pytest.mark.parametrize("model", options("model"))
def test_model_options_instantiate(model, tmp_path):
    cfg = compose_cfg([f"model={model}"], tmp_path)
    net = instantiate(cfg.model, _convert_="all", in_channels=3, num_classes=10)
    assert isinstance(net, Network) and net.n_blocks > 0


@pytest.mark.parametrize("group", ["training", "trainer", "callbacks", "logger", "optim", "preset"])
def test_group_options_compose(group, tmp_path):
    for option in options(group):
        cfg = compose_cfg([f"{group}={option}"], tmp_path)
        if group == "training":
            assert instantiate(cfg.training) is not None


@pytest.mark.parametrize("experiment", options("experiment"))
@pytest.mark.parametrize("preset", [None, "quick"])
def test_experiments_compose(experiment, preset, tmp_path):
    overrides = [f"experiment={experiment}"] + ([f"preset={preset}"] if preset else [])
    cfg = compose_cfg(overrides, tmp_path)
    if preset == "quick":
        assert cfg.data._target_.endswith("DigitsDataModule")
        assert cfg.trainer.accelerator == "cpu"
