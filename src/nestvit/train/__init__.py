"""Training: recipes, the loop, checkpoints, distributed data parallel, distillation, metrics and plots.

``train(load_config("mnist5k_nest"), "runs/demo")`` is what ``nestvit train mnist5k_nest --out runs/demo``
runs. Modules: ``config`` (recipes and ``--set``), ``optim`` (parameter groups, LR schedules, EMA), ``inputs``
(batches on the device), ``loop`` (the trainer), ``hooks`` (what a run does besides training: EMA and
test-time-augmentation evaluations, plots, your own loggers), ``checkpoint`` (atomic, resumable state),
``interrupt`` (Ctrl-C / SIGTERM: save, then stop), ``distributed`` (torchrun / DDP), ``distill`` (DeiT
distillation, ``SmallConvNet``), ``metrics`` (top-k, confusion, ``metrics.jsonl``), ``plots`` (PNG curves),
``runs`` (the model of a config and the run contract of its weights; ``nestvit.load`` reads them back),
``cli_train`` / ``cli_eval`` / ``cli_predict``.
"""

from .config import ConfigError, TrainConfig, builtin_recipes, load_config
from .distill import SmallConvNet
from .hooks import Callback
from .interrupt import Stopped
from .loop import NonFiniteLossError, RunResult, evaluate, train

__all__ = ["Callback", "ConfigError", "NonFiniteLossError", "RunResult", "SmallConvNet", "Stopped",
           "TrainConfig", "builtin_recipes", "evaluate", "load_config", "train"]
