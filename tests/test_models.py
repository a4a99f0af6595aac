"""Network shapes, parameter counts, BatchNorm modes, stride layouts and initial-weight loading."""

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pwda_fast import adversaries, config
from pwda_fast.models import (
    DeepLabV2,
    FeatureDiscriminator,
    MRNet,
    MultiScaleDiscriminator,
    Nets,
    OutputDiscriminator,
    build_networks,
    load_init_weights,
    read_init_weights,
    resolve_model,
    weights_layout,
)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.slow
def test_paper_networks_shapes_at_512x1024_and_parameter_counts():
    g, d, d_aux = build_networks(config.load("toy", {"model.arch": "deeplabv2", "model.depth": 101,
                                                     "model.width": 64,
                                                     "model.disc_width": 64, "model.disc_stride": 32,
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


def _field(stride: int) -> int:
    """Receptive field (pixels) of one cell of OutputDiscriminator(stride=stride), from its layers."""
    field, jump = 1, 1
    for conv in OutputDiscriminator(num_classes=3, width=4, stride=stride).net[::2]:
        field += (conv.kernel_size[0] - 1) * jump
        jump *= conv.stride[0]
    return field


def test_disc_stride_cells_per_crop_and_paper_default():
    # The paper's D is the default: 16x32 cells at 512x1024 (the 512x1024 shape and the 2,781,121
    # parameters are pinned above), five 4x4 stride-2 convs, 94-pixel fields.
    paper = OutputDiscriminator(num_classes=19, width=64)
    assert paper.stride == 32 and _field(32) == 94
    assert [(c.kernel_size, c.stride, c.padding) for c in paper.net[::2]] == [((4, 4), (2, 2), (1, 1))] * 5
    assert n_params(paper) == 2_781_121
    assert config.ModelConfig().disc_stride == 32
    # The toy preset: stride 4 gives the paper's 16x32 cells on its 64x128 crops, ~3 cells per field.
    toy = config.load("toy").model
    assert toy.disc_stride == 4
    _, d, _ = build_networks(toy)
    assert d(torch.rand(2, 19, 64, 128)).shape == (2, 1, 16, 32)
    assert _field(4) == 10
    # Every stride: H/stride x W/stride cells, the same state_dict keys, 1x1 convs after the halvings.
    x = torch.rand(1, 3, 64, 128)
    keys = set(OutputDiscriminator(3, 4).state_dict())
    for stride in (1, 2, 4, 8, 16, 32):
        d = OutputDiscriminator(num_classes=3, width=4, stride=stride)
        assert d(x).shape == (1, 1, 64 // stride, 128 // stride)
        assert set(d.state_dict()) == keys
        assert [c.stride[0] for c in d.net[::2]].count(2) == stride.bit_length() - 1
        assert _field(stride) == 1 + 3 * (stride - 1)
    with pytest.raises(ValueError, match="stride must be one of"):
        OutputDiscriminator(stride=12)
    with pytest.raises(config.ConfigError, match="disc_stride"):
        config.load("toy", {"model.disc_stride": 3})


def _ms_field(d, size: int = 384) -> tuple[tuple, int]:
    """(scale 0's map shape, the height in pixels its centre cell sees), from the gradient of that cell."""
    d = d.double()
    for m in d.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.constant_(m.weight, 0.01)
    x = torch.zeros(1, d.nets[0][0][0].in_channels, size, size, dtype=torch.float64, requires_grad=True)
    out = d(x)[0]
    out[0, 0, out.shape[2] // 2, out.shape[3] // 2].backward()
    rows = x.grad[0].abs().sum((0, 2)).nonzero()
    return tuple(out.shape), int(rows.max() - rows.min() + 1)


def test_ms_disc_stride_scales_mrnet_d_as_disc_stride_scales_the_paper_d():
    """MRNet's own D (stride 8: 155-pixel fields, the whole 64x128 toy crop) is the default; the toy
    preset takes stride 1: MRNet's 64x128 scale-0 cells per crop and 21-pixel fields (155 / 8 = 19),
    beside the BCE D's 10. Same state_dict keys at every stride; 1x1 convs after the halvings."""
    assert config.ModelConfig().ms_disc_stride == 8
    assert config.load("toy").model.ms_disc_stride == 1
    keys = set(MultiScaleDiscriminator(3, width=4, res_blocks=1).state_dict())
    for stride, field in ((8, 155), (4, 83), (2, 43), (1, 21)):
        d = MultiScaleDiscriminator(3, width=4, stride=stride)
        assert _ms_field(d) == ((1, 1, 384 // stride, 384 // stride), field), stride
        assert set(MultiScaleDiscriminator(3, width=4, res_blocks=1, stride=stride).state_dict()) == keys
        shapes = [m[0].kernel_size[0] for m in d.nets[0][:5:2]]  # the three convs that halve at stride 8
        assert shapes == [3] * (stride.bit_length() - 1) + [1] * (4 - stride.bit_length()), stride
    toy = config.load("toy", {"adapt.adversary": "mrnet", "adapt.weighting": "none"})
    _, d, _ = build_networks(toy.model, discriminators=adversaries.get("mrnet").discriminators)
    shapes = [m.shape for m in d.d2(torch.rand(2, 19, 64, 128))]
    assert shapes == [(2, 1, 64, 128), (2, 1, 32, 64), (2, 1, 16, 32)]
    with pytest.raises(ValueError, match="stride must be one of"):
        MultiScaleDiscriminator(stride=16)
    with pytest.raises(config.ConfigError, match="ms_disc_stride"):
        config.load("toy", {"model.ms_disc_stride": 16})


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
    # torchvision weights stride on the 3x3 conv: the model must be built that way to take them.
    g = DeepLabV2(num_classes=19, depth=14, width=8, stride_on="3x3")
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
    refused = r"model.init_weights .*evil.pth: UnpicklingError: .* refused; give a file of tensors"
    with pytest.raises(ValueError, match=refused) as e:
        load_init_weights(g, tmp_path / "evil.pth")
    assert not marker.exists() and "weights_only" not in str(e.value)  # never advise unsafe loading
    good = tmp_path / "good.pth"
    torch.save(g.state_dict(), good)
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"init_weights .*cut.pth: \w+Error: .* truncated.* weights file"):
        load_init_weights(g, tmp_path / "cut.pth")


# --- MRNet's generator -------------------------------------------------------------------------

# A toy MRNet: ResNet-14 at width 8, heads 16 wide (GroupNorm then has 16 and 32 groups).
TINY_MRNET = dict(depth=14, width=8, head_width=16)


def n_frozen(m):
    return sum(p.numel() for p in m.parameters() if not p.requires_grad)


def test_mrnet_parameter_count_equals_mrnet_class():
    # 93,536,480: MRNet's own DeeplabMulti(num_classes=19, use_se=True, norm_style='gn') counted
    # with torch (layumi/Seg-Uncertainty model/deeplab_multi.py).
    # Meta tensors: no memory, well under a second per model.
    with torch.device("meta"):
        g = {bn: MRNet(19, depth=101, width=64, bn=bn, head_width=256, head_norm="gn", head_se=True)
             for bn in ("stats", "frozen", "train")}
        no_se = MRNet(19, depth=101, width=64, head_se=False)
        bn_heads = MRNet(19, depth=101, width=64, head_norm="bn")
    assert n_params(g["stats"]) == 93_536_480
    assert n_params(no_se) == 93_124_160  # without SE: minus 2 * (1280*80+80 + 80*1280+1280)
    assert n_params(bn_heads) == 93_536_480  # BN and GN both have 2*C affine parameters
    # The backbone's BN affine parameters (ResNet-101's 104 BatchNorms) are the only frozen ones.
    assert n_frozen(g["stats"]) == n_frozen(g["frozen"]) == 105_344
    assert n_frozen(g["train"]) == 0
    assert g["stats"].feat_channels == 2048


def test_mrnet_output_sizes_at_512x1024():
    with torch.device("meta"):
        g = MRNet(19, depth=101, width=64)
        aux, main, feat = g(torch.empty(1, 3, 512, 1024))
    assert aux.shape == main.shape == (1, 19, 65, 129)
    assert feat.shape == (1, 2048, 65, 129)


def test_mrnet_heads_are_built_and_wired_as_mrnet():
    g = MRNet(5, **TINY_MRNET).eval()
    head = g.main_head
    convs = [branch[0] for branch in head.conv2d_list]
    assert [c.kernel_size[0] for c in convs] == [1, 3, 3, 3, 3]
    assert [c.dilation[0] for c in convs] == [1, 6, 12, 18, 24]
    assert [c.padding[0] for c in convs] == [0, 6, 12, 18, 24]
    assert all(c.bias is not None and c.out_channels == 16 for c in convs)
    se, conv, norm = head.bottleneck
    assert (se.se[0].in_features, se.se[0].out_features) == (80, 5)
    assert conv.out_channels == 32 and isinstance(norm, nn.GroupNorm) and norm.num_groups == 32
    assert isinstance(head.conv2d_list[0][1], nn.GroupNorm) and head.conv2d_list[0][1].num_groups == 16
    # Initialisation as MRNet's code does it: bottleneck bias 0, classifier N(0, 0.001), no bias.
    assert torch.all(conv.bias == 0) and head.head[1].bias is None
    assert head.head[1].weight.std().item() == pytest.approx(0.001, rel=0.2)

    seen = {}
    g.layer3.register_forward_hook(lambda m, i, o: seen.__setitem__("x3", o.clone()))
    g.layer4.register_forward_hook(lambda m, i, o: seen.__setitem__("x4", o.clone()))
    g.main_head.register_forward_hook(lambda m, i, o: seen.__setitem__("main_in", i[0]))
    g.main_head.bottleneck.register_forward_hook(lambda m, i, o: seen.__setitem__("bneck", o))
    with torch.no_grad():
        aux, main, feat = g(torch.randn(2, 3, 41, 57))
        torch.testing.assert_close(seen["main_in"], torch.cat((seen["x4"], seen["x3"]), 1))
        torch.testing.assert_close(aux, g.aux_head(seen["x3"]))
    torch.testing.assert_close(feat, seen["x4"])
    assert aux.shape == main.shape == (2, 5, 6, 8) and feat.shape == (2, 256, 6, 8)
    assert (seen["bneck"] < 0).any()  # no ReLU after the bottleneck's norm


def test_mrnet_param_groups_split_backbone_and_heads():
    g = MRNet(3, bn="stats", **TINY_MRNET)
    backbone, heads = g.param_groups(2e-4, 10.0)
    assert heads["lr"] == pytest.approx(2e-3) and backbone["lr"] == pytest.approx(2e-4)
    head_ids = {id(p) for m in (g.aux_head, g.main_head) for p in m.parameters()}
    assert {id(p) for p in heads["params"]} == head_ids
    trainable = {id(p) for p in g.parameters() if p.requires_grad}
    assert {id(p) for p in backbone["params"]} == trainable - head_ids


@pytest.mark.parametrize("arch", [DeepLabV2, MRNet])
def test_stride_on_puts_the_stride_on_the_named_conv(arch):
    x = torch.randn(1, 3, 45, 61)
    shapes = {}
    for stride_on, (s1, s3) in {"1x1": (2, 1), "3x3": (1, 2)}.items():
        kwargs = dict(head_width=16) if arch is MRNet else {}
        g = arch(3, depth=26, width=8, stride_on=stride_on, **kwargs).eval()
        first = g.layer2[0]
        assert (first.conv1.stride, first.conv2.stride) == ((s1, s1), (s3, s3))
        assert first.downsample[0].stride == (2, 2)
        others = [b for layer in (g.layer1, g.layer2, g.layer3, g.layer4) for b in layer
                  if b is not first]
        assert all(b.conv1.stride == b.conv2.stride == (1, 1) for b in others)
        with torch.no_grad():
            shapes[stride_on] = [tuple(o.shape) for o in g(x)]
    assert shapes["1x1"] == shapes["3x3"]


def test_stride_on_is_checked_when_built():
    with pytest.raises(ValueError, match="stride_on .*'auto'.*resolve_model"):
        DeepLabV2(3, depth=14, width=8, stride_on="auto")
    with pytest.raises(ValueError, match="model.bn .*'eval'"):
        MRNet(3, bn="eval", **TINY_MRNET)
    with pytest.raises(ValueError, match="head_width = 24: GroupNorm"):
        MRNet(3, depth=14, width=8, head_width=24)


# --- weight layouts and stride resolution ---------------------------------------------------------

def _tiny_cfg(init_weights="", **model):
    overrides = {"model.arch": "mrnet", "model.depth": 14, "model.width": 8,
                 "model.head_width": 16, "model.init_weights": str(init_weights)}
    overrides.update({f"model.{k}": v for k, v in model.items()})
    return config.load("toy", overrides).model


def _scale_layout(g) -> dict:
    """A DeepLab-v2 init file: every backbone key under "Scale.", plus a 21-class VOC layer5."""
    heads = ("aux_head", "main_head")
    state = {"Scale." + k: v.clone() + 1 for k, v in g.state_dict().items() if not k.startswith(heads)}
    state["Scale.layer5.conv2d_list.0.weight"] = torch.zeros(21, g.feat_channels, 3, 3)
    return state


def test_scale_layout_resolves_to_1x1_and_loads(tmp_path):
    scale = _scale_layout(MRNet(19, **TINY_MRNET))
    torch.save(scale, tmp_path / "deeplab.pth")
    cfg = _tiny_cfg(tmp_path / "deeplab.pth")
    assert weights_layout(cfg.init_weights) == "caffe"
    init = read_init_weights(cfg.init_weights)  # read once by the caller (engine.finalize in a run)
    assert resolve_model(cfg, init).stride_on == "1x1" and cfg.stride_on == "auto"  # a copy is resolved
    g, _, d_aux = build_networks(cfg, init)
    assert isinstance(g, MRNet) and g.stride_on == "1x1" and g.layer2[0].conv1.stride == (2, 2)
    torch.testing.assert_close(g.layer3[0].conv2.weight, scale["Scale.layer3.0.conv2.weight"])
    torch.testing.assert_close(g.bn1.running_var, scale["Scale.bn1.running_var"])
    assert d_aux(torch.randn(1, g.feat_channels, 3, 4)).shape == (1, 1, 3, 4)


def test_torchvision_layout_resolves_to_3x3_and_loads(tmp_path):
    tv = _torchvision_layout(MRNet(19, **TINY_MRNET))
    torch.save(tv, tmp_path / "resnet.pth")
    cfg = _tiny_cfg(tmp_path / "resnet.pth")
    assert weights_layout(cfg.init_weights) == "torchvision"
    init = read_init_weights(cfg.init_weights)
    assert resolve_model(cfg, init).stride_on == "3x3"
    g, _, _ = build_networks(cfg, init)
    assert g.stride_on == "3x3" and g.layer2[0].conv2.stride == (2, 2)
    torch.testing.assert_close(g.layer4[0].conv3.weight, tv["layer4.0.conv3.weight"])


def test_no_weights_resolve_to_1x1_and_unknown_layouts_are_refused(tmp_path):
    assert weights_layout("") is None
    assert resolve_model(_tiny_cfg()).stride_on == "1x1"
    assert resolve_model(_tiny_cfg(stride_on="3x3")).stride_on == "3x3"
    bare = {k: v for k, v in _torchvision_layout(MRNet(19, **TINY_MRNET)).items()
            if not k.startswith("fc.")}
    torch.save(bare, tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="cannot tell its layout.*model.stride_on.*data.normalize"):
        resolve_model(_tiny_cfg(tmp_path / "bare.pth"), read_init_weights(tmp_path / "bare.pth"))


def test_explicit_stride_on_that_disagrees_with_the_file_is_refused(tmp_path):
    g = MRNet(19, **TINY_MRNET)
    torch.save(_torchvision_layout(g), tmp_path / "resnet.pth")
    torch.save(_scale_layout(g), tmp_path / "deeplab.pth")
    with pytest.raises(ValueError, match=r"resnet.pth is in torchvision's layout .*3x3.*"
                                         r"config sets model.stride_on = \"1x1\"; "
                                         r"set model.stride_on = \"3x3\""):
        build_networks(_tiny_cfg(tmp_path / "resnet.pth", stride_on="1x1"),
                       read_init_weights(tmp_path / "resnet.pth"))
    with pytest.raises(ValueError, match=r"deeplab.pth is in the Caffe / DeepLab-v2 layout .*"
                                         r"model.stride_on = \"3x3\"; set model.stride_on = \"1x1\""):
        build_networks(_tiny_cfg(tmp_path / "deeplab.pth", arch="deeplabv2", stride_on="3x3"),
                       read_init_weights(tmp_path / "deeplab.pth"))


def test_mrnet_checkpoint_heads_layer5_layer6_load_into_our_heads(tmp_path):
    # MRNet saves its generator with the heads named layer5 (aux) and layer6 (main), here under
    # DataParallel's "module." prefix.
    src = MRNet(19, **TINY_MRNET)
    mapped = {"aux_head.": "layer5.", "main_head.": "layer6."}
    state = {}
    for k, v in src.state_dict().items():
        for ours, theirs in mapped.items():
            k = k.replace(ours, theirs) if k.startswith(ours) else k
        state["module." + k] = v + 1 if v.is_floating_point() else v
    torch.save(state, tmp_path / "mrnet_gta5.pth")
    assert weights_layout(tmp_path / "mrnet_gta5.pth") == "caffe"
    g = MRNet(19, **TINY_MRNET)
    report = load_init_weights(g, tmp_path / "mrnet_gta5.pth")
    assert report["skipped"] == []
    for k, v in g.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, src.state_dict()[k] + 1, msg=k)


# --- BatchNorm modes -------------------------------------------------------------------------------

def _bn1_io(g, x):
    """Run g(x); return (input, output) of the backbone's first BN (cloned: ReLU follows in place)."""
    seen = {}
    handle = g.bn1.register_forward_hook(
        lambda m, i, o: seen.update(inp=i[0].detach().clone(), out=o.detach().clone()))
    out = g(x)
    handle.remove()
    return out, seen["inp"], seen["out"]


def _sgd_step(g, out):
    opt = torch.optim.SGD(g.param_groups(0.1, 10.0), lr=0.1)
    sum(o.square().mean() for o in out).backward()
    opt.step()


def test_bn_stats_uses_batch_statistics_with_frozen_affine():
    torch.manual_seed(0)
    g = MRNet(3, bn="stats", **TINY_MRNET).train()
    bn = g.bn1
    with torch.no_grad():  # non-trivial affine values, so a change would show
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    w0, b0, conv0 = bn.weight.clone(), bn.bias.clone(), g.conv1.weight.clone()
    out, inp, bn_out = _bn1_io(g, torch.randn(2, 3, 33, 47))
    assert bn.training
    batch = F.batch_norm(inp, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    running = F.batch_norm(inp, mean0, var0, bn.weight, bn.bias, training=False, eps=bn.eps)
    torch.testing.assert_close(bn_out, batch)
    assert not torch.allclose(bn_out, running, atol=1e-3)
    # Running statistics are tracked with PyTorch's momentum 0.1.
    torch.testing.assert_close(bn.running_mean, 0.9 * mean0 + 0.1 * inp.mean((0, 2, 3)))
    assert all(not m.weight.requires_grad and not m.bias.requires_grad for m in g.backbone_bns())
    assert all(p.requires_grad for p in g.main_head.parameters())
    _sgd_step(g, out)
    assert torch.equal(bn.weight, w0) and torch.equal(bn.bias, b0)
    assert not torch.equal(g.conv1.weight, conv0)
    g.eval()
    assert not bn.training


def test_bn_frozen_keeps_backbone_statistics_but_head_norms_train():
    g = MRNet(3, bn="frozen", head_norm="bn", **TINY_MRNET).train()
    head_bn = g.main_head.conv2d_list[0][1]
    before = {id(m): m.running_mean.clone() for m in g.backbone_bns()}
    head_before = head_bn.running_mean.clone()
    g(torch.randn(2, 3, 33, 47))
    assert all(not m.training and torch.equal(before[id(m)], m.running_mean) for m in g.backbone_bns())
    assert head_bn.training and head_bn.weight.requires_grad
    assert not torch.equal(head_before, head_bn.running_mean)


def test_bn_train_trains_the_affine_parameters():
    torch.manual_seed(0)
    g = MRNet(3, bn="train", **TINY_MRNET).train()
    w0 = g.layer1[0].bn3.weight.clone()
    assert all(m.training and m.weight.requires_grad for m in g.backbone_bns())
    _sgd_step(g, g(torch.randn(2, 3, 33, 47)))
    assert not torch.equal(g.layer1[0].bn3.weight, w0)


@pytest.mark.slow
def test_backbone_listing_is_mrnets_314_entries_for_104_tensors():
    """MRNet's get_1x_lr_params_NOscale on R101 with frozen BN affine: conv1 once, 99 bottleneck convs
    3 times, 4 downsample convs 4 times."""
    g = MRNet(depth=101, width=64, bn="stats")
    listing = g.backbone_listing()
    counts = {}
    for p in listing:
        counts[id(p)] = counts.get(id(p), 0) + 1
    assert len(listing) == 314 and len(counts) == 104
    assert sorted(collections.Counter(counts.values()).items()) == [(1, 1), (3, 99), (4, 4)]


@pytest.mark.parametrize("foreach", [False, True])
def test_repeating_sgd_equals_sgd_over_mrnets_duplicated_list(foreach):
    """optim.backbone_repeats: three steps of RepeatingSGD over the repeat groups give bit for bit what
    torch.optim.SGD(foreach=False) gives over MRNet's duplicated list (Nesterov, weight decay, 10x
    heads), the first step's momentum included; plain SGD over unique tensors does not."""
    import warnings

    from pwda_fast.engine import RepeatingSGD

    torch.manual_seed(0)
    nets = [MRNet(num_classes=3, depth=14, width=8, bn="stats", head_width=32) for _ in range(3)]
    for g in nets[1:]:
        g.load_state_dict(nets[0].state_dict())
    ours, plain, ref = nets
    kw = dict(momentum=0.9, nesterov=True, weight_decay=5e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the duplicates it is given on purpose
        ref_opt = torch.optim.SGD([{"params": ref.backbone_listing(), "lr": 0.01},
                                   {"params": ref.param_groups(0.01, 10.0)[1]["params"], "lr": 0.1}],
                                  foreach=False, **kw)
    opts = [RepeatingSGD(ours.param_groups(0.01, 10.0, repeats=True), foreach=foreach, **kw),
            torch.optim.SGD(plain.param_groups(0.01, 10.0), foreach=foreach, **kw), ref_opt]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for ps in zip(*(g.parameters() for g in nets)):
            grad = torch.randn(ps[0].shape, generator=gen)
            for p in ps:
                p.grad = grad.clone() if p.requires_grad else None
        for opt in opts:
            opt.step()
    assert len(ref.backbone_listing()) > len({id(p) for p in ref.backbone_listing()})  # repeats exist
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(plain.parameters(), ref.parameters()))
    # The optimizer (and so its checkpoint) holds each tensor once.
    held = [p for group in opts[0].param_groups for p in group["params"]]
    assert len(held) == len({id(p) for p in held}) == sum(p.requires_grad for p in ours.parameters())


def test_nets_state_dict_round_trip_and_errors_name_the_network():
    cfg = config.load("toy").model
    a, b = Nets(*build_networks(cfg)), Nets(*build_networks(cfg))
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(x, y) for na, nb in zip(a, b) for x, y in
               zip(na.state_dict().values(), nb.state_dict().values()))
    state = a.state_dict()
    del state["d_aux"]
    b.load_state_dict(state, required=("g",))  # a file without D_aux still loads G and D
    with pytest.raises(KeyError, match="d_aux"):
        b.load_state_dict(state)
    state["d"] = {k: v[:1] for k, v in state["d"].items()}
    with pytest.raises(RuntimeError, match="^d: "):
        b.load_state_dict(state, required=("g",))


def test_training_start_reads_the_init_weights_file_once(tmp_path, monkeypatch):
    """pwda-train resolves the config and builds the engine from one read of model.init_weights (a
    ~170 MB file for the published weights), and the weights still load."""
    from pwda_fast import engine, tensorfile, train

    scale = _scale_layout(MRNet(19, **TINY_MRNET))
    torch.save(scale, tmp_path / "deeplab.pth")
    reads = []
    real = tensorfile.load
    monkeypatch.setattr(tensorfile, "load", lambda path, **kw: reads.append(path) or real(path, **kw))
    built = {}
    real_build = engine.build
    monkeypatch.setattr(engine, "build", lambda *a, **kw: built.setdefault("engine", real_build(*a, **kw)))
    monkeypatch.setattr(train.Trainer, "run", lambda self: self.setup() and 0)
    argv = ["--config", "toy", "--model.arch=mrnet", "--model.depth=14", "--model.width=8",
            "--model.head_width=16", f"--model.init_weights={tmp_path / 'deeplab.pth'}",
            f"--train.run_dir={tmp_path / 'run'}", "--train.iters=1", "--data.workers=0"]
    assert train.main(argv) == 0
    assert [str(p) for p in reads] == [str(tmp_path / "deeplab.pth")]
    g = built["engine"].nets.g
    torch.testing.assert_close(g.layer3[0].conv2.weight, scale["Scale.layer3.0.conv2.weight"])
