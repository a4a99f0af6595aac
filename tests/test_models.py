"""Network shapes, parameter counts, frozen BN and initial-weight loading."""

import pytest
import torch

from pwda_fast import config
from pwda_fast.models import (
    DeepLabV2,
    FeatureDiscriminator,
    OutputDiscriminator,
    build_networks,
    load_init_weights,
)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.slow
def test_paper_networks_shapes_at_512x1024_and_parameter_counts():
    g, d, d_aux = build_networks(config.load("toy", {"model.depth": 101, "model.width": 64,
                                                     "model.disc_width": 64,
                                                     "model.aux_disc_width": 1024}).model)
    print(f"\nDeepLab-v2 R101 (19 classes, two heads): {n_params(g):,} parameters; "
          f"D: {n_params(d):,}; D_aux: {n_params(d_aux):,}")
    assert 44_000_000 < n_params(g) < 45_500_000
    assert n_params(d) == 2_781_121  # 19*64*16+64 + 64*128*16+128 + ... + 512*16+1
    g.eval()
    with torch.no_grad():
        aux, main, feat = g(torch.randn(1, 3, 512, 1024))
        assert aux.shape == main.shape == (1, 19, 65, 129)
        assert feat.shape == (1, 2048, 65, 129)
        assert d(torch.softmax(torch.randn(1, 19, 512, 1024), 1)).shape == (1, 1, 16, 32)
        assert d_aux(feat).shape == (1, 1, 65, 129)


def test_aspp_sums_all_four_dilations():
    g = DeepLabV2(num_classes=3, depth=14, width=8)
    head = g.main_head
    x = torch.randn(1, head.conv2d_list[0].in_channels, 9, 9)
    expected = sum(conv(x) for conv in head.conv2d_list)
    torch.testing.assert_close(head(x), expected)
    assert [c.dilation[0] for c in head.conv2d_list] == [6, 12, 18, 24]


def test_frozen_bn_keeps_statistics_and_affine():
    g = DeepLabV2(num_classes=3, depth=14, width=8, bn="frozen").train()
    bn = g.bn1
    before = bn.running_mean.clone()
    g(torch.randn(2, 3, 33, 47))
    assert not bn.training and torch.equal(before, bn.running_mean)
    assert not bn.weight.requires_grad and not bn.bias.requires_grad
    trainable = DeepLabV2(num_classes=3, depth=14, width=8, bn="train").train()
    assert trainable.bn1.training and trainable.bn1.weight.requires_grad


def test_small_discriminators_shapes():
    d = OutputDiscriminator(num_classes=5, width=8)
    assert d(torch.randn(2, 5, 64, 96)).shape == (2, 1, 2, 3)
    d_aux = FeatureDiscriminator(in_channels=32, width=16)
    assert d_aux(torch.randn(2, 32, 5, 7)).shape == (2, 1, 5, 7)


def test_param_groups_give_heads_ten_times_the_rate():
    g = DeepLabV2(num_classes=3, depth=14, width=8, bn="train")
    groups = g.param_groups(0.1, 10.0)
    assert groups[1]["lr"] == pytest.approx(1.0)
    assert sum(len(gr["params"]) for gr in groups) == len(list(g.parameters()))


def _torchvision_layout(g: DeepLabV2) -> dict:
    """A state dict laid out like torchvision's resnet: backbone keys, plus an ImageNet fc."""
    heads = ("aux_head", "main_head")
    state = {k: v.clone() + 1 for k, v in g.state_dict().items() if not k.startswith(heads)}
    state["fc.weight"] = torch.zeros(1000, g.feat_channels)
    state["fc.bias"] = torch.zeros(1000)
    return state


def test_load_torchvision_and_deeplab_scale_layouts(tmp_path):
    g = DeepLabV2(num_classes=19, depth=14, width=8)
    tv = _torchvision_layout(g)
    torch.save(tv, tmp_path / "tv.pth")
    report = load_init_weights(g, tmp_path / "tv.pth")
    torch.testing.assert_close(g.conv1.weight, tv["conv1.weight"])
    assert "fc.weight" in report["skipped"]

    # DeepLab-v2 init: "Scale." prefix and a 21-class VOC classifier named layer5.
    scale = {"Scale." + k: v * 2 for k, v in tv.items() if not k.startswith("fc.")}
    scale["Scale.layer5.conv2d_list.0.weight"] = torch.zeros(21, g.feat_channels, 3, 3)
    torch.save(scale, tmp_path / "deeplab.pth")
    g2 = DeepLabV2(num_classes=19, depth=14, width=8)
    load_init_weights(g2, tmp_path / "deeplab.pth")
    torch.testing.assert_close(g2.layer4[0].conv3.weight, tv["layer4.0.conv3.weight"] * 2)


def test_load_errors_name_the_problem(tmp_path):
    g = DeepLabV2(num_classes=19, depth=14, width=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_init_weights(g, tmp_path / "missing.pth")
    wrong = DeepLabV2(num_classes=19, depth=14, width=16).state_dict()
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="shape mismatches, first: .*conv1.weight"):
        load_init_weights(g, tmp_path / "wrong.pth")
    partial = {k: v for k, v in g.state_dict().items() if not k.startswith("layer4")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="backbone tensors missing, first: .*layer4"):
        load_init_weights(g, tmp_path / "partial.pth")


def test_init_weights_refuses_code_carrying_pickle(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"conv1.weight": Evil()}, tmp_path / "evil.pth")
    g = DeepLabV2(num_classes=19, depth=14, width=8)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        load_init_weights(g, tmp_path / "evil.pth")
    assert not marker.exists()
