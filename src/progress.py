"""Progress that reaches a log file: rich bars on a terminal, log lines everywhere else.

Training shows Lightning's RichProgressBar and lesion sweeps a rich Progress, but both draw
nothing when stdout is not a terminal (`nohup ... > log`, a Slurm job's output file): a run of
half an hour would look hung. There, `progress_bar()` gives `LogProgressBar` and `lesion_bar()`
gives `LogProgress`, which write a line through logging (console and run.log) at most every
`interval` seconds, with the rate and the time left:

    train: step 120/700 (17%), 1.9 s/step, ~18m22s left, train/loss 0.612
    reorder (test batch 2): 20/80 (25%), 1.3 s/lesion, ~1m18s left
"""

from __future__ import annotations

import logging
import sys
from time import monotonic
from typing import Annotated, Any

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from src.schema import POSITIVE

log = logging.getLogger("src.progress")


def is_terminal() -> bool:
    return sys.stdout.isatty()


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _line(what: str, at: float, total: float | None, done: float, elapsed: float, unit: str) -> str:
    """`<what> at/total (p%), rate, ~time left`, where `done` items took `elapsed` seconds."""
    line = f"{what} {at:g}" + (f"/{total:g} ({100 * at / total:.0f}%)" if total else "")
    if done > 0 and elapsed > 0:
        per = elapsed / done
        line += f", {per:.2g} s/{unit}" if per >= 1 else f", {1 / per:.3g} {unit}/s"
        if total:
            line += f", ~{_duration(per * (total - at))} left"
    return line


class LogProgress:
    """The part of rich.progress.Progress the lesion engines use (add_task, reset, advance), as
    log lines: at most one per `interval` seconds, and one when the work is done."""

    def __init__(self, interval: float = 30.0, unit: str = "lesion"):
        self.interval, self.unit = float(interval), unit
        self.tasks: list[dict[str, Any]] = []

    def __enter__(self) -> LogProgress:
        self.start = self.last = monotonic()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None and self.tasks:
            t = self.tasks[-1]
            log.info("%s: done in %s", t["description"], _duration(monotonic() - self.start))

    def add_task(self, description: str, total: float | None = None) -> int:
        self.tasks.append({"description": description, "total": total, "done": 0.0})
        self.reset(len(self.tasks) - 1)
        return len(self.tasks) - 1

    def reset(self, task: int, description: str | None = None) -> None:
        t = self.tasks[task]
        t.update(done=0.0, since=monotonic())
        if description is not None:
            t["description"] = description

    def advance(self, task: int, advance: float = 1) -> None:
        if not advance:
            return
        t = self.tasks[task]
        t["done"] += advance
        now = monotonic()
        if now - self.last >= self.interval:
            self.last = now
            what = t["description"] + ":"
            log.info(_line(what, t["done"], t["total"], t["done"], now - t["since"], self.unit))


def lesion_bar(enabled: bool, interval: float = 30.0) -> Progress | LogProgress:
    """A progress display for a sweep over lesions: rich on a terminal, else log lines."""
    if enabled and not is_terminal():
        return LogProgress(interval)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
    )


class LogProgressBar(ProgressBar):
    """Lightning's progress as log lines: the training step (of max_steps or the epoch's batches)
    with s/step, time left and the progress-bar metrics (loss), at most once per `interval`
    seconds; the validation and test results as each loop ends."""

    def __init__(self, interval: float = 30.0):
        super().__init__()
        self.interval, self.enabled = float(interval), True

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = self.last = monotonic()
        self.first_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = monotonic()
        if not self.enabled or now - self.last < self.interval:
            return
        self.last = now
        total = trainer.max_steps if trainer.max_steps > 0 else None
        step, done = trainer.global_step, trainer.global_step - self.first_step
        line = _line("train: step", step, total, done, now - self.start, "step")
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        for k, v in metrics.items():
            line += f", {k} {v:.3g}" if isinstance(v, float) else f", {k} {v}"
        log.info(line)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.enabled and not trainer.sanity_checking:
            self._results("validation", trainer, "val/")

    def on_test_end(self, trainer, pl_module) -> None:
        if self.enabled:
            self._results("test", trainer, "test/")

    def _results(self, what: str, trainer, prefix: str) -> None:
        found = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
        if found:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(found.items()))
            log.info(f"{what} at step {trainer.global_step}: {shown}")


def progress_bar(interval: Annotated[float, POSITIVE] = 30.0) -> ProgressBar:
    """Lightning's progress bar for this run: rich on a terminal, log lines otherwise."""
    return RichProgressBar() if is_terminal() else LogProgressBar(interval)
