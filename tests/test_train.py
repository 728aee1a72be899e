"""The training protocol, run folders, resume, inference, the real cache and the CLI (all on the CPU)."""
from __future__ import annotations

import csv
import json
import platform
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from heads.run_files import RunError
from heads.runs import load_run
from heads.data import DataError, load_split
from heads.infer import predict_split, window_logits
from heads.metrics import sweep_threshold
from heads.config import ConfigError, ModelConfig
from heads.train_state import TrainingStopped
from heads.train import joint_loss, pos_weight_of, steps_per_epoch, train_heads

from heads_fixtures import splits, state_equal, tiny_model, tiny_train, write_cache


@pytest.fixture(scope="module")
def conflict_data():
    return splits(128, 64)


# ---- the protocol's pieces -------------------------------------------------------------------------


def test_joint_loss_follows_equations_7_and_8():
    lf, lt = torch.tensor([0.3, -1.2]), torch.tensor([2.0, 0.5])
    y = torch.tensor([1.0, 0.0])
    pw = torch.tensor(1.5)
    eps, w = 0.1, 0.5
    ys = y * (1 - eps) + 0.5 * eps                                  # [0.95, 0.05]

    def bce(l):
        return -(pw * ys * torch.log(torch.sigmoid(l)) + (1 - ys) * torch.log(1 - torch.sigmoid(l))).mean()

    torch.testing.assert_close(joint_loss(lf, lt, y, pw, eps, w), (1 - w) * bce(lf) + w * bce(lt))
    torch.testing.assert_close(joint_loss(lf, None, y, pw, eps, w), bce(lf))


def test_pos_weight_is_negatives_over_positives():
    assert pos_weight_of(torch.tensor([1.0, 0.0, 0.0, float("nan"), 1.0, 0.0])) == pytest.approx(3 / 2)
    with pytest.raises(ConfigError, match="both classes"):
        pos_weight_of(torch.tensor([1.0, 1.0]))


def test_optimizer_steps_per_epoch():
    assert steps_per_epoch(778, 4, 4) == 49       # 195 micro-batches -> 48 full groups + one of 3
    assert steps_per_epoch(16, 4, 4) == 1


def test_batches_are_index_operations_on_ragged_tokens(conflict_data):
    train, _ = conflict_data
    rows, wins = torch.tensor([5, 0, 7]), torch.tensor([1, 3, 0])
    b = train.batch(rows, wins, text_source="window")
    torch.testing.assert_close(b.tokens["video"].values, train.video["last"][rows, wins])
    a = train.audio["last"]
    seg = b.tokens["audio"].segments
    for j, r in enumerate(rows.tolist()):
        torch.testing.assert_close(b.tokens["audio"].values[seg == j], a.values[a.offsets[r] : a.offsets[r + 1]])
    tw = train.text_window["last"]
    row = 7 * train.max_windows + 0
    torch.testing.assert_close(b.tokens["text"].values[b.tokens["text"].segments == 2],
                               tw.values[tw.offsets[row] : tw.offsets[row + 1]])


# ---- training behaviour ----------------------------------------------------------------------------


def test_full_model_learns_a_two_modality_signal_single_modalities_do_not(conflict_data):
    train, val = conflict_data
    scores = {}
    for mods in ("vat", "v", "t"):
        r = train_heads(train, val, tiny_model(train, mods), tiny_train(epochs=8, patience=8))
        scores[mods] = r.val_metrics["macro_f1"]
    assert scores["vat"] >= 0.9, scores
    assert scores["v"] <= 0.75 and scores["t"] <= 0.75, scores


def test_same_command_twice_gives_identical_numbers(conflict_data, tmp_path):
    train, val = conflict_data
    a = train_heads(train, val, tiny_model(train), tiny_train(epochs=3), tmp_path / "a")
    b = train_heads(train, val, tiny_model(train), tiny_train(epochs=3), tmp_path / "b")
    assert [h.__dict__ for h in a.history] == [h.__dict__ for h in b.history]
    assert (tmp_path / "a" / "history.csv").read_bytes() == (tmp_path / "b" / "history.csv").read_bytes()
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    c = train_heads(train, val, tiny_model(train), tiny_train(epochs=3, seed=1))
    assert [h.train_loss for h in c.history] != [h.train_loss for h in a.history]


def test_early_stopping_keeps_the_best_epoch(conflict_data):
    train, val = conflict_data
    # a learning rate too small to change the predictions: epoch 1 stays best, the run stops at 1 + patience
    r = train_heads(train, val, tiny_model(train), tiny_train(epochs=20, patience=3, lr=1e-12, lr_min=1e-12))
    assert r.stopped_early and len(r.history) == 4 and r.best_epoch == 1
    assert r.threshold == r.history[0].threshold


def test_best_epoch_threshold_is_the_sweep_on_blended_val_probabilities(conflict_data, tmp_path):
    train, val = conflict_data
    r = train_heads(train, val, tiny_model(train), tiny_train(epochs=4, alpha=0.6), tmp_path / "run")
    best = max(r.history, key=lambda h: (h.val_macro_f1, -h.epoch))
    assert r.best_epoch == best.epoch and r.threshold == best.threshold
    run = load_run(tmp_path / "run")
    ids, probs, labels = predict_split(run, val, windows=None)
    t, f1 = sweep_threshold(probs, labels)
    assert 0.25 <= r.threshold <= 0.75
    assert t == pytest.approx(r.threshold) and f1 == pytest.approx(r.val_metrics["macro_f1"])
    # the blend: alpha 0.6 on the text head, window-averaged
    wl = window_logits(run.model, val, modalities=run.model_config.present)
    p = (0.6 * torch.sigmoid(wl.text) + 0.4 * torch.sigmoid(wl.full)).mean(1)
    np.testing.assert_allclose(probs, p.numpy(), rtol=1e-6)


@pytest.mark.parametrize("text_source", ["full", "window"])
def test_window_logits_pool_per_video_inputs_once_and_match_plain_forwards(text_source):
    """window_logits pools audio (and the full transcript) once per video; the logits must equal one plain
    forward per (video, window), including videos with fewer cached windows than asked."""
    from heads.model import build_model

    _, val = splits(4, 10)
    val.n_windows[::3] = 1                                   # ragged window counts
    model = build_model(tiny_model(val), seed=0).eval()
    wl = window_logits(model, val, modalities=model.cfg.present, text_source=text_source, batch_size=13)
    w = val.max_windows
    for i in range(len(val)):
        wins = torch.arange(w).clamp(max=int(val.n_windows[i]) - 1)
        b = val.batch(torch.full((w,), i), wins, text_source=text_source)
        lf, lt = model(b.tokens)
        torch.testing.assert_close(wl.full[i], lf.detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(wl.text[i], lt.detach(), rtol=0, atol=1e-5)
        assert wl.valid[i].tolist() == [k < int(val.n_windows[i]) for k in range(w)]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator setting is glibc's")
def test_cpu_training_keeps_freed_memory_for_reuse():
    from extract.host_memory import keep_freed_memory

    assert keep_freed_memory() is True


def test_without_text_the_text_head_and_alpha_drop_out(conflict_data, tmp_path):
    train, val = conflict_data
    r = train_heads(train, val, tiny_model(train, "va"), tiny_train(epochs=2), tmp_path / "va")
    assert r.model.text_head is None
    assert json.loads((tmp_path / "va" / "metrics.json").read_text())["alpha"] == 0.0


# ---- run folders and resume ------------------------------------------------------------------------


def test_run_folder_contents(conflict_data, tmp_path):
    train, val = conflict_data
    out = tmp_path / "run"
    r = train_heads(train, val, tiny_model(train), tiny_train(epochs=3), out, cache={"fingerprint": "abc", "path": "c"})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "history.csv", "metrics.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["modalities"] == "vat" and cfg["train"]["epochs"] == 3 and cfg["cache"]["fingerprint"] == "abc"
    assert "git_commit" in cfg["provenance"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["best_epoch"] == r.best_epoch and m["threshold"] == r.threshold and "macro_f1" in m["val"]
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [int(x["epoch"]) for x in rows] == [1, 2, 3]
    assert set(rows[0]) >= {"train_loss", "val_loss", "val_macro_f1", "val_f1_ah", "val_f1_noah", "threshold"}
    run = load_run(out)
    assert state_equal(run.model.state_dict(), r.model.state_dict())


def test_resume_reaches_the_same_final_numbers(conflict_data, tmp_path):
    train, val = conflict_data
    mc, tc = tiny_model(train), tiny_train(epochs=5, patience=5)
    full = train_heads(train, val, mc, tc, tmp_path / "full")
    part = train_heads(train, val, mc, tc, tmp_path / "part", stop_after=2)
    assert not part.completed and len(part.history) == 2
    files = {p.name for p in (tmp_path / "part").iterdir()}
    assert "state.safetensors" in files and "metrics.json" not in files
    with pytest.raises(RunError, match="--resume"):
        train_heads(train, val, mc, tc, tmp_path / "part")
    done = train_heads(train, val, mc, tc, tmp_path / "part", resume=True)
    assert [h.__dict__ for h in done.history] == [h.__dict__ for h in full.history]
    assert (done.best_epoch, done.threshold) == (full.best_epoch, full.threshold)
    assert (tmp_path / "part/model.safetensors").read_bytes() == (tmp_path / "full/model.safetensors").read_bytes()
    assert not (tmp_path / "part/state.safetensors").exists()
    again = train_heads(train, val, mc, tc, tmp_path / "part", resume=True)   # finished: nothing to do
    assert again.best_epoch == full.best_epoch


def test_checkpoints_are_throttled_but_the_interrupted_epoch_is_written(conflict_data, tmp_path, monkeypatch):
    import heads.resume as train_module

    train, val = conflict_data
    mc = tiny_model(train)
    full = train_heads(train, val, mc, tiny_train(epochs=5, patience=5), tmp_path / "full")
    written, write = [], train_module._write_epoch
    monkeypatch.setattr(train_module, "_write_epoch",
                        lambda out, tensors, meta, best, best_epoch: written.append((meta["state"]["epoch"], best is not None))
                        or write(out, tensors, meta, best, best_epoch))
    every = tiny_train(epochs=5, patience=5, checkpoint_seconds=0)
    train_heads(train, val, mc, every, tmp_path / "every", stop_after=3)
    assert [e for e, _ in written] == [1, 2, 3]
    written.clear()
    rare = tiny_train(epochs=5, patience=5, checkpoint_seconds=1e9)
    train_heads(train, val, mc, rare, tmp_path / "rare", stop_after=3)
    assert written == [(3, True)]                    # one checkpoint, carrying the best weights of epochs 1-3
    written.clear()
    done = train_heads(train, val, mc, rare, tmp_path / "rare", resume=True)
    assert [e for e, _ in written] == [5]            # the last epoch
    assert [h.__dict__ for h in done.history] == [h.__dict__ for h in full.history]
    assert (tmp_path / "rare/model.safetensors").read_bytes() == (tmp_path / "full/model.safetensors").read_bytes()


def test_callback_interruption_then_resume(conflict_data, tmp_path):
    train, val = conflict_data
    mc, tc = tiny_model(train, "vt"), tiny_train(epochs=4, patience=4)
    full = train_heads(train, val, mc, tc)

    def crash(rec, prog):
        if rec.epoch == 3:
            raise TrainingStopped

    train_heads(train, val, mc, tc, tmp_path / "r", on_epoch=crash)
    with pytest.raises(RunError, match="different train options"):
        train_heads(train, val, mc, tiny_train(epochs=4, patience=4, lr=5e-4), tmp_path / "r", resume=True)
    done = train_heads(train, val, mc, tc, tmp_path / "r", resume=True)
    assert [h.val_loss for h in done.history] == [h.val_loss for h in full.history]


def test_loading_refuses_unknown_options_wrong_shapes_and_other_caches(conflict_data, tmp_path):
    train, val = conflict_data
    out = tmp_path / "run"
    train_heads(train, val, tiny_model(train), tiny_train(epochs=1), out, cache={"fingerprint": "fp1", "path": "c"})
    cfg_path = out / "config.json"
    good = json.loads(cfg_path.read_text())

    class Reader:
        fingerprint = "fp2"

    with pytest.raises(RunError, match="fingerprint fp1.*fp2"):
        load_run(out, cache=Reader())
    load_run(out, expect_fingerprint="fp1")

    bad = json.loads(json.dumps(good))
    bad["train"]["warmup"] = 3
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(RunError, match="unknown option.*warmup"):
        load_run(out)
    bad = json.loads(json.dumps(good))
    bad["model"]["dim"] = 24
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(RunError, match=r"shape .* but the config expects"):
        load_run(out)
    cfg_path.write_text("{not json")
    with pytest.raises(RunError, match="not valid JSON"):
        load_run(out)


def test_heads_package_never_unpickles():
    root = Path(__file__).resolve().parent.parent
    for f in [*(root / "heads").glob("*.py"), root / "ahcli" / "cmd_heads.py"]:
        text = f.read_text()
        assert not re.search(r"import pickle|from pickle|pickle\.load|import dill", text), f
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), f


# ---- the real cache and the CLI --------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("heads") / "cache")


def test_load_split_from_a_real_cache(cache_dir):
    from extract.store import CacheReader

    reader = CacheReader(cache_dir)
    data = load_split(reader, "train", device="cpu")
    assert len(data) == 32 and data.video["last"].shape == (32, 3, 8, 16)
    assert data.video["last"].dtype == torch.float16
    assert data.audio["last"].dim == 12 and data.text["last"].dim == 10
    assert len(data.text_window["last"]) == 32 * 3
    assert data.n_windows.tolist() == [3] * 32
    rec = reader.record(data.video_ids[4])
    np.testing.assert_array_equal(data.video["last"][4].numpy(), rec.arrays["video/last"])
    a = data.audio["last"]
    np.testing.assert_array_equal(a.values[a.offsets[4] : a.offsets[5]].numpy(), rec.arrays["audio/last"])
    assert data.labels[4].item() == rec.label
    private = load_split(reader, "private", device="cpu", modalities=("text",), text_window=False)
    assert torch.isnan(private.labels).all() and not private.video and not private.text_window
    with pytest.raises(DataError, match="no complete videos"):
        load_split(reader, "nonexistent")


def test_load_split_refuses_a_split_larger_than_the_available_memory_before_reading(cache_dir, monkeypatch):
    import heads.load
    import extract.host_memory
    from extract.store import CacheReader

    reader = CacheReader(cache_dir)
    ids = reader.video_ids("train")
    declared = sum(reader.array_nbytes(v, ["video/last"]) for v in ids)
    data = load_split(reader, "train", device="cpu")
    assert declared == data.video["last"].numel() * data.video["last"].element_size()
    need = sum(reader.array_nbytes(v, [n for n in reader.array_names(v) if "/" in n] + ["text_window_lengths"])
               for v in ids)
    assert 0.9 * data.nbytes() < need <= data.nbytes()     # the loaded split adds only labels and offsets

    assert (extract.host_memory.available_bytes() or 1) > 0
    reads, record = [], CacheReader.record
    monkeypatch.setattr(CacheReader, "record", lambda self, *a, **k: reads.append(a) or record(self, *a, **k))
    monkeypatch.setattr(heads.load, "available_bytes", lambda: need - 1)
    with pytest.raises(DataError, match=r"the train split needs 0\.0 GB of memory and 0\.0 GB is available"):
        load_split(reader, "train", device="cpu")
    assert reads == []                                      # refused before reading a single video
    monkeypatch.setattr(heads.load, "available_bytes", lambda: need)
    assert len(load_split(reader, "train", device="cpu")) == len(ids) == len(reads)


def test_cli_train_heads_then_evaluate(cache_dir, tmp_path):
    from ahcli.app import app

    runner = CliRunner()
    out = tmp_path / "run"
    args = ["train-heads", str(cache_dir), str(out), "--epochs", "3", "--dim", "16", "--head-hidden", "16",
            "--lr", "1e-3", "--device", "cpu", "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    assert metrics["epochs_run"] == 3 and 0.25 <= metrics["threshold"] <= 0.75
    res = runner.invoke(app, ["evaluate", str(out), str(cache_dir), "--split", "test", "--windows", "2", "--json"])
    assert res.exit_code == 0, res.output
    ev = json.loads(res.stdout.strip().splitlines()[-1])
    assert ev["videos"] == 16 and ev["threshold"] == metrics["threshold"]
    assert set(ev["metrics"]) >= {"macro_f1", "f1_ah", "f1_noah", "weighted_f1", "accuracy", "ap", "confusion"}
    res = runner.invoke(app, ["evaluate", str(out), str(cache_dir), "--split", "private", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout.strip().splitlines()[-1])["metrics"] is None
    # a run from another cache is refused with one line
    cfg = json.loads((out / "config.json").read_text())
    cfg["cache"]["fingerprint"] = "0000"
    (out / "config.json").write_text(json.dumps(cfg))
    res = runner.invoke(app, ["evaluate", str(out), str(cache_dir), "--split", "test"])
    assert res.exit_code != 0 and "fingerprint" in str(res.exception)


def test_accumulation_weights_reproduce_micro_batch_accumulation():
    from heads.train import accumulation_weights

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1)
    x, y = torch.randn(10, 3), torch.rand(10)
    # reference: micro-batches of 4, 4, 2, each mean loss divided by the 3 micro-batches, accumulated
    for xb, yb in ((x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])):
        ((lin(xb).squeeze(-1) - yb).pow(2).mean() / 3).backward()
    ref = [p.grad.clone() for p in lin.parameters()]
    lin.zero_grad()
    w = accumulation_weights(10, 4)
    torch.testing.assert_close(w, torch.tensor([1 / 12] * 8 + [1 / 6] * 2))
    ((lin(x).squeeze(-1) - y).pow(2) * w).sum().backward()
    for a, b in zip(ref, (p.grad for p in lin.parameters())):
        torch.testing.assert_close(a, b)


def test_run_config_records_the_ffn_width_and_parameter_counts(conflict_data, tmp_path):
    train, val = conflict_data
    mc = ModelConfig(**{**tiny_model(train).to_dict(), "ffn_hidden": 24})
    r = train_heads(train, val, mc, tiny_train(epochs=1), tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model"]["ffn_hidden"] == 24 and r.model.ffn[1].out_features == 24
    assert cfg["parameters"] == {"heads": sum(p.numel() for p in r.model.parameters()), "encoder_blocks": 0}


def test_pos_weight_readings_with_bah_label_counts():
    """BAH: train 393 negative / 385 positive, val 49 / 75. The leak-free default is 1.021; the paper's ~0.96
    is n_neg/n_pos over train + val (442/460)."""
    from heads.config import TrainConfig
    from heads.train import pos_weight_for

    train = torch.tensor([0.0] * 393 + [1.0] * 385)
    val = torch.tensor([0.0] * 49 + [1.0] * 75)
    assert pos_weight_for("train", train, val) == pytest.approx(393 / 385)
    assert round(pos_weight_for("train+val", train, val), 3) == 0.961
    assert pos_weight_for("1.5", train, val) == 1.5
    with pytest.raises(ConfigError, match="pos_weight"):
        TrainConfig(pos_weight="val")
