"""Classification metrics and the run's metric log.

- ``EvalAccumulator``: summed loss, top-1/top-5 counts and the confusion matrix of an evaluation,
  kept as tensors so ranks can ``all_reduce`` them; ``result()`` gives an ``EvalResult`` with
  per-class accuracy.
- ``MetricsLog``: ``metrics.jsonl`` (one JSON record per logged step and per epoch, appended and
  flushed as they come) plus TensorBoard scalars when ``torch.utils.tensorboard`` imports.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..fileio import atomic_write_text, disk_full_error, is_disk_full

METRICS_FILE = "metrics.jsonl"


def unequal_sizes(counts: Iterable[int]) -> bool:
    """Whether the classes with images (``counts``: images per class) differ in size."""
    return len({n for n in counts if n}) > 1


@dataclass
class EvalResult:
    loss: float
    top1: float  # percent
    top5: float  # percent (top-k with k = min(5, num_classes))
    count: int
    confusion: list[list[int]]  # [true class][predicted class]
    classes: list[str]

    @property
    def per_class(self) -> dict[str, float]:
        """Accuracy (percent) of each class: the diagonal of the confusion matrix over its row sums."""
        out = {}
        for i, name in enumerate(self.classes):
            total = sum(self.confusion[i])
            out[name] = 100.0 * self.confusion[i][i] / total if total else math.nan
        return out

    @property
    def per_class_count(self) -> dict[str, int]:
        """Images of each class (the confusion matrix's row sums)."""
        return {name: sum(row) for name, row in zip(self.classes, self.confusion)}

    @property
    def balanced_top1(self) -> float:
        """Balanced accuracy (percent): the mean of the per-class accuracies of the classes with images, each class
        counting the same however many images it has (top-1 when every class has as many); NaN with none."""
        scored = [a for a in self.per_class.values() if not math.isnan(a)]
        return sum(scored) / len(scored) if scored else math.nan

    @property
    def unequal(self) -> bool:
        """Whether the classes with images differ in size (then top-1 favours the large ones: say balanced too)."""
        return unequal_sizes(self.per_class_count.values())

    def to_json(self) -> dict[str, Any]:
        """The result as strict JSON: a class without images has accuracy null (not NaN)."""
        per_class = {c: None if math.isnan(a) else a for c, a in self.per_class.items()}
        balanced = None if math.isnan(self.balanced_top1) else self.balanced_top1
        return {"loss": self.loss, "top1": self.top1, "top5": self.top5, "balanced_top1": balanced,
                "count": self.count, "classes": self.classes, "per_class_accuracy": per_class,
                "per_class_count": self.per_class_count, "confusion": self.confusion}


class EvalAccumulator:
    """Accumulates logits and labels of evaluation batches on the model's device."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.k = num_classes
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        loss = F.cross_entropy(logits, labels, reduction="sum")
        top = logits.topk(min(5, self.k), dim=1).indices  # (B, k)
        hit = top == labels[:, None]
        pred = top[:, 0]
        self.sums += torch.stack([loss.double(), hit[:, 0].sum().double(), hit.any(1).sum().double(),
                                  torch.tensor(labels.numel(), dtype=torch.float64, device=labels.device)])
        self.confusion += torch.bincount(labels * self.k + pred, minlength=self.k * self.k)

    def result(self, classes: list[str]) -> EvalResult:
        loss, top1, top5, n = self.sums.tolist()
        n_safe = max(n, 1.0)
        conf = self.confusion.view(self.k, self.k).tolist()
        return EvalResult(loss=loss / n_safe, top1=100.0 * top1 / n_safe, top5=100.0 * top5 / n_safe,
                          count=int(n), confusion=conf, classes=list(classes))


class MetricsLog:
    """Append-only JSONL metric log (and TensorBoard when it is installed). Rank 0 only."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, truncate_after_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self.tb = None
        self.dropped = 0  # records truncate_after_step dropped
        if not enabled:
            return
        if truncate_after_step is not None:
            self.dropped = truncate_metrics(self.path, truncate_after_step)
        self.file = self.path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # noqa: BLE001 - tensorboard is optional; skip silently without it
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:
            if is_disk_full(e):  # a torn last line is skipped by read_metrics and dropped on resume
                raise disk_full_error(self.path, kept="the records written before are intact") from e
            raise
        if self.tb is not None:
            kind, step = record.get("kind", "step"), record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _metrics_path(path: str | Path) -> Path:
    """``path`` itself, or the ``metrics.jsonl`` inside it when it is a run directory."""
    path = Path(path)
    return path / METRICS_FILE if path.is_dir() else path


def truncate_metrics(path: str | Path, after_step: int) -> int:
    """On resume: drop what a killed run logged after its last checkpoint (and a torn last line), atomically;
    ``after_step=0`` (a new run) drops the records of a run killed before its first checkpoint. Returns how
    many records were dropped (a torn line is not counted)."""
    path = _metrics_path(path)
    if not path.is_file():
        return 0
    records = read_metrics(path)
    keep = [r for r in records if r.get("step", 0) <= after_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return len(records) - len(keep)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (or of the run directory holding one); unreadable lines are skipped."""
    records = []
    for line in _metrics_path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a killed process
            continue
    return records
