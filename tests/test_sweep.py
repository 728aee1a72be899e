"""`ahcli sweep` (grid x seeds, resumable, greedy ensemble selection on val) and `ahcli compare` (paired
participant bootstrap), on a tiny real cache (tests/heads_fixtures.py)."""
from __future__ import annotations

import csv
import json
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from heads_fixtures import tiny_model, tiny_train, write_cache

SIZES = {"train": 32, "val": 24, "test": 24, "private": 2}
GRID = """seeds: [0, 1, 2]
grid:
  label_smoothing: [0.0, 0.1]
  epochs: [3]
  patience: [3]
  dim: [16]
  head_hidden: [16]
  lr: [0.001]
  lr_min: [0.00001]
"""

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A cache, a 2 configurations x 3 seeds sweep over it, and an audio-only run (audio is pure noise here)."""
    from ahcli.cmd_sweep import build_configs, train_heads_defaults
    from ahflows.sweep import run_sweep
    from extract.store import CacheReader
    from heads.data import load_split
    from heads.run_files import cache_record
    from heads.train import train_heads

    root = tmp_path_factory.mktemp("sweep")
    cache = write_cache(root / "cache", SIZES)
    (root / "grid.yaml").write_text(GRID, encoding="utf-8")
    calls = []
    res = run_sweep(cache, root / "sw", root / "grid.yaml", train_heads_defaults(), build_configs, device="cpu",
                    on_training=lambda desc, k, n: calls.append((desc, k, n)))
    reader = CacheReader(cache)
    train, val = load_split(reader, "train", device="cpu"), load_split(reader, "val", device="cpu")
    train_heads(train, val, tiny_model(train, modalities="a"), tiny_train(epochs=2), root / "audio",
                cache=cache_record(reader))
    return {"root": root, "cache": cache, "res": res, "reader": reader, "calls": calls}


def test_sweep_selects_an_ensemble_at_least_as_good_as_the_best_run_on_val(swept):
    from ahflows.ensemble import is_ensemble_folder
    from ahflows.submission import WITH_PROBS

    res, out = swept["res"], swept["root"] / "sw"
    assert not res.stopped and len(res.points) == 6 and len(res.trained) == 6
    assert sorted(p.name for p in res.points) == ["c00-s0", "c00-s1", "c00-s2", "c01-s0", "c01-s1", "c01-s2"]
    assert {p.options["label_smoothing"] for p in res.points} == {0.0, 0.1}
    # seeds and label smoothing differ only per member: all six train as one stacked pass (heads/stacked.py),
    # each then written as an ordinary run folder that loads like one train-heads wrote
    assert len(swept["calls"]) == 1 and "one stacked pass" in swept["calls"][0][0]
    from heads.runs import load_run
    for p in res.points:
        run = load_run(out / "runs" / p.name)
        assert run.train_config.seed == p.seed and run.train_config.label_smoothing == p.options["label_smoothing"]
    ens = json.loads((out / "ensemble" / "metrics.json").read_text())
    assert is_ensemble_folder(out / "ensemble")
    # the acceptance criterion: val Macro F1 of the chosen ensemble >= the best single run's (scored alike)
    assert ens["val"]["macro_f1"] >= max(res.selection.single_val) - 1e-12
    assert ens["val"]["macro_f1"] == pytest.approx(max(s.val_macro_f1 for s in res.selection.steps))
    assert len(ens["runs"]) == len(ens["selection"]["members"]) == res.selection.best_step
    assert [Path(r["path"]).name for r in ens["runs"]] == ens["selection"]["members"]
    for split in ("val", "test"):
        iv = ens["intervals"][split]["macro_f1"]
        assert iv["low"] <= ens[split]["macro_f1"] <= iv["high"] and iv["value"] == pytest.approx(ens[split]["macro_f1"])
    # a valid ensemble folder: predictions agree with the threshold, the submission lists every private video
    with open(out / "ensemble" / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["split"] for r in rows} == {"val", "test", "private"}
    assert all(int(r["prediction"]) == int(float(r["probability"]) >= ens["threshold"]) for r in rows)
    lines = (out / "ensemble" / WITH_PROBS).read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == swept["reader"].video_ids("private")
    assert all(Decimal(line.split(",")[1]) + Decimal(line.split(",")[2]) == 1 for line in lines)
    # the tables: every run once, the curve of val/test Macro F1 over the number of members
    with open(out / "runs.csv", newline="") as fh:
        runs = list(csv.DictReader(fh))
    assert [r["run"] for r in runs] == [p.name for p in res.points]
    assert sum(int(r["chosen"]) for r in runs) == res.selection.best_step
    with open(out / "selection.csv", newline="") as fh:
        steps = list(csv.DictReader(fh))
    assert [int(s["step"]) for s in steps] == list(range(1, 11))
    assert [int(s["kept"]) for s in steps].index(1) + 1 == res.selection.best_step


def test_run_metrics_carry_participant_bootstrap_intervals(swept):
    out = swept["root"] / "sw" / "runs" / "c00-s0"
    m = json.loads((out / "metrics.json").read_text())
    iv = m["intervals"]["val"]
    assert iv["unit"] == "participant" and iv["participants"] == SIZES["val"] and iv["resamples"] == 1000
    for k in ("macro_f1", "f1_ah", "f1_noah", "ap"):
        assert iv[k]["low"] <= iv[k]["value"] <= iv[k]["high"]
    assert iv["macro_f1"]["value"] == pytest.approx(m["val"]["macro_f1"])
    assert iv["ap"]["value"] == pytest.approx(m["val"]["ap"])


def test_sweep_rerun_skips_finished_runs_and_rewrites_the_same_ensemble(swept):
    from ahcli.cmd_sweep import build_configs, train_heads_defaults
    from ahflows.sweep import run_sweep

    root = swept["root"]
    before = json.loads((root / "sw" / "ensemble" / "metrics.json").read_text())
    stamp = (root / "sw" / "runs" / "c01-s2" / "model.safetensors").stat().st_mtime_ns
    res = run_sweep(swept["cache"], root / "sw", root / "grid.yaml", train_heads_defaults(), build_configs,
                    device="cpu")
    assert res.trained == [] and len(res.skipped) == 6
    assert (root / "sw" / "runs" / "c01-s2" / "model.safetensors").stat().st_mtime_ns == stamp
    after = json.loads((root / "sw" / "ensemble" / "metrics.json").read_text())
    assert after["val"] == before["val"] and after["selection"] == before["selection"]


def test_sweep_refuses_another_grid_in_the_same_folder(swept, tmp_path):
    from ahcli.cmd_sweep import build_configs, train_heads_defaults
    from ahflows.sweep import SweepError, run_sweep

    grid = tmp_path / "other.yaml"
    grid.write_text(GRID.replace("[0.0, 0.1]", "[0.0, 0.2]"), encoding="utf-8")
    with pytest.raises(SweepError, match="another grid"):
        run_sweep(swept["cache"], swept["root"] / "sw", grid, train_heads_defaults(), build_configs, device="cpu")


@pytest.mark.parametrize("text, match", [
    ("seeds: [0]\ngrid:\n  label_smothing: [0.1]\n", "'label_smothing' is not a train-heads option"),
    ("seeds: [0]\ngrid:\n  resume: [true]\n", "'resume' is not a train-heads option a grid can vary"),
    ("seeds: [0]\ngrid:\n  seed: [1, 2]\n", "use 'seeds'"),
    ("seeds: [0]\ngrid:\n  epochs: [two]\n", "epochs: 'two' is not a valid value"),
    ("seeds: [0]\ngrid:\n  pooling: [fancy]\n", "pooling: 'fancy' is not a valid value"),
    ("seeds: [0]\ngrid:\n  modalities: [vx]\n", "modalities"),
    ("seeds: [0, 0]\n", "distinct"),
    ("seed: [0]\n", "unknown key 'seed'"),
    ("grid:\n  epochs: 3\n", "non-empty list"),
])
def test_grid_file_errors_are_one_line(tmp_path, text, match):
    from ahcli.cmd_sweep import train_heads_defaults
    from ahflows.sweep import SweepError, read_grid

    path = tmp_path / "grid.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SweepError, match=match) as err:
        read_grid(path, train_heads_defaults())
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_grid_values_take_the_option_types(tmp_path):
    from ahcli.cmd_sweep import build_configs, train_heads_defaults
    from ahflows.sweep import read_grid

    path = tmp_path / "grid.yaml"
    path.write_text("seeds: [3]\ngrid:\n  label_smoothing: [0, 0.1]\n  pos_weight: [1.5]\n  pooling: [literal]\n"
                    "  no_conflict: [false, true]\n  modalities: [vt]\n", encoding="utf-8")
    grid = read_grid(path, train_heads_defaults())
    assert grid.grid["label_smoothing"] == [0.0, 0.1] and grid.grid["pos_weight"] == ["1.5"]
    points = grid.points()
    assert len(points) == 4 and {p.seed for p in points} == {3}
    model_kw, cfg = build_configs({**train_heads_defaults(), **points[-1].options, "seed": 3, "device": "cpu"})
    assert model_kw["conflict"] is False and model_kw["pooling"] == "literal" and cfg.seed == 3
    assert cfg.label_smoothing == 0.1 and cfg.pos_weight == "1.5"


def test_compare_a_folder_with_itself_finds_no_difference(swept):
    from ahflows.compare import compare_folders

    ens = swept["root"] / "sw" / "ensemble"
    res = compare_folders(ens, ens, swept["cache"], device="cpu")
    for split in ("val", "test"):
        d = res["splits"][split]
        assert d["difference"] == {"value": 0.0, "low": 0.0, "high": 0.0} and not d["distinguishable"]
    run = swept["root"] / "sw" / "runs" / "c00-s1"
    assert not compare_folders(run, run, swept["cache"], device="cpu")["splits"]["test"]["distinguishable"]


def test_compare_tells_a_clearly_better_folder_apart(swept):
    from ahflows.compare import compare_folders

    ens, audio = swept["root"] / "sw" / "ensemble", swept["root"] / "audio"
    res = compare_folders(ens, audio, swept["cache"], device="cpu")
    d = res["splits"]["test"]
    assert d["a"] > d["b"] + 0.15, d
    assert d["distinguishable"] and d["difference"]["low"] > 0
    assert d["unit"] == "participant" and d["participants"] == SIZES["test"]
    flipped = compare_folders(audio, ens, swept["cache"], device="cpu")["splits"]["test"]
    assert flipped["distinguishable"] and flipped["difference"]["high"] < 0
    assert np.isclose(flipped["difference"]["value"], -d["difference"]["value"])


# ---- calibration over the sweep's runs (heads/calibration.py, ahflows/calibrate.py) --------------------


@pytest.fixture(scope="module")
def overconfident(swept):
    """A deliberately over-confident run: the audio-only run (audio carries no signal in these data, so it is
    right about half the time) with its output layer scaled x 20: probabilities near 0 and 1."""
    import shutil

    from heads.run_files import MODEL_FILE, load_tensors, save_tensors

    run = swept["root"] / "overconfident"
    shutil.copytree(swept["root"] / "audio", run)
    tensors, meta = load_tensors(run / MODEL_FILE)
    for k in ("head.4.weight", "head.4.bias"):
        tensors[k] = tensors[k] * 20
    save_tensors(run / MODEL_FILE, tensors, meta)
    return run


def test_calibrating_an_overconfident_run_lowers_val_ece_and_is_applied(swept, overconfident):
    from ahflows.calibrate import calibrate_run
    from ahflows.compare import compare_folders
    from ahflows.plots import Figures
    from heads.data import load_split
    from heads.infer import evaluate_split
    from heads.runs import load_run

    cal = calibrate_run(overconfident, swept["cache"], device="cpu", figures=Figures(("png",)))
    assert cal.temperature > 1.0                                          # it softens
    assert cal.scores["val"]["ece_after"] <= cal.scores["val"]["ece_before"]
    assert cal.scores["val"]["nll_after"] <= cal.scores["val"]["nll_before"]
    assert "test" in cal.scores and (overconfident / "reliability.png").is_file()
    stored = json.loads((overconfident / "calibration.json").read_text())
    assert stored["temperature"] == cal.temperature and stored["threshold"] == cal.threshold

    run = load_run(overconfident)
    assert run.calibration is not None and run.calibration.temperature == cal.temperature
    val = load_split(swept["reader"], "val", device="cpu")
    res = evaluate_split(run, val)
    assert res["temperature"] == cal.temperature and res["threshold"] == cal.threshold
    raw = evaluate_split(run, val, calibrated=False)
    assert raw["threshold"] == run.threshold and raw["temperature"] is None
    # compare scores the calibrated run as evaluate does
    same = compare_folders(overconfident, overconfident, swept["cache"], device="cpu")["splits"]["val"]
    assert same["a"] == pytest.approx(res["metrics"]["macro_f1"]) and not same["distinguishable"]


def test_a_calibrated_ensemble_writes_calibrated_probabilities(swept, overconfident, tmp_path):
    from ahflows.calibration_plots import report_section
    from ahflows.ensemble import run_ensemble
    from ahflows.plots import Figures
    from ahflows.submission import WITH_PROBS
    from heads.calibration import apply_temperature

    runs = [overconfident]
    run_ensemble(runs, swept["cache"], tmp_path / "raw", windows=2)
    rec = run_ensemble(runs, swept["cache"], tmp_path / "cal", windows=2, calibrated=True)
    cal = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert rec["calibration"]["temperature"] == cal["temperature"] > 1.0
    assert cal["scores"]["val"]["ece_after"] <= cal["scores"]["val"]["ece_before"]
    assert rec["threshold"] == cal["threshold"]

    def probs(folder):
        with open(folder / "predictions.csv", newline="") as fh:
            return {r["video_id"]: float(r["probability"]) for r in csv.DictReader(fh)}

    before, after = probs(tmp_path / "raw"), probs(tmp_path / "cal")
    for vid, p in before.items():                 # calibrated = sigmoid(logit(raw) / T), at 4 decimals
        assert after[vid] == pytest.approx(float(apply_temperature(p, cal["temperature"])), abs=2e-4)
    for line in (tmp_path / "cal" / WITH_PROBS).read_text().splitlines():
        vid, _, p1, _ = line.split(",")
        assert float(p1) == after[vid]             # the submission's p1 is the calibrated value
    lines, images = report_section(tmp_path / "cal", Figures(("png",)))
    text = "\n".join(lines)
    assert "How sure is this number" in text and "ECE before" in text and "[" in text
    assert [p.name for p in images] == ["reliability.png"] and images[0].is_file()
    # a rerun without --calibrate removes the stale calibration
    run_ensemble(runs, swept["cache"], tmp_path / "cal", windows=2)
    assert not (tmp_path / "cal" / "calibration.json").exists()


def test_a_stopped_sweep_keeps_nothing_half_written_and_a_rerun_finishes(swept, tmp_path):
    from ahcli.cmd_sweep import build_configs, train_heads_defaults
    from ahflows.sweep import run_sweep
    from heads.train_state import TrainingStopped

    grid = tmp_path / "grid.yaml"
    grid.write_text("seeds: [5, 6]\ngrid:\n  epochs: [2]\n  dim: [16]\n  head_hidden: [16]\n  lr: [0.001]\n",
                    encoding="utf-8")

    def stop(rec, prog):
        raise TrainingStopped

    args = (swept["cache"], tmp_path / "sw", grid, train_heads_defaults(), build_configs)
    res = run_sweep(*args, device="cpu", on_epoch=stop)
    assert res.stopped and res.trained == [] and res.ensemble is None
    assert not (tmp_path / "sw" / "ensemble").exists()
    res = run_sweep(*args, device="cpu")
    assert not res.stopped and res.trained == ["c00-s5", "c00-s6"] and res.skipped == []
    assert (tmp_path / "sw" / "ensemble" / "metrics.json").is_file()


def test_every_option_a_grid_may_vary_reaches_the_configs():
    """A train-heads option added later is either handed to the configs or listed as not sweepable."""
    from ahcli.cmd_sweep import MODEL_KEYS, TRAIN_KEYS, train_heads_defaults
    from ahflows.sweep import NOT_SWEPT

    sweepable = set(train_heads_defaults()) - NOT_SWEPT
    assert sweepable <= set(MODEL_KEYS) | set(TRAIN_KEYS), sweepable - set(MODEL_KEYS) - set(TRAIN_KEYS)
