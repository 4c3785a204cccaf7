"""The training loop: ``train(cfg, run_dir)``.

One optimizer step: the rank's share of the global batch is fetched (uint8, on the device) and
augmented as a whole (so mixup partners and random draws do not depend on the micro-batch size),
then split into ``accumulation`` micro-batches; each runs forward under autocast and backward with
its loss divided by the number of micro-batches (DDP synchronises gradients on the last one only),
so ``2 x 16`` accumulates the gradient of ``1 x 32``. With ``optim.sam_rho`` (SAM) a first
forward/backward on the first ``sam_batch`` images moves the weights before those passes, and they
are moved back before the update. Then: non-finite check, gradient clipping, AdamW step, EMA
update. The learning rate is set from ``LRSchedule`` before every step.

After every epoch: evaluation (model and EMA), ``metrics.jsonl`` records, weights
(``last``/``best``/``ema.safetensors``), the training state (``state.pt``, atomic), plots. Rank 0
alone prints and writes; every rank computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..cli_args import writable_dir
from ..contract import RunContract
from ..data.augment import BatchAugment, eval_transform, shift, tta_views
from ..data.datasets import DatasetError, unreadable_summary
from ..errors import UserError, listed
from ..fileio import atomic_write_text, json_text, remove_stale_temporaries
from ..interop import WeightsError, save_weights
from ..system import machine_info, machine_label, resolve_precision, slow_bf16, use_tf32
from . import config as C
from .checkpoint import STATE_FILE, atomic_torch_save, capture_rng, load_state, restore_rng
from .distill import balanced_class_weights, classification_loss, teacher_targets
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, init_distributed, shutdown
from .hooks import Callback, EmaEvaluation, Plots, TtaEvaluation
from .inputs import Split, TrainBatches, eval_batches, is_streamed, load_split, normalization, resolve_data
from .interrupt import Stopped, StopRequest, ignoring_ctrl_c, stopped_at_once
from .metrics import EvalAccumulator, EvalResult, MetricsLog
from .optim import (
    LRSchedule,
    ModelEMA,
    build_optimizer,
    frozen_norm_stats,
    param_groups,
    sam_perturb,
    sam_restore,
    set_lr,
)
from .plots import plot_confusion, plot_run
from .runs import build_model, input_transform, run_contract


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or infinite; the run stops without writing a checkpoint."""


@dataclass
class RunResult:
    run_dir: Path
    epochs_done: int
    steps: int
    test: EvalResult | None  # the last evaluation of the model
    ema: EvalResult | None  # ... and of its EMA
    best_top1: float
    wall_s: float


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``"bf16"`` / ``"fp16"``; nothing for ``"fp32"``."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def _build(section: C.ModelSection, key: str, *, teacher: bool = False,
           **data: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``build_model``, where a constructor's ``TypeError`` (an option the model does not have, a value of the
    wrong type: ``registry.build_config`` raises it) is the config's mistake, said in one line naming ``key``.
    ``teacher``: a distillation teacher, built for the student's images as it is; what does not fit them (its
    weights, a size its architecture cannot take) is said as the teacher's."""
    try:
        return build_model(section, key=key, **data)
    except WeightsError as e:  # (a ValueError too)
        if not teacher:
            raise
        raise _teacher_misfit(section, data, str(e).split(". Is it a checkpoint")[0]) from None
    except TypeError as e:
        raise C.ConfigError(f"{key} do not fit {section.name}: {e}") from e
    except ValueError as e:  # a size the model cannot take: say which keys of a recipe set the sizes
        if isinstance(e, UserError):
            raise
        if teacher:
            raise _teacher_misfit(section, data, str(e)) from None
        raise C.ConfigError(f"{section.name or 'the model'} cannot be built for this data: {e} (a recipe sets the "
                            f"images' size with data.img_size, an in-memory set's with data.pad_to or "
                            f"data.resize_to, the model's options with {key})") from e


def _teacher_misfit(section: C.ModelSection, data: dict[str, Any], why: str) -> C.ConfigError:
    h, w = data["img_size"]
    return C.ConfigError(f"distill.teacher_weights {section.weights} cannot teach the student's {h}x{w}x"
                         f"{data['in_chans']} images ({why}); a teacher sees the student's images: distil from one "
                         "trained at that size and channel count (or train the student at the teacher's: "
                         "data.img_size)")


def absolute_weights(cfg: C.TrainConfig, *, resume: bool = False) -> C.TrainConfig:
    """``model.weights`` and ``distill.teacher_weights`` recorded absolute where they name a file or folder here
    (as ``data.root``), so that ``--resume`` works from any folder; published tags and ``hf-hub:`` stay as given.
    A relative path a run recorded before this that is not found from here: one error naming the fix."""
    from ..contract import HUB_PREFIX
    from ..pretrained import published

    for section, key in (("model", "weights"), ("distill", "teacher_weights")):
        value = getattr(getattr(cfg, section), key)
        if resume and section == "distill" and value and Path(value).is_absolute() and not Path(value).exists():
            raise C.ConfigError(f"distill.teacher_weights {value}: no such file or folder (moved?); the teacher gives "
                                "every step's targets: resume with --set distill.teacher_weights=NEW_PATH")
        if not value or str(value).startswith(HUB_PREFIX) or published(value) is not None or Path(value).is_absolute():
            continue  # a published tag first, as build_model reads it
        path = Path(value).expanduser()
        if path.exists():
            cfg = C.replace(cfg, **{section: {key: str(path.absolute())}})
        elif resume:
            raise C.ConfigError(f"{section}.{key} {value}: not found from {Path.cwd()} (a path relative to the "
                                f"folder the run was started in); resume from there, or add --set "
                                f"{section}.{key}=ABSOLUTE_PATH")
    return cfg


def _sums() -> dict[str, float]:
    """Running sums of training steps (a log window's or an epoch's)."""
    return {"loss": 0.0, "correct": 0.0, "images": 0.0, "data_s": 0.0, "steps": 0, "time_s": 0.0}


class Trainer:
    """Holds a run's model, optimizer, data and state; ``fit()`` trains it. Build with ``train()``."""

    def __init__(self, cfg: C.TrainConfig, run_dir: Path, info: DistInfo, *, resume: bool = False,
                 state: dict[str, Any] | None = None, callbacks: Sequence[Callback] = ()) -> None:
        self.info, self.device, self.run_dir = info, info.device, run_dir
        self.main = info.is_main
        self.started = time.perf_counter()
        self.stop = StopRequest(announce=self.main, at_once=self._stopped_at_once)  # Ctrl-C / SIGTERM: save, stop
        self.saved_step: int | None = None  # the step of the run's state.pt
        self.stop_agreed = False  # under DDP: a rank asked to stop, as the last step's all-reduce says
        self.precision = resolve_precision(cfg.precision, self.device)
        use_tf32(self.device, cfg.tf32)
        if self.precision == "fp16" and self.device.type != "cuda":
            raise C.ConfigError("precision fp16 needs CUDA (it trains with a GradScaler); use bf16 on the CPU")
        if not resume and (run_dir / STATE_FILE).exists():  # every rank checks, so none waits for a failed one
            raise FileExistsError(f"{run_dir} already holds a run; continue it (nestvit train --resume {run_dir}; "
                                  "from Python train(cfg, RUN, resume=True)) or choose another run folder")
        writable_dir(run_dir, create=False, flag="the run folder")  # now, not after the data and model are read
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.machine = machine_info(self.device.type)  # recorded in summary.json and the run header
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)

        # data, and the normalisation written back into the config (the run directory records it)
        saved_data = (state or {}).get("config", {}).get("data", {})
        if state is not None and "channels" not in saved_data and cfg.data.channels is None and \
                is_streamed(cfg.data.name):
            cfg = C.replace(cfg, data={"channels": 3})  # runs before data.channels decoded every file to RGB
        cfg = absolute_weights(cfg, resume=resume)
        self.channels_given = cfg.data.channels is not None  # else read from the files' headers
        d = resolve_data(cfg.data, cfg.model)  # image size from the model, the eval split from what exists
        self.train_split = load_split(d, d.train_split, self.device, limit=d.limit_train)
        self.eval_split = load_split(d, d.eval_split, self.device, classes=self.train_split.classes,
                                     limit=d.limit_eval)
        mean, std = normalization(d, self.train_split)
        cfg = C.replace(cfg, data={"mean": mean, "std": std, "img_size": d.img_size, "eval_split": d.eval_split,
                                   "channels": d.channels, "root": d.root})
        self.cfg = cfg
        self.classes = self.train_split.classes
        self.num_classes = len(self.classes)

        # model, EMA, teacher
        section = self._starting_weights(cfg, run_dir) if resume else cfg.model
        self.model, self.model_kwargs = _build(section, "model.overrides", num_classes=self.num_classes,
                                               in_chans=self.train_split.channels, img_size=self.train_split.size,
                                               classes=self.classes)
        self.model_name = self.model.registry_spec["model"]  # model.name, or the weights' (fine-tuning)
        self.model.to(self.device)
        self.ema = ModelEMA(self.model, cfg.ema.decay) if cfg.ema.decay > 0 else None
        # what the run does besides training: the config's hooks, then the caller's (nestvit.train.hooks)
        self.hooks: list[Callback] = [*([EmaEvaluation()] if self.ema is not None else []),
                                      *([TtaEvaluation(cfg.tta)] if cfg.tta != "none" else []), Plots(),
                                      *callbacks]
        self.test: EvalResult | None = None  # the model's latest evaluation
        self.teacher, self.teacher_notes = None, []
        if cfg.distill.teacher_weights:  # distill.teacher names its model, else its weights' contract does
            self.teacher_notes = self._check_teacher(cfg.distill.teacher_weights)
            section = C.ModelSection(name=cfg.distill.teacher, overrides=cfg.distill.teacher_overrides,
                                     weights=cfg.distill.teacher_weights)
            self.teacher, _ = _build(section, "distill.teacher_overrides", teacher=True, num_classes=self.num_classes,
                                     in_chans=self.train_split.channels, img_size=self.train_split.size,
                                     adapt=False,  # a teacher must fit as it is: a new head would teach noise
                                     classes=self.classes)  # its head rows follow the class names
            self.teacher_notes += [f"distill.teacher_weights: {note}" for note in self.teacher.adapt_notes]
            self.teacher.to(self.device).eval().requires_grad_(False)
        if info.rank > 0:  # ranks share the initial weights but draw their own dropout / drop-path masks
            torch.manual_seed(cfg.seed + 1000 * info.rank)

        # batch plan, schedule, optimizer
        self.per_device, self.micro, self.accum = cfg.batch_plan(info.world_size)
        # SAM's ascent pass: the first images of each device's batch, at most one micro-batch (its memory bound)
        self.sam_images = min(cfg.optim.sam_batch or self.micro, self.micro)
        self.batches = TrainBatches(self.train_split, global_batch=cfg.global_batch, rank=info.rank,
                                    world_size=info.world_size, seed=cfg.seed, device=self.device,
                                    workers=d.workers)
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.peak_lr = cfg.scaled_lr()
        self.schedule = LRSchedule.from_config(cfg.schedule, peak=self.peak_lr, steps_per_epoch=self.steps_per_epoch,
                                               epochs=cfg.epochs)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.peak_lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.augment = BatchAugment(dataclasses.replace(cfg.aug, mean=mean, std=std), num_classes=self.num_classes)
        self.class_weights = balanced_class_weights(self.train_split.labels, self.num_classes).to(self.device) \
            if cfg.class_weights == "balanced" else None
        self.aug_gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 7919 + 1 + info.rank)

        self.ddp: nn.Module = self.model
        if info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.model,
                                               device_ids=[self.device] if self.device.type == "cuda" else None)
        self.forward = torch.compile(self.ddp) if cfg.compile else self.ddp

        # state
        self.step = 0  # optimizer steps done
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # optimizer steps done inside the current epoch (mid-epoch checkpoints)
        self.best_top1, self.best_loss = -1.0, math.inf  # best.safetensors: the highest top-1, ties to the lower loss
        self.rng_state: dict[str, Any] | None = None
        # time budget (cfg.time_budget_min): seconds spent by earlier pieces of a resumed run, the last
        # evaluation's duration (kept in reserve for the final one, times its views plus one with cfg.tta)
        # and the part of the budget spent
        self.budget_s = cfg.time_budget_min * 60.0
        self.final_eval_cost = 1 + (len(tta_views(cfg.tta)) if cfg.tta != "none" else 0)
        self.spent_before = self.eval_s = self.time_frac = 0.0
        self.epoch_sums: dict[str, dict[str, float]] | None = None
        self.lr = 0.0  # the learning rate of the last optimizer step (what the records log)
        self.fit_started = time.perf_counter()
        self.finished = False  # a resumed run whose training is over (its final evaluation is redone)
        if resume:
            self._load(state if state is not None else load_state(run_dir))

        if self.main:
            started = ("config.yaml", "metrics.jsonl", "tensorboard")  # what a run killed early leaves
            others = [p.name for p in run_dir.iterdir() if p.name not in started and not p.name.startswith(".")] \
                if run_dir.is_dir() and not resume else []
            if others:  # a folder of the user's (images, notes): the run's files go beside them, said once
                self.say(f"note: {run_dir} already holds {len(others)} file(s) or folder(s) of no run "
                         f"({', '.join(sorted(others)[:3])}{' ...' if len(others) > 3 else ''}); the run's files are "
                         "written beside them")
            run_dir.mkdir(parents=True, exist_ok=True)
            removed = remove_stale_temporaries(run_dir)  # left by writes of a killed run
            if removed:
                self.say(f"note: removed {len(removed)} temporary file(s) a killed run left in {run_dir}")
            C.save_config(cfg, run_dir / "config.yaml")
        barrier(info)
        # a new run drops the records of one killed before its first checkpoint (step 0); a resumed run those
        # logged after its checkpoint
        self.log = MetricsLog(run_dir, enabled=self.main, truncate_after_step=self.step)
        if self.log.dropped:
            self.say(f"note: dropped {self.log.dropped} record(s) of {self.log.path} logged after the "
                     + (f"checkpoint at step {self.step}" if resume else "start of a run killed before its first "
                        "checkpoint"))

    # ---------------------------------------------------------------------------------------------
    # printing
    # ---------------------------------------------------------------------------------------------

    def say(self, message: str) -> None:
        if self.main:
            from tqdm import tqdm

            try:
                tqdm.write(message)
            except BrokenPipeError:  # `nestvit train ... | head`: the reader left; the run goes on, its files say it
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    def describe(self) -> None:
        cfg, i = self.cfg, self.info
        tr, ev = self.train_split, self.eval_split
        groups = param_groups(self.model, weight_decay=cfg.optim.weight_decay, policy=cfg.optim.no_decay)
        nd = sum(len(g["names"]) for g in groups if g["group"] == "no_decay")
        self.say(f"run dir: {self.run_dir}")
        threads = torch.get_num_threads()
        where = (f"cpu ({threads} thread{'s' if threads > 1 else ''}; {machine_label(self.machine)})"
                 if self.device.type == "cpu" else f"{self.device} ({machine_label(self.machine)})")
        if cfg.model.weights:
            self.say(f"weights: {cfg.model.weights}" + "".join(f"\n  {note}" for note in self.model.adapt_notes))
        self.say(f"model: {self.model_name} ({self.model.num_params():,} parameters) on {where}, "
                 f"precision {cfg.precision}{f' -> {self.precision}' if cfg.precision != self.precision else ''}"
                 f"{' (TF32 matrix products)' if self.device.type == 'cuda' and cfg.tf32 else ''}"
                 f"{', compiled' if cfg.compile else ''}, world size {i.world_size}")
        if self.precision == "bf16" and (warning := slow_bf16(self.device, "--set precision=auto (fp32 here)")):
            self.say(warning)
        for note in ([f"data: {tr.about}"] if tr.about else []) + tr.notes + ev.notes:
            self.say(note)
        grey = "" if tr.folder is None or tr.channels != 1 else " (data.channels=1)" if self.channels_given else \
            " (greyscale files: one channel; data.channels=3 for RGB)"
        self.say(f"data: {cfg.data.name} {len(tr)} train / {len(ev)} {cfg.data.eval_split} images of "
                 f"{tr.channels}x{tr.size[0]}x{tr.size[1]}{grey}, {self.num_classes} classes "
                 f"({listed(self.classes, 8)}); normalised with mean {cfg.data.mean} std {cfg.data.std}")
        counts = torch.bincount(tr.labels.long().cpu(), minlength=self.num_classes).tolist()
        small, large = min(counts), max(counts)
        if self.class_weights is None and large >= 3 * max(small, 1):  # one class has 3x the images of another
            self.say(f"note: the training classes differ in size ({self.classes[counts.index(large)]} {large:,} "
                     f"images, {self.classes[counts.index(small)]} {small:,}): top-1 favours the large ones; "
                     "--set class_weights=balanced weighs every class the same (evaluations report the balanced "
                     "accuracy too)")
        if self.class_weights is not None:
            w = self.class_weights.tolist()
            self.say("class weights: balanced (N / (K x images of the class)): "
                     + ", ".join(f"{c} {v:.3g}" for c, v in list(zip(self.classes, w))[:8])
                     + (f" and {len(w) - 8} more (from {min(w):.3g} to {max(w):.3g})" if len(w) > 8 else ""))
        self.say(f"batch: global {cfg.global_batch} = {i.world_size} device(s) x {self.per_device} per device; per "
                 f"device {self.micro} per forward x {self.accum} accumulation step(s); {self.steps_per_epoch} "
                 f"steps/epoch x {cfg.epochs} epochs = {self.schedule.total_steps} steps")
        scale = (f"{cfg.optim.lr:g} x {cfg.global_batch}/{cfg.optim.lr_ref_batch} = {self.peak_lr:.4g} "
                 "(scaled linearly with the global batch)" if cfg.optim.lr_ref_batch > 0 else
                 f"{self.peak_lr:.4g} (not scaled)")
        self.say(f"lr: {scale}; {self.schedule.describe()}")
        self.say(f"optimizer: AdamW weight decay {cfg.optim.weight_decay:g} ({nd} tensors exempt, policy "
                 f"{cfg.optim.no_decay!r}), clip {cfg.optim.clip_grad or 'off'}, EMA "
                 f"{cfg.ema.decay if self.ema else 'off'}"
                 + (f", SAM rho {cfg.optim.sam_rho:g} on {self.sam_images} images a step"
                    if cfg.optim.sam_rho > 0 else "")
                 + (f"; distilling from {self.teacher.registry_spec['model']} ({cfg.distill.type}, alpha "
                    f"{cfg.distill.alpha:g})" if self.teacher is not None else ""))
        for note in self.teacher_notes:
            self.say(note)
        if self.budget_s:
            self.say(f"time budget: {self.cfg.time_budget_min:g} min (training and evaluations); the schedule "
                     f"decays by step or by time, whichever is further along; {cfg.epochs} epochs at most")
        if self.step and not self.finished:
            self.say(f"resuming at epoch {self.epoch + 1}, step {self.step}")

    # ---------------------------------------------------------------------------------------------
    # one optimizer step
    # ---------------------------------------------------------------------------------------------

    def loss(self, xs: torch.Tensor, ts: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """The model's output and its loss (labels, plus the teacher's term with distillation) under autocast."""
        d = self.cfg.distill
        with autocast(self.device, self.precision):
            out = self.forward(xs)
            teacher = teacher_targets(self.teacher, xs) if self.teacher is not None else None
            return out, classification_loss(out, ts, teacher, kind=d.type, alpha=d.alpha, tau=d.tau,
                                            class_weights=self.class_weights)

    def sam_ascent(self, x: torch.Tensor, targets: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """SAM's first pass: the gradient of the first ``sam_images`` images moves the weights by ``sam_rho``.

        Each device moves along its own images' gradient (no all-reduce: SAM's m-sharpness, as the
        paper's own code does per accelerator); batch-norm statistics are left as they were.
        """
        n = self.sam_images
        with self.ddp.no_sync() if self.info.enabled else contextlib.nullcontext(), frozen_norm_stats(self.model):
            self.scaler.scale(self.loss(x[:n], targets[:n])[1]).backward()
        return sam_perturb(self.model, self.cfg.optim.sam_rho)

    def train_step(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, float]:
        """One optimizer step on this rank's augmented batch; ``(mean loss, correct, images)`` over all ranks."""
        self.lr = lr = self.schedule(self.step, self.time_frac)
        set_lr(self.optimizer, lr)
        moved = self.sam_ascent(x, targets) if self.cfg.optim.sam_rho > 0 else []
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        for i, (xs, ts) in enumerate(zip(x.split(self.micro), targets.split(self.micro))):
            last = i == self.accum - 1
            with self.ddp.no_sync() if (self.info.enabled and not last) else contextlib.nullcontext():
                out, loss = self.loss(xs, ts)
                self.scaler.scale(loss / self.accum).backward()
            logits = out[0] if isinstance(out, tuple) else out
            loss_sum += loss.detach().float() / self.accum
            correct += (logits.detach().argmax(1) == ts.argmax(1)).sum()
        sam_restore(moved)
        # a stop request rides on the step's all-reduce: every rank stops after the same step, at no extra cost
        stats = all_reduce_sum(torch.stack([loss_sum, correct, self.stop.flag(self.device)]), self.info)
        loss_value = stats[0].item() / self.info.world_size
        self.stop_agreed = stats[2].item() > 0
        self.read_clock()
        if not math.isfinite(loss_value):
            state = self.run_dir / STATE_FILE
            last = (f"The last good checkpoint is {state}" if state.is_file()
                    else "No checkpoint was written yet")
            raise NonFiniteLossError(
                f"loss is {loss_value} at step {self.step + 1} (epoch {self.epoch + 1}, batch {self.step_in_epoch + 1}"
                f" of {self.steps_per_epoch}); training stopped. {last}. Lower optim.lr, set optim.clip_grad, or "
                "train in fp32")
        if self.cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        self.step_in_epoch += 1
        return loss_value, stats[1].item(), float(x.shape[0] * self.info.world_size)

    # ---------------------------------------------------------------------------------------------
    # epochs
    # ---------------------------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        from tqdm import tqdm

        self.model.train()
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
                   disable=not (self.main and self.cfg.progress), dynamic_ncols=True, leave=False,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)  # a log file: a status every 30 s
        # the sums (and seconds) of the epoch and of the log window so far, saved with the state: after a resume
        # the epoch's record and the next step record count the steps before the checkpoint too
        sums = self.epoch_sums or {"epoch": _sums(), "window": _sums()}
        self.epoch_sums = sums
        total, window = sums["epoch"], sums["window"]
        t_epoch = t_window = time.perf_counter()
        epoch_s, window_s = total["time_s"], window["time_s"]
        batches = self.batches.epoch(epoch, self.step_in_epoch)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(batches, None)
            except DatasetError as e:  # an unreadable file, between two steps: the steps so far are kept
                bar.close()
                raise self.data_error(e) from None
            if batch is None:
                break
            x, targets = self.augment(*batch, generator=self.aug_gen)
            self._sync()
            data_s = time.perf_counter() - t0
            loss, correct, images = self.train_step(x, targets)
            for acc in (window, total):
                acc["loss"] += loss
                acc["correct"] += correct
                acc["images"] += images
                acc["data_s"] += data_s
                acc["steps"] += 1
            now = time.perf_counter()
            img_s = window["images"] / max(window_s + now - t_window, 1e-9)
            data_img_s = window["images"] / max(window["data_s"], 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{window['loss'] / window['steps']:.4f}",
                            acc=f"{100 * window['correct'] / window['images']:.1f}",
                            lr=f"{self.lr:.2e}", img_s=f"{img_s:.0f}",
                            data_img_s=f"{data_img_s:.0f}", refresh=False)
            if self.step % self.cfg.log_every == 0:
                self.record({"kind": "step", "epoch": epoch + 1, "step": self.step,
                             "loss": window["loss"] / window["steps"],
                             "acc": 100 * window["correct"] / window["images"],
                             "lr": self.lr, "img_s": img_s, "data_img_s": data_img_s})
                window = sums["window"] = _sums()
                t_window, window_s = time.perf_counter(), 0.0
            now = time.perf_counter()
            total["time_s"], window["time_s"] = epoch_s + now - t_epoch, window_s + now - t_window
            mid_epoch = self.step_in_epoch < self.steps_per_epoch  # the epoch's last step: fit() saves it
            saved = bool(self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 and mid_epoch)
            if saved:
                self.save_state()
            if mid_epoch and (self.stop_agreed if self.info.enabled else self.stop.requested):
                batches.close()
                bar.close()
                self.stopped(save=not saved)
            if self.time_frac >= 1.0:
                batches.close()
                break
        bar.close()
        self.epoch_sums = None
        elapsed = epoch_s + time.perf_counter() - t_epoch
        steps = max(total["steps"], 1)
        return {"train_loss": total["loss"] / steps, "train_acc": 100 * total["correct"] / max(total["images"], 1),
                "img_s": total["images"] / max(elapsed, 1e-9),
                "data_img_s": total["images"] / max(total["data_s"], 1e-9), "time_s": elapsed}

    def evaluate(self, model: nn.Module, tta: str = "none") -> EvalResult:
        """Top-1/top-5, loss and confusion matrix of ``model`` on the evaluation split (summed over ranks)."""
        return evaluate(model, self.eval_split, mean=self.cfg.data.mean, std=self.cfg.data.std,
                        batch=self.cfg.eval_batch, info=self.info, precision=self.precision,
                        workers=self.cfg.data.workers, tta=tta)

    def elapsed(self) -> float:
        """Seconds of this run so far, the pieces before a resume included (what the time budget counts)."""
        return self.spent_before + time.perf_counter() - self.fit_started

    def read_clock(self) -> None:
        """Under a time budget, set ``time_frac``: the part spent, counting the final evaluation's time ahead
        (the last one's), from the ranks' mean clock so that all of them stop at the same step."""
        if self.budget_s:
            ahead = self.eval_s * self.final_eval_cost
            t = all_reduce_sum(torch.full((), self.elapsed() + ahead, device=self.device), self.info)
            self.time_frac = t.item() / self.info.world_size / self.budget_s

    def call(self, hook: str, *args: Any) -> None:
        """Call ``hook`` (a :class:`Callback` method name) of every hook, in order."""
        for h in self.hooks:
            getattr(h, hook)(self, *args)

    def record(self, record: dict[str, Any]) -> None:
        """A metrics record: to ``metrics.jsonl`` (rank 0), then to every hook's ``on_record``."""
        self.log.write(record)
        self.call("on_record", record)

    def fit(self, stop_after_epochs: int | None = None) -> RunResult:
        cfg = self.cfg
        self.describe()
        if self.rng_state is not None:
            restore_rng(self.rng_state, {"augment": self.aug_gen})
        self.fit_started = time.perf_counter()
        if self.budget_s:
            self.time_frac = self.spent_before / self.budget_s
        self.call("on_fit_start")
        if self.finished:  # killed after its last checkpoint, before its summary: redo what came after it
            self.say("the run's training is over but its final evaluation, plots or summary were not written; "
                     "redoing them")
            if self.epoch < cfg.epochs:  # it was stopped by its time budget
                self.time_frac = max(self.time_frac, 1.0)
            self.test = self.evaluate(self.model)
            redone: dict[str, Any] = {}
            self.call("on_evaluate", redone)
            self.call("on_final_evaluate", redone)
            self.write_plots(self.test)
        with self.stop:
            self.train_epochs(stop_after_epochs)
        result = self.finish()
        if self.stop.requested:  # it came during the last evaluation: the run (or its stop_after_epochs) is done
            raise Stopped(self.stop.signal_name, self.step, self.run_dir,
                          complete=self.epoch >= self.cfg.epochs or self.time_frac >= 1.0)
        return result

    def data_error(self, e: DatasetError) -> DatasetError:
        """The error of an unreadable image met between steps, naming every unreadable file of the run's folders that
        a quick scan finds (not the first only), after saving the run's state (one process: saving is collective
        under DDP, and one rank cannot do it alone)."""
        text, files_word = str(e), "file"
        folders = [s for s in (self.train_split, self.eval_split) if s.folder is not None]
        if folders and self.main:  # both splits: a bad file of the other one would stop the run again later
            files = [path for s in folders for path, _ in s.folder.samples]
            _, said = unreadable_summary(files, of=f" of {' and '.join(s.name for s in folders)}")
            if said:
                files_word = "files"
                text += f". {said}"
        if self.step == 0 and self.saved_step is None:
            text += f". Replace the {files_word}, then run the command again (nothing was trained yet)"
        elif self.step == self.saved_step:
            text += (f". Replace the {files_word}, then continue with nestvit train --resume {self.run_dir} (its state "
                     f"is saved at step {self.step})")
        elif not self.info.enabled:
            self.save_state()
            text += (f". The {self.step} steps trained so far are saved: replace the {files_word}, then continue "
                     f"with nestvit train --resume {self.run_dir}")
        return DatasetError(text)

    def _stopped_at_once(self) -> str:
        return stopped_at_once(self.step, self.saved_step, self.run_dir, f"nestvit train --resume {self.run_dir}")

    def stopped(self, *, save: bool) -> None:
        """Save the state where training stands (a step boundary) and raise :class:`Stopped`."""
        if save:
            self.save_state()
        self.log.close()
        raise Stopped(self.stop.signal_name or "a stop request of another rank", self.step, self.run_dir)

    def train_epochs(self, stop_after_epochs: int | None) -> None:
        """Train (and evaluate, save, call the hooks) epoch by epoch until the run's end, a time budget or
        ``stop_after_epochs``."""
        cfg = self.cfg
        while self.epoch < cfg.epochs and self.time_frac < 1.0:
            epoch = self.epoch
            stats = self.train_epoch(epoch)
            out_of_time = self.step_in_epoch < self.steps_per_epoch  # the budget ended the epoch early
            if out_of_time:
                done = round(epoch + self.step_in_epoch / self.steps_per_epoch, 3)
            else:
                self.epoch, self.step_in_epoch = epoch + 1, 0
                done = self.epoch
            record: dict[str, Any] = {"kind": "epoch", "epoch": done, "step": self.step, **stats,
                                      "lr": self.lr}
            last = out_of_time or self.epoch == cfg.epochs or self.time_frac >= 1.0
            if (epoch + 1) % cfg.eval_every == 0 or last:
                t = self.elapsed()
                try:
                    self.test = self.evaluate(self.model)
                except DatasetError as e:  # a bad file of the evaluation split: the epoch's training is kept
                    raise self.data_error(e) from None
                record.update(test_loss=self.test.loss, test_top1=self.test.top1, test_top5=self.test.top5)
                if self.test.unequal:  # classes of unequal size: the mean of the per-class accuracies too
                    record.update(test_balanced_top1=self.test.balanced_top1)
                self.call("on_evaluate", record)  # counted in the evaluation time the budget reserves
                self.eval_s = self.elapsed() - t
                self.read_clock()
                last = last or self.time_frac >= 1.0  # the evaluation spent the rest of the budget
                if last:
                    self.call("on_final_evaluate", record)
            self.record(record)
            self.say(self._epoch_line(record))
            self.save_weights(self.test if "test_top1" in record else None)
            self.save_state()
            stop = stop_after_epochs is not None and self.epoch >= stop_after_epochs
            self.call("on_epoch_end", record, last or stop)
            if stop or last:
                break
            if all_reduce_sum(self.stop.flag(self.device), self.info).item() > 0:  # asked during the evaluation
                self.stopped(save=False)

    def finish(self) -> RunResult:
        """``summary.json`` and the closing line, after the last epoch."""
        cfg = self.cfg
        if self.time_frac >= 1.0 and self.epoch < cfg.epochs:
            self.say(f"the time budget of {cfg.time_budget_min:g} min is spent: stopped after {self.step} steps")
        wall = self.spent_before + time.perf_counter() - self.started  # every piece of a resumed run
        test = self.test
        ema = next((h.result for h in self.hooks if isinstance(h, EmaEvaluation)), None)
        result = RunResult(self.run_dir, self.epoch, self.step, test, ema, self.best_top1, wall)
        part = self.step_in_epoch / self.steps_per_epoch  # of an epoch a time budget ended early
        epochs = round(self.epoch + part, 3) if part else self.epoch
        summary = {"epochs": epochs, "steps": self.step, "wall_s": round(wall, 1),
                   "test_top1": test.top1 if test else None, "test_top5": test.top5 if test else None,
                   "test_images": test.count if test else None, "test_split": self.eval_split.name,
                   "test_balanced_top1": test.balanced_top1 if test and test.unequal else None,
                   "best_top1": self.best_top1, "ema_top1": None,
                   "params": self.model.num_params(), "world_size": self.info.world_size,
                   "device": str(self.device), "precision": self.precision,
                   "machine": self.machine}  # which CPU/GPU: VMs of one name differ 2-4x in speed
        if self.budget_s:
            summary.update(time_budget_s=self.budget_s, run_s=round(self.elapsed(), 1),
                           stopped_by_budget=self.time_frac >= 1.0 and self.epoch < cfg.epochs)
        self.call("on_fit_end", summary)
        if self.main:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            if test is not None:
                ema_top1, tta_top1 = summary.get("ema_top1"), summary.get("test_top1_tta")
                self.say(f"done in {_fmt_time(wall)}: {self.cfg.data.eval_split} top-1 {test.top1:.2f}% "
                         + (f"top-5 {test.top5:.2f}% " if self.num_classes > 5 else "")
                         + f"(best {self.best_top1:.2f}%)"
                         + (f", EMA top-1 {ema_top1:.2f}%" if ema_top1 is not None else "")
                         + (f", {cfg.tta} TTA top-1 {tta_top1:.2f}%" if tta_top1 is not None else "")
                         + f"; {self.run_dir}")
        self.log.close()
        return result

    def _epoch_line(self, r: dict[str, Any]) -> str:
        line = (f"epoch {r['epoch']}/{self.cfg.epochs}: loss {r['train_loss']:.4f} train acc {r['train_acc']:.2f}%"
                f" | {r['img_s']:.0f} img/s (input pipeline alone {r['data_img_s']:.0f} img/s)"
                f" | {_fmt_time(r['time_s'])}")
        if "test_top1" in r:
            line += f" | {self.cfg.data.eval_split} top-1 {r['test_top1']:.2f}%"  # the metrics keep the key test_*
            if self.num_classes > 5:  # top-5 of 5 classes or fewer is always 100 %: not shown
                line += f" top-5 {r['test_top5']:.2f}%"
            if "test_balanced_top1" in r:
                line += f" balanced {r['test_balanced_top1']:.2f}%"
        if "ema_top1" in r:
            line += f" | EMA top-1 {r['ema_top1']:.2f}%"
        if "test_top1_tta" in r:
            line += f" | {self.cfg.tta} TTA top-1 {r['test_top1_tta']:.2f}%"
        return line

    # ---------------------------------------------------------------------------------------------
    # files
    # ---------------------------------------------------------------------------------------------

    def write_plots(self, test: EvalResult | None) -> None:
        """Curves from ``metrics.jsonl`` and the last evaluation's confusion matrix (JSON and PNG)."""
        if not self.main:
            return
        plot_run(self.run_dir)
        if test is not None:
            atomic_write_text(self.run_dir / "confusion.json", json_text(test.to_json()) + "\n")
            plot_confusion(test.confusion, test.classes, self.run_dir / "confusion.png",
                           title=f"{self.model_name} on {self.eval_split.name}: top-1 {test.top1:.2f}%")

    def _contract(self, top1: float | None = None) -> RunContract:
        transform = input_transform(self.cfg.data, channels=self.train_split.channels, size=self.train_split.size,
                                    unpadded=self.train_split.unpadded)
        return run_contract(self.model_name, self.model_kwargs, classes=self.classes, transform=transform,
                            data=self.cfg.data.name, epoch=self.epoch, step=self.step, top1=top1)

    def save_weights(self, test: EvalResult | None) -> None:
        if not self.main:
            return
        top1 = test.top1 if test is not None else None
        save_weights(self.model, self.run_dir / "last.safetensors", contract=self._contract(top1))
        if self.ema is not None:
            save_weights(self.ema.module, self.run_dir / "ema.safetensors", contract=self._contract())
        if top1 is not None and (top1, -test.loss) > (self.best_top1, -self.best_loss):
            self.best_top1, self.best_loss = top1, test.loss if math.isfinite(test.loss) else math.inf
            save_weights(self.model, self.run_dir / "best.safetensors", contract=self._contract(top1))

    def save_state(self) -> None:
        """Write ``state.pt`` atomically (every rank's RNG states gathered into it)."""
        rngs = all_gather_objects(capture_rng({"augment": self.aug_gen}), self.info)
        self.saved_step = self.step  # (rank 0 writes it; every rank knows where the run can go on from)
        if not self.main:
            return
        state = {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": {"step": self.step},  # LRSchedule is a pure function of the step
            "rng": rngs,
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "elapsed_s": self.elapsed(),
            "best_top1": self.best_top1,
            "best_loss": self.best_loss,
            "world_size": self.info.world_size,
            "config": C.to_dict(self.cfg),
            "time_budget_s": self.budget_s,
            "budget_spent": self.time_frac >= 1.0,  # with time_budget_s: the run is over (see run_finished)
            "epoch_sums": self.epoch_sums,  # mid-epoch: the sums of its record and of the log window so far
            "data_files": self._files,  # which images each split held (a resume says if they changed)
            "steps_per_epoch": self.steps_per_epoch,  # the plan of steps a resume must keep
        }
        atomic_torch_save(state, self.run_dir / STATE_FILE)

    @functools.cached_property
    def _files(self) -> dict[str, Any]:
        return self._data_files()

    def _data_files(self) -> dict[str, Any]:
        """Per split: its image count and, for files on disk, a SHA-256 of their paths, also of their paths
        relative to ``data.root`` (what a resume compares: the same files moved with their folder are the same)."""
        import hashlib

        def sha(names: list[str]) -> str | None:
            return hashlib.sha256("\n".join(names).encode()).hexdigest() if names else None

        root = Path(self.cfg.data.root).expanduser().absolute() if self.cfg.data.root else None
        base = root.parent if root is not None and root.is_file() else root  # a CSV's paths: from its folder

        def relative(path: Path) -> str:
            try:
                return Path(path).absolute().relative_to(base).as_posix() if base is not None else str(path)
            except ValueError:  # outside the root (a CSV's absolute paths): as it is
                return str(path)

        out: dict[str, Any] = {}
        for key, split in (("train", self.train_split), ("eval", self.eval_split)):
            files = [path for path, _ in split.folder.samples] if split.folder is not None else []
            out[key] = {"images": len(split), "paths_sha256": sha([str(f) for f in files]),
                        "relative_paths_sha256": sha([relative(f) for f in files])}
        return out

    def _load(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:  # torch's error lists every key: say it in one line
            raise C.ConfigError(self._misfit(state)) from e
        self.finished = run_finished(state, self.cfg)
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.step_in_epoch, self.best_top1 = state["step_in_epoch"], state["best_top1"]
        self.best_loss = state.get("best_loss", -math.inf)  # older states: ties go to the earlier epoch, as then
        self.spent_before = state.get("elapsed_s", 0.0)
        self.saved_step = self.step
        self.epoch_sums = state.get("epoch_sums")  # a resumed epoch's sums before the checkpoint
        self._check_plan(state)
        before, now = state.get("data_files"), self._files

        def same(a: dict[str, Any], b: dict[str, Any]) -> bool:  # runs before relative paths: absolute ones
            key = "relative_paths_sha256" if "relative_paths_sha256" in a else "paths_sha256"
            return a["images"] == b["images"] and a.get(key) == b.get(key)
        changed = [k for k in now if before and k in before and not same(before[k], now[k])]
        if changed:  # files replaced are fine; files added or removed also move a hold-out drawn from the folder
            self.say("note: the data changed since the run was saved: " + "; ".join(
                f"{k} split {before[k]['images']} -> {now[k]['images']} images"
                + ("" if before[k]["images"] != now[k]["images"] else " (other files)") for k in changed)
                + (". Its test numbers before and after are not on the same images"
                   + (" (a hold-out drawn from the folder moves when files are added or removed)"
                      if "holdout" in self.eval_split.name else "")
                   if "eval" in changed else ". Training goes on over the files there now"))
        rngs = state["rng"]
        if len(rngs) == self.info.world_size:
            self.rng_state = rngs[self.info.rank]
        else:
            self.say(f"note: the run was saved with {len(rngs)} process(es), now {self.info.world_size}; random "
                     "streams restart from the seed (the data order is unchanged)")
        # keys the saved config lacks are newer than the run (their values keep its behaviour): no note
        changed = [k for k in _changed_keys(state["config"], C.to_dict(self.cfg)) if _has_key(state["config"], k)]
        if changed:
            now_cfg = C.to_dict(self.cfg)
            self.say("note: the config differs from the saved run's in " + ", ".join(
                f"{k} ({_short(_get_key(state['config'], k))} -> {_short(_get_key(now_cfg, k))})" for k in changed))
        if {"epochs", "time_budget_min"} & set(changed) and self.cfg.schedule.name != "constant" \
                and not self.cfg.time_budget_min:  # (a budget's schedule follows the time: read_clock sets it)
            before = state["optimizer"]["param_groups"][0]["lr"]
            now = self.schedule(self.step, self.time_frac)
            if not math.isclose(before, now, rel_tol=1e-3):
                self.say(f"note: the {self.cfg.schedule.name} schedule now spans {self.schedule.total_steps} steps, "
                         f"so the learning rate goes on from {now:.3g}, not from the {before:.3g} the run reached "
                         "(a run of another length than planned: fine-tuning it, nestvit train finetune, starts a "
                         "schedule anew)")

    def _starting_weights(self, cfg: C.TrainConfig, run_dir: Path) -> C.ModelSection:
        """A resumed fine-tuning run whose ``model.weights`` moved or are gone: its own weights give the
        architecture (its state holds every weight it trained); the config keeps the path it started from."""
        weights = cfg.model.weights
        if not weights or not Path(weights).is_absolute() or Path(weights).exists():
            return cfg.model  # (published tags and hf-hub ids are not paths: absolute_weights left them as given)
        own = run_dir / "last.safetensors"
        if not own.is_file():
            raise C.ConfigError(f"model.weights {weights}: no such file or folder (moved?), and {run_dir} has no "
                                "weights of its own yet to take the architecture from; resume with --set "
                                "model.weights=NEW_PATH")
        self.say(f"note: model.weights {weights} is gone; the architecture comes from {own} (the run's state holds "
                 "every weight it trained)")
        return dataclasses.replace(cfg.model, weights=str(own))

    def _check_plan(self, state: dict[str, Any]) -> None:
        """Refuse a resume whose changes break the run's plan of steps: another number of steps per epoch (other
        ``global_batch``, ``data.limit_train`` or image count: the step count and the learning-rate schedule would
        no longer fit the epochs), or, in the middle of an epoch, another image order (seed; for tar shards the
        number of processes or workers too: images repeated and skipped) or fewer epochs than the one it is in
        (ended half trained)."""
        saved = state.get("config") or {}
        epoch, in_epoch, step = int(state["epoch"]), int(state["step_in_epoch"]), int(state["step"])
        if step == 0:  # nothing trained yet: any plan goes
            return
        images = ((state.get("data_files") or {}).get("train") or {}).get("images")
        spe = state.get("steps_per_epoch")  # recorded since 2026-12-06; before: what the last piece trained with
        if spe is None and images and saved.get("global_batch"):
            spe = images // saved["global_batch"]
        new_run = f"go on from its weights in a new run (nestvit train RECIPE --set model.weights={self.run_dir} " \
                  "--out NEW_RUN)"
        if spe is not None and spe != self.steps_per_epoch:
            raise C.ConfigError(
                f"{self.run_dir} trained {spe} steps per epoch ({images if images is not None else '?'} images in "
                f"batches of {saved.get('global_batch', '?')}); now {self.steps_per_epoch} ({len(self.train_split)} "
                f"of {self.cfg.global_batch}): its steps and learning-rate schedule would no longer fit the epochs. "
                f"Keep global_batch, data.limit_train and the training images as they were, or {new_run}")
        if not in_epoch:
            return
        mid = f"{self.run_dir} stopped in the middle of epoch {epoch + 1} (step {in_epoch} of {self.steps_per_epoch})"
        order = [f"seed {self.cfg.seed} (not {saved['seed']})"] if saved.get("seed", self.cfg.seed) != self.cfg.seed \
            else []
        if self.train_split.stream is not None:  # a shard epoch's order follows the processes and the workers
            if state.get("world_size", self.info.world_size) != self.info.world_size:
                order.append(f"{self.info.world_size} process(es) (not {state['world_size']})")
            workers = (saved.get("data") or {}).get("workers", self.cfg.data.workers)
            if workers != self.cfg.data.workers:
                order.append(f"data.workers {self.cfg.data.workers} (not {workers})")
        if order:
            raise C.ConfigError(f"{mid}; {' and '.join(order)} would draw another order of its images, repeating "
                                f"some and skipping others: resume with the run's own settings, or {new_run}")
        if self.cfg.epochs <= epoch:
            raise C.ConfigError(f"{mid}; epochs {self.cfg.epochs} would end it there, that epoch half trained and "
                                f"unevaluated: resume with epochs >= {epoch + 1}, or use its last weights as they are "
                                f"(nestvit eval {self.run_dir} --weights last)")

    def _check_teacher(self, weights: str) -> list[str]:
        """The teacher's weights against the student's data: another class count is an error; other class names,
        another input size or normalisation are warnings (it sees the student's images, prepared for the student)."""
        from ..contract import read_contract, resolve_weights

        try:
            contract = read_contract(resolve_weights(weights))
        except Exception:  # noqa: BLE001 - weights without a run contract (timm's, torch.save): nothing to compare
            return []
        classes = list(contract.classes or [])
        if classes and len(classes) != self.num_classes:
            raise C.ConfigError(f"distill.teacher_weights {weights} has {len(classes)} classes "
                                f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}); the student's data "
                                f"has {self.num_classes}: a teacher is trained on the student's classes")
        notes = []  # classes of other names or order: said by build_model (follow_class_names)
        t, cfg = contract.transform, self.cfg.data
        if t is not None and (tuple(t.size) != tuple(self.train_split.size)
                              or (cfg.mean is not None and tuple(t.mean) != tuple(cfg.mean))
                              or (cfg.std is not None and tuple(t.std) != tuple(cfg.std))):
            notes.append(f"warning: the teacher was trained on {t.size[0]}x{t.size[1]} images normalised with mean "
                         f"{tuple(t.mean)} std {tuple(t.std)}; it sees the student's, {self.train_split.size[0]}x"
                         f"{self.train_split.size[1]} with mean {cfg.mean} std {cfg.std}, so its targets may be "
                         "poorer than its own accuracy")
        return notes

    def _misfit(self, state: dict[str, Any]) -> str:
        """One line: the checkpoint's model does not fit the config's (names, sizes, differing keys), and what to do."""
        def size(sd: Any) -> int:
            return sum(t.numel() for t in sd.values() if isinstance(t, torch.Tensor)) if isinstance(sd, dict) else 0

        saved = state.get("config") if isinstance(state.get("config"), dict) else {}
        name = (saved.get("model") or {}).get("name", "?")
        changed = [k for k in _changed_keys(saved, C.to_dict(self.cfg)) if k.split(".")[0] in ("model", "data")]
        differ = f"; the configs differ in {', '.join(changed[:6])}" if changed and saved else ""
        return (f"{self.run_dir / STATE_FILE} does not fit the config: it holds a {name} of "
                f"{size(state.get('model')):,} weights, the config builds a {self.cfg.model.name} of "
                f"{size(self.model.state_dict()):,}{differ}. Resume with the run's own config.yaml (no --set of "
                "model or data keys), or start a new run with another --out")


def run_finished(state: dict[str, Any], cfg: C.TrainConfig) -> bool:
    """Whether the run of training ``state`` is over under ``cfg``: all its epochs done, or its time budget
    spent (the same budget: a larger one, or more epochs, continues it)."""
    if state["epoch"] >= cfg.epochs:
        return True
    budget = cfg.time_budget_min * 60.0
    return bool(budget) and (state.get("elapsed_s", 0.0) >= budget
                             or (bool(state.get("budget_spent")) and state.get("time_budget_s") == budget))


def finished_summary(run_dir: Path, state: dict[str, Any], cfg: C.TrainConfig) -> dict[str, Any] | None:
    """The ``summary.json`` of a finished run that wrote it after its last checkpoint, else None (the run has
    more to train, or was killed before its final evaluation, plots and summary were written)."""
    if not run_finished(state, cfg):
        return None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("steps") == state["step"] else None


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, *, mean: tuple[float, ...], std: tuple[float, ...], batch: int = 500,
             info: DistInfo | None = None, precision: str = "fp32", workers: int = 0,
             tta: str = "none") -> EvalResult:
    """Evaluate ``model`` (on ``info.device``) on every image of ``split``, each rank its share, summed over ranks.

    A distilled model's pair of heads is averaged, as DeiT does at test time. With ``tta`` (test-time
    augmentation, see :func:`tta_views`) the model also sees every image mirrored and/or moved, and the
    prediction is the mean of the views' softmax outputs (its log, for the loss).
    """
    info = info or DistInfo(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    acc = EvalAccumulator(len(split.classes), info.device)
    for images, labels in eval_batches(split, batch=batch, rank=info.rank, world_size=info.world_size,
                                       device=info.device, workers=workers):
        with autocast(info.device, precision):
            out = view_logits(model, images, mean, std, tta)
        acc.add(out, labels)
    all_reduce_sum(acc.sums, info)
    all_reduce_sum(acc.confusion, info)
    model.train(was_training)
    return acc.result(split.classes)


def view_logits(model: nn.Module, images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                tta: str = "none") -> torch.Tensor:
    """Logits ``(B, classes)`` of uint8 images ``(B, C, H, W)``, normalised with ``mean`` / ``std`` as in training.

    With ``tta`` (:func:`tta_views`), the log of the mean of the views' softmax outputs (still logits); a
    distilled model's pair of heads is averaged. What ``evaluate`` and ``nestvit predict`` score."""
    views = tta_views(tta)
    if len(views) == 1:
        return _logits(model(eval_transform(images, mean, std)))
    return torch.stack([
        _logits(model(eval_transform(shift(images.flip(-1) if m else images, dy, dx), mean, std)))
        .float().log_softmax(-1) for m, dy, dx in views]).logsumexp(0) - math.log(len(views))


def _logits(out: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A distilled model's (class, distillation) pair averaged; any other output as it is."""
    return (out[0] + out[1]) / 2 if isinstance(out, tuple) else out


def _get_key(config: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _short(value: Any, limit: int = 60) -> str:
    """A value for a one-line note: long ones keep their start and their end (where paths differ)."""
    text = str(value)
    return text if len(text) <= limit else text[:20] + "..." + text[-(limit - 23):]


def _has_key(config: dict[str, Any], dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return False
        config = config[part]
    return True


# what a run's model was trained to see and to be: a resume keeps them (a new run, or fine-tuning, changes them)
FIXED_ON_RESUME = ("model.name", "model.overrides", "data.name", "data.classes", "data.train_split", "data.img_size",
                   "data.resize_to", "data.pad_to", "data.channels", "data.mean", "data.std")


def check_resumable(saved: dict[str, Any], cfg: C.TrainConfig, run_dir: Path) -> None:
    """Refuse a resume whose config changes a key of :data:`FIXED_ON_RESUME` (a key left open, None, is filled
    from the run as it was and is no change); one line naming the keys, their values and what to do instead."""
    from ..models.nest_variants import legacy_nest_kwargs

    new = C.to_dict(cfg)
    saved = {**saved, "model": dict(saved.get("model") or {})}
    for side in (saved["model"], new["model"]):  # files of older versions: the names and options they build today
        if side.get("name"):
            side["name"], side["overrides"] = legacy_nest_kwargs(side["name"], side.get("overrides") or {})
    changed = []
    for key in FIXED_ON_RESUME:
        if not _has_key(saved, key):
            continue
        section, name = key.split(".")
        a, b = saved[section][name], new[section][name]
        if isinstance(a, dict) and isinstance(b, dict):  # model.overrides: the entries that differ
            changed += [f"{key}.{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                        if a.get(k) != b.get(k)]
        elif b is not None and a != b and not (isinstance(a, list | tuple) and list(a) == list(b or [])):
            changed.append(f"{key} {a!r} -> {b!r}")
    if changed:
        raise C.ConfigError(f"{run_dir} was trained with other data or another model: {'; '.join(changed)}. A "
                            "resume continues the same training; train a new run (another --out) to change them, "
                            f"or fine-tune this one: nestvit train finetune --set model.weights={run_dir}")


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "overrides":
            out += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(prefix + key)
    return out


def train(cfg: C.TrainConfig, run_dir: str | Path, *, resume: bool = False, device: str | None = None,
          stop_after_epochs: int | None = None, callbacks: Sequence[Callback] = ()) -> RunResult:
    """Train ``cfg`` into ``run_dir`` (continuing the run there with ``resume``); joins torchrun's group if any.

    ``cfg``: a ``TrainConfig``, or a recipe (built-in name, path or dict) for :func:`load_config`.
    ``stop_after_epochs`` returns after that many epochs have completed, as an interrupted run would.
    ``callbacks``: your own hooks of the loop (``nestvit.train.hooks.Callback``), after the built-in ones.
    """
    if isinstance(cfg, (str, Path, dict)):
        cfg = C.load_config(cfg)
    elif not isinstance(cfg, C.TrainConfig):
        raise TypeError(f"train takes a TrainConfig or a recipe (name, path or dict), not {type(cfg).__name__!r}; "
                        "load_config(recipe, overrides) builds one")
    info = init_distributed(device)
    trainer, threads = None, torch.get_num_threads()
    try:
        run_dir = Path(all_gather_objects(str(run_dir), info)[0])  # every rank writes under rank 0's choice
        state = load_state(run_dir) if resume else None
        if state is not None and isinstance(state.get("config"), dict):
            check_resumable(state["config"], cfg, run_dir)
        done = finished_summary(run_dir, state, cfg) if state is not None else None
        if done is not None:  # nothing to train, evaluate or write: say so and change nothing
            if info.is_main:
                top1 = done.get("test_top1")
                budget = state["epoch"] < cfg.epochs  # stopped by its time budget, not by its epochs
                why = (f" (stopped by its time budget, time_budget_min={cfg.time_budget_min:g})" if budget else "")
                more = ("a larger --set time_budget_min (the epochs were not what stopped it)" if budget
                        else "--epochs N" + (" or a larger time_budget_min" if cfg.time_budget_min else ""))
                trained = done.get("epochs", state["epoch"])
                epochs = f"{trained}/{cfg.epochs}" if trained <= cfg.epochs else \
                    f"{trained} (more than --epochs {cfg.epochs})"
                print(f"{run_dir} is already finished{why}: {epochs} epochs, "
                      f"{state['step']} steps" + (f", test top-1 {top1:.2f}%" if isinstance(top1, (int, float)) else "")
                      + f" (summary.json); nothing to do, nothing changed. To train on, resume with {more}")
            return RunResult(run_dir, state["epoch"], state["step"], None, None, state.get("best_top1", -1.0), 0.0)
        trainer = Trainer(cfg, run_dir, info, resume=resume, state=state, callbacks=callbacks)
        return trainer.fit(stop_after_epochs)
    finally:
        del trainer  # model, optimizer and DDP go before the process group (see distributed.shutdown)
        with ignoring_ctrl_c():  # a second Ctrl-C here would replace the Stopped that says where the run is
            shutdown(info)
        torch.set_num_threads(threads)  # cfg.threads applies to this run only
