"""`ahcli ablate`: the rows of Tables 4-6, the splits loaded once, inference-time variants without
retraining, mean ± std aggregation, resume, and option checks. Tiny epochs: the numbers are not the point
there. The slow acceptance test at the end checks what the full model learns on a synthetic BAH tree."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from heads_fixtures import write_cache

BASE = {"epochs": 1, "patience": 1, "dim": 8, "head_hidden": 8, "lr": 1e-3, "device": "cpu"}
T4 = {"no_conflict", "window_text", "alpha=0", "alpha=0.5", "alpha=0.6", "alpha=1"}
T5 = {f"modality={m}" for m in ("v", "a", "t", "va", "vt", "at", "vat")}
T6 = {"windows=1", "windows=3", "windows=5", "single_A", "single_B", "ensemble_AB"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("ablate") / "cache",
                       {"train": 24, "val": 12, "test": 12}, windows=(2, 3))


@pytest.fixture(scope="module")
def full(cache, tmp_path_factory):
    """One full ablation with 2 seeds, counting trainings and split loads."""
    import ahflows.ablate
    import ahflows.checkpoint_a
    import heads.stacked

    calls = {"train": 0, "load": [], "stacked": 0}
    real_train, real_load = ahflows.checkpoint_a.train_heads, ahflows.ablate.load_split
    real_stacked = heads.stacked.train_stacked

    def train(*a, **k):
        calls["train"] += 1
        return real_train(*a, **k)

    def stacked(train, val, model_cfg, cfgs, **k):       # a training's seeds in one pass: one model each
        calls["train"] += len(cfgs)
        calls["stacked"] += 1
        return real_stacked(train, val, model_cfg, cfgs, **k)

    def load(reader, split, *a, **k):
        calls["load"].append(split)
        return real_load(reader, split, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(ahflows.checkpoint_a, "train_heads", train)
    mp.setattr(heads.stacked, "train_stacked", stacked)
    mp.setattr(ahflows.ablate, "load_split", load)
    try:
        from ahflows.ablate import run_ablation

        out = tmp_path_factory.mktemp("ablation")
        res = run_ablation(cache, out, seeds=2, base=BASE)
    finally:
        mp.undo()
    return {"res": res, "out": out, "calls": calls}


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_ablation_writes_every_table_row_per_seed_and_aggregated(full):
    rows = _csv(full["out"] / "ablation.csv")
    per_seed = [r for r in rows if r["seed"] != "mean"]
    agg = [r for r in rows if r["seed"] == "mean"]
    want = {("4", c) for c in T4} | {("5", c) for c in T5} | {("6", c) for c in T6}
    for seed in ("0", "1"):
        for split in ("val", "test"):
            got = {(r["table"], r["config"]) for r in per_seed if r["seed"] == seed and r["split"] == split}
            assert got == want, (seed, split, want ^ got)
    assert len(per_seed) == 2 * 2 * len(want) and len(agg) == 2 * len(want)
    for a in agg:
        group = [r for r in per_seed if (r["table"], r["config"], r["split"]) == (a["table"], a["config"], a["split"])]
        vals = [float(r["macro_f1"]) for r in group]
        assert a["n_seeds"] == "2"
        assert float(a["macro_f1"]) == pytest.approx(np.mean(vals), abs=1e-6)
        assert float(a["macro_f1_std"]) == pytest.approx(np.std(vals, ddof=1), abs=1e-6)
        assert 0.25 <= float(group[0]["threshold"]) <= 0.75
    md = (full["out"] / "ablation.md").read_text()
    for title in ("Table 4", "Table 5", "Table 6"):
        assert title in md
    for label in ("No conflict features", "Window-aligned transcript only", "Text blend α = 1.0", "Video only",
                  "Audio + Text", "All three (ours)", "Inference: 3 windows", "Ensemble of 2 checkpoints"):
        assert label in md
    assert "±" in md and "frozen" in md


def test_splits_loaded_once_and_inference_variants_not_retrained(full):
    calls = full["calls"]
    assert sorted(calls["load"]) == ["test", "train", "val"]
    # per seed: 7 modality subsets + no conflict + window-aligned text + checkpoint B
    assert calls["train"] == 2 * 10
    assert calls["stacked"] == 10, "each training's two seeds in one stacked pass"
    rows = full["res"].rows
    get = {(r.table, r.config, r.split, r.seed): r for r in rows}
    for seed in (0, 1):
        for split in ("val", "test"):
            full_model = get[("5", "modality=vat", split, seed)]
            # alpha 0.6 at the tables' window count is the full model itself, as is 1 inference window
            for twin in (get[("4", "alpha=0.6", split, seed)], get[("6", "windows=1", split, seed)]):
                assert (twin.macro_f1, twin.threshold) == (full_model.macro_f1, full_model.threshold)
    assert {r.windows for r in rows if r.config == "windows=5"} == {3}, "capped at the 3 cached eval windows"


def test_resume_reuses_finished_trainings(full, cache, tmp_path):
    import shutil

    import ahflows.checkpoint_a
    from ahflows.ablate import run_ablation

    out = tmp_path / "resumed"
    shutil.copytree(full["out"], out)
    log = (out / "trainings.jsonl").read_text().splitlines()
    (out / "trainings.jsonl").write_text("\n".join(log[:-3]) + "\n" + log[-3][:20])   # a cut last line
    n = {"train": 0}
    real = ahflows.checkpoint_a.train_heads

    def counting(*a, **k):
        n["train"] += 1
        return real(*a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(ahflows.checkpoint_a, "train_heads", counting)
    try:
        res = run_ablation(cache, out, seeds=2, base=BASE, resume=True)
    finally:
        mp.undo()
    assert n["train"] == 3
    before = _csv(full["out"] / "ablation.csv")
    after = _csv(out / "ablation.csv")
    assert [r["macro_f1"] for r in after] == [r["macro_f1"] for r in before], "CPU training is deterministic"
    assert len(res.rows) == len(full["res"].rows)


def test_controlled_and_unknown_options_are_refused(cache, tmp_path):
    from ahflows.ablate import AblationError, run_ablation

    with pytest.raises(AblationError, match="seed"):
        run_ablation(cache, tmp_path / "a", seeds=1, base={"seed": 3})
    with pytest.raises(AblationError, match="modalities"):
        run_ablation(cache, tmp_path / "a", seeds=1, base={"modalities": "vt"})
    with pytest.raises(AblationError, match="colour"):
        run_ablation(cache, tmp_path / "a", seeds=1, base={"colour": 1})


def test_cli_quick_ablation(cache, tmp_path):
    from ahcli.app import app

    out = tmp_path / "q"
    res = CliRunner().invoke(app, ["ablate", str(cache), str(out), "--seeds", "1", "--quick", "--epochs", "1",
                                   "--dim", "8", "--head-hidden", "8", "--lr", "1e-3", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = _csv(out / "ablation.csv")
    configs = {r["config"] for r in rows if r["table"] == "5"}
    assert configs == {"modality=v", "modality=a", "modality=t", "modality=vat"}
    assert not any(r["config"] in ("ensemble_AB", "no_conflict") for r in rows)
    assert "modality=vat" in res.stdout and "full model vs best single modality" in res.output
    log = [json.loads(line) for line in (out / "trainings.jsonl").read_text().splitlines()]
    assert [r["name"] for r in log] == ["v", "a", "t", "vat"]


def test_unfreeze_top_is_refused_in_one_line_on_a_cache_without_prefix(cache, tmp_path):
    from ahflows.ablate import AblationError, run_ablation

    with pytest.raises(AblationError) as err:
        run_ablation(cache, tmp_path / "u", seeds=1, base=BASE, unfreeze_top=2)
    msg = str(err.value)
    assert "\n" not in msg and "--unfreeze-top 2" in msg and "prefix" in msg and str(cache) in msg
    assert not (tmp_path / "u").exists(), "refused before the ablation folder is made"
    with pytest.raises(AblationError, match="--only-seed 0: must lie in 3..4"):
        run_ablation(cache, tmp_path / "u", seeds=2, base=BASE, seed_offset=3, only_seed=0)


def test_unfreeze_top_trains_every_variant_from_a_prefix_cache(report_run_case, tmp_path):
    """`ablate --unfreeze-top 2 --seeds 1` (the acceptance line), with the demo's other options and a seed
    offset: every table is written, every variant but checkpoint B trained its top 2 blocks."""
    import ahflows.checkpoint_a
    from ahcli.app import app

    cfgs = []
    real = ahflows.checkpoint_a.train_heads

    def spy(train, val, mcfg, tcfg, *a, **k):
        cfgs.append((mcfg.modalities, mcfg.conflict, mcfg.ffn_width, tcfg))
        return real(train, val, mcfg, tcfg, *a, **k)

    out = tmp_path / "top2"
    mp = pytest.MonkeyPatch()
    mp.setattr(ahflows.checkpoint_a, "train_heads", spy)
    try:
        res = CliRunner().invoke(app, [
            "ablate", str(report_run_case.cache), str(out), "--seeds", "1", "--seed-offset", "4", "--unfreeze-top",
            "2", "--epochs", "1", "--dim", "8", "--head-hidden", "8", "--ffn-hidden", "12", "--lr", "1e-3",
            "--text-weight", "0.1", "--label-smoothing", "0.05", "--batch-size", "8", "--accum", "1",
            "--device", "cpu"])
    finally:
        mp.undo()
    assert res.exit_code == 0, res.output
    rows = _csv(out / "ablation.csv")
    tables = {(r["table"], r["config"]) for r in rows if r["seed"] == "4"}
    assert {c for t, c in tables if t == "5"} == T5 and {c for t, c in tables if t == "6"} == T6
    assert {"no_conflict", "alpha=0.6"} <= {c for t, c in tables if t == "4"}
    assert {r["seed"] for r in rows} == {"4", "mean"}
    b = [c for c in cfgs if c[3].label_smoothing == 0.1]
    others = [c for c in cfgs if c[3].label_smoothing != 0.1]
    assert len(b) == 1 and b[0][3].unfreeze_top == 0, "checkpoint B stays frozen"
    assert {c[0] for c in others} >= {"v", "a", "t", "va", "vt", "at", "vat"}
    for _, _, ffn, t in others:
        assert (t.unfreeze_top, t.label_smoothing, t.text_weight, t.seed) == (2, 0.05, 0.1, 4)
        assert ffn == 12
    assert [c for c in cfgs if not c[1]], "the no-conflict variant was trained"
    md = (out / "ablation.md").read_text()
    assert "Every variant trained with the top-2 encoder blocks unfrozen" in md and "n = 1" in md


# ---- acceptance: on a synthetic tree the full model beats every single modality -----------------------

ACCEPT_VIDEOS, ACCEPT_SEED, ACCEPT_SEEDS = 300, 1, 3
# Small random features want a larger lr than the paper's 3e-5. The paper's 60 epochs, but patience 30: on
# ~45 val videos the val F1 is noisy, and patience 15 sometimes stops before the face x words interaction
# (which appears around epoch 20-30) is learned.
ACCEPT_BASE = {"dim": 64, "head_hidden": 64, "lr": 1e-3, "patience": 30, "device": "cpu"}


@pytest.mark.slow
def test_full_model_beats_every_single_modality_on_a_synthetic_tree(tmp_path):
    """synth -> tiny encoders -> extract -> `ablate --quick`: the planted rule (A/H = face valence XOR text
    valence, extract/synth.py) needs face and words together, so vat must clear v, a and t on test."""
    from extract.tiny_encoders import write_tiny_encoders
    from extract.run import ExtractOptions, extract
    from extract.synth import write_synthetic_bah
    from ahflows.ablate import run_ablation
    from ahflows.ablation_table import full_vs_single

    write_synthetic_bah(tmp_path / "synth", ACCEPT_VIDEOS, ACCEPT_SEED)
    spec = write_tiny_encoders(tmp_path / "enc")
    summary = extract(tmp_path / "synth" / "data", tmp_path / "cache", spec,
                      ExtractOptions(splits=("train", "val", "test"), device="cpu", workers=0, progress=False))
    assert not summary.failed
    res = run_ablation(tmp_path / "cache", tmp_path / "abl", seeds=ACCEPT_SEEDS, base=ACCEPT_BASE, quick=True)
    test = {(r.config, r.seed): r.macro_f1 for r in res.rows if r.table == "5" and r.split == "test"}
    for seed in range(ACCEPT_SEEDS):
        full = test[("modality=vat", seed)]
        for m in "vat":
            assert full >= test[(f"modality={m}", seed)] + 0.05, (seed, m, test)
    margin = full_vs_single(res.aggregated)
    assert margin is not None and margin >= 0.15, res.markdown
