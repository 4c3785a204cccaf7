"""Ctrl-C or SIGTERM during training: finish the step, save the run's state, stop; a resume goes on from there.

The first SIGINT (Ctrl-C) or SIGTERM (a scheduler's pre-emption, ``kill PID``) asks the loop to stop at its
next step boundary. There it saves ``state.pt``, the same checkpoint ``checkpoint_every`` writes (so the
resumed run is bit-exact), and raises :class:`Stopped`. A second Ctrl-C stops at once, losing the steps since
the last checkpoint. SIGHUP (the terminal or ssh session closed) stops the same way. A signal the process was
told to ignore stays ignored (``nohup`` ignores SIGHUP; a shell script's background job ignores SIGINT).

DataLoader workers leave the signals to the trainer (:func:`leave_signals_to_the_trainer`, their
``worker_init_fn``): each moves to a process group of its own, so a terminal's Ctrl-C and a SIGTERM to the
trainer's group (``kill -- -PGID``; torchrun forwards signals to each rank's group) reach the trainer only; a
worker that quit would fail the step the trainer finishes. PyTorch still stops its workers by their pid. A
scheduler that signals every process one by one still reaches them: send the trainer alone such signals.

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

__all__ = ["StopRequest", "Stopped", "leave_signals_to_the_trainer", "stopped_at_once"]

# SIGHUP: the terminal or ssh session closed (a run under nohup ignores it, and that stays so)
_SIGNALS = (signal.SIGINT, signal.SIGTERM, *((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()))
_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", getattr(signal, "SIGHUP", -1): "SIGHUP"}


class Stopped(KeyboardInterrupt):
    """Training stopped by Ctrl-C or SIGTERM after its state was saved: ``train(cfg, run_dir, resume=True)``
    (``nestvit train --resume RUN``) goes on from ``step``, as if it had never stopped. ``complete``: the
    signal came as the run was finishing, and it did (what called it stops too: the next run of an
    experiment does not start)."""

    def __init__(self, signal_name: str, step: int, run_dir: str | Path, how: str | None = None,
                 complete: bool = False) -> None:
        self.signal_name, self.step, self.run_dir, self.complete = signal_name, step, Path(run_dir), complete
        self.how = how or f"nestvit train --resume {run_dir}"
        done = f"; {run_dir} is complete" if complete else f"; the run's state is saved in {run_dir}"
        super().__init__(f"stopped by {signal_name} at step {step}{done}: continue it with {self.how}"
                         if not complete or how else f"stopped by {signal_name} at step {step}{done}")

    def __reduce__(self):  # picklable (a worker process's exception), although __init__ takes more than one
        return type(self), (self.signal_name, self.step, self.run_dir, self.how, self.complete)


def stopped_at_once(step: int, saved_step: int | None, run_dir: Path, resume: str) -> str:
    """What a second Ctrl-C says: where the run stands and where it can go on from (``resume``: the command)."""
    if saved_step is None:
        return (f"stopped at once at step {step}, before the run's first checkpoint: nothing is saved; start it "
                f"again (remove {run_dir} first)")
    return f"stopped at once at step {step}; the run goes on from its last checkpoint, step {saved_step}, with {resume}"


class StopRequest:
    """While entered (in the main thread), the first SIGINT, SIGTERM or SIGHUP sets :attr:`signal_name` instead of
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
                       "first (Ctrl-C again stops at once and loses the steps since the last checkpoint)\n")
            with contextlib.suppress(OSError):
                os.write(2, message.encode())

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def flag(self, device: torch.device) -> torch.Tensor:
        """``1.0`` when a stop is requested on this rank, as a tensor to sum over the ranks."""
        return torch.full((), float(self.requested), device=device)  # no blocking copy from the host


def leave_signals_to_the_trainer(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker leaves the stop signals to the main process. It starts with
    them blocked (:func:`starting_workers`); here it ignores Ctrl-C, drops a SIGTERM sent to the trainer's
    group meanwhile, moves to a process group of its own, takes PyTorch's SIGTERM handling back (the DataLoader
    stops its workers with it) and lets the signals in."""
    from torch.utils.data._utils.signal_handling import _set_worker_signal_handlers

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # discards a pending one (POSIX)
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: no process groups (Windows)
        os.setpgid(0, 0)
    _set_worker_signal_handlers()
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


@contextlib.contextmanager
def starting_workers():
    """Block the stop signals while DataLoader workers are forked: a worker is born with them blocked, so that a
    signal to the trainer's group in its first instant (before :func:`leave_signals_to_the_trainer`) does not
    end it. The trainer gets a signal sent meanwhile when the block ends."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def ignoring_ctrl_c():
    """Ctrl-C ignored for a moment (the clean-up after a stop: a second Ctrl-C there would replace the
    :class:`Stopped` that says where the run stands)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old if old is not None else signal.SIG_DFL)
