"""D_aux at image size: the cheap form (first 1x1 conv at feature size) equals the literal one."""

import torch
import torch.nn.functional as F

from pwda_fast.models.discriminator import FeatureDiscriminator


def test_image_size_d_aux_equals_upsample_then_d_aux():
    torch.manual_seed(0)
    d_aux = FeatureDiscriminator(in_channels=96, width=32)
    feat = torch.randn(2, 96, 9, 13)
    size = (65, 97)  # not an integer multiple: the align_corners weights are uneven
    literal = d_aux(F.interpolate(feat, size=size, mode="bilinear", align_corners=True))
    cheap = d_aux(feat, size)
    assert cheap.shape == (2, 1, *size)
    torch.testing.assert_close(cheap, literal, rtol=1e-5, atol=1e-5)
    # and differs from the feature-size form upsampled afterwards (a different function)
    late = F.interpolate(d_aux(feat), size=size, mode="bilinear", align_corners=True)
    assert (late - literal).abs().max() > 1e-3
    # gradients into the features agree too
    x1, x2 = feat.clone().requires_grad_(), feat.clone().requires_grad_()
    d_aux(F.interpolate(x1, size=size, mode="bilinear", align_corners=True)).sum().backward()
    d_aux(x2, size).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-6)
    assert torch.equal(d_aux(feat, feat.shape[2:]), d_aux(feat))  # same size: the plain net
