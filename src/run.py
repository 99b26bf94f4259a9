"""Entry point: `python -m src.run [experiment=...] [preset=quick] [key=value ...]`.

Builds data, model, LightningModule, callbacks, loggers and trainer from the Hydra config, fits
(unless `train=false`), tests, and lets the analysis callbacks run at the end of testing. Every run
directory gets `metrics.json` (final test metrics, `test_error` as a fraction, and what was run)
and `checkpoints/` (each checkpoint carries the run's config: see src/checkpoint.py).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from src import precision, schema  # precision: the ${auto_precision:} of trainer.precision
from src.cluster import (
    ddp_ranks_join_this_job,
    leave_ddp,
    requeued,
    terminating,
    watch_sigterm,
)
from src.errors import (
    ConfigError,
    DataUnavailable,
    check_choices,
    check_pairing,
    exit_with,
    unknown_key,
    validate,
)
from src.results import write_json
from src.rundir import (
    keep_earlier_records,
    refuse_to_overwrite,
    restore_earlier_records,
    results_state,
    wandb_id,
)

log = logging.getLogger("src.run")
USER_ERRORS = (ConfigError, DataUnavailable, FileNotFoundError)


class DropNoise(logging.Filter):
    """Lightning's advertisements and notices about defaults a user did not choose to see."""

    NOISE = ("💡 Tip:", "`weights_only` was not set", "Seed set to")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOISE)


def drop_noise() -> None:
    """Filter every console/file handler in place now (Hydra's, submitit's, Lightning's own)."""
    names = ("", "lightning.pytorch", "lightning.fabric")
    for handler in {h for n in names for h in logging.getLogger(n).handlers}:
        if not any(isinstance(f, DropNoise) for f in handler.filters):
            handler.addFilter(DropNoise())


# Library deprecation notices a user can do nothing about (Lightning's own use of torch APIs).
warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec.*")
# Lightning's hint for Slurm login nodes: a local run there is deliberate; jobs use srun already.
warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system")


def build(cfg: DictConfig, list_key: str) -> list:
    """Instantiate each entry of a dict of configs that has a `_target_` (null: switched off)."""
    return [
        instantiate(c)
        for c in (cfg.get(list_key) or {}).values()
        if c is not None and "_target_" in c
    ]


def reported(err: InstantiationException) -> BaseException:
    """The error a constructor or builder raised for a bad value (a ValueError or TypeError, or
    one of USER_ERRORS), reported in one line naming its config node; anything else as it was."""
    cause = err.__cause__
    if isinstance(cause, USER_ERRORS):
        return cause
    if isinstance(cause, (ValueError, TypeError)):
        key = re.search(r"full_key: (\S+)", str(err))
        return ConfigError(f"{key.group(1) if key else 'config'}: {cause}")
    return err


def run_facts(cfg: DictConfig, choices: dict, net, mode, seed, trained_in) -> dict:
    """What was run, for metrics.json: a results folder reads without its `.hydra/`. `seed`: the
    seed the network was trained with (a checkpoint's own, when one is analysed), so that runs
    testing one checkpoint in several ways pair with it; `trained_in`: likewise the precision its
    weights were trained in (None: unknown, e.g. a checkpoint older than this record)."""
    return {
        "model": choices.get("model"),
        "data": cfg.get("data_name") or choices.get("data"),  # lm_lesions names its text
        "training": choices.get("training"),
        "n_blocks": net.n_blocks,
        "k": mode.blocks_per_step(net.n_blocks),
        "test_mode": getattr(mode, "test_mode", None),  # block_subset's test-time rule
        "seed": seed,
        "precision": trained_in,
        "run_id": wandb_id(cfg.paths.output_dir),
    }


def train(cfg: DictConfig) -> dict:
    output_dir = Path(cfg.paths.output_dir)
    schema.check(cfg)  # every key against its declaration, before any work
    if cfg.get("task") is not None:  # an analysis that needs no trained network (Figs 6a, 7)
        instantiate(cfg.task, _convert_="all", output_dir=str(output_dir))
        return {}
    validate(cfg)
    warning = schema.schedule_warning(cfg)
    if warning:
        log.warning(warning)
    refuse_to_overwrite(output_dir, resuming=bool(cfg.resume) or requeued())
    # Lightning and the checkpoint code load only now: a config error above exits within a
    # second or two, not after importing the whole training stack
    import lightning as L

    from src import checkpoint

    # Imported after Hydra configured logging, Lightning prints through Hydra's handlers (console
    # and run.log) and also through the console handler it gives its `lightning` logger: drop
    # that one, so each message appears once.
    logging.getLogger("lightning").handlers.clear()
    drop_noise()  # again: the handlers Lightning added on import

    choices = dict(HydraConfig.get().runtime.choices)
    ckpt, trained_seed, trained_in = None, cfg.get("seed"), None
    if not cfg.train and cfg.ckpt_path:  # else a pretrained model.path brings its own weights
        ckpt = checkpoint.load(cfg.ckpt_path)
        if checkpoint.KEY in ckpt:  # rebuild the run that wrote it
            saved = ckpt[checkpoint.KEY]
            checkpoint.adopt(cfg, saved, list(HydraConfig.get().overrides.task), cfg.ckpt_path)
            choices.update({g: saved["choices"].get(g) for g in checkpoint.GROUPS})
            trained_seed = saved.get("seed", trained_seed)
            trained_in = saved.get("precision")
    if cfg.seed is not None:
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = instantiate(cfg.data, _convert_="all")
    net = instantiate(
        cfg.model,
        _convert_="all",
        in_channels=datamodule.channels,
        num_classes=datamodule.num_classes,
    )
    # the training fast path (src/precision.py): trainer.precision resolved, the memory format set
    fast = precision.choose(cfg, net)
    fast.apply(net)
    log.info("%s", fast)
    if cfg.train:
        trained_in = fast.precision
    if cfg.get("compile"):
        net.compile_blocks()
    mode = instantiate(cfg.training)
    module_class = get_class(cfg.get("module") or "src.module.Classifier")  # LMs: src.lm
    check_pairing(net, datamodule, module_class)
    module = module_class(net, mode=mode, num_classes=datamodule.num_classes, **cfg.optim)
    ddp_ranks_join_this_job()
    callbacks = build(cfg, "callbacks")
    # every table's metadata; after the callbacks, whose constructors may still refuse a value:
    # the run's W&B id (`<run dir>/wandb_id`) is written only once nothing was refused
    module.facts = run_facts(cfg, choices, net, mode, trained_seed, trained_in)
    # the optimizer step of the weights analysed (the tables' `step`): a `step=` override, else
    # the checkpoint's own; after training, the trained network's (set below)
    module.facts["step"] = (
        cfg.get("step") if cfg.get("step") is not None else (ckpt or {}).get("global_step")
    )
    # in every run, so a callback can save a checkpoint of its own (src/export.py)
    callbacks.append(checkpoint.RunConfig(checkpoint.describe(cfg, choices, trained_in)))
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=build(cfg, "logger"),
        default_root_dir=str(output_dir),
    )
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    if "SLURM_JOB_ID" in os.environ:
        log.info(
            "in Slurm job %s (task %s of %s, restart %s)",
            os.environ["SLURM_JOB_ID"],
            os.environ.get("SLURM_PROCID", "0"),
            os.environ.get("SLURM_NTASKS", "1"),
            os.environ.get("SLURM_RESTART_COUNT", "0"),
        )
    if cfg.train:
        log.info(
            "training %s (%d blocks) on %s", cfg.model._target_, net.n_blocks, cfg.data._target_
        )
        resume_from = checkpoint.resume_checkpoint(cfg, output_dir)
        if resume_from:
            log.info("resuming from %s", resume_from)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        module.facts["step"] = trainer.global_step
        # the weights tested below are the final ones, also when fit stopped mid-epoch
        trainer.save_checkpoint(output_dir / "checkpoints" / "last.ckpt")
    elif ckpt is not None:
        checkpoint.load_weights(module, ckpt, cfg.ckpt_path)
    results = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    metrics = {k.replace("/", "_"): float(v) for k, v in results.items()}
    metrics["global_step"] = trainer.global_step
    metrics |= module.facts
    if trainer.is_global_zero:
        write_json(output_dir / "metrics.json", metrics)
        if "test_perplexity" in metrics:  # a language model
            log.info("test perplexity %.3f; results in %s", metrics["test_perplexity"], output_dir)
        else:
            log.info(
                "test error %.4f; results in %s",
                metrics.get("test_error", float("nan")),
                output_dir,
            )
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    watch_sigterm()
    drop_noise()
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    results_before = results_state(output_dir)
    try:
        try:
            return train(cfg).get("test_error")
        except InstantiationException as err:  # a bad value caught by a constructor
            problem = reported(err)
            if problem is err:
                raise
            raise problem from None
    except USER_ERRORS as err:
        if results_state(output_dir) == results_before:  # refused before writing any results:
            restore_earlier_records(output_dir)  # the records of a run already there stay its own
        exit_with(err)
    except BaseException:  # Lightning ends a fit on SIGTERM with SIGTERMException(SystemExit)
        if terminating():
            # Slurm is requeueing this job and its SIGTERM broke something on the way (e.g. it
            # killed W&B's service): report no result, so the requeued job runs and reports.
            log.warning("failed after SIGTERM under Slurm; exiting for the requeued job to resume")
            logging.shutdown()
            os._exit(143)
        raise
    finally:
        if "wandb" in sys.modules:
            import wandb

            try:
                wandb.finish()
            except Exception as err:  # W&B's service is gone, e.g. killed by a Slurm requeue:
                log.warning("could not close the W&B run: %r", err)  # don't mask the real exit
        leave_ddp()


def report_unknown_keys() -> None:
    """Hydra reports an override of a key the config lacks (`trainer.max_stepz=5`, without `+`)
    in several lines and exits 1, also under `-m`: one line naming the fix instead, exit 2."""
    from hydra._internal import utils as hydra_utils

    report = getattr(hydra_utils, "run_and_report", None)
    if report is None or getattr(report, "reports_unknown_keys", False):
        return

    def run_and_report(func):
        def checked():
            try:
                return func()
            except Exception as err:
                problem = unknown_key(err)
                if problem is None:
                    raise
                exit_with(problem)  # SystemExit: Hydra's report lets it through

        return report(checked)

    run_and_report.reports_unknown_keys = True
    hydra_utils.run_and_report = run_and_report


def cli() -> None:
    """`python -m src.run ...`: every user error reported in one line, exit 2."""
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        check_choices(sys.argv[1:])
    except ConfigError as err:
        exit_with(err)
    report_unknown_keys()
    keep_earlier_records()
    main()


if __name__ == "__main__":
    cli()
