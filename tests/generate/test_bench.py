"""The generator benchmark runs end to end on tiny presets."""

from __future__ import annotations

import pytest

from nestvit.generate.bench import bench_generators, format_table


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_bench_generators_tiny(clock):
    rows = bench_generators(["tiny"], batch_size=2, train_batch_size=2, repeats=1, train_repeats=1, warmup=0,
                            clock=clock, log=None)
    assert [r["kind"] for r in rows] == ["nest", "transgan", "conv"]
    for r in rows:
        assert r["params"] > 0 and r["gflops_per_image"] > 0 and r["clock"] == clock
        assert r["images_per_s"] > 0 and r["train_steps_per_s"] > 0
    assert rows[0]["ratio_infer_vs_nest"] == pytest.approx(1.0)
    assert rows[0]["params"] == rows[1]["params"]  # NesT and TransGAN-like share every weight shape
    table = format_table(rows)
    assert "nest_tiny" in table and "transgan_tiny" in table and table.count("\n") == 4


def test_bench_bad_clock():
    with pytest.raises(ValueError, match="clock"):
        bench_generators(["tiny"], clock="gpu", log=None)


def test_interleaved_round_robin_drops_warmup():
    from nestvit.generate.bench import _interleaved

    order, lines = [], []
    calls = {k: (lambda k=k: order.append(k)) for k in ("a", "b")}
    times = _interleaved(calls, rounds=2, warmup=1, clock="wall", log=lines.append, where="8x8", what="step")
    assert order == ["a", "b"] * 3  # one call each per round, warmup round included
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}  # the warmup round is not kept
    assert all(t >= 0 for v in times.values() for t in v)
    assert len(lines) == 6 and lines[0].startswith("8x8 a") and " step 1/3: " in lines[0]
