"""Hooks of the training loop: what a run does besides training, each a small class.

The loop (``nestvit.train.loop.Trainer.fit``) trains and evaluates the model; everything else is a
:class:`Callback` called at fixed points:

- ``on_fit_start(trainer)``: once, before the first step (after a resume, too);
- ``on_record(trainer, record)``: every metrics record (``kind`` ``step`` every ``log_every`` steps,
  ``epoch`` after every epoch), after ``metrics.jsonl`` has it;
- ``on_evaluate(trainer, record)``: after each evaluation of the model, to add numbers to the epoch's
  record (the EMA's top-1 is one);
- ``on_final_evaluate(trainer, record)``: once, after the last evaluation (test-time augmentation);
- ``on_epoch_end(trainer, record, final)``: after the epoch's weights and state are saved (plots);
- ``on_fit_end(trainer, summary)``: with ``summary.json``'s dict before it is written (add keys to it).

Built in: :class:`EmaEvaluation`, :class:`TtaEvaluation` and :class:`Plots`, added by the trainer from the
config. Your own, for example a Weights & Biases logger, in a few lines::

    import wandb
    from nestvit.config import to_dict
    from nestvit.train import Callback, load_config, train

    class WandbLogger(Callback):
        def on_fit_start(self, trainer):
            wandb.init(project="nestvit", config=to_dict(trainer.cfg))
        def on_record(self, trainer, record):
            wandb.log(record, step=record["step"])
        def on_fit_end(self, trainer, summary):
            wandb.finish()

    train(load_config("mnist5k_nest"), "runs/demo", callbacks=[WandbLogger()])

or on the command line, ``nestvit train mnist5k_nest --callback mymodule:WandbLogger``. Hooks run on
every rank; use ``trainer.main`` to act on rank 0 only. The time budget stays in the loop: it is its
stopping rule and the learning-rate schedule's clock.
"""

from __future__ import annotations

import importlib
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loop import Trainer
    from .metrics import EvalResult

PLOT_EVERY_S = 60.0  # plots are redrawn after an epoch at most this often (and always at the end)

__all__ = ["Callback", "EmaEvaluation", "Plots", "TtaEvaluation", "load_callback"]


class Callback:
    """A hook of the training loop; override the methods you need (each does nothing by default)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        pass

    def on_record(self, trainer: Trainer, record: dict[str, Any]) -> None:
        pass

    def on_evaluate(self, trainer: Trainer, record: dict[str, Any]) -> None:
        pass

    def on_final_evaluate(self, trainer: Trainer, record: dict[str, Any]) -> None:
        pass

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any], final: bool) -> None:
        pass

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        pass


class EmaEvaluation(Callback):
    """Evaluate the EMA of the weights beside the model (``ema.decay > 0``): ``ema_top1`` in records and summary."""

    def __init__(self) -> None:
        self.result: EvalResult | None = None

    def on_evaluate(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.result = trainer.evaluate(trainer.ema.module)
        record.update(ema_top1=self.result.top1, ema_top5=self.result.top5)

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        summary["ema_top1"] = self.result.top1 if self.result else None


class TtaEvaluation(Callback):
    """The final evaluation with test-time views too (``tta``): ``test_top1_tta`` in the record and summary."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.result: EvalResult | None = None

    def on_final_evaluate(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.result = trainer.evaluate(trainer.model, tta=self.mode)
        record.update(test_top1_tta=self.result.top1, test_top5_tta=self.result.top5)

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if self.result is not None:
            summary.update(tta=self.mode, test_top1_tta=self.result.top1)


class Plots(Callback):
    """PNG curves from ``metrics.jsonl`` and the confusion matrix: at most every ``every_s`` and at the end."""

    def __init__(self, every_s: float = PLOT_EVERY_S) -> None:
        self.every_s = every_s
        self.plotted = time.perf_counter()

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any], final: bool) -> None:
        if final or time.perf_counter() - self.plotted > self.every_s:
            self.plotted = time.perf_counter()
            trainer.write_plots(trainer.test)


def load_callback(spec: str) -> Callback:
    """``"module:Class"`` (or ``module.Class``) -> an instance of that :class:`Callback` (no arguments)."""
    from ..config import ConfigError

    module, sep, name = spec.partition(":")
    if not sep:
        module, _, name = spec.rpartition(".")
    if not module or not name:  # "mylogger": which class of which module?
        raise ConfigError(f"--callback {spec}: give MODULE:CLASS (e.g. my_logger:WandbLogger), the module on the "
                          "Python path")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"--callback {spec}: cannot import it ({e}); give MODULE:CLASS of a module on the "
                          "Python path") from None
    if not (isinstance(cls, type) and issubclass(cls, Callback)):
        raise ConfigError(f"--callback {spec}: {name} is not a nestvit.train.Callback subclass")
    try:
        hook = cls()
    except Exception as e:  # noqa: BLE001 - the user's class: its failure is named, not called a bug of nestvit
        raise ConfigError(f"--callback {spec}: {name}() failed ({type(e).__name__}: {e}); a callback is built "
                          "with no arguments") from None
    return hook
