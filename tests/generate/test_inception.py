"""The FID Inception-v3: architecture against published facts, loading the user's file, clear errors."""

from __future__ import annotations

import pytest
import torch

from nestvit.generate.inception import FIDInceptionV3, InceptionFeatures
from nestvit.generate.metrics import FeatureNetError, get_feature_extractor


@pytest.fixture(scope="module")
def net() -> FIDInceptionV3:
    torch.manual_seed(0)
    return FIDInceptionV3().eval()


def test_parameter_count_and_key_layout(net):
    # torchvision's inception_v3 has 27,161,264 parameters; less its auxiliary classifier (3,326,696) and with
    # the TF graph's 1008 classes instead of 1000 (+8 x 2049) that is the FID network's count.
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049
    sd = net.state_dict()
    # pytorch-fid's file uses these names and shapes (conv without bias, BN with running stats)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Mixed_6b.branch7x7dbl_5.conv.weight"].shape == (192, 128, 1, 7)
    assert sd["Mixed_7c.branch3x3dbl_3b.bn.running_var"].shape == (384,)
    assert sd["fc.weight"].shape == (1008, 2048)
    assert not any(k.endswith("conv.bias") for k in sd)


def test_features_shapes_and_pooling(net):
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        f = net.forward_features(x)
        rgb = net.forward_features(x.expand(-1, 3, -1, -1))
    assert f.shape == (2, 2048) and (f >= 0).all()  # post-ReLU global average pool
    torch.testing.assert_close(f, rgb)  # grey images are repeated to RGB
    with pytest.raises(ValueError, match="1 or 3"):
        net.forward_features(torch.rand(1, 2, 32, 32))
    # the TF average pool ignores padding: a constant image stays constant at the borders
    from nestvit.generate.inception import _avg3
    torch.testing.assert_close(_avg3(torch.ones(1, 1, 5, 5)), torch.ones(1, 1, 5, 5))


def test_load_user_file(tmp_path, net):
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    fx = get_feature_extractor(f"inception:{path}")
    assert isinstance(fx, InceptionFeatures) and fx.name.startswith("inception_v3_fid:")
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    f, logits = fx.both(x)
    with torch.no_grad():
        torch.testing.assert_close(f, net.forward_features(x))
        torch.testing.assert_close(logits, net(x))
    assert logits.shape == (3, 1008)


def test_bad_files_are_named(tmp_path, net):
    with pytest.raises(FeatureNetError, match="no such file"):
        get_feature_extractor(f"inception:{tmp_path / 'nope.pth'}")
    with pytest.raises(FeatureNetError, match="need the weights file"):
        get_feature_extractor("inception")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(FeatureNetError, match="junk.pth: cannot read weights .*; expected pt_inception"):
        get_feature_extractor(f"inception:{junk}")
    partial = {k: v for k, v in net.state_dict().items() if not k.startswith("Mixed_7c.")}
    partial["extra.weight"] = torch.zeros(1)
    torch.save(partial, tmp_path / "other.pth")
    with pytest.raises(FeatureNetError, match=r"not the FID Inception-v3.*missing: Mixed_7c.*unexpected: extra"):
        get_feature_extractor(f"inception:{tmp_path / 'other.pth'}")
