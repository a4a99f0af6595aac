"""weighting.maps: the reference's equations composed into maps at image size, with the run's constants."""

import pytest
import torch

from pwda_fast import config, ops, reference, weighting

N, C, SIZE = 2, 19, (29, 37)  # odd image size; the logits come at a lower, also odd, resolution


def _inputs(aux_size):
    torch.manual_seed(0)
    main = 4 * torch.randn(N, C, 13, 17)  # spread out: some pixels above T, some below
    aux = 2 * torch.randn(N, 1, *aux_size)
    return main, aux


@pytest.mark.parametrize("aux_size", [(13, 17), SIZE], ids=["aux_at-feature", "aux_at-image"])
@pytest.mark.parametrize("weighting_name", ["gen+dis", "gen", "none"])
def test_maps_equal_the_reference_on_random_logits(weighting_name, aux_size):
    a = config.AdaptConfig(weighting=weighting_name, threshold=0.6, floor=0.05, mu=0.2)
    main, aux = _inputs(aux_size)
    maps = weighting.maps(main, aux, SIZE, a)
    logits, aux_up = reference.upsample_to(main, SIZE), reference.upsample_to(aux, SIZE)
    assert {k: tuple(v.shape) for k, v in maps.items()} == {"logits": (N, C, *SIZE), "aux": (N, 1, *SIZE),
                                                            "gen": (N, *SIZE), "dis": (N, *SIZE),
                                                            "weight": (N, *SIZE)}
    assert all(v.dtype == torch.float32 for v in maps.values())
    torch.testing.assert_close(maps["logits"], logits, rtol=0, atol=0)
    torch.testing.assert_close(maps["aux"], aux_up, rtol=0, atol=0)
    with_dis, k = weighting_name == "gen+dis", {"threshold": 0.6, "floor": 0.05, "mu": 0.2}
    expected = reference.pixel_weights(logits, aux_up if with_dis else None, **k)
    torch.testing.assert_close(maps["weight"], expected, rtol=0, atol=0)
    # the op training takes the weights from, with D_aux's map at its own resolution
    torch.testing.assert_close(maps["weight"], ops.pixel_weights(logits, aux if with_dis else None, **k),
                               rtol=0, atol=0)
    expected_gen = reference.generation_confidence(logits, threshold=0.6, floor=0.05)
    torch.testing.assert_close(maps["gen"], expected_gen, rtol=0, atol=0)
    torch.testing.assert_close(maps["dis"], torch.sigmoid(aux_up[:, 0]), rtol=0, atol=0)
    assert (maps["gen"] == 0.05).any() and (maps["gen"] > 0.05).any()  # both branches of eq. 3 occur
    product = (maps["gen"] + 0.2) * (maps["dis"] if with_dis else 1.0)  # eq. 6, or eq. 4
    torch.testing.assert_close(maps["weight"], product)


def test_maps_are_float32_constants_whatever_the_inputs():
    a = config.AdaptConfig(weighting="gen+dis")
    main, aux = _inputs((13, 17))
    main, aux = main.bfloat16().requires_grad_(), aux.bfloat16().requires_grad_()
    maps = weighting.maps(main, aux, SIZE, a)
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in maps.values())


def test_constants_and_dismap_follow_the_adapt_config():
    a = config.AdaptConfig(weighting="gen", threshold=0.7, floor=0.02, mu=0.3)
    assert weighting.constants(a) == {"threshold": 0.7, "floor": 0.02, "mu": 0.3}
    assert not weighting.uses_dis(a)
    assert weighting.uses_dis(config.AdaptConfig(weighting="gen+dis"))
