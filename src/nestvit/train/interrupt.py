"""Ctrl-C or SIGTERM during training: finish the step, save the run's state, stop; a resume goes on from there.

The first SIGINT (Ctrl-C) or SIGTERM (a scheduler's pre-emption, ``kill PID``) asks the loop to stop at its
next step boundary. There it saves ``state.pt``, the same checkpoint ``checkpoint_every`` writes (so the
resumed run is bit-exact), and raises :class:`Stopped`. A second Ctrl-C stops at once, losing the steps since
the last checkpoint. A signal the process was told to ignore (``nohup``, a shell's background job ignores
SIGINT) stays ignored.

DataLoader workers ignore SIGINT (:func:`ignore_ctrl_c`, their ``worker_init_fn``): a terminal's Ctrl-C
reaches every process of the group, and a worker that quit would fail the step the main process finishes.
They keep PyTorch's SIGTERM handling: the DataLoader (and ``multiprocessing`` at exit) stops its workers with
SIGTERM, so a worker must obey it. A SIGTERM sent to every process, workers included (a scheduler
that signals the whole job), ends the workers too and the stop fails with their error; send it to the main
process alone.

Under DDP the ranks agree on the step they stop at: the trainer sums every rank's request into the
all-reduce each step already makes (:meth:`StopRequest.flag`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import torch

__all__ = ["StopRequest", "Stopped", "ignore_ctrl_c"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class Stopped(KeyboardInterrupt):
    """Training stopped by Ctrl-C or SIGTERM after its state was saved: ``train(cfg, run_dir, resume=True)``
    (``nestvit train --resume RUN``) goes on from ``step``, as if it had never stopped."""

    def __init__(self, signal_name: str, step: int, run_dir: str | Path, how: str | None = None) -> None:
        self.signal_name, self.step, self.run_dir = signal_name, step, Path(run_dir)
        self.how = how or f"nestvit train --resume {run_dir}"
        super().__init__(f"stopped by {signal_name} at step {step}; the run's state is saved in {run_dir}: "
                         f"continue it with {self.how}")


class StopRequest:
    """While entered (in the main thread), the first SIGINT or SIGTERM sets :attr:`signal_name` instead of
    killing the process; a second SIGINT raises ``KeyboardInterrupt``. The previous handlers come back on exit.

    ``announce``: say so on stderr when the request comes (rank 0 does, the other ranks are quiet).
    ``at_once``: what the second Ctrl-C's ``KeyboardInterrupt`` says (called then: where the run stands).
    """

    def __init__(self, *, announce: bool = True, at_once: Callable[[], str] | None = None) -> None:
        self.announce, self.at_once = announce, at_once
        self.signal_name: str | None = None
        self._old: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopRequest:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in _SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Give the signals back to their previous handlers (again: nothing)."""
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)  # None: a handler set outside Python
        self._old = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a DataLoader worker forked with this handler, before its worker_init_fn
            return
        if self.signal_name is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt(self.at_once() if self.at_once else "")
            return
        self.signal_name = _NAMES.get(signum, f"signal {signum}")
        if self.announce:  # a raw write: the handler may run inside a print of the main flow (a buffered
            # stream's write is not reentrant), and a progress bar's lock may be held
            message = (f"\n{self.signal_name}: stopping after the current step or evaluation, saving the run's state "
                       "first "
                       "(Ctrl-C again stops at once and loses the steps since the last checkpoint)\n")
            with contextlib.suppress(OSError):
                os.write(2, message.encode())

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def flag(self, device: torch.device) -> torch.Tensor:
        """``1.0`` when a stop is requested on this rank, as a tensor to sum over the ranks."""
        return torch.tensor(float(self.requested), device=device)


def ignore_ctrl_c(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker leaves Ctrl-C (SIGINT) to the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
