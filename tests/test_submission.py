"""The challenge submission: the organisers' template order (`ensemble --template`), `--trial N`, the zip
of the submission folder, and an independent re-check of every rule of their format: no header, the
template's ids in its order, 4 decimals, p0 + p1 = 1 exactly as printed, pred consistent with the threshold,
the two variants agreeing."""
from __future__ import annotations

import json
import random
import re
import zipfile
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.usefixtures("one_thread")
PROB = re.compile(r"^[01]\.\d{4}$")


def check_challenge_files(out: Path, trial: int, template: list[str]) -> dict[str, tuple[str, str, str]]:
    """Every rule of the organisers' format, re-checked from the files alone; returns id -> (p0, p1, pred)."""
    info = json.loads((out / "submission" / "info.json").read_text(encoding="utf-8"))
    threshold = Decimal(repr(float(info["threshold"])))
    files = {}
    for folder in ("with_probabilities", "no_probabilities"):
        raw = (out / "submission" / folder / f"trial-{trial}.txt").read_bytes()
        text = raw.decode("utf-8")
        assert not text.startswith("\ufeff") and text.endswith("\n") and "\r" not in text
        files[folder] = [line.split(",") for line in text.splitlines()]
    with_p, no_p = files["with_probabilities"], files["no_probabilities"]
    assert [r[0] for r in with_p] == template, "exactly the template's ids, in its order (so no header line)"
    assert [r[0] for r in no_p] == template
    got = {}
    for (vid, p0, p1, pred), (vid2, pred2) in zip(with_p, no_p):
        assert PROB.match(p0) and PROB.match(p1), f"{vid}: 4 decimals ({p0}, {p1})"
        assert Decimal(p0) + Decimal(p1) == 1, f"{vid}: {p0} + {p1} != 1 as printed"
        assert pred in ("0", "1") and pred == pred2
        assert int(pred) == int(Decimal(p1) >= threshold), f"{vid}: pred {pred}, p1 {p1}, threshold {threshold}"
        got[vid] = (p0, p1, pred)
    with zipfile.ZipFile(out / "submission.zip") as zf:
        names = sorted(zf.namelist())
        assert f"with_probabilities/trial-{trial}.txt" in names and f"no_probabilities/trial-{trial}.txt" in names
        assert all(re.fullmatch(r"(with|no)_probabilities/trial-[0-4]\.txt", n) for n in names), names
        for folder in ("with_probabilities", "no_probabilities"):
            assert zf.read(f"{folder}/trial-{trial}.txt") == \
                (out / "submission" / folder / f"trial-{trial}.txt").read_bytes()
    return got


def test_cli_template_order_trial_and_zip_follow_every_format_rule(report_run_case, tmp_path):
    from ahcli.app import app
    from extract.store import CacheReader

    case = report_run_case
    ids = CacheReader(case.cache).video_ids("private")
    assert len(ids) >= 2
    template = sorted(ids, reverse=True)           # an order that is neither the cache's nor the split file's
    random.Random(3).shuffle(template)
    if template == sorted(ids):
        template.reverse()
    tpl = tmp_path / "trial-0.txt"
    tpl.write_text("".join(f"{v},0.5000,0.5000,0\n" for v in template), encoding="utf-8")
    out = tmp_path / "ens"
    res = CliRunner().invoke(app, ["ensemble", str(case.run_a), str(case.run_b), "--cache", str(case.cache),
                                   "--out", str(out), "--template", str(tpl), "--trial", "2", "--windows", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    got = check_challenge_files(out, 2, template)
    assert not (out / "submission" / "with_probabilities" / "trial-0.txt").exists()
    info = json.loads((out / "submission" / "info.json").read_text())
    assert info["trial"] == 2 and "template" in info["order_source"] and info["placeholders"] == []
    # the tables for a paper beside predictions.csv: each member and the ensemble, n = 1 (one model each)
    md, tex = (out / "ensemble.md").read_text(), (out / "ensemble.tex").read_text()
    assert md.count("| n = 1 |") == 3 and "| ensemble |" in md and "± 0.000" not in md
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex and "ensemble &" in tex
    preds = {r["video_id"]: r for r in _csv(out / "predictions.csv") if r["split"] == "private"}
    for vid, (_, p1, _) in got.items():
        assert preds[vid]["probability"] == p1 and preds[vid]["prediction"] == got[vid][2]


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class _Reader:
    """What private_order reads of a cache: two private predictions, no recorded split-file order."""

    def __init__(self, path: Path):
        self.path = path

    def video_ids(self, split=None):
        return ["Videos/1/a.mp4", "Videos/1/b.mp4"] if split == "private" else []

    def errors(self):
        return []


def test_template_disagreeing_with_the_predictions_is_refused_naming_the_ids(tmp_path):
    from ahflows.submission import SubmissionError, check_missing, private_order

    reader = _Reader(tmp_path)

    def tpl(name: str, text: str) -> Path:
        (tmp_path / name).write_text(text, encoding="utf-8")
        return tmp_path / name

    order = private_order(reader, None, tpl("ok.txt", "Videos/1/b.mp4,1\nVideos/1/a.mp4,0\n"), trial=3)
    assert order.video_ids == ["Videos/1/b.mp4", "Videos/1/a.mp4"] and order.trial == 3 and not order.missing

    with pytest.raises(SubmissionError, match="Videos/1/b.mp4") as err:     # a prediction the template lacks
        private_order(reader, None, tpl("short.txt", "Videos/1/a.mp4,0\n"))
    assert "\n" not in str(err.value)

    ghost = private_order(reader, None, tpl("ghost.txt", "Videos/1/a.mp4,0\nVideos/9/z.mp4,0\nVideos/1/b.mp4,0\n"))
    assert ghost.missing == ["Videos/9/z.mp4"]
    with pytest.raises(SubmissionError, match="Videos/9/z.mp4.*--allow-missing"):
        check_missing(ghost, allow_missing=False)

    with pytest.raises(SubmissionError, match="header"):
        private_order(reader, None, tpl("head.txt", "video_id,pred\nVideos/1/a.mp4,0\nVideos/1/b.mp4,0\n"))
    with pytest.raises(SubmissionError, match="twice: Videos/1/a.mp4"):
        private_order(reader, None, tpl("dup.txt", "Videos/1/a.mp4,0\nVideos/1/a.mp4,0\nVideos/1/b.mp4,0\n"))
    with pytest.raises(SubmissionError, match="trial-0 .. trial-4"):
        private_order(reader, None, None, trial=5)


def test_placeholder_and_rounding_edges_still_follow_the_format(tmp_path):
    """Probabilities at the rounding edges (0.99995 -> 1.0000, 0.00004 -> 0.0000, exactly the threshold) and a
    placeholder line keep every rule; a second trial adds its files to the same zip."""
    from ahflows.submission import PrivateOrder, write_submission

    ids = ["v/a.mp4", "v/b.mp4", "v/c.mp4", "v/d.mp4", "v/ghost.mp4"]
    probs = {"v/a.mp4": 0.99995, "v/b.mp4": 0.00004, "v/c.mp4": 0.53, "v/d.mp4": 0.12345}
    write_submission(tmp_path, PrivateOrder(ids, "test", missing=["v/ghost.mp4"], trial=0), probs, 0.53)
    got = check_challenge_files(tmp_path, 0, ids)
    assert got["v/a.mp4"] == ("0.0000", "1.0000", "1") and got["v/b.mp4"] == ("1.0000", "0.0000", "0")
    assert got["v/c.mp4"][2] == "1" and got["v/ghost.mp4"][1] == "0.5000"
    write_submission(tmp_path, PrivateOrder(ids, "test", missing=["v/ghost.mp4"], trial=1), probs, 0.6)
    check_challenge_files(tmp_path, 1, ids)
    with zipfile.ZipFile(tmp_path / "submission.zip") as zf:
        assert len(zf.namelist()) == 4
