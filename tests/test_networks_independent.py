"""The networks against an independent twin written from their published descriptions.

The twin is plain functions over a state_dict (torch.nn.functional only), written from MRNet's model
(layumi/Seg-Uncertainty model/deeplab_multi.py, the paper's generator), AdaptSegNet's (DeepLab-v2 with
ASPP heads; model/discriminator.py for D) and the paper's D_aux (§5.2); nothing of pwda_fast.models is
used by it. The package network gets random weights (every affine, bias and BatchNorm statistic away
from its default), the twin the same state_dict, and both see the same input: outputs, gradients and
BatchNorm buffers must agree, in training mode (same dropout seed) and in evaluation mode, for every
backbone BN mode and both head norms. A wrong dilation, padding, pooling, SE squeeze, GroupNorm, dropout
kind or BN mode then shows as a difference of values, not only of shapes or parameter counts.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from pwda_fast import config
from pwda_fast.models import build_networks

# One intra-op thread: on 2 shared cores a second thread made these 5-10x slower under load.
pytestmark = pytest.mark.usefixtures("one_thread")

# --- the twin ----------------------------------------------------------------------------------------

# Bottleneck blocks per stage (the ResNet paper's table; 14 and 26 are the toy depths).
BLOCKS = {14: (1, 1, 1, 1), 26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# (stride, dilation) of layer1..layer4: DeepLab's output stride 8 keeps layer3 and layer4 at layer2's
# resolution and widens their 3x3 convs instead (dilation 2, then 4).
STAGES = ((1, 1), (2, 1), (1, 2), (1, 4))
ATROUS = (6, 12, 18, 24)  # both generators' heads: 3x3 convs at these rates, padding = rate
MRNET_GROUPS = 32  # MRNet's NormLayer("gn"): GroupNorm(32, C)
SE_SQUEEZE = 16  # MRNet's SEBlock(r=16)
LEAK = 0.2  # AdaptSegNet's D and the paper's D_aux
BN_MOMENTUM, BN_EPS, GN_EPS = 0.1, 1e-5, 1e-5  # PyTorch's defaults, which both published codes keep


class Params(dict):
    """A state_dict that records which tensors the twin read, so that a tensor the package has and the
    published network lacks (a bias, an extra layer) fails the comparison too."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def unread(self) -> set:
        return set(self) - self.read


def _bn(p, name, x, batch_stats):
    """BatchNorm with batch statistics (updating the running ones, as nn.BatchNorm2d in train mode)
    or with the running statistics."""
    counter = p[name + ".num_batches_tracked"]
    if batch_stats:
        counter.add_(1)
    return F.batch_norm(x, p[name + ".running_mean"], p[name + ".running_var"], p[name + ".weight"],
                        p[name + ".bias"], training=batch_stats, momentum=BN_MOMENTUM, eps=BN_EPS)


def _conv(p, name, x, stride=1, padding=0, dilation=1, bias=False):
    return F.conv2d(x, p[name + ".weight"], p[name + ".bias"] if bias else None, stride, padding, dilation)


def _bottleneck(p, name, x, stride, dilation, stride_on, batch_stats, project):
    """1x1 -> 3x3 (dilated, padding = dilation) -> 1x1 (4x wider), BN after each, ReLU after the first
    two and after the sum with the shortcut. Caffe's ResNet strides in the first 1x1 conv
    (stride_on "1x1"), torchvision's in the 3x3."""
    s1, s3 = {"1x1": (stride, 1), "3x3": (1, stride)}[stride_on]
    y = F.relu(_bn(p, name + ".bn1", _conv(p, name + ".conv1", x, stride=s1), batch_stats))
    y = _conv(p, name + ".conv2", y, stride=s3, padding=dilation, dilation=dilation)
    y = F.relu(_bn(p, name + ".bn2", y, batch_stats))
    y = _bn(p, name + ".bn3", _conv(p, name + ".conv3", y), batch_stats)
    if project:
        x = _bn(p, name + ".downsample.1", _conv(p, name + ".downsample.0", x, stride=stride), batch_stats)
    return F.relu(y + x)


def _backbone(p, x, depth, stride_on, batch_stats):
    """x (N, 3, H, W) -> (layer3, layer4) at output stride 8: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool
    rounding up (Caffe's pooling), then four stages of bottlenecks. The first block of every stage has
    a projection shortcut: layer1 widens, layer2 strides, layer3 and layer4 are dilated (MRNet's
    _make_layer projects whenever the dilation is 2 or 4)."""
    x = F.relu(_bn(p, "bn1", _conv(p, "conv1", x, stride=2, padding=3), batch_stats))
    x = F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True)
    stages = []
    for i, ((stride, dilation), blocks) in enumerate(zip(STAGES, BLOCKS[depth]), start=1):
        for b in range(blocks):
            x = _bottleneck(p, f"layer{i}.{b}", x, stride if b == 0 else 1, dilation, stride_on, batch_stats,
                            project=b == 0)
        stages.append(x)
    return stages[2], stages[3]


def _mrnet_norm(p, name, x, style, training):
    if style == "gn":
        return F.group_norm(x, MRNET_GROUPS, p[name + ".weight"], p[name + ".bias"], GN_EPS)
    return _bn(p, name, x, training)  # head BatchNorms always train (batch statistics in train mode)


def _mrnet_head(p, name, x, style, se, dropout, training):
    """MRNet's Classifier_Module: five parallel branches (1x1, and 3x3 at the four atrous rates), each
    conv with bias -> norm -> ReLU, concatenated; squeeze-excitation (global average, C -> C/16 -> C,
    ReLU then sigmoid, channels rescaled); 3x3 conv with bias -> norm (no ReLU); channel dropout
    (whole feature maps zeroed, Dropout2d); 1x1 classifier without bias."""
    rates = (0, *ATROUS)  # rate 0: the 1x1 branch
    branches = []
    for i, rate in enumerate(rates):
        y = _conv(p, f"{name}.conv2d_list.{i}.0", x, padding=rate, dilation=max(rate, 1), bias=True)
        branches.append(F.relu(_mrnet_norm(p, f"{name}.conv2d_list.{i}.1", y, style, training)))
    y = torch.cat(branches, 1)
    first = 0
    if se:
        squeezed = y.mean((2, 3))  # (N, C)
        hidden = F.relu(F.linear(squeezed, p[f"{name}.bottleneck.0.se.0.weight"],
                                 p[f"{name}.bottleneck.0.se.0.bias"]))
        gate = torch.sigmoid(F.linear(hidden, p[f"{name}.bottleneck.0.se.2.weight"],
                                      p[f"{name}.bottleneck.0.se.2.bias"]))
        assert hidden.shape[1] == y.shape[1] // SE_SQUEEZE
        y = y * gate[:, :, None, None]
        first = 1
    y = _conv(p, f"{name}.bottleneck.{first}", y, padding=1, bias=True)
    y = _mrnet_norm(p, f"{name}.bottleneck.{first + 1}", y, style, training)
    y = F.dropout2d(y, dropout, training)
    return _conv(p, f"{name}.head.1", y)


def _aspp_head(p, name, x):
    """DeepLab-v2's ASPP classifier: the sum of four 3x3 convs with bias at the four atrous rates."""
    return sum(_conv(p, f"{name}.conv2d_list.{i}", x, padding=rate, dilation=rate, bias=True)
               for i, rate in enumerate(ATROUS))


def twin_generator(p, x, m, training):
    """x (N, 3, H, W) -> (aux, main, layer4) for ModelConfig m. MRNet: aux head on layer3, main head on
    concat(layer4, layer3); DeepLab-v2: ASPP on layer3 and on layer4. Backbone BN: "train" and "stats"
    use batch statistics in training mode, "frozen" never does."""
    x3, x4 = _backbone(p, x, m.depth, m.stride_on, training and m.bn != "frozen")
    if m.arch == "mrnet":
        head = dict(style=m.head_norm, se=m.head_se, dropout=m.head_dropout, training=training)
        aux = _mrnet_head(p, "aux_head", x3, **head)
        return aux, _mrnet_head(p, "main_head", torch.cat((x4, x3), 1), **head), x4
    return _aspp_head(p, "aux_head", x3), _aspp_head(p, "main_head", x4), x4


def _kernels(p, convs):
    """(out channels, kernel height, kernel width) of each named conv."""
    return [(w.shape[0], *w.shape[2:]) for w in (p[name + ".weight"] for name in convs)]


def twin_output_discriminator(p, x):
    """AdaptSegNet's FCDiscriminator: four 4x4 stride-2 convs (padding 1) widening 1x, 2x, 4x, 8x with
    LeakyReLU(0.2), then a 4x4 stride-2 conv to one logit."""
    width = p["net.0.weight"].shape[0]
    widths = _kernels(p, [f"net.{2 * i}" for i in range(5)])
    assert widths == [(width * 2**i, 4, 4) for i in range(4)] + [(1, 4, 4)], f"D's convs: {widths}"
    for i in range(4):
        x = F.leaky_relu(_conv(p, f"net.{2 * i}", x, stride=2, padding=1, bias=True), LEAK)
    return _conv(p, "net.8", x, stride=2, padding=1, bias=True)


def twin_feature_discriminator(p, x, size=None):
    """The paper's D_aux: 1x1 convs to width, width/2, width/4 with LeakyReLU(0.2), then a 1x1 conv to
    one logit; with `size`, on the features upsampled to that size (bilinear, corners aligned) first."""
    if size is not None:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    width = p["net.0.weight"].shape[0]
    widths = _kernels(p, [f"net.{2 * i}" for i in range(4)])
    assert widths == [(width, 1, 1), (width // 2, 1, 1), (width // 4, 1, 1), (1, 1, 1)], f"D_aux: {widths}"
    for i in range(3):
        x = F.leaky_relu(_conv(p, f"net.{2 * i}", x, bias=True), LEAK)
    return _conv(p, "net.6", x, bias=True)


# --- helpers ----------------------------------------------------------------------------------------

# Height 200 and width 232 give an even 100x116 stem output, where a max-pool rounding down would
# give 50x58 instead of 51x59, and a 26x30 output map, wide enough for the rate-24 taps to land inside.
IMAGE = (2, 3, 200, 232)
SEED = 20260


def randomized(net, seed, dtype):
    """Give every tensor of `net` a random value of a sensible scale (BN and GN affine and statistics
    too, so that swapping or skipping any of them shows), in `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in net.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = t.clone()
            continue
        shape = t.shape
        if name.endswith("running_var"):
            v = torch.rand(shape, generator=gen) + 0.5
        elif name.endswith("running_mean") or name.endswith("bias"):
            v = 0.2 * torch.randn(shape, generator=gen)
        elif t.dim() == 1:  # a norm's scale
            v = torch.rand(shape, generator=gen) + 0.5
        else:  # conv and linear weights: He scale, so that deep stacks keep unit-size activations
            v = torch.randn(shape, generator=gen) * math.sqrt(2.0 / (t[0].numel()))
        state[name] = v.to(dtype)
    net.to(dtype).load_state_dict(state)
    return net


def twin_params(net, trainable):
    """The net's state_dict as the twin's Params, with fresh leaves; those named in `trainable`
    require grad."""
    return Params({k: v.detach().clone().requires_grad_(k in trainable) for k, v in net.state_dict().items()})


def assert_close(ours, twin, what, rtol=1e-9):
    assert ours.shape == twin.shape, f"{what}: shape {tuple(ours.shape)}, published {tuple(twin.shape)}"
    scale = twin.abs().max().item()
    torch.testing.assert_close(ours, twin, rtol=rtol, atol=rtol * max(scale, 1.0),
                               msg=lambda m: f"{what}: {m}")


def weighted_sum(outputs, gen):
    """A scalar of all outputs with fixed random weights: its gradient checks every output pixel."""
    return sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outputs)


def model_config(**model):
    # stride_on given: "auto" is the package's to resolve, the twin takes the geometry it is told.
    overrides = {"model.depth": 26, "model.width": 8, "model.head_width": 32, "model.stride_on": "1x1",
                 "model.disc_stride": 32}  # the paper's D (AdaptSegNet's), not the toy preset's
    overrides.update({f"model.{k}": v for k, v in model.items()})
    return config.load("toy", overrides).model


def check_generator(m):
    """Training mode (forward with the same dropout seed, BN buffers after it, gradients of the input
    and of every parameter) and evaluation mode, the package against the twin, in float64."""
    g, _, _ = build_networks(m)
    g = randomized(g, SEED, torch.float64)
    x = torch.randn(IMAGE, generator=torch.Generator().manual_seed(SEED + 1), dtype=torch.float64)
    names = ("aux", "main", "layer4")

    g.train()
    trainable = {k for k, v in g.named_parameters() if v.requires_grad}
    # Backbone BN affine (its only 1-D parameters) trains only with bn = "train" (MRNet's --train_bn);
    # every head parameter trains.
    heads = ("aux_head.", "main_head.")
    assert trainable == {k for k, v in g.named_parameters()
                         if m.bn == "train" or k.startswith(heads) or v.dim() > 1}, "trainable parameters"
    p = twin_params(g, trainable)
    x_ours, x_twin = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(SEED)
    ours = g(x_ours)
    torch.manual_seed(SEED)
    twin = twin_generator(p, x_twin, m, training=True)
    assert not p.unread(), f"tensors the published network does not have: {sorted(p.unread())}"
    for name, a, b in zip(names, ours, twin):
        assert_close(a, b, f"{m.arch} bn={m.bn} head_norm={m.head_norm} training {name}")
    for k, buf in g.named_buffers():
        if buf.is_floating_point():
            assert_close(buf, p[k].detach(), f"buffer {k} after a training forward")
        else:
            assert torch.equal(buf, p[k]), f"{k}: {buf.item()} batches counted, published {p[k].item()}"

    weighted_sum(ours, torch.Generator().manual_seed(SEED + 2)).backward()
    leaves = [x_twin] + [p[k] for k in sorted(trainable)]
    grads = torch.autograd.grad(weighted_sum(twin, torch.Generator().manual_seed(SEED + 2)), leaves)
    assert_close(x_ours.grad, grads[0], "gradient of the input", rtol=1e-8)
    params = dict(g.named_parameters())
    for k, grad in zip(sorted(trainable), grads[1:]):
        assert_close(params[k].grad, grad, f"gradient of {k}", rtol=1e-8)
    assert all(v.grad is None for k, v in params.items() if k not in trainable)

    # The same weights again: the statistics the training forward moved are put back.
    g = randomized(g, SEED, torch.float64).eval()
    p = twin_params(g, set())
    with torch.no_grad():
        ours, twin = g(x), twin_generator(p, x, m, training=False)
    for name, a, b in zip(names, ours, twin):
        assert_close(a, b, f"{m.arch} bn={m.bn} head_norm={m.head_norm} eval {name}")


# --- the tests --------------------------------------------------------------------------------------

@pytest.mark.parametrize("head_norm", ["gn", "bn"])
@pytest.mark.parametrize("bn", ["stats", "frozen", "train"])
def test_mrnet_generator_equals_the_published_description(bn, head_norm):
    check_generator(model_config(arch="mrnet", bn=bn, head_norm=head_norm))


def test_mrnet_generator_with_torchvision_stride_and_without_se():
    check_generator(model_config(arch="mrnet", bn="stats", stride_on="3x3", head_se=False, head_dropout=0.3))


@pytest.mark.parametrize("bn", ["stats", "frozen", "train"])
def test_deeplabv2_generator_equals_the_published_description(bn):
    check_generator(model_config(arch="deeplabv2", bn=bn))


def test_training_outputs_depend_on_the_dropout_seed():
    # The training comparison above is only as strong as its dropout: it must draw masks.
    m = model_config(arch="mrnet", bn="stats")
    g = randomized(build_networks(m)[0], SEED, torch.float64).train()
    x = torch.randn(IMAGE, generator=torch.Generator().manual_seed(SEED + 1), dtype=torch.float64)
    mains = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            mains.append(g(x)[1])
    assert (mains[0] - mains[1]).abs().max() > 1e-2 * mains[0].abs().max()


def _discriminators():
    m = model_config(disc_width=8, aux_disc_width=16)
    _, d, d_aux = build_networks(m)
    return randomized(d, SEED, torch.float32), randomized(d_aux, SEED + 1, torch.float32)


def assert_same_gradients(net, p, ours, twin, seed, what):
    """ours, twin: (input, output). The gradients of a fixed random weighting of each output with respect
    to its input and to every parameter of `net` (the twin's leaves in `p`) agree."""
    (x_ours, out_ours), (x_twin, out_twin) = ours, twin
    weighted_sum([out_ours], torch.Generator().manual_seed(seed)).backward()
    grads = torch.autograd.grad(weighted_sum([out_twin], torch.Generator().manual_seed(seed)),
                                [x_twin, *(p[k] for k, _ in net.named_parameters())])
    assert_close(x_ours.grad, grads[0], f"{what} gradient of its input", rtol=1e-5)
    for (k, param), grad in zip(net.named_parameters(), grads[1:]):
        assert_close(param.grad, grad, f"{what} gradient of {k}", rtol=1e-5)


def test_output_discriminator_equals_adaptsegnets():
    d, _ = _discriminators()
    gen = torch.Generator().manual_seed(SEED + 3)
    # 97x131: odd sizes at every stride-2 level, where padding 1 of a 4x4 kernel rounds down.
    probs = torch.softmax(3 * torch.randn(2, 19, 97, 131, generator=gen), 1)
    p = twin_params(d, {k for k, _ in d.named_parameters()})
    x_ours, x_twin = probs.clone().requires_grad_(), probs.clone().requires_grad_()
    ours, twin = d(x_ours), twin_output_discriminator(p, x_twin)
    assert not p.unread()
    assert ours.shape == (2, 1, 3, 4)
    assert_close(ours, twin, "D logits", rtol=1e-5)
    assert_same_gradients(d, p, (x_ours, ours), (x_twin, twin), 1, "D")


@pytest.mark.parametrize("size", [None, (61, 83)], ids=["feature-size", "image-size"])
def test_feature_discriminator_equals_the_papers(size):
    _, d_aux = _discriminators()
    feat = torch.randn(2, d_aux.net[0].in_channels, 9, 13, generator=torch.Generator().manual_seed(SEED + 4))
    p = twin_params(d_aux, {k for k, _ in d_aux.named_parameters()})
    x_ours, x_twin = feat.clone().requires_grad_(), feat.clone().requires_grad_()
    ours, twin = d_aux(x_ours, size), twin_feature_discriminator(p, x_twin, size)
    assert not p.unread()
    assert_close(ours, twin, "D_aux logits", rtol=1e-5)
    assert_same_gradients(d_aux, p, (x_ours, ours), (x_twin, twin), 2, "D_aux")
