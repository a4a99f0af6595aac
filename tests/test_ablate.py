"""The Table 3 ablation: every row is a real training run; the table and pictures come from them."""

import json
import statistics

import numpy as np
import pytest
from helpers import tiny_overrides
from PIL import Image

from pwda_fast import ablate, config, pictures


def test_rows_are_the_papers_table_3_settings():
    settings = {}
    for slug, _, flags in ablate.ROWS:
        overrides = dict(config.parse_args(flags)[1])
        settings[slug] = config.load("toy", overrides).adapt
    assert settings["source-only"].mode == "source_only"
    assert settings["no-weighting"].weighting == "none"
    assert (settings["genmap-t1"].weighting, settings["genmap-t1"].threshold) == ("gen", 1.0)
    assert (settings["genmap-t0.9"].weighting, settings["genmap-t0.9"].threshold) == ("gen", 0.9)
    last = settings["genmap-t0.9-dismap"]
    assert (last.mode, last.weighting, last.threshold) == ("adapt", "gen+dis", 0.9)


def test_table_reports_mean_sample_std_and_every_seed():
    summary = ablate.summarise({"A": {1: 40.0, 2: 42.0, 3: 44.0}, "B": {1: 10.0}})
    assert summary["A"]["mean"] == 42.0 and summary["A"]["std"] == statistics.stdev([40, 42, 44]) == 2.0
    assert summary["B"]["std"] is None
    table = ablate.markdown_table(summary).splitlines()
    assert table[0] == "| method | mIoU mean ± std | seed 1 | seed 2 | seed 3 |"
    assert table[2] == "| A | 42.00 ± 2.00 | 40.00 | 42.00 | 44.00 |"
    assert table[3] == "| B | 10.00 | 10.00 | – | – |"


@pytest.mark.slow
def test_tiny_ablation_runs_every_row_and_writes_table_and_pictures(tmp_path, capsys):
    tiny = tiny_overrides(tmp_path, **{"data.batch_size": 1, "train.eval_images": 4})
    extra = [f"--{k}={json.dumps(v)}" for k, v in tiny.items() if k not in ("train.run_dir", "train.iters")]
    out = tmp_path / "ablation"
    assert ablate.main(["--seeds", "1", "--iters", "2", "--out", str(out), *extra]) == 0
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == sorted(f"{slug}-s1234" for slug, _, _ in ablate.ROWS)
    for slug, _, _ in ablate.ROWS:
        saved = json.loads((out / f"{slug}-s1234" / "config.json").read_text())
        assert saved["train"]["iters"] == 2 and saved["train"]["seed"] == 1234
        assert Image.open(out / f"{slug}-s1234.png").size == (2 * 192, pictures.TITLE_H + 2 * 96)
    text = (out / "ablation.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
    assert [r.split(" | ")[0][2:] for r in rows] == [name for _, name, _ in ablate.ROWS]
    result = json.loads((out / "ablation.json").read_text())
    for _, name, _ in ablate.ROWS:
        miou = json.loads((out / f"{_slug(name)}-s1234" / "final.json").read_text())["miou"]
        assert result["rows"][name]["seeds"]["1234"] == miou
    assert "Command: `python -m pwda_fast.ablate --seeds 1" in text
    assert text.strip() in capsys.readouterr().out
    picture = np.asarray(Image.open(out / "ablation.png"))
    panels = 2 + len(ablate.ROWS)  # image, ground truth, one prediction per row
    assert picture.shape[1] == panels * 2 * 192 + (panels - 1) * pictures.GAP


def _slug(name: str) -> str:
    return next(slug for slug, row, _ in ablate.ROWS if row == name)
