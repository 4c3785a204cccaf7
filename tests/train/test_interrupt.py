"""Ctrl-C and SIGTERM: training finishes its step, saves its state and stops; the resumed run is bit-exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from nestvit.cli import main as cli_main
from nestvit.train.checkpoint import load_state
from nestvit.train.hooks import Callback
from nestvit.train.interrupt import Stopped, StopRequest
from nestvit.train.loop import train
from nestvit.train.metrics import read_metrics

from .test_loop import RANDOM, assert_same_weights, weights


@pytest.fixture(autouse=True)
def _handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    after = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s, h in before.items():
        signal.signal(s, h)
    assert after == before  # whatever happened, training gave the signals back


class SignalAt(Callback):
    """Sends ``signum`` to this process when the step record of ``step`` comes (log_every=1)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_record(self, trainer, record):
        if record["kind"] == "step" and record["step"] == self.step:
            signal.raise_signal(self.signum)


@pytest.mark.parametrize("signum,at,where", [
    (signal.SIGINT, 2, (2, 0, 2)),   # mid-epoch: saved after that very step
    (signal.SIGTERM, 4, (4, 1, 0)),  # the epoch's last step: after the epoch's evaluation and checkpoint
])
def test_a_signal_saves_the_step_and_the_resumed_run_is_bit_exact(tmp_path, make_config, capfd, signum, at, where):
    cfg = make_config(*RANDOM)
    train(cfg, tmp_path / "a")
    with pytest.raises(Stopped) as stopped:
        train(cfg, tmp_path / "b", callbacks=[SignalAt(at, signum)])
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    assert str(stopped.value) == (f"stopped by {name} at step {at}; the run's state is saved in {tmp_path / 'b'}: "
                                  f"continue it with nestvit train --resume {tmp_path / 'b'}")
    assert f"{name}: stopping after the current step or evaluation, saving the run's state first" in \
        capfd.readouterr().err
    state = load_state(tmp_path / "b")
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == where
    assert not (tmp_path / "b/summary.json").exists()
    train(cfg, tmp_path / "b", resume=True)
    for name in ("last", "ema"):
        assert_same_weights(weights(tmp_path / f"a/{name}.safetensors"), weights(tmp_path / f"b/{name}.safetensors"))
    steps = lambda run: [(r["step"], r["loss"]) for r in read_metrics(run) if r["kind"] == "step"]  # noqa: E731
    assert steps(tmp_path / "a") == steps(tmp_path / "b")
    # the stopped epoch's record counts its steps before the stop too; the run's time counts both pieces
    epochs = lambda run: [(r["train_loss"], r["train_acc"]) for r in read_metrics(run) if r["kind"] == "epoch"]  # noqa
    assert epochs(tmp_path / "a") == epochs(tmp_path / "b")
    wall = json.loads((tmp_path / "b/summary.json").read_text())["wall_s"]
    assert wall >= state["elapsed_s"] + 0.1 * json.loads((tmp_path / "a/summary.json").read_text())["wall_s"]


def test_the_log_window_between_two_records_survives_a_stop(tmp_path, make_config, monkeypatch):
    from nestvit.train import loop

    cfg = make_config(*RANDOM, "log_every=3")
    train(cfg, tmp_path / "a")
    real = loop.Trainer.train_step

    def signal_after_step_2(self, x, t):
        out = real(self, x, t)
        if self.step == 2:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(loop.Trainer, "train_step", signal_after_step_2)
    with pytest.raises(Stopped, match="at step 2;"):
        train(cfg, tmp_path / "b")
    monkeypatch.setattr(loop.Trainer, "train_step", real)
    train(cfg, tmp_path / "b", resume=True)
    records = lambda run: [(r["step"], r["loss"], r["acc"]) for r in read_metrics(run) if r["kind"] == "step"]  # noqa
    assert records(tmp_path / "a") == records(tmp_path / "b")  # step 3's record averages steps 1-3, as unstopped


def test_a_signal_during_the_last_evaluation_lets_the_run_finish_and_stops_what_called_it(tmp_path, make_config):
    class SignalAtTheEnd(Callback):
        def on_final_evaluate(self, trainer, record):
            signal.raise_signal(signal.SIGTERM)

    with pytest.raises(Stopped, match=rf"^stopped by SIGTERM at step 8; {tmp_path / 'run'} is complete$") as e:
        train(make_config(), tmp_path / "run", callbacks=[SignalAtTheEnd()])
    assert e.value.complete and (tmp_path / "run/summary.json").is_file()


def test_a_second_ctrl_c_says_which_checkpoint_the_run_goes_on_from(tmp_path, make_config):
    class TwiceAt(SignalAt):
        def on_record(self, trainer, record):
            if record["kind"] == "step" and record["step"] == self.step:
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)

    cfg = make_config("checkpoint_every=1")
    with pytest.raises(KeyboardInterrupt, match=rf"^stopped at once at step 3; the run goes on from its last "
                                                rf"checkpoint, step 2, with nestvit train --resume {tmp_path / 'a'}$"):
        train(cfg, tmp_path / "a", callbacks=[TwiceAt(3, signal.SIGINT)])
    with pytest.raises(KeyboardInterrupt, match=r"^stopped at once at step 1, before the run's first checkpoint: "
                                                r"nothing is saved; start it again \(remove .*b first\)$"):
        train(make_config(), tmp_path / "b", callbacks=[TwiceAt(1, signal.SIGINT)])


def test_a_second_ctrl_c_stops_at_once_and_sigterm_never_does():
    with StopRequest(announce=False) as stop:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # a second SIGTERM (torchrun's after the terminal's Ctrl-C): no harm
        assert stop.requested and stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_signal_stays_ignored_and_other_threads_change_nothing():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a shell's background job
    with StopRequest(announce=False) as stop:
        signal.raise_signal(signal.SIGINT)
        assert not stop.requested
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # SIGTERM is still taken
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    signal.signal(signal.SIGINT, signal.default_int_handler)

    seen = []

    def in_a_thread():
        with StopRequest(announce=False) as other:  # signal handlers can only be set in the main thread
            seen.append((other.requested, signal.getsignal(signal.SIGTERM)))

    t = threading.Thread(target=in_a_thread)
    t.start()
    t.join()
    assert seen == [(False, signal.SIG_DFL)]


def test_a_forked_process_leaves_the_request_to_its_parent():
    # a DataLoader worker is forked with the trainer's handler and runs it until its worker_init_fn: before, each
    # worker printed the stop notice again
    with StopRequest(announce=False) as stop:
        pid = os.fork()
        if pid == 0:
            signal.raise_signal(signal.SIGINT)
            os._exit(0 if not stop.requested else 1)
        assert os.waitpid(pid, 0)[1] == 0 and not stop.requested


class _SignalledInWorkers(torch.utils.data.Dataset):
    """Every item sends SIGINT to the worker process that loads it (a terminal's Ctrl-C), and says in which
    process group the worker is."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        os.kill(os.getpid(), signal.SIGINT)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the worker's mask: the signals let in again
        return torch.tensor([i, os.getpgid(0), int(signal.SIGTERM in blocked or signal.SIGINT in blocked)])


def test_a_gan_stopped_while_training_its_feature_network_says_to_run_it_again(tmp_path, monkeypatch):
    from nestvit.generate import train as gan

    from ..generate.test_train import TINY

    def stopped_feature_net(cfg, folder, dev, log, images=None):
        raise Stopped("Ctrl-C", 5, folder)

    monkeypatch.setattr(gan, "load_train_images", lambda cfg: torch.zeros(16, 3, 16, 16, dtype=torch.uint8))
    monkeypatch.setattr(gan, "eval_reference", stopped_feature_net)
    with pytest.raises(Stopped, match=r"at step 5; the run's state is saved in .*feature_net: continue it with the "
                                      r"same nestvit generate train command"):  # before: nestvit train --resume ..
        gan.train_gan(gan.GanConfig(**{**TINY, "eval_every": 10}, steps=2), tmp_path / "run")


def test_dataloader_workers_leave_ctrl_c_to_the_trainer():
    from nestvit.train.inputs import _loader

    batches = [b.tolist() for b in _loader(_SignalledInWorkers(), 1, batch_size=2)]
    assert [[item[0] for item in b] for b in batches] == [[0, 1], [2, 3], [4, 5]]  # the worker went on
    # a group of its own: a SIGTERM to the trainer's group (kill -- -PGID, torchrun's forwarding) misses it
    assert {item[1] for b in batches for item in b} != {os.getpgid(0)}
    assert {item[2] for b in batches for item in b} == {0}  # born with the signals blocked, then let in


def test_a_signal_while_workers_start_reaches_the_trainer_afterwards():
    from nestvit.train.interrupt import starting_workers

    with StopRequest(announce=False) as stop:
        with starting_workers():  # a fork here gives a worker born with the signals blocked
            signal.raise_signal(signal.SIGTERM)
            assert not stop.requested
        assert stop.requested and stop.signal_name == "SIGTERM"


def test_a_gan_stops_after_its_step_and_resumes_exactly(tmp_path, monkeypatch):
    from nestvit.generate import train as gan

    from ..generate.test_train import TINY, _weights

    data = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    cfg = gan.GanConfig(**TINY, steps=6, ema_beta=0.9)
    gan.train_gan(cfg, tmp_path / "straight", data=data)
    real, calls = gan._to_unit, []

    def ctrl_c_in_step_3(images, pad_to):  # the signal comes while step 3 runs
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return real(images, pad_to)

    monkeypatch.setattr(gan, "_to_unit", ctrl_c_in_step_3)
    with pytest.raises(Stopped, match=r"at step 3; .* train_gan\(cfg, '.*split', resume=True, data=images\), the "
                                      "same images$"):  # images given from Python: resumed from Python
        gan.train_gan(cfg, tmp_path / "split", data=data)
    monkeypatch.setattr(gan, "_to_unit", real)
    assert load_state(tmp_path / "split")["step"] == 3
    gan.train_gan(cfg, tmp_path / "split", data=data, resume=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ctrl_c_of_the_command_line_with_dataloader_workers(tmp_path, make_recipe):
    """A terminal's Ctrl-C reaches the whole process group, DataLoader workers included: `nestvit train` still
    saves, says how to go on (exit status 130), and `--resume` finishes the run."""
    from ..test_bad_input import image_folder

    root = image_folder(tmp_path / "imgs", {"train": {"a": 8, "b": 8}, "val": {"a": 4, "b": 4}}, size=8)
    recipe = make_recipe(epochs=30, global_batch=4, checkpoint_every=0, threads=1)
    recipe["data"] = {"name": "imagefolder", "root": str(root), "eval_split": "val", "img_size": 8, "workers": 1}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    exe = Path(sys.executable).parent / "nestvit"
    p = subprocess.Popen([str(exe), "train", str(tmp_path / "r.yaml"), "--out", str(run)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").is_file() or '"kind": "epoch"' not in (run / "metrics.jsonl").read_text():
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)  # what a terminal does
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Ctrl-C: stopping after the current step or evaluation" in err
    assert f"continue it with nestvit train --resume {run}" in err
    assert "Traceback" not in err and "worker" not in err.lower()
    step = load_state(run)["step"]
    assert 0 < step < 30 * 4
    assert cli_main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 30 * 4


def _rank_1_gets_sigterm_at_step_2(cfg, run):
    rank = int(os.environ["RANK"])
    try:
        train(cfg, run, callbacks=[SignalAt(2, signal.SIGTERM)] if rank == 1 else [])
    except Stopped as e:
        (run / f"stopped{rank}.txt").write_text(f"{e.step} {e.signal_name}")


def _resume(cfg, run):
    train(cfg, run, resume=True)


def test_ddp_ranks_stop_at_the_same_step_when_one_is_signalled(tmp_path, make_config):
    from nestvit.train.distributed import spawn_local

    cfg = make_config("epochs=1", "micro_batch=8", *RANDOM)
    spawn_local(2, train, cfg, tmp_path / "a")
    spawn_local(2, _rank_1_gets_sigterm_at_step_2, cfg, tmp_path / "b")
    # the request came after step 2's all-reduce: the ranks learn of it in step 3's and both stop after it
    assert (tmp_path / "b/stopped0.txt").read_text() == "3 a stop request of another rank"
    assert (tmp_path / "b/stopped1.txt").read_text() == "3 SIGTERM"
    assert load_state(tmp_path / "b")["step"] == 3
    spawn_local(2, _resume, cfg, tmp_path / "b")
    for name in ("last", "ema"):
        assert_same_weights(weights(tmp_path / f"a/{name}.safetensors"), weights(tmp_path / f"b/{name}.safetensors"))


def test_a_resume_refuses_changes_that_break_the_plan_of_steps(tmp_path, make_config, monkeypatch):
    # before: accepted with a bare note; a shrunk set or another batch left the step count and the schedule off
    # the epochs (the last steps at lr 0), another seed mid-epoch repeated and skipped images, fewer epochs
    # ended the run half an epoch in with stale best weights
    from nestvit.config import ConfigError
    from nestvit.train import loop

    real = loop.Trainer.train_step

    def signal_after_step_6(self, x, t):
        out = real(self, x, t)
        if self.step == 6:  # epoch 2, step 2 of 4
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(loop.Trainer, "train_step", signal_after_step_6)
    run = tmp_path / "run"
    with pytest.raises(Stopped, match="at step 6;"):
        train(make_config(), run)
    monkeypatch.setattr(loop.Trainer, "train_step", real)
    for change, message in ((["global_batch=64"], r"trained 4 steps per epoch \(128 images in batches of 32\); now 2"),
                            (["data.limit_train=96"], "now 3 .*Keep global_batch, data.limit_train and the training"),
                            (["seed=3"], "middle of epoch 2 .*seed 3 \\(not 0\\) would draw another order"),
                            (["epochs=1"], r"middle of epoch 2 \(step 2 of 4\); epochs 1 would end it there")):
        with pytest.raises(ConfigError, match=message):
            train(make_config(*change), run, resume=True)
    result = train(make_config("optim.lr=1e-4", epochs=3), run, resume=True)  # what the plan allows goes on
    assert result.steps == 12
