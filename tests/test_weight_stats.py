"""Fig. 2 measurements: hand-checked on crafted maps, real networks, and logged by the trainer."""

import copy
import json

import pytest
import torch
from helpers import as_argv, tiny_overrides

from pwda_fast import config, models, reference, train, weight_stats, weighting

GROUPS = {"aligned": (0, 2), "shifted": (1, 9)}  # road, building | sidewalk, terrain
SURE, UNSURE = (10.0, 0.0), (0.0, 0.0)  # two-class logits: p* = 0.99995 and 0.5


def _maps(confident_logits, weight):
    logits = torch.tensor(confident_logits).permute(2, 0, 1)[None]  # (1, 2, H, W)
    return {"logits": logits, "weight": torch.tensor(weight)[None]}


class _AsTraining(torch.nn.Module):
    """A stand-in for G (image -> (aux, main, feat), each the image) and for D_aux at image size
    ((feat, size) -> feat's first channel) that refuses to run other than as training runs it."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # measure() reads the device from a parameter

    def forward(self, x, size=None):
        assert self.training  # measured as the generator stage runs (batch statistics)
        return (x, x, x) if size is None else x[:, :1]


def test_fractions_and_group_means_by_hand(monkeypatch):
    """Image 0 (labels at image size 2x3; 255 = void):

        labels      0    0    2        p* > 0.9   yes  no   yes      w   0.1  0.5  0.2
                    1   255   9                   no   yes  no           0.9  0.3  0.7

    Image 1: every pixel road (labels stored at 4x6, read at 2x3), none confident, w = 1.0.
    Image 0 alone: above_t = 3/6 = 0.5; aligned (road, building): 3 pixels, 2 confident -> 2/3,
    w = (0.1 + 0.5 + 0.2) / 3 = 0.266667; shifted (sidewalk, terrain): 2 pixels, none confident,
    w = (0.9 + 0.7) / 2 = 0.8; the void pixel counts in above_t only.
    Both images: above_t = 3/12 = 0.25; aligned 9 pixels, 2 confident -> 2/9,
    w = (0.8 + 6 * 1.0) / 9 = 0.755556; shifted unchanged. The same in batches of 1 or 2 images.
    """
    maps = [_maps([[SURE, UNSURE, SURE], [UNSURE, SURE, UNSURE]], [[0.1, 0.5, 0.2], [0.9, 0.3, 0.7]]),
            _maps([[UNSURE] * 3] * 2, [[1.0] * 3] * 2)]
    g, d_aux = _AsTraining(), _AsTraining()
    g.eval()
    d_aux.eval()
    calls = []

    def fake_maps(main, aux, size, adapt_cfg):
        calls.append(main.shape)  # each image holds its own index, which g passes on
        per_image = [maps[int(main[n, 0, 0, 0])] for n in range(main.shape[0])]
        return {k: torch.cat([m[k] for m in per_image]) for k in ("logits", "weight")}

    monkeypatch.setattr(weighting, "maps", fake_maps)
    val = [{"image": torch.zeros(3, 2, 3), "label": torch.tensor([[0, 0, 2], [1, 255, 9]])},
           {"image": torch.ones(3, 2, 3), "label": torch.zeros(4, 6, dtype=torch.int64)}]
    adapt = config.AdaptConfig(threshold=0.9)
    one = weight_stats.measure(g, d_aux, val, adapt, GROUPS, images=1)
    assert one == pytest.approx({"above_t": 0.5, "above_t_aligned": 2 / 3, "weight_aligned": 0.8 / 3,
                                 "above_t_shifted": 0.0, "weight_shifted": 0.8})
    both = {"above_t": 0.25, "above_t_aligned": 2 / 9, "weight_aligned": 6.8 / 9, "above_t_shifted": 0.0,
            "weight_shifted": 0.8}
    for batch, shapes in ((1, [(1, 3, 2, 3)] * 2), (2, [(2, 3, 2, 3)]), (4, [(2, 3, 2, 3)])):
        calls.clear()
        got = weight_stats.measure(g, d_aux, val, adapt, GROUPS, images=5, batch=batch)
        assert got == pytest.approx(both)
        assert calls == shapes, batch  # images=5: only 2 exist
    assert not g.training and not d_aux.training  # modes restored
    assert "weight_all" not in weight_stats.measure(g, d_aux, val[1:], adapt, {"all": (13,)})  # no car pixels


def test_weights_are_measured_under_batch_statistics_and_change_nothing():
    """The toy generator trains its BatchNorm (model.bn = train): measured on a batch, the maps are
    the generator stage's (train mode, the batch's statistics, dropout off), not evaluation's; the
    networks' buffers, modes and the random stream are as before."""
    torch.manual_seed(0)
    cfg = config.load("toy", {"model.head_dropout": 0.5})
    g, _, d_aux = models.build_networks(cfg.model)
    g.eval()
    images = torch.randn(3, 3, 48, 96) * 2 + 1
    before = {k: v.clone() for k, v in g.state_dict().items()}
    rng = torch.get_rng_state()
    maps = weighting.target_maps(g, d_aux, images, cfg.adapt)
    assert torch.equal(rng, torch.get_rng_state()) and not g.training
    assert all(torch.equal(v, g.state_dict()[k]) for k, v in before.items())
    twin = copy.deepcopy(g).train()
    for m in twin.modules():
        if isinstance(m, torch.nn.Dropout2d | torch.nn.Dropout):
            m.eval()
    with torch.no_grad():
        _, main, _ = twin(images)
    torch.testing.assert_close(maps["logits"], reference.upsample_to(main, (48, 96)))
    with torch.no_grad():
        _, main_eval, _ = g(images)  # running statistics (eval) give other logits
    assert not torch.allclose(reference.upsample_to(main_eval, (48, 96)), maps["logits"], atol=1e-3)
    assert torch.equal(weighting.target_maps(g, d_aux, images, cfg.adapt)["weight"], maps["weight"])


@pytest.mark.parametrize("weighting", ["gen", "gen+dis"])
def test_real_networks_give_weights_in_their_range(weighting):
    torch.manual_seed(0)
    cfg = config.load("toy", {"adapt.weighting": weighting, "adapt.threshold": 0.5})
    g, _, d_aux = models.build_networks(cfg.model)
    val = [{"image": torch.randn(3, 48, 96), "label": torch.randint(0, 19, (48, 96))} for _ in range(2)]
    rng = torch.get_rng_state()
    out = weight_stats.measure(g, d_aux, val, cfg.adapt, {"all": tuple(range(19))})
    assert torch.equal(rng, torch.get_rng_state())  # draws nothing: training goes on as without it
    assert set(out) == {"above_t", "above_t_all", "weight_all"}
    assert 0.0 <= out["above_t"] <= 1.0 and out["above_t"] == pytest.approx(out["above_t_all"])
    a = cfg.adapt  # w = (d + mu) * sigmoid(a) with d in [floor, 1]: between 0 and 1 + mu
    low = a.floor + a.mu if weighting == "gen" else 0.0
    assert low <= out["weight_all"] <= 1.0 + a.mu


def test_every_evaluation_logs_them(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"train.iters": 2, "train.eval_every": 1, "train.eval_images": 2})
    assert train.main(as_argv(overrides)) == 0
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [ln for ln in lines if ln.get("eval")]
    assert [e["step"] for e in evals] == [1, 2]
    for e in evals:  # the toy pair: one group of all its classes
        assert {"above_t", "above_t_all", "weight_all"} <= set(e) and 0 <= e["above_t"] <= 1


@pytest.mark.parametrize("overrides, expected", [
    ({"adapt.weighting": "gen+dis"}, {"d_aux_end": 0.9}),  # steps 8 and 9 of 9 (the last eighth): 1.0, 0.8
    ({"adapt.weighting": "gen+aux"}, {"d_aux_end": 0.9}),  # D_aux trains, out of w
    ({"adapt.weighting": "gen"}, {}),  # no D_aux
    ({"adapt.weighting": "none", "adapt.adversary": "mrnet"}, {}),  # its "d_aux" is D1's LSGAN loss
    ({"adapt.mode": "source_only"}, {}),
])
def test_d_aux_at_end_averages_the_last_eighth_of_the_rows_with_dismap(tmp_path, overrides, expected):
    (tmp_path / "config.json").write_text(config.load("toy", {"train.iters": 9, **overrides}).to_json())
    lines = [{"step": s, "d_aux": d} for s, d in ((1, 1.4), (7, 1.2), (8, 1.0), (9, 0.8))]
    lines.append({"step": 9, "eval": True, "miou": 20.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert weight_stats.d_aux_at_end(tmp_path) == pytest.approx(expected)
    assert weight_stats.d_aux_at_end(tmp_path / "missing") == {}
