"""``nestvit.system``: glibc keeps freed blocks instead of faulting them back in every step; the slow-bf16 warning."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from nestvit import cli
from nestvit.system import (
    cpu_has_fast_bf16,
    keep_freed_memory,
    machine_info,
    machine_label,
    resolve_precision,
    slow_bf16,
)

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Five 20 MB blocks taken, touched and freed ten times: glibc's own thresholds (at most 32 MB mmap, 64 MB
# trim) give the 100 MB back to the kernel every round, so every round faults it in again.
ROUNDS = """
import ctypes, resource, sys
from nestvit.system import cpu_has_fast_bf16, keep_freed_memory, slow_bf16
print(keep_freed_memory(), end=" ")
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 20 << 20
def one_round():
    blocks = [libc.malloc(size) for _ in range(5)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in blocks:
        libc.free(b)
one_round()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    one_round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


def _faults(keep: bool) -> tuple[str, int]:
    env = dict(os.environ, NESTVIT_KEEP_FREED_MEMORY="1" if keep else "0")
    out = subprocess.run([sys.executable, "-c", ROUNDS], env=env, capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere keep_freed_memory is a no-op returning False")
def test_keep_freed_memory_stops_page_faults():
    applied, kept = _faults(True)
    assert applied == "True"
    assert kept < 1000  # 10 rounds x 100 MB would be ~256,000 faults of 4 KB pages
    applied, default = _faults(False)
    assert applied == "False"
    assert default > 20 * max(kept, 100)


def test_keep_freed_memory_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("NESTVIT_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False


def test_every_command_applies_it(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["models", "nest_tiny_cifar"]) == 0
    assert calls == [1]
    assert cli.main([]) == 0  # bare `nestvit` prints help and tunes nothing
    assert calls == [1]


def test_slow_bf16_warns_on_a_cpu_without_bf16_kernels_only(monkeypatch):
    assert isinstance(cpu_has_fast_bf16(), bool)
    monkeypatch.setattr("nestvit.system.cpu_has_fast_bf16", lambda: False)
    warning = slow_bf16("cpu", "--set precision=fp32")
    assert warning.startswith("warning: this CPU has no fast bf16 kernels") and warning.endswith("precision=fp32")
    assert slow_bf16("cuda:0", "x") is None
    monkeypatch.setattr("nestvit.system.cpu_has_fast_bf16", lambda: True)
    assert slow_bf16("cpu", "x") is None


def test_precision_auto_is_bf16_only_where_it_is_fast(monkeypatch):
    for given in ("fp32", "bf16", "fp16"):
        assert resolve_precision(given, "cpu") == given  # only auto is resolved
    monkeypatch.setattr("nestvit.system.cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr("nestvit.system.cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("auto", "mps") == "fp32"
    for bf16 in (True, False):  # a GPU decides by its own bf16 support, not the CPU's
        monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda bf16=bf16: bf16)
        assert resolve_precision("auto", "cuda:0") == ("bf16" if bf16 else "fp32")


def test_machine_info_and_label():
    info = machine_info()
    assert info["logical_cpus"] >= 1 and info["torch_threads"] == torch.get_num_threads()
    assert set(info["cpu_flags"]) >= {"avx2", "avx512f", "avx512_bf16"}
    assert machine_label(info).endswith(f", {info['usable_cpus']} CPUs")
    zen5 = {"cpu_model": "AMD EPYC", "cpu_family": "26", "cpu_model_number": "2", "usable_cpus": 2}
    assert machine_label(zen5) == "AMD EPYC (family 26, model 2), 2 CPUs"
    assert machine_label({"cpu_model": "Apple M3", "usable_cpus": 8}) == "Apple M3, 8 CPUs"  # no family on Arm
    assert machine_label({**zen5, "gpu": {"name": "NVIDIA H200"}}) == "NVIDIA H200"
    assert machine_label(None) is None and machine_label({}) is None  # a run from before runs recorded it
