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


def test_training_options_build_their_mode(tmp_path):
    built = {
        o: instantiate(compose_cfg([f"training={o}"], tmp_path).training)
        for o in options("training")
    }
    assert {o: type(m).__name__ for o, m in built.items()} == {
        "block_subset": "BlockSubset",
        "pruned": "Pruned",
        "standard": "Standard",
        "stochastic_depth": "StochasticDepth",
    }
    assert built["block_subset"].k == 23 and built["stochastic_depth"].final_survival == 0.5
    assert built["pruned"].deleted == frozenset()  # nothing deleted unless training.deleted says


def test_trainer_options_build_their_trainer(tmp_path):
    from src.precision import native_bf16

    expect = {"cpu": "cpu", "default": "auto", "ddp": "auto", "gpu": "gpu"}
    assert set(expect) == set(options("trainer"))
    for option, accelerator in expect.items():
        cfg = compose_cfg([f"trainer={option}"], tmp_path)
        assert cfg.trainer.accelerator == accelerator and cfg.trainer.max_steps == 64000
        # gpu: bf16-mixed; elsewhere the CPU's own choice (bf16-mixed only with native bf16)
        cpu = "bf16-mixed" if accelerator != "gpu" and native_bf16() else "32-true"
        assert cfg.trainer.precision == ("bf16-mixed" if option == "gpu" else cpu)
        assert cfg.trainer.get("strategy", "auto") == ("ddp" if option == "ddp" else "auto")
    trainer = instantiate(compose_cfg(["trainer=cpu"], tmp_path).trainer, logger=False)
    assert trainer.max_steps == 64000 and trainer.num_devices == 1


def test_callbacks_and_loggers_build(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from src import progress
    from src.run import build

    cfg = compose_cfg([], tmp_path)
    monkeypatch.setattr(progress, "is_terminal", lambda: False)  # a Slurm job's log file
    callbacks = build(cfg, "callbacks")
    assert sorted(type(c).__name__ for c in callbacks) == ["LogProgressBar", "ModelCheckpoint"]
    [ckpt] = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    assert ckpt.monitor == "val/error" and ckpt.dirpath == str(tmp_path / "run" / "checkpoints")
    monkeypatch.setattr(progress, "is_terminal", lambda: True)
    assert "RichProgressBar" in {type(c).__name__ for c in build(cfg, "callbacks")}
    kinds = {"csv": CSVLogger, "wandb": WandbLogger}
    for option in options("logger"):
        loggers = build(compose_cfg([f"logger={option}"], tmp_path), "logger")
        if option == "none":
            assert loggers == []
        else:
            [logger] = loggers
            assert isinstance(logger, kinds[option]) and logger.save_dir == str(tmp_path / "run")


def test_optim_and_preset(tmp_path):
    cfg = compose_cfg(["optim=paper"], tmp_path)
    assert dict(cfg.optim) == {
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "nesterov": False,
        "milestones": [32000, 48000],
        "gamma": 0.1,
        "warmup_steps": 400,
        "warmup_lr": 0.01,
    }
    quick = compose_cfg(["preset=quick"], tmp_path)
    assert quick.data._target_.endswith("DigitsDataModule") and quick.trainer.accelerator == "cpu"
    assert quick.trainer.max_steps == 400 and list(quick.optim.milestones) == [200, 300]


@pytest.mark.parametrize("experiment", options("experiment"))
@pytest.mark.parametrize("preset", [None, "quick", "medium"])
def test_experiments_compose(experiment, preset, tmp_path):
    overrides = [f"experiment={experiment}"] + ([f"preset={preset}"] if preset else [])
    cfg = compose_cfg(overrides, tmp_path)
    # a preset's image data set; the language-model experiment keeps its text under any preset
    text = experiment == "lm_lesions"
    if text:
        assert cfg.data._target_.endswith("TextDataModule") and cfg.data_name == "text"
    if preset == "quick":
        assert text or cfg.data._target_.endswith("DigitsDataModule")
        assert cfg.trainer.accelerator == "cpu"
    if preset == "medium":
        assert text or cfg.data._target_.endswith("FashionMNISTDataModule")
        assert cfg.data.test_size == 2000
        assert cfg.trainer.max_steps == 700 and list(cfg.optim.milestones) == [350, 525]


def test_models_sized_per_preset(tmp_path):
    """A model's own size at a preset (conf/model/size/, conf/lesion/imagenet_size/) applies only
    there, and a command-line width still wins."""

    def width(*overrides):
        return compose_cfg(list(overrides), tmp_path).model.width

    assert width("model=vgg15") == width("model=vgg15", "preset=quick") == 128  # the paper's
    assert width("model=vgg15", "preset=medium") == 64
    assert width("model=vgg15", "preset=medium", "model.width=128") == 128
    assert width("experiment=imagenet_delete_single") == 64
    assert width("experiment=imagenet_delete_single", "preset=quick") == 8
    assert width("experiment=imagenet_delete_single", "preset=medium") == 16
