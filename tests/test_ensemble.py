"""`ahcli ensemble`: probability averaging, the threshold re-tuned on val, fingerprint refusal, and
challenge submission files that validate (line count, order, p0 + p1 == 1 as printed, pred vs threshold)."""
from __future__ import annotations

import csv
import json
import random
import shutil
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from heads_fixtures import tiny_model, tiny_train, write_cache

SIZES = {"train": 32, "val": 16, "test": 16, "private": 5}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A real cache and two finished run folders on it (checkpoints 'A' eps 0 and 'B' eps 0.1)."""
    from extract.store import CacheReader
    from heads.run_files import cache_record
    from heads.data import load_split
    from heads.train import train_heads

    root = tmp_path_factory.mktemp("ensemble")
    cache = write_cache(root / "cache", SIZES)
    reader = CacheReader(cache)
    train, val = load_split(reader, "train", device="cpu"), load_split(reader, "val", device="cpu")
    runs = []
    for name, eps, seed in (("A", 0.0, 0), ("B", 0.1, 1)):
        train_heads(train, val, tiny_model(train), tiny_train(epochs=3, label_smoothing=eps, seed=seed),
                    root / name, cache=cache_record(reader))
        runs.append(root / name)
    return {"root": root, "cache": cache, "runs": runs, "reader": reader}


def _lines(path: Path) -> list[list[str]]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and not text.startswith("video_id"), "no header, newline-terminated"
    return [line.split(",") for line in text.splitlines()]


def _check_submission(out: Path, order: list[str], threshold: float) -> dict[str, str]:
    """Validate both challenge files; return video_id -> printed p1."""
    from ahflows.submission import NO_PROBS, WITH_PROBS

    with_p, no_p = _lines(out / WITH_PROBS), _lines(out / NO_PROBS)
    assert len(with_p) == len(no_p) == len(order)
    assert [r[0] for r in with_p] == order and [r[0] for r in no_p] == order
    p1s = {}
    for (vid, p0, p1, pred), (_, pred2) in zip(with_p, no_p):
        assert len(p0.split(".")[1]) == 4 and len(p1.split(".")[1]) == 4, "4 decimals"
        assert Decimal(p0) + Decimal(p1) == Decimal(1), f"{vid}: {p0} + {p1} != 1"
        assert pred == pred2 and pred in ("0", "1")
        assert int(pred) == int(Decimal(p1) >= Decimal(str(threshold))), f"{vid}: pred {pred} vs p1 {p1}"
        p1s[vid] = p1
    return p1s


def _independent_ensemble(case, split: str, windows: int = 5) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The mean of each run's own predict_split, computed here without ahflows.ensemble."""
    from heads.runs import load_run
    from heads.data import load_split
    from heads.infer import predict_split

    data = load_split(case["reader"], split, device="cpu")
    probs = []
    for r in case["runs"]:
        ids, p, y = predict_split(load_run(r), data, windows=windows)
        probs.append(p)
    return ids, np.mean(probs, axis=0), y


def test_format_pair_prints_probabilities_summing_to_one():
    from ahflows.submission import format_pair

    rng = random.Random(0)
    values = [0.0, 1.0, 0.5, 0.99995, 0.00005, 0.12345, 0.98765, 1 / 3, 2 / 3] + [rng.random() for _ in range(2000)]
    for p in values:
        s0, s1 = format_pair(p)
        assert Decimal(s0) + Decimal(s1) == Decimal(1), (p, s0, s1)
        assert len(s0) == len(s1) == 6 and abs(float(s1) - p) <= 5e-5 + 1e-12


def test_ensemble_files_average_and_val_tuned_threshold(case, tmp_path):
    from ahflows.ensemble import run_ensemble
    from heads.metrics import bah_metrics, sweep_threshold

    out = tmp_path / "ens"
    rec = run_ensemble(case["runs"], case["cache"], out, windows=2)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(rec))
    assert set(on_disk) == {"threshold", "val", "test", "runs", "cache_fingerprint", "videos", "intervals"}
    for split in ("val", "test"):              # participant-bootstrap intervals around the reported numbers
        iv = on_disk["intervals"][split]
        assert iv["unit"] == "participant" and iv["resamples"] == 1000
        for k in ("macro_f1", "f1_ah", "f1_noah", "ap"):
            assert iv[k]["low"] <= iv[k]["value"] <= iv[k]["high"]
        assert iv["macro_f1"]["value"] == pytest.approx(on_disk[split]["macro_f1"])
    assert on_disk["videos"]["test"] == {"scored": SIZES["test"], "listed": SIZES["test"], "missing": []}
    assert set(on_disk["test"]) >= {"macro_f1", "f1_ah", "f1_noah", "ap", "accuracy"}
    assert on_disk["cache_fingerprint"] == case["reader"].fingerprint
    assert [Path(r["path"]).name for r in on_disk["runs"]] == ["A", "B"]

    # the ensemble probability is the mean of the runs' probabilities; the threshold is swept on val over it
    ids, p, y = _independent_ensemble(case, "val", windows=2)
    p = np.round(p, 4)
    t, f1 = sweep_threshold(p, y)
    assert rec["threshold"] == t and rec["val"]["macro_f1"] == pytest.approx(f1)
    _, pt, yt = _independent_ensemble(case, "test", windows=2)
    assert rec["test"]["macro_f1"] == pytest.approx(bah_metrics(yt, probs=np.round(pt, 4), threshold=t)["macro_f1"])

    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == sum(SIZES.values())
    assert {r["split"] for r in rows} == set(SIZES)
    by_id = {r["video_id"]: r for r in rows}
    for vid, prob in zip(ids, p):
        assert by_id[vid]["probability"] == f"{prob:.4f}"
        assert by_id[vid]["prediction"] == str(int(prob >= t))
    assert all(r["label"] == "" for r in rows if r["split"] == "private")
    assert all(r["label"] in ("0", "1") for r in rows if r["split"] != "private")

    # without a BAH root the submission follows the cache's (video_id) order
    private_ids = case["reader"].video_ids("private")
    p1 = _check_submission(out, private_ids, t)
    for vid in private_ids:
        assert p1[vid] == by_id[vid]["probability"]
    info = json.loads((out / "submission" / "info.json").read_text())
    assert info["lines"] == SIZES["private"] and info["order_source"].startswith("cache")


def _private_tree(tmp_path: Path, ids: list[str], with_labels: bool = True) -> Path:
    """A BAH root whose ../test-set-30-participants-unlabeled/data/split/test.txt lists `ids`."""
    data = tmp_path / "bah" / "data"
    (data / "split").mkdir(parents=True)
    split = tmp_path / "bah" / "test-set-30-participants-unlabeled" / "data" / "split"
    split.mkdir(parents=True)
    lines = [f"{v},0,some words, with commas" if with_labels and i % 2 else f"{v},some words" for i, v in enumerate(ids)]
    (split / "test.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data


def test_submission_follows_the_private_split_file_order(case, tmp_path):
    from ahflows.ensemble import run_ensemble

    order = list(reversed(case["reader"].video_ids("private")))
    order = order[1:] + order[:1]                        # neither sorted nor reverse-sorted
    data = _private_tree(tmp_path, order)
    rec = run_ensemble(case["runs"], case["cache"], tmp_path / "ens", windows=1, data_root=data)
    _check_submission(tmp_path / "ens", order, rec["threshold"])
    info = json.loads((tmp_path / "ens" / "submission" / "info.json").read_text())
    assert info["order_source"].endswith("test.txt") and info["placeholders"] == []


def test_private_video_missing_from_the_cache_is_refused_or_placeheld(case, tmp_path):
    from ahflows.ensemble import run_ensemble
    from ahflows.submission import SubmissionError

    ghost = "Videos/99999/Visite_1/99999_Question_1_2023-01-01_10-00-00_Video.mp4"
    order = case["reader"].video_ids("private")
    order = order[:2] + [ghost] + order[2:]
    data = _private_tree(tmp_path, order, with_labels=False)
    with pytest.raises(SubmissionError, match="99999_Question_1") as exc:
        run_ensemble(case["runs"], case["cache"], tmp_path / "refused", data_root=data)
    assert "\n" not in str(exc.value) and "--allow-missing" in str(exc.value)
    assert not (tmp_path / "refused").exists(), "refused before writing anything"

    warnings = []
    rec = run_ensemble(case["runs"], case["cache"], tmp_path / "ens", data_root=data, allow_missing=True,
                       warn=warnings.append)
    p1 = _check_submission(tmp_path / "ens", order, rec["threshold"])
    assert p1[ghost] == "0.5000"
    info = json.loads((tmp_path / "ens" / "submission" / "info.json").read_text())
    assert info["placeholders"] == [ghost]
    assert any(ghost in w for w in warnings)


def test_failed_private_extraction_is_listed_from_the_cache_errors(case, tmp_path):
    """Without a BAH root, the cache's error records still name the private videos that failed."""
    from ahflows.submission import SubmissionError, check_missing, private_order

    class Reader:
        path = tmp_path                    # no listed.json: the order comes from the cache alone

        def video_ids(self, split=None):
            return ["Videos/1/b.mp4", "Videos/1/a.mp4"] if split == "private" else []

        def errors(self):
            return [{"video_id": "Videos/1/c.mp4", "split": "private", "message": "no faces"},
                    {"video_id": "Videos/1/t.mp4", "split": "train", "message": "bad mp4"}]

    order = private_order(Reader(), None)
    assert order.video_ids == ["Videos/1/a.mp4", "Videos/1/b.mp4", "Videos/1/c.mp4"]
    assert order.missing == ["Videos/1/c.mp4"]
    with pytest.raises(SubmissionError, match="Videos/1/c.mp4"):
        check_missing(order, allow_missing=False)
    check_missing(order, allow_missing=True)


def _with_fingerprint(src: Path, dst: Path, fp: str) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["cache"]["fingerprint"] = fp
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_runs_from_different_caches_are_refused(case, tmp_path):
    from ahcli.app import app
    from ahflows.ensemble import EnsembleError, run_ensemble

    other = _with_fingerprint(case["runs"][1], tmp_path / "B-other", "feedfacefeedface")
    with pytest.raises(EnsembleError, match="feedfacefeedface") as exc:
        run_ensemble([case["runs"][0], other], case["cache"], tmp_path / "e1")
    assert "one cache" in str(exc.value) and "\n" not in str(exc.value)

    both = [_with_fingerprint(r, tmp_path / f"{r.name}-x", "0123456789abcdef") for r in case["runs"]]
    res = CliRunner().invoke(app, ["ensemble", *map(str, both), "--cache", str(case["cache"]),
                                   "--out", str(tmp_path / "e2")])
    assert res.exit_code != 0 and isinstance(res.exception, EnsembleError)
    assert "0123456789abcdef" in str(res.exception) and case["reader"].fingerprint in str(res.exception)
    assert not (tmp_path / "e2").exists()


def test_cli_ensemble_prints_json_and_table(case, tmp_path):
    from ahcli.app import app

    runner = CliRunner()
    args = ["ensemble", *map(str, case["runs"]), "--cache", str(case["cache"]), "--out", str(tmp_path / "e")]
    res = runner.invoke(app, args + ["--windows", "2", "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0.25 <= rec["threshold"] <= 0.75 and rec["test"]["videos"] == SIZES["test"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "ensemble" in res.stdout and "Macro F1" in res.stdout
