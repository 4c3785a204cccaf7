"""Published weights by name (``nestvit.pretrained``), downloaded from a server on the loopback address
that these tests start themselves; never from the internet."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.server
import io
import json
import threading

import pytest
import torch

import nestvit
from nestvit import pretrained as pt
from nestvit.cli import main
from nestvit.contract import ContractError, contract_of
from nestvit.pretrained import PretrainedError, PretrainedFile

SMALL = {"depths": 1, "embed_dims": 16, "num_heads": 1}


class _Server:
    """Serves ``files`` (name -> bytes) with extra ``headers`` (name -> dict); counts the requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                name = self.path.lstrip("/")
                server.requests.append(name)
                if name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                for k, v in server.headers.get(name, {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # the cache, as torch.hub.set_dir does
    s = _Server()
    yield s
    s.close()


def _publish(server, monkeypatch, *, name="w.pth", sha256=True, layout="timm", listing=False, kwargs=SMALL,
             **extra):
    """A small NesT published on the loopback server as a timm-layout state dict; ``(entry, source model)``."""
    torch.manual_seed(0)
    source = nestvit.create_model("nest_tiny_cifar", **kwargs)
    buf = io.BytesIO()
    torch.save(source.state_dict(), buf)
    body = buf.getvalue()
    server.files[name] = body
    digest = hashlib.sha256(body).hexdigest()
    entry = PretrainedFile("nest_tiny_cifar.test_in1k", server.url + name, name, layout, "tests", "apache-2.0", 50.0,
                           "nowhere", sha256=(digest if sha256 is True else sha256), kwargs=dict(kwargs),
                           mean=(0.1, 0.2, 0.3), std=(0.2, 0.2, 0.2), listing=listing, **extra)
    monkeypatch.setattr(pt, "PUBLISHED", (entry, *pt.PUBLISHED))
    return entry, source


def test_the_published_list_covers_the_papers_models():
    tags = {p.tag for p in nestvit.list_pretrained()}
    for tag in ("nest_tiny_224.jx_in1k", "nest_small_224.jx_in1k", "nest_base_224.jx_in1k",
                "nest_tiny_224.official_in1k", "nest_small_224.official_in1k", "nest_base_224.official_in1k",
                "tnt_s_patch16_224.in1k", "deit_tiny_patch16_224.fb_in1k", "deit_small_patch16_224.fb_in1k",
                "deit_base_patch16_224.fb_in1k"):
        assert tag in tags
    for p in nestvit.list_pretrained():
        assert p.model in nestvit.list_models(), p.tag  # every tag names a registered model
        assert p.url.startswith("https://") and p.license and 50 < p.top1 < 90 and p.reported
        assert p.sha256 is None or (len(p.sha256) in (8, 64) and int(p.sha256, 16) >= 0)
        assert p.sha256 is not None or p.listing or "huggingface.co" in p.url  # else: checked by the server's hash
        if p.sha256 and len(p.sha256) == 8:
            assert p.sha256 in p.url  # the prefix the publisher put in the file name
    assert [p.tag for p in nestvit.list_pretrained("deit_*")] == [
        "deit_tiny_patch16_224.fb_in1k", "deit_small_patch16_224.fb_in1k", "deit_base_patch16_224.fb_in1k"]
    official = [p for p in nestvit.list_pretrained("*.official_in1k")]
    assert all(p.kwargs == {"act": "gelu_tanh"} and p.layout == "official" for p in official)


def test_download_check_convert_load_and_cache(server, monkeypatch):
    entry, source = _publish(server, monkeypatch)
    model = nestvit.create_model("nest_tiny_cifar", pretrained=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), source.eval()(x))
    assert model.adapt_notes == [] and server.requests == ["w.pth"]
    cached = entry.cache_path()
    assert cached.parent.name == "checkpoints" and cached.is_file()
    assert (cached.parent / "w.pth.sha256").read_text().strip() == entry.sha256
    again = nestvit.create_model("nest_tiny_cifar.test_in1k", pretrained=True)  # the tag in the name: the cache
    assert server.requests == ["w.pth"] and torch.equal(again.eval()(x), model(x))
    # the contract of the saved model names the tag and the published input transform
    contract = nestvit.contract.contract_of(again)
    assert contract.info == {"pretrained": "nest_tiny_cifar.test_in1k"}
    assert contract.transform.mean == (0.1, 0.2, 0.3) and contract.transform.resize == "center-crop"


def test_pretrained_adapts_to_a_new_head_size_and_channels(server, monkeypatch):
    _publish(server, monkeypatch)
    model = nestvit.create_model("nest_tiny_cifar", pretrained="test_in1k", num_classes=3, img_size=64, in_chans=1)
    notes = "\n".join(model.adapt_notes)
    assert "head: re-initialised for 3 classes" in notes and "resampled" in notes and "input channels" in notes
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 3)
    assert nestvit.input_transform(model).resize == "center-crop"
    wide = nestvit.create_model("nest_tiny_cifar", pretrained="test_in1k", img_size=(32, 64))  # a square crop cannot
    assert nestvit.input_transform(wide).size == (32, 64) and nestvit.input_transform(wide).resize == "stretch"
    backbone = nestvit.create_model("nest_tiny_cifar", pretrained=True, num_classes=0, features_only=True)
    assert [f.shape[1] for f in backbone(torch.randn(1, 3, 32, 32))] == [16] * 4


def test_a_damaged_download_is_refused_and_nothing_is_cached(server, monkeypatch):
    entry, _ = _publish(server, monkeypatch, sha256="0123abcd")
    with pytest.raises(PretrainedError, match="does not match the published 0123abcd"):
        nestvit.create_model("nest_tiny_cifar", pretrained=True)
    assert not entry.cache_path().parent.exists() or not any(entry.cache_path().parent.iterdir())


def test_the_servers_hash_is_checked_when_none_is_published(server, monkeypatch):
    entry, _ = _publish(server, monkeypatch, sha256=None)
    real = hashlib.sha256(server.files["w.pth"]).hexdigest()
    server.headers["w.pth"] = {"X-Linked-Etag": '"' + "0" * 64 + '"'}
    with pytest.raises(PretrainedError, match="the server reported"):
        pt.download(entry, progress=False)
    server.headers["w.pth"] = {"X-Linked-Etag": f'"{real}"'}
    path = pt.download(entry, progress=False)
    assert (path.parent / "w.pth.sha256").read_text().strip() == real


def test_offline_names_the_url_and_where_to_put_the_file(server, monkeypatch, tmp_path):
    entry, source = _publish(server, monkeypatch)
    body = server.files.pop("w.pth")
    server.close()  # nothing listens any more
    with pytest.raises(PretrainedError) as err:
        nestvit.create_model("nest_tiny_cifar", pretrained=True)
    message = str(err.value)
    assert entry.url in message and str(entry.cache_path()) in message and "pretrained=" in message
    # the user fetches it by hand and puts it where the message says: it is checked, then used
    entry.cache_path().parent.mkdir(parents=True, exist_ok=True)
    entry.cache_path().write_bytes(b"not the file")
    with pytest.raises(PretrainedError, match="does not match the published"):
        nestvit.create_model("nest_tiny_cifar", pretrained=True)
    entry.cache_path().write_bytes(body)
    model = nestvit.create_model("nest_tiny_cifar", pretrained=True)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model.eval()(x), source.eval()(x))
    # or passes the file itself
    local = tmp_path / "mine.pth"
    local.write_bytes(body)
    assert torch.equal(nestvit.create_model("nest_tiny_cifar", pretrained=str(local), **SMALL).eval()(x),
                       source(x))


def test_official_checkpoints_are_found_in_the_bucket_listing_and_converted(server, monkeypatch):
    pytest.importorskip("msgpack")
    from tests.test_official import _flax_msgpack, _nest, _to_official

    torch.manual_seed(1)
    source = nestvit.create_model("nest_tiny_cifar", act="gelu_tanh", **SMALL).eval()
    tree = {"step": 1, "optimizer": {"target": _nest(_to_official(source)), "state": {}}}
    body = _flax_msgpack(tree)
    server.files["b/ckpt-39.flax"] = body
    server.files["b/ckpt-20.flax"] = b"an older checkpoint"
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
    listing = {"items": [{"name": f"nest-checkpoints/t/checkpoints-0/ckpt-{n}.flax",
                          "mediaLink": server.url + f"b/ckpt-{n}.flax", "md5Hash": md5 if n == 39 else "x"}
                         for n in (20, 39)]
               + [{"name": "nest-checkpoints/t/checkpoints-0/ckpt-39.index", "mediaLink": server.url + "nothing"}]}
    server.files["listing"] = json.dumps(listing).encode()
    entry = PretrainedFile("nest_tiny_cifar.official_test", server.url + "listing", "t.flax", "official", "tests",
                           "apache-2.0", 50.0, "nowhere", kwargs={"act": "gelu_tanh", **SMALL}, listing=True)
    monkeypatch.setattr(pt, "PUBLISHED", (entry,))
    model = nestvit.create_model("nest_tiny_cifar", pretrained="official_test", num_classes=4)
    assert server.requests == ["listing", "b/ckpt-39.flax"] and model.cfg.act == "gelu_tanh"
    assert model.adapt_notes == ["head: re-initialised for 4 classes (the weights had 10)"]
    x = torch.randn(2, 3, 32, 32)
    same = nestvit.create_model("nest_tiny_cifar", pretrained="official_test").eval()
    assert torch.allclose(same(x), source(x), atol=1e-5)
    server.files["b/ckpt-39.flax"] = body[:-1] + b"\x00"  # damaged in transit: the bucket's MD5 catches it
    entry.cache_path().unlink()
    with pytest.raises(PretrainedError, match="MD5"):
        pt.download(entry, progress=False)
    del server.files["listing"]  # unreachable: the offline fix says the URL is a listing, not the file
    with pytest.raises(PretrainedError, match=r"Fetch the newest ckpt.N file it lists \(a JSON listing of the bucket"):
        pt.download(entry, progress=False)


def test_bad_requests_are_one_clear_error(tmp_path):
    with pytest.raises(PretrainedError, match="no published weights for 'nest_tiny_cifar'"):
        nestvit.create_model("nest_tiny_cifar", pretrained=True)
    with pytest.raises(PretrainedError, match="published: nest_tiny_224.jx_in1k, nest_tiny_224.official_in1k"):
        nestvit.create_model("nest_tiny_224", pretrained="nope")
    with pytest.raises(PretrainedError, match="no such file"):
        nestvit.create_model("nest_tiny_224", pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(nestvit.registry.ModelOptionError, match="not both"):
        nestvit.create_model("nest_tiny_224", pretrained=True, weights="x.safetensors")


def test_cli_lists_and_downloads(server, monkeypatch, capsys):
    assert main(["pretrained", "deit_*"]) == 0
    out = capsys.readouterr().out
    assert "deit_small_patch16_224.fb_in1k" in out and "79.8" in out and "apache-2.0" in out and "nest_" not in out
    assert main(["pretrained", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"tag", "url", "sha256", "license", "top1", "reported", "source"} <= set(rows[0])
    entry, _ = _publish(server, monkeypatch)
    assert main(["pretrained", "nest_tiny_cifar.*", "--download"]) == 0
    assert f"{entry.tag}: {entry.cache_path()} sha256 {entry.sha256}" in capsys.readouterr().out
    assert main(["pretrained", "nothing*"]) == 2


def test_finetune_from_a_tag_takes_the_architecture_and_adapts(server, monkeypatch):
    from nestvit.train.config import ModelSection
    from nestvit.train.runs import build_model

    _publish(server, monkeypatch)
    model, kwargs = build_model(ModelSection(name=None, weights="nest_tiny_cifar.test_in1k"), num_classes=5,
                                in_chans=1, img_size=32)
    assert kwargs["depths"] == 1 and kwargs["in_chans"] == 1
    assert any("5 classes" in n for n in model.adapt_notes) and any("input channels" in n for n in model.adapt_notes)


def test_a_tag_without_pretrained_builds_the_architecture():
    model = nestvit.create_model("deit_tiny_patch16_224.fb_in1k", num_classes=3, img_size=32)
    assert model.registry_spec["model"] == "deit_tiny_patch16_224" and model.num_classes == 3


def test_entries_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        pt.PUBLISHED[0].url = "http://elsewhere"


def test_a_tag_sets_the_normalisation_the_weights_learnt(server, monkeypatch):
    from nestvit.train.config import DataSection, ModelSection
    from nestvit.train.inputs import resolve_data

    _publish(server, monkeypatch)
    model = ModelSection(name=None, weights="nest_tiny_cifar.test_in1k")
    d = resolve_data(DataSection(name="mnist5k"), model)
    assert (d.mean, d.std) == ((0.1, 0.2, 0.3), (0.2, 0.2, 0.2))
    mine = resolve_data(DataSection(name="mnist5k", mean=(0.5,), std=(0.5,)), model)
    assert (mine.mean, mine.std) == ((0.5,), (0.5,))


def test_finetune_from_a_published_tag_on_a_folder(server, monkeypatch, tmp_path, capsys):
    """The journey from published weights: `nestvit train finetune --set model.weights=TAG` on a folder of class
    folders, then eval and predict of the fine-tuned run, whose contract keeps the published normalisation."""
    import numpy as np
    from PIL import Image

    entry, _ = _publish(server, monkeypatch)
    rng = np.random.default_rng(0)
    for c in ("ant", "bee"):
        (tmp_path / "bugs" / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(tmp_path / "bugs" / c / f"{i}.png")
    run = tmp_path / "ft"
    assert main(["train", "finetune", "--set", f"model.weights={entry.tag}", "--set", f"data.root={tmp_path / 'bugs'}",
                 "--set", "data.img_size=32", "--set", "data.workers=0", "--set", "global_batch=8",
                 "--set", "epochs=1", "--set", "progress=false", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"weights: {entry.tag}" in out and "head: re-initialised for 2 classes (the weights had 10)" in out
    loaded = nestvit.load(run)
    assert loaded.contract.model == "nest_tiny_cifar" and loaded.contract.kwargs["embed_dims"] == 16
    assert loaded.transform.mean == (0.1, 0.2, 0.3) and loaded.classes == ["ant", "bee"]
    assert server.requests == ["w.pth"]  # downloaded once
    assert main(["eval", str(run)]) == 0
    assert main(["predict", str(run), str(tmp_path / "bugs" / "bee" / "0.png")]) == 0


def test_imagenet_weights_name_their_classes_and_score_wordnet_folders_by_id(server, monkeypatch, tmp_path, capsys):
    # before: published ImageNet weights predicted "class281"; ImageNet's own folders (n01440764, ...) were
    # scored by position only, so a subset of them (Imagenette's 10) could not be scored at all
    import numpy as np
    from PIL import Image

    ids, names = pt.imagenet_classes()
    assert len(set(ids)) == len(set(names)) == 1000 and list(ids) == sorted(ids)
    assert names[:2] == ("tench", "goldfish") and names[ids.index("n03126707")] == "crane (machine)"
    entry, source = _publish(server, monkeypatch, kwargs={**SMALL, "num_classes": 1000})
    loaded = nestvit.load(entry.tag)
    assert loaded.classes == list(names)
    adapted = nestvit.create_model(entry.tag, pretrained=True, num_classes=3)  # a new head: the data's classes
    assert contract_of(adapted).classes is None
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(image)
    with torch.no_grad():
        top = int(source.eval()(loaded.transform(loaded.transform.read_batch([image]))).argmax())
    assert main(["predict", entry.tag, str(image), "--top-k", "1"]) == 0
    assert f"{names[top]} " in capsys.readouterr().out
    rng = np.random.default_rng(1)
    picked = (0, 1, 517)
    for i in picked:  # ImageNet's layout for a few of its classes, as Imagenette has it
        (tmp_path / "net" / "val" / ids[i]).mkdir(parents=True)
        for j in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "net" / "val" / ids[i]
                                                                                   / f"{j}.png")
    (tmp_path / "net" / "val" / ".ipynb_checkpoints").mkdir()  # hidden: left out, as the reader leaves it out
    Image.new("RGB", (8, 8)).save((tmp_path / "net" / "val" / "junk").mkdir() or tmp_path / "net" / "val" / "junk"
                                  / "0.png")  # neither an id nor a name: skipped with a warning
    assert main(["eval", entry.tag, "--data", str(tmp_path / "net"), "--out", str(tmp_path / "ev")]) == 0
    out, err = capsys.readouterr()
    assert "(6 images)" in out and "records no class names" not in err and "class(es) junk that the model" in err
    assert "  crane (machine)  " in out and "%  of 2 images" in out and "n/a (no images): 997 classes (" in out
    text = (tmp_path / "ev" / "eval.json").read_text()
    assert len(text.splitlines()) < 4000  # the confusion matrix a line a row (before: a line a number, a million)
    counts = json.loads(text)["per_class_count"]
    assert {c: n for c, n in counts.items() if n} == {names[i]: 2 for i in picked}
    assert (tmp_path / "ev" / "confusion.png").is_file()
    # fine-tuned on folders named by WordNet id: their head rows kept
    from nestvit.interop import save_weights
    from nestvit.train.config import ModelSection
    from nestvit.train.runs import build_model

    copy = save_weights(loaded.model, tmp_path / "copy.safetensors", contract=loaded.contract)
    trained = source.state_dict()["head.weight"]
    for weights in (str(copy), entry.tag):  # and the tag itself (before: a fresh head, however many were shared)
        model, _ = build_model(ModelSection(name=None, weights=weights), num_classes=4, in_chans=3, img_size=32,
                               classes=[ids[517], "emu", ids[1], names[2]])  # a name alone may be another thing
        head = model.state_dict()["head.weight"]
        assert torch.equal(head[0], trained[517]) and torch.equal(head[2], trained[1]), weights
        assert not any(torch.equal(head[k], row) for row in trained for k in (1, 3))
        assert f"{ids[517]}, {ids[1]} keep their rows by name; the new emu, {names[2]} start fresh" \
            in " ".join(model.adapt_notes)
    model, _ = build_model(ModelSection(name=None, weights=entry.tag), num_classes=2, in_chans=3, img_size=32,
                           classes=["emu", "gnu"])  # nothing shared: the fresh head, as before
    assert not any(torch.equal(row, t) for row in model.state_dict()["head.weight"] for t in trained)
    for name in (names[2], "not_a_class"):  # folders named by class name: by name
        Image.new("RGB", (8, 8)).save((tmp_path / "named" / name).mkdir(parents=True) or tmp_path / "named" / name
                                      / "0.png")
    assert main(["eval", entry.tag, "--data", str(tmp_path / "named")]) == 0
    out, err = capsys.readouterr()
    assert f"  {names[2]}  " in out and "class(es) not_a_class that the model does not have" in err


def test_the_commands_read_a_published_tag(server, monkeypatch, tmp_path, capsys):
    """predict / explain / export / nestvit.load take a tag as they take a run: downloaded once, with the
    publisher's input transform; the export is written into the current folder, not the download cache."""
    import numpy as np
    from PIL import Image

    entry, _ = _publish(server, monkeypatch)
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(image)
    loaded = nestvit.load(entry.tag)
    assert loaded.contract.model == "nest_tiny_cifar" and loaded.transform.mean == (0.1, 0.2, 0.3)
    assert loaded.classes[:2] == ["class0", "class1"] and loaded.contract.info["pretrained"] == entry.tag
    assert main(["predict", entry.tag, str(image), "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("weights: ") and "class" in out
    assert main(["explain", entry.tag, str(image), "--method", "occlusion", "--out", str(tmp_path / "ex")]) == 0
    assert (tmp_path / "ex" / "x_occlusion.png").is_file()
    monkeypatch.chdir(tmp_path)
    assert main(["export", entry.tag, "--format", "pt2"]) == 0
    assert (tmp_path / f"{entry.tag}.pt2").is_file() and server.requests == ["w.pth"]
    for c in range(10):  # published weights name no classes: a folder's sorted classes are their outputs
        (tmp_path / "ten" / f"c{c}").mkdir(parents=True)
        Image.fromarray(np.full((36, 36, 3), 20 * c, np.uint8)).save(tmp_path / "ten" / f"c{c}" / "0.png")
    assert main(["eval", entry.tag, "--data", str(tmp_path / "ten")]) == 0
    out, err = capsys.readouterr()
    assert "records no class names: the folder's classes, sorted, are its outputs 0..9" in err
    assert f"{entry.tag} (published weights, " in out and " on imagefolder:train (10 images)" in out
    with pytest.raises(ContractError, match="is a published tag: one set of weights"):
        nestvit.load(entry.tag, "last")
