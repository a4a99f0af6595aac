"""The Table 3 ablation: options, paired statistics and outputs on fake results; one tiny real run."""

import importlib.util
import json
import math
import re
import shlex
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_overrides
from PIL import Image

from pwda_fast import ablate, config, curves, ops, pictures, stats, train

# main draws curves.png with matplotlib (the plots extra) and stops before any run without it
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="needs the plots extra (matplotlib)")

ALIGNED, SHIFTED = ["road", "building"], ["sidewalk", "car"]
GROUPS = {"aligned": ALIGNED, "shifted": SHIFTED}


def test_rows_are_the_papers_table_3_settings():
    settings = {}
    for slug, _, flags in ablate.ROWS:
        overrides = dict(config.parse_args(flags)[1])
        settings[slug] = config.load("toy", overrides).adapt
    assert settings["source-only"].mode == "source_only"
    assert (settings["no-weighting"].weighting, settings["no-weighting"].adversary) == ("none", "pwda")
    published = settings["mrnet-published"]
    assert (published.mode, published.weighting, published.adversary) == ("adapt", "none", "mrnet")
    assert (settings["genmap-t1"].weighting, settings["genmap-t1"].threshold) == ("gen", 1.0)
    assert (settings["genmap-t0.9"].weighting, settings["genmap-t0.9"].threshold) == ("gen", 0.9)
    last = settings["genmap-t0.9-dismap"]
    assert (last.mode, last.weighting, last.threshold) == ("adapt", "gen+dis", 0.9)
    aux = settings["genmap-t0.9-aux"]  # D_aux and its loss as in the full method, DisMap out of w
    assert (aux.weighting, aux.threshold) == ("gen+aux", 0.9)
    assert ablate.BASELINE == dict((slug, name) for slug, name, _ in ablate.ROWS)["no-weighting"]
    assert all(s.adversary == "pwda" for slug, s in settings.items() if not slug.startswith("mrnet"))
    models = {slug: config.load("toy", dict(config.parse_args(flags)[1])).model
              for slug, _, flags in ablate.ROWS}
    assert settings["mrnet-whole-crop"].adversary == "mrnet"
    assert (models["mrnet-published"].ms_disc_stride, models["mrnet-whole-crop"].ms_disc_stride) == (1, 8)
    # CLAN_train.py: both rates ramp from 0 over PREHEAT_STEPS = 20, weighting from i_iter > 20.
    flags = dict((r[0], r[2]) for r in ablate.ROWS)["full-preheat"]
    clan = config.load("toy", dict(config.parse_args(flags)[1]))
    assert (clan.adapt.preheat_iters, clan.optim.warmup_iters, clan.optim.warmup_start,
            clan.optim.warmup_d) == (21, 20, 0.0, True)


def test_options_pairs_seeds_and_iters():
    args, extra = ablate.parse_args(["--pair", "both", "--seeds", "4", "--iters", "300", "--optim.lr=0.02"])
    assert args.pairs == ["toy", "toy_partial"] and args.seed_list == [1234, 1235, 1236, 1237]
    assert args.iters == 300 and extra == ["--optim.lr=0.02"]
    args, _ = ablate.parse_args(["--seeds", "7,3,11", "--pair", "toy_partial"])
    assert args.seed_list == [7, 3, 11] and args.pairs == ["toy_partial"]
    assert ablate.parse_args(["--seeds", "5,"])[0].seed_list == [5]  # one explicit seed
    args, _ = ablate.parse_args(["--first-seed", "10", "--seeds", "2"])
    assert args.seed_list == [10, 11] and args.pairs == ["toy"] and args.iters is None


@pytest.mark.parametrize("argv", [["--seeds", "0"], ["--seeds", "a,b"], ["--seeds", "1,1"],
                                  ["--seeds", "three"], ["--pair", "gta5"], ["--iters", "0"]])
def test_bad_options_exit_2_with_the_reason(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        ablate.parse_args(argv)
    assert stop.value.code == 2
    assert "--seeds" in capsys.readouterr().err or argv[0] != "--seeds"


def _fake(miou_by_row: dict[str, list[float]], seeds=(1, 2, 3)) -> dict:
    """Per-seed results whose class IoUs are the mIoU plus a fixed offset per class."""
    offsets = {"road": 20.0, "building": 10.0, "sidewalk": -10.0, "car": -20.0}
    raw = {}
    for row, values in miou_by_row.items():
        raw[row] = {s: {"miou": v, "iou": {c: v + o for c, o in offsets.items()},
                        "fig2": {"above_t": 0.1 * k, "weight_aligned": 0.2}}
                    for k, (s, v) in enumerate(zip(seeds, values))}
    return raw


def test_paired_differences_and_their_intervals_by_hand():
    """Baseline 40, 42, 44; GenMap (T=1) 41, 42, 46: paired differences 1, 0, 2 -> mean 1,
    sd = sqrt(((0)^2 + (-1)^2 + 1^2) / 2) = 1, half width t_{0.975, 2} * 1 / sqrt(3) = 4.3026527 / 1.7320508
    = 2.4841377. The class IoUs move with the mIoU, so every group and class differs by the same."""
    raw = _fake({"source-only": [20.0, 25.0, 30.0], ablate.BASELINE: [40.0, 42.0, 44.0],
                 "GenMap (T=1)": [41.0, 42.0, 46.0]})
    raw["GenMap (T=1)"][3]["iou"]["car"] = 26.0 + 100.0  # one class on one seed: +100 more
    summary = ablate.analyse(raw, GROUPS)
    base, row = summary[ablate.BASELINE], summary["GenMap (T=1)"]
    assert base["mean"] == 42.0 and base["std"] == statistics.stdev([40, 42, 44]) == 2.0
    assert "diff" not in base and base["seeds"] == {1: 40.0, 2: 42.0, 3: 44.0}
    assert row["diff"]["per_seed"] == {1: 1.0, 2: 0.0, 3: 2.0}
    assert (row["diff"]["mean"], row["diff"]["sd"], row["diff"]["n"]) == (1.0, 1.0, 3)
    assert row["diff"]["half_width"] == pytest.approx(2.4841377, abs=1e-6)
    assert row["diff"]["low"] == pytest.approx(1 - 2.4841377, abs=1e-6)
    assert row["groups"]["aligned"]["per_seed"] == {1: 1.0, 2: 0.0, 3: 2.0}
    # shifted on seed 3: (sidewalk +2, car +102) / 2 = 52
    assert row["groups"]["shifted"]["per_seed"] == {1: 1.0, 2: 0.0, 3: 52.0}
    assert row["classes"] == pytest.approx({"road": 1.0, "building": 1.0, "sidewalk": 1.0, "car": 103 / 3})
    assert row["groups"]["shifted"]["mean"] == pytest.approx(53 / 3)
    assert row["fig2"] == pytest.approx({"above_t": 0.1, "weight_aligned": 0.2})  # mean of 0, 0.1, 0.2
    assert summary["source-only"]["diff"]["mean"] == pytest.approx(-17.0)


def test_one_change_at_a_time_pairs_the_rows_that_differ_in_one_part():
    """steps(): GenMap + D_aux's loss 44, 45, 49 against GenMap (T=0.9) 42, 44, 45 -> +2, +1, +4, mean
    7/3; the full method 43, 45, 46 against the row without DisMap -> -1, 0, -3; a step whose other row
    is missing (GenMap T=1, MRNet) is left out; the table names each step with its interval and seeds."""
    raw = _fake({ablate.BASELINE: [40.0, 42.0, 44.0], "GenMap (T=0.9)": [42.0, 44.0, 45.0],
                 "GenMap (T=0.9) + D_aux's loss, no DisMap": [44.0, 45.0, 49.0],
                 "GenMap (T=0.9) + DisMap": [43.0, 45.0, 46.0]})
    changes = ablate.steps(raw, GROUPS)
    step = {(slug, against): label for slug, against, label in ablate.STEPS}
    aux, dismap = step["genmap-t0.9-aux", "genmap-t0.9"], step["genmap-t0.9-dismap", "genmap-t0.9-aux"]
    assert list(changes) == [aux, dismap, step["genmap-t0.9-dismap", "genmap-t0.9"]]
    assert changes[aux]["diff"]["per_seed"] == {1: 2.0, 2: 1.0, 3: 4.0}
    assert changes[dismap]["diff"]["per_seed"] == {1: -1.0, 2: 0.0, 3: -3.0}
    assert changes[step["genmap-t0.9-dismap", "genmap-t0.9"]]["diff"]["per_seed"] == {1: 1.0, 2: 1.0, 3: 1.0}
    table = ablate.steps_table(changes, GROUPS, "change")
    assert table.splitlines()[0] == ("| change | Δ mIoU [95% CI] | sd of Δ | Δ aligned classes [95% CI] | "
                                     "Δ shifted classes [95% CI] | seeds |")
    half = stats.t_interval([2.0, 1.0, 4.0]).half_width
    assert f"| {aux} | +2.33 [{7 / 3 - half:+.2f}, {7 / 3 + half:+.2f}] | 1.53 |" in table


def test_a_class_missing_from_a_run_is_left_out_of_its_differences():
    raw = _fake({ablate.BASELINE: [40.0, 42.0], "GenMap (T=1)": [41.0, 45.0]}, seeds=(1, 2))
    del raw["GenMap (T=1)"][2]["iou"]["car"]  # never predicted nor present: no IoU
    row = ablate.analyse(raw, GROUPS)["GenMap (T=1)"]
    assert row["groups"]["shifted"]["per_seed"] == {1: 1.0, 2: 3.0}  # seed 2: sidewalk alone
    assert row["classes"]["car"] == 1.0  # seed 1 alone


def test_tables_show_intervals_groups_fig2_classes_and_seeds():
    raw = _fake({"source-only": [20.0, 25.0, 30.0], ablate.BASELINE: [40.0, 42.0, 44.0],
                 "GenMap (T=1)": [41.0, 42.0, 46.0]})
    lines = ablate.markdown_tables(ablate.analyse(raw, GROUPS), GROUPS).splitlines()
    assert lines[0] == ("| method | mIoU mean ± sd | Δ mIoU vs no weighting [95% CI] | sd of Δ "
                        "| Δ aligned classes [95% CI] | Δ shifted classes [95% CI] |")
    assert lines[3] == f"| {ablate.BASELINE} | 42.00 ± 2.00 | – | – | – | – |"
    interval = "+1.00 [-1.48, +3.48]"  # differences 1, 0, 2: sd 1
    assert lines[4] == f"| GenMap (T=1) | 43.00 ± 2.65 | {interval} | 1.00 | {interval} | {interval} |"
    assert "| method | p* > T, all pixels | mean w, aligned |" in lines
    assert "| GenMap (T=1) | 0.100 | 0.200 |" in lines
    assert "| car | shifted | -17.00 | +1.00 |" in lines
    assert "| source-only | 20.00 | 25.00 | 30.00 |" in lines
    # One group ("all", the toy pair): no group columns or titles; one seed: means without intervals.
    raw = _fake({ablate.BASELINE: [40.0], "GenMap (T=1)": [39.5]}, seeds=(9,))
    for runs in raw.values():
        runs[9]["fig2"] = {"above_t": 0.5, "weight_all": 0.3}
    raw["GenMap (T=1)"][9]["fig2"]["d_aux_end"] = 1.0
    one = ablate.analyse(raw, {"all": ALIGNED + SHIFTED})
    lines = ablate.markdown_tables(one, {"all": ALIGNED + SHIFTED}).splitlines()
    assert lines[0] == "| method | mIoU mean ± sd | Δ mIoU vs no weighting [95% CI] | sd of Δ |"
    assert lines[3] == "| GenMap (T=1) | 39.50 | -0.50 | – |"
    assert "| method | p* > T | mean w | D_aux loss, last 1/8 of steps |" in lines
    assert f"| {ablate.BASELINE} | 0.500 | 0.300 | – |" in lines
    assert "| GenMap (T=1) | 0.500 | 0.300 | 1.000 |" in lines
    assert "| car | -0.50 |" in lines


def test_doc_section_per_pair_is_replaced_not_repeated(tmp_path):
    doc = tmp_path / "RESULTS.md"
    toy = "<!-- ablation:toy:start -->\n{}\n<!-- ablation:toy:end -->"
    doc.write_text(f"# Results\n\nkept\n{toy.format('old table')}\ntail\n")
    ablate.update_doc(doc, "toy", "new table\n")
    ablate.update_doc(doc, "toy_partial", "partial table")
    ablate.update_doc(doc, "toy_partial", "partial table 2")
    assert doc.read_text() == (f"# Results\n\nkept\n{toy.format('new table')}\ntail\n\n"
                               "<!-- ablation:toy_partial:start -->\npartial table 2\n"
                               "<!-- ablation:toy_partial:end -->\n")


def _fake_run_for_result(tmp_path, asked: list):
    """A stand-in for train.run_for_result: records the overrides in `asked`, writes a metrics.jsonl and
    returns a made-up result (mIoU 30 + seed, 5 more with adapt.weighting=gen, 2 more with
    model.disc_stride=32) and build (an extension digest per seed)."""

    def fake_run(argv, title):
        overrides = config.parse_args(argv)[1]
        asked.append(overrides)
        run_dir = tmp_path / overrides["train.run_dir"]
        run_dir.mkdir(parents=True)
        seed, pair = overrides["train.seed"], overrides["data.source"]
        miou = (30.0 + seed + (5.0 if overrides.get("adapt.weighting") == "gen" else 0.0)
                + (2.0 if overrides.get("model.disc_stride") == 32 else 0.0))
        iou = {"road": miou, "sidewalk": miou, "car": miou}
        records = [{"step": 5, "eval": True, "miou": 1.0, "above_t": 0.9},
                   {"step": 10, "eval": True, "miou": miou},  # before the measurements existed
                   {"step": 10, "seg": 0.5},
                   {"step": 10, "eval": True, "miou": miou, "above_t": 0.25, f"weight_{pair}": 0.5}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        build = {"kernels": {"loss": "cpp", "upsample": "torch"}, "ext": f"ext{seed}", "torch": "2.x",
                 "device": "cpu", "threads": 2, "cpu_capability": "AVX2", "onednn_max_cpu_isa": ""}
        return 0, {"miou": miou, "iou": iou, "protocol": "single", "build": build}

    return fake_run


@needs_matplotlib
def test_main_runs_every_pair_row_and_seed_and_writes_outputs(tmp_path, monkeypatch, capsys):
    """Training replaced by fake results: what main asks train for, and what it writes."""
    asked = []
    monkeypatch.setattr(train, "run_for_result", _fake_run_for_result(tmp_path, asked))
    rendered = []

    def fake_render(runs, out, index):
        rendered.append(runs)
        return out / "ablation.png"

    monkeypatch.setattr(ablate, "render_rows", fake_render)
    monkeypatch.setattr(ablate.checkpoint, "latest", lambda run_dir: run_dir / "ckpt.pt")  # runs at hand
    monkeypatch.chdir(tmp_path)
    argv = ["--pair", "both", "--seeds", "1,2", "--iters", "10", "--out", "abl", "--doc", "R.md",
            "--train.log_every=5"]
    assert ablate.main(argv) == 0
    assert len(asked) == 2 * len(ablate.ROWS) * 2
    for o in asked:
        assert o["data.source"] == o["data.target"] and o["train.iters"] == 10 and o["train.log_every"] == 5
        slug = max((row for row in ablate.ROWS if config.parse_args(row[2])[1].items() <= o.items()),
                   key=lambda row: len(row[2]))[0]  # the most specific row whose flags the run has
        assert o["train.run_dir"] == f"abl/{o['data.source']}/{slug}-s{o['train.seed']}"
    out = capsys.readouterr().out
    for pair in ("toy", "toy_partial"):
        result = json.loads((tmp_path / "abl" / pair / "ablation.json").read_text())
        assert (result["pair"], result["seeds"], result["iters"], result["level"]) == \
            (pair, [1, 2], [10], 0.95)
        assert result["command"] == "python -m pwda_fast.ablate " + " ".join(argv)
        rows = result["rows"]
        assert list(rows) == [name for _, name, _ in ablate.ROWS]
        assert rows["GenMap (T=1)"]["seeds"] == {"1": 36.0, "2": 37.0}
        assert rows["GenMap (T=1)"]["diff"]["per_seed"] == {"1": 5.0, "2": 5.0}
        assert rows["GenMap (T=1)"]["diff"]["half_width"] == 0.0
        # The latest evaluation of the last step (a finished run re-evaluated by the rerun).
        assert rows["source-only"]["fig2"] == {"above_t": 0.25, f"weight_{pair}": 0.5}
        groups = {"toy": ["all"], "toy_partial": ["aligned", "shifted"]}[pair]
        assert list(result["groups"]) == groups and list(rows["GenMap (T=1)"]["groups"]) == groups
        text = (tmp_path / "abl" / pair / "ablation.md").read_text()
        assert f"of the `{pair}` study, 10 iterations, 2 seed(s) (1, 2), the same seeds in every row" in text
        assert "| GenMap (T=1) | 36.50 ± 0.71 | +5.00 [+5.00, +5.00]" in text
        assert text.strip() in out
        assert f"<!-- ablation:{pair}:start -->\n{text.rstrip()}\n<!-- ablation:{pair}:end -->" in \
            (tmp_path / "R.md").read_text()
        chart = Image.open(tmp_path / "abl" / pair / "curves.png")  # two charts, a 2-column legend
        legend_h = (math.ceil(len(ablate.ROWS) / 2) + 1) * curves.LEGEND_LINE_H
        assert chart.size == (curves.ROWS_W, curves.TITLE_H + 2 * curves.ROWS_CHART_H + legend_h)
    # ablation.png: one panel per row, its first seed's run, titled with that run's mIoU.
    for pair, runs in zip(("toy", "toy_partial"), rendered):
        assert [str(d) for d in runs.values()] == [f"abl/{pair}/{slug}-s1" for slug, _, _ in ablate.ROWS]
        assert list(runs)[[name for _, name, _ in ablate.ROWS].index("GenMap (T=1)")] == "GenMap (T=1): 36.0"


@needs_matplotlib
def test_a_study_grows_from_its_records(tmp_path, monkeypatch, capsys):
    """Each finished run is a record at once; a rerun trains only what is not stored, --rows runs the
    named rows only, a record made with another config is rerun, --no-train makes the tables alone."""
    asked = []
    monkeypatch.setattr(train, "run_for_result", _fake_run_for_result(tmp_path, asked))
    monkeypatch.chdir(tmp_path)
    base = ["--pair", "toy_partial", "--iters", "10", "--out", "abl", "--records", "rec"]
    assert ablate.main([*base, "--seeds", "1,", "--rows", "no-weighting,genmap-t1"]) == 0
    assert [o["train.run_dir"] for o in asked] == ["abl/toy_partial/no-weighting-s1",
                                                   "abl/toy_partial/genmap-t1-s1"]
    record = json.loads((tmp_path / "rec" / "toy_partial" / "genmap-t1-s1.json").read_text())
    assert (record["row"], record["seed"], record["miou"], record["iters"]) == ("genmap-t1", 1, 36.0, 10)
    assert record["config"]["adapt"]["weighting"] == "gen" and record["tree"]
    assert record["fig2"] == {"above_t": 0.25, "weight_toy_partial": 0.5}
    assert set(record["curve"]) == {"5", "10"}
    assert record["build"]["ext"] == "ext1"  # what the run reported it ran with (final.json's build)
    result = json.loads((tmp_path / "abl" / "toy_partial" / "ablation.json").read_text())
    assert list(result["rows"]) == [ablate.BASELINE, "GenMap (T=1)"]
    text = (tmp_path / "abl" / "toy_partial" / "ablation.md").read_text()
    assert "Builds: extension ext1, loss kernel cpp, torch 2.x, cpu with 2 threads, AVX2 (2 records)" in text
    assert "more than one build" not in text
    assert "another build" not in capsys.readouterr().out
    asked.clear()  # a second seed: only its runs train; the first seed's come from the records
    assert ablate.main([*base, "--seeds", "1,2", "--rows", "no-weighting,genmap-t1"]) == 0
    assert [o["train.seed"] for o in asked] == [2, 2]
    # Its first run is the first with another build (ext2): said once, when it is stored.
    warnings = [line for line in capsys.readouterr().out.splitlines() if "another build" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: no-weighting-s2 ran with another build")
    assert "extension ext2" in warnings[0] and "theirs: extension ext1" in warnings[0]
    rows = json.loads((tmp_path / "abl" / "toy_partial" / "ablation.json").read_text())["rows"]
    assert rows["GenMap (T=1)"]["diff"]["per_seed"] == {"1": 5.0, "2": 5.0}
    text = (tmp_path / "abl" / "toy_partial" / "ablation.md").read_text()  # seed 2 ran with another build
    assert "(2 records); extension ext2" in text and "more than one build" in text
    asked.clear()
    assert ablate.main([*base, "--seeds", "1,2,3", "--no-train"]) == 0  # the tables from the records
    assert asked == []
    assert json.loads((tmp_path / "abl" / "toy_partial" / "ablation.json").read_text())["rows"] == rows
    # Another config: the stored records are not its runs. The baseline is rerun; GenMap's records
    # are left out of the tables (not mixed with runs of another setting).
    for seed in (1, 2):
        (tmp_path / "abl" / "toy_partial" / f"no-weighting-s{seed}").rename(tmp_path / f"old{seed}")
    assert ablate.main([*base, "--seeds", "1,2", "--rows", "no-weighting", "--adapt.floor=0.02"]) == 0
    assert [o["train.seed"] for o in asked] == [1, 2] and all(o["adapt.floor"] == 0.02 for o in asked)
    result = json.loads((tmp_path / "abl" / "toy_partial" / "ablation.json").read_text())
    assert list(result["rows"]) == [ablate.BASELINE]
    assert ablate.main([*base, "--no-train"]) == 1  # without the override the baseline's records are stale
    with pytest.raises(SystemExit):
        ablate.parse_args(["--rows", "genmap-t2"])


def test_a_run_stopped_before_its_end_stops_the_study_and_stores_no_record(tmp_path, monkeypatch, capsys):
    """SIGTERM or train.stop_at inside a study: the stopped run writes a checkpoint but no final.json, so
    run_for_result gives no result; the study stops there (no traceback, no later row started, no report),
    keeps the records finished before it, and the same command goes on."""
    asked = []
    finish = _fake_run_for_result(tmp_path, asked)

    def the_second_run_stops(argv, title):
        if len(asked) != 1:
            return finish(argv, title)
        asked.append(config.parse_args(argv)[1])
        return 0, None  # what run_for_result gives for a run stopped before its end

    monkeypatch.setattr(train, "run_for_result", the_second_run_stops)
    monkeypatch.chdir(tmp_path)
    argv = ["--pair", "toy_partial", "--iters", "10", "--out", "abl", "--records", "rec", "--seeds", "1,",
            "--rows", "no-weighting,genmap-t1,genmap-t0.9"]
    assert ablate.main(argv) == 0
    assert len(asked) == 2  # the baseline ran, GenMap (T=1) stopped, GenMap (T=0.9) never started
    assert sorted(p.name for p in (tmp_path / "rec" / "toy_partial").iterdir()) == ["no-weighting-s1.json"]
    assert not (tmp_path / "abl" / "toy_partial" / "ablation.md").exists()
    asked.clear()
    monkeypatch.setattr(train, "run_for_result", finish)
    assert ablate.main(argv) == 0  # the rerun: the stored baseline is not run again
    assert [o["train.run_dir"] for o in asked] == ["abl/toy_partial/genmap-t1-s1",
                                                   "abl/toy_partial/genmap-t0.9-s1"]


@needs_matplotlib
def test_a_variant_study_is_compared_row_by_row_with_its_pairs_study(tmp_path, monkeypatch, capsys):
    """--variant s32 --model.disc_stride=32: its own records and tables, and each row minus the same row
    and seed of the pair's study, from the pair's records that differ from the variant's runs in the
    variant's overrides alone (one made with another adapt.floor is named and left out)."""
    asked = []
    monkeypatch.setattr(train, "run_for_result", _fake_run_for_result(tmp_path, asked))
    monkeypatch.chdir(tmp_path)
    base = ["--pair", "toy_partial", "--iters", "10", "--out", "abl", "--records", "rec", "--seeds", "1,2",
            "--rows", "no-weighting,genmap-t1"]
    assert ablate.main(base) == 0
    other = tmp_path / "rec" / "toy_partial" / "genmap-t1-s2.json"
    record = json.loads(other.read_text())
    record["config"]["adapt"]["floor"] = 0.02
    other.write_text(json.dumps(record))
    capsys.readouterr()
    assert ablate.main([*base, "--variant", "s32", "--model.disc_stride=32"]) == 0
    assert [o["train.run_dir"] for o in asked[4:]] == [
        f"abl/toy_partial-s32/{row}-s{seed}" for row in ("no-weighting", "genmap-t1") for seed in (1, 2)]
    assert sorted(p.name for p in (tmp_path / "rec" / "toy_partial-s32").iterdir()) == [
        "genmap-t1-s1.json", "genmap-t1-s2.json", "no-weighting-s1.json", "no-weighting-s2.json"]
    out = capsys.readouterr().out
    assert "rec/toy_partial/genmap-t1-s2.json: differs from the variant's run in adapt.floor too" in out
    result = json.loads((tmp_path / "abl" / "toy_partial-s32" / "ablation.json").read_text())
    against = result["against_pair"]
    assert against[ablate.BASELINE]["diff"]["per_seed"] == {"1": 2.0, "2": 2.0}
    assert against["GenMap (T=1)"]["diff"]["per_seed"] == {"1": 2.0}  # seed 2's pair record left out
    assert result["rows"]["GenMap (T=1)"]["diff"]["mean"] == 5.0  # within the variant: as in the pair
    text = (tmp_path / "abl" / "toy_partial-s32" / "ablation.md").read_text()
    assert "Against the `toy_partial` study" in text and "(--model.disc_stride=32)" in text
    assert f"| {ablate.BASELINE} | +2.00 [+2.00, +2.00] | 0.00 |" in text
    assert "| GenMap (T=1) | +2.00 | – |" in text
    assert "Against" not in (tmp_path / "abl" / "toy_partial" / "ablation.md").read_text()


def test_a_key_added_after_a_record_reads_as_config_from_dict_reads_it(tmp_path):
    """A record made before a key existed stays fresh where the key's value means what the record ran
    (config.from_dict's reading), and is stale where the config now sets it otherwise."""
    cfg = config.load("toy").to_dict()
    old = json.loads(json.dumps(cfg))
    del old["kernels"]["upsample"], old["model"]["ms_disc_width"]
    path = tmp_path / "row-s1.json"
    path.write_text(json.dumps({"config": old}))
    assert ablate.read_record(path, {**cfg, "model": {**cfg["model"], "ms_disc_width": 32}}) is not None
    assert ablate.read_record(path, cfg) is None  # the toy's 8 is not the 32 a record without the key ran


def test_a_study_without_its_baseline_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert ablate.main(["--pair", "toy", "--no-train", "--out", "abl", "--records", "rec"]) == 1
    assert "holds no record of" in capsys.readouterr().err


def test_main_without_matplotlib_stops_before_any_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    monkeypatch.setattr(train, "run_for_result", lambda argv, title: pytest.fail("a run started"))
    assert ablate.main(["--pair", "toy", "--seeds", "1", "--iters", "2", "--out", str(tmp_path)]) == 2
    assert "pip install 'pwda_fast[plots]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_eval_series_keeps_the_latest_line_of_each_step(tmp_path):
    lines = [{"step": 5, "eval": True, "miou": 1.0}, {"step": 5, "seg": 0.1},
             {"step": 10, "eval": True, "miou": 2.0}, {"step": 10, "eval": True, "miou": 3.0, "above_t": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert ablate.eval_series(tmp_path) == {5: lines[0], 10: lines[3]}
    assert ablate.fig2_at_end(ablate.eval_series(tmp_path)) == {"above_t": 0.5}
    assert ablate.eval_series(tmp_path / "missing") == {} and ablate.fig2_at_end({}) == {}


def test_t_interval_in_the_summary_is_the_stats_one():
    raw = _fake({ablate.BASELINE: [40.0, 41.0, 45.0, 39.0], "GenMap (T=1)": [41.5, 40.0, 47.0, 38.0]},
                seeds=(1, 2, 3, 4))
    diff = ablate.analyse(raw, GROUPS)["GenMap (T=1)"]["diff"]
    expected = stats.t_interval([1.5, -1.0, 2.0, -1.0]).to_dict()
    assert {k: diff[k] for k in expected} == expected


@needs_matplotlib
@pytest.mark.slow
def test_tiny_ablation_runs_every_row_and_writes_table_and_pictures(tmp_path, capsys):
    tiny = tiny_overrides(tmp_path, **{"data.batch_size": 1, "train.eval_images": 4})
    extra = [f"--{k}={json.dumps(v)}" for k, v in tiny.items() if k not in ("train.run_dir", "train.iters")]
    out = tmp_path / "ablation"
    argv = ["--pair", "toy_partial", "--seeds", "1", "--iters", "2", "--out", str(out), *extra]
    assert ablate.main(argv) == 0
    pair_dir = out / "toy_partial"
    runs = sorted(p.name for p in pair_dir.iterdir() if p.is_dir())
    assert runs == sorted(f"{slug}-s1234" for slug, _, _ in ablate.ROWS)
    for slug, _, _ in ablate.ROWS:
        saved = json.loads((pair_dir / f"{slug}-s1234" / "config.json").read_text())
        assert saved["train"]["iters"] == 2 and saved["train"]["seed"] == 1234
        assert saved["data"]["source"] == saved["data"]["target"] == "toy_partial"
        assert Image.open(pair_dir / f"{slug}-s1234.png").size == (2 * 192, pictures.TITLE_H + 2 * 96)
    text = (pair_dir / "ablation.md").read_text()
    first = text.split("\n\n| method | mIoU")[1].split("\n\n")[0].splitlines()
    assert [r.split(" | ")[0][2:] for r in first[2:]] == [name for _, name, _ in ablate.ROWS]
    result = json.loads((pair_dir / "ablation.json").read_text())
    for slug, name, _ in ablate.ROWS:
        final = json.loads((pair_dir / f"{slug}-s1234" / "final.json").read_text())
        assert result["rows"][name]["seeds"]["1234"] == final["miou"]
        build = final["build"]  # what ran, beside the config: the loss kernel after any fallback
        assert build["kernels"]["loss"] in ops.LOSS.names and build["threads"] == torch.get_num_threads()
        assert build["ext"] == ops.ext_digest() and build["device"] == "cpu"
        record = json.loads((out / "records" / "toy_partial" / f"{slug}-s1234.json").read_text())
        assert record["build"] == build
        fig2 = result["rows"][name]["fig2"]  # logged by the trainer at its last evaluation
        assert {"above_t", "above_t_aligned", "above_t_shifted", "weight_aligned", "weight_shifted"} \
            <= set(fig2)
        flags = dict((slug, flags) for slug, _, flags in ablate.ROWS)[slug]
        assert ("d_aux_end" in fig2) == any(f in flags for f in ("--adapt.weighting=gen+dis",
                                                                 "--adapt.weighting=gen+aux"))
    assert "Command: `python -m pwda_fast.ablate --pair toy_partial --seeds 1" in text
    assert text.count("Builds: extension") == 1 and "more than one build" not in text
    assert text.strip() in capsys.readouterr().out
    picture = np.asarray(Image.open(pair_dir / "ablation.png"))
    panels = 2 + len(ablate.ROWS)  # image, ground truth, one prediction per row
    assert picture.shape[1] == panels * 2 * 192 + (panels - 1) * pictures.GAP


ROOT = Path(__file__).resolve().parents[1]


def _without_command(block: str) -> str:
    return re.sub(r"^Command: .*$", "", block, flags=re.M)


@needs_matplotlib
@pytest.mark.parametrize("study", sorted(p.name for p in (ROOT / "docs" / "study").iterdir() if p.is_dir()))
def test_the_documented_studies_are_what_their_stored_records_give(study, tmp_path, monkeypatch, capsys):
    """Each study stored in docs/study has its tables in docs/RESULTS.md (and README's summary, where
    its command writes one), and they regenerate from its records with the command printed under
    them: no number in the docs that the records do not give, and no record stale for the config its
    row has today (such a record is left out and the tables change)."""
    results, readme = (ROOT / "docs" / "RESULTS.md").read_text(), (ROOT / "README.md").read_text()
    block = ablate.doc_block(results, study)
    assert block is not None, f"docs/study/{study} is stored but docs/RESULTS.md has no tables of it"
    argv = shlex.split(re.search(r"^Command: `python -m pwda_fast.ablate (.*)` \(", block, re.M).group(1))
    assert "--no-train" in argv and argv[argv.index("--records") + 1] == "docs/study"
    docs = {"--doc": tmp_path / "RESULTS.md", "--summary-doc": tmp_path / "README.md"}
    docs["--doc"].write_text(results)
    docs["--summary-doc"].write_text(readme)
    for flag, value in [("--out", tmp_path / "out"), *docs.items()]:
        if flag in argv:
            argv[argv.index(flag) + 1] = str(value)
    monkeypatch.setattr(train, "run_for_result", lambda argv, title: pytest.fail("a run started"))
    # The prediction panel is not in the docs (and needs the runs' checkpoints): not drawn.
    monkeypatch.setattr(ablate, "render_rows", lambda run_dirs, out, image: out / "ablation.png")
    monkeypatch.chdir(ROOT)  # the records' folder as the report names it
    assert ablate.main(argv) == 0
    assert "not this row's" not in capsys.readouterr().out, "a stored record is stale for its row's config"
    regenerated = ablate.doc_block(docs["--doc"].read_text(), study)
    assert _without_command(regenerated) == _without_command(block), (
        f"docs/RESULTS.md's {study} tables differ from what docs/study/{study} gives: rerun the command "
        "printed under them")
    if "--summary-doc" in argv:
        summary = ablate.doc_block(docs["--summary-doc"].read_text(), study, "study")
        assert summary == ablate.doc_block(readme, study, "study"), (
            f"README's {study} table differs from what docs/study/{study} gives: rerun the command above")
