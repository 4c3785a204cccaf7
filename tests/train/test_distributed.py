"""Two CPU processes (gloo on 127.0.0.1) train what one process with the same global batch trains."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from nestvit.train.distributed import spawn_local
from nestvit.train.loop import train
from nestvit.train.metrics import read_metrics


def test_two_process_ddp_matches_one_process(tmp_path, make_config):
    # global batch 32: one process x 32, or two processes x 16 (the second with 2 x 8 accumulation)
    cfg = make_config("epochs=2", "micro_batch=8", "optim.clip_grad=1.0", "ema.decay=0.9")
    single = train(make_config("epochs=2", "optim.clip_grad=1.0", "ema.decay=0.9"), tmp_path / "one")
    spawn_local(2, train, cfg, tmp_path / "two")
    a, b = load_file(str(tmp_path / "one/last.safetensors")), load_file(str(tmp_path / "two/last.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    ea, eb = load_file(str(tmp_path / "one/ema.safetensors")), load_file(str(tmp_path / "two/ema.safetensors"))
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=1e-4, atol=1e-6, msg=k)
    # rank 0 alone wrote the log; losses are averaged over ranks and evaluation covers every test image once
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for ra, rb in zip(one, two):
        assert abs(ra.get("loss", 0) - rb.get("loss", 0)) < 1e-4
    last = [r for r in two if r["kind"] == "epoch"][-1]
    assert abs(last["test_top1"] - single.test.top1) < 1e-6
    import json

    conf = json.loads((tmp_path / "two/confusion.json").read_text())
    assert conf["count"] == 64


def test_two_process_ddp_with_sam(tmp_path, make_config):
    # each rank moves the weights along its own 8 images' gradient (no all-reduce in that pass), then the
    # batch's all-reduced gradient steps from the restored weights: the run finishes and SAM changed it
    plain = make_config("epochs=1", "micro_batch=8")
    spawn_local(2, train, plain, tmp_path / "plain")
    spawn_local(2, train, make_config("epochs=1", "micro_batch=8", "optim.sam_rho=0.5", "optim.sam_batch=8"),
                tmp_path / "sam")
    a, b = load_file(str(tmp_path / "plain/last.safetensors")), load_file(str(tmp_path / "sam/last.safetensors"))
    assert a.keys() == b.keys() and any(not torch.allclose(a[k], b[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in b.values())
    assert [r["step"] for r in read_metrics(tmp_path / "sam") if r["kind"] == "step"] == [1, 2, 3, 4]
