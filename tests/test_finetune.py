"""Checkpoint A: the end-to-end fine-tuning path, the cached top-block fast path, and both kinds of run folder
in evaluate / ensemble. Tiny encoders on a 12-video synthetic tree, a float32 cache so the two paths can be
compared at fp32 precision; short audio segments and text segments so the segment-restricted attention is
exercised."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from extract.errors import AHError

N_TOP = 2
SMALL = ["--dim", "16", "--head-hidden", "16", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Deterministic and fast on a shared 2-core machine; restored for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    """A synthetic tree, tiny encoders with a float32 [last, prefix] spec, its cache, and the same cache
    without the prefix states (another spec: layers [last] only)."""
    from extract.tiny_encoders import write_tiny_encoders
    from extract.run import ExtractOptions, extract
    from extract.synth import write_synthetic_bah

    root = tmp_path_factory.mktemp("finetune")
    write_synthetic_bah(root / "synth", 12, 5)
    tiny = write_tiny_encoders(root / "enc", seed=0)
    d = yaml.safe_load(tiny.read_text())
    d.update(dtype="float32", windows={"frames": 16, "train": 2, "eval": 2})
    d["audio"]["segment_seconds"] = 0.5        # ~1-2 s recordings: several audio segments
    d["text"]["max_tokens"] = 24               # several text segments per transcript
    spec = root / "enc" / "spec32.yaml"
    spec.write_text(yaml.safe_dump(d))
    data = root / "synth" / "data"
    cache = root / "cache"
    extract(data, cache, spec, ExtractOptions(workers=0, progress=False, splits=("train", "val", "test")))
    return {"root": root, "data": data, "spec": spec, "cache": cache, "bare": _without_prefix(cache, root / "bare")}


def _without_prefix(src: Path, dst: Path) -> Path:
    from extract.spec import spec_from_dict
    from extract.cache_writer import CacheWriter
    from extract.store import CacheReader

    reader = CacheReader(src)
    spec = dataclasses.replace(spec_from_dict(dict(reader.spec)), layers=("last",))
    writer = CacheWriter(dst, spec, {"test": True})
    for vid in reader.video_ids():
        rec = reader.record(vid)
        rec.arrays = {k: a for k, a in rec.arrays.items() if "prefix" not in k and not k.endswith("_segments")}
        writer.write(rec)
    writer.seal()
    return dst


def _perturb(tops: torch.nn.ModuleDict, seed: int = 0) -> None:
    """Weights unlike the encoder's own: what training would leave."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tops.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _core(lower, modalities: str, seed: int = 0):
    from heads.config import ModelConfig
    from heads.model import build_model
    from heads.topblocks import TopBlocksHeads

    heads = build_model(ModelConfig(input_dims=lower.dims, modalities=modalities, dim=16, head_hidden=16), seed=seed)
    return TopBlocksHeads(lower.tops, heads).eval()


# ---- the two paths agree -------------------------------------------------------------------------------


def test_cached_path_logits_equal_end_to_end_for_each_encoder(world):
    """Same weights, eval mode: the cached prefix states through the top blocks give the logits the encoders
    give on the raw media, for video, audio and text alone and all three together (windows included)."""
    from extract.bah import read_bah
    from extract.spec import load_spec
    from extract.store import CacheReader
    from heads.data import load_split
    from ahflows.raw_media import LowerEncoders, raw_window_logits
    from heads.infer import window_logits

    spec = load_spec(world["spec"])
    reader = CacheReader(world["cache"])
    videos = {v.video_id: v for v in read_bah(world["data"]).videos}
    for k, mods in enumerate(("v", "a", "t", "vat")):
        lower = LowerEncoders(spec, [m for m in ("video", "audio", "text") if m[0] in mods], N_TOP)
        _perturb(lower.tops, seed=k)
        core = _core(lower, mods, seed=k)
        data = load_split(reader, "val", layers=("prefix",), device="cpu", modalities=core.cfg.present,
                          text_window=False)
        if "a" in mods:
            assert int(data.audio["prefix"].parts.max()) > 0      # several audio segments: exactness matters
        if "t" in mods:
            assert int(data.text["prefix"].parts.max()) > 0
        cached = window_logits(core, data, windows=None, modalities=core.cfg.present, layer="prefix")
        starts = [data.starts[i, : int(data.n_windows[i])].tolist() for i in range(len(data))]
        raw = raw_window_logits(core, lower, [videos[v] for v in data.video_ids], starts, cached.valid)
        torch.testing.assert_close(cached.full, raw.full, atol=2e-5, rtol=1e-4)
        if "t" in mods:
            torch.testing.assert_close(cached.text, raw.text, atol=2e-5, rtol=1e-4)
        assert cached.full.std() > 0


def test_lower_blocks_plus_top_blocks_equal_the_whole_fine_tuned_encoder(world):
    """The end-to-end path (frozen lower blocks, then the trained top blocks) is the HF encoder whose top
    blocks hold the trained weights: its last_hidden_state, long audio and text in segments included."""
    from extract.bah import read_bah
    from extract.encoders import audio_forward, text_forward, video_forward
    from extract.loading import load_backbone
    from extract.spec import load_spec
    from ahflows.raw_media import LowerEncoders, decode

    spec = load_spec(world["spec"])
    lower = LowerEncoders(spec, ("video", "audio", "text"), N_TOP)
    spec = lower.spec                  # resolved: the video size and normalisation from the model's processor
    _perturb(lower.tops, seed=7)
    core = _core(lower, "vat")
    video = next(v for v in read_bah(world["data"]).videos if v.split == "val")
    item = decode(video, [3, 0], spec, ("video", "audio", "text"), False, 0)
    prefix = lower.prefix([item])
    for m in ("video", "audio", "text"):
        full = load_backbone(spec, m)
        blocks = full.encoder.layer if hasattr(full.encoder, "layer") else full.encoder.layers
        for dst, src in zip(blocks[-N_TOP:], core.tops[m].blocks):
            dst.load_state_dict(src.state_dict())
        if core.tops[m].final is not None:
            full.layernorm.load_state_dict(core.tops[m].final.state_dict())
        with torch.no_grad():
            if m == "video":
                want = video_forward(full, spec, item.clips, ("last",), "cpu")["last"]
            elif m == "audio":
                want = audio_forward(full, lower.extractor, spec, item.wave, ("last",), "cpu")["last"]
            else:
                want = text_forward(full, lower.tokenizer, spec, item.text, ("last",), "cpu")["last"]
            got = core.last(m, prefix[m])
        torch.testing.assert_close(got.values.reshape(want.shape), want, atol=2e-5, rtol=1e-4)


# ---- training changes the right weights ----------------------------------------------------------------


def test_end_to_end_training_changes_the_unfrozen_blocks_and_nothing_below(world):
    from ahflows.finetune import prepare_finetune
    from heads.config import TrainConfig
    from heads.train import fit, param_groups

    cfg = TrainConfig(epochs=1, patience=1, lr=1e-3, lr_min=1e-5, weight_decay=0.0, batch_size=2, accum=1,
                      unfreeze_top=N_TOP, device="cpu")
    ft = prepare_finetune(world["data"], world["spec"], {"modalities": "vat", "dim": 16, "head_hidden": 16}, cfg,
                          workers=0)
    core = ft.learner.model
    groups = param_groups(core, cfg)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]        # encoder blocks at lr / 10
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in core.tops.parameters()}
    lower_before = {m: {k: v.clone() for k, v in model.state_dict().items()} for m, model in ft.lower.models.items()}
    tops_before = {k: v.clone() for k, v in core.tops.state_dict().items()}
    heads_before = {k: v.clone() for k, v in core.head_model.state_dict().items()}
    assert not any(p.requires_grad for model in ft.lower.models.values() for p in model.parameters())

    fit(ft.learner, ft.model_cfg, cfg, None, cache=ft.cache, encoders=ft.encoders)

    tops_after = core.tops.state_dict()
    changed = [k for k in tops_before if not torch.equal(tops_before[k], tops_after[k])]
    weights = [k for k in tops_before if k.endswith("weight")]
    assert set(weights) <= set(changed), sorted(set(weights) - set(changed))[:5]   # no weight decay: gradients
    for m in ("video", "audio", "text"):
        assert any(k.startswith(f"{m}.") for k in changed)
    assert any(not torch.equal(heads_before[k], v) for k, v in core.head_model.state_dict().items())
    for m, model in ft.lower.models.items():
        after = model.state_dict()
        assert all(torch.equal(lower_before[m][k], after[k]) for k in after), m


# ---- the commands ---------------------------------------------------------------------------------------


def _invoke(*args):
    from ahcli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(res, *words: str) -> None:
    assert res.exit_code != 0 and isinstance(res.exception, AHError), res.output
    msg = str(res.exception)
    assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """A finetune run (2 epochs, end to end on the CPU), a train-heads run and a cached top-2 run."""
    out = tmp_path_factory.mktemp("runs")
    a, b, c = out / "A", out / "B", out / "C"
    res = _invoke("finetune", world["data"], a, "--spec", world["spec"], "--epochs", 2, "--workers", 0,
                  "--batch-size", 2, "--accum", 1, "--lr", "1e-3", "--json", *SMALL)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["epochs_run"] == 2
    res = _invoke("train-heads", world["cache"], b, "--epochs", 2, "--lr", "1e-3", "--label-smoothing", 0.1, *SMALL)
    assert res.exit_code == 0, res.output
    res = _invoke("train-heads", world["cache"], c, "--epochs", 2, "--lr", "1e-3", "--batch-size", 2, "--accum", 1,
                  "--unfreeze-top", N_TOP, *SMALL)
    assert res.exit_code == 0, res.output
    return {"A": a, "B": b, "C": c}


def test_finetune_writes_a_run_folder_with_the_encoder_blocks(runs, world):
    from extract.store import CacheReader
    from heads.runs import load_run
    from heads.topblocks import TOPS_FILE, TopBlocksHeads

    a = runs["A"]
    assert sorted(p.name for p in a.iterdir()) == sorted(
        ["config.json", "history.csv", "metrics.json", "model.safetensors", TOPS_FILE, "train.log"])
    assert len((a / "history.csv").read_text().strip().splitlines()) == 3
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["train"]["unfreeze_top"] == N_TOP and cfg["encoders"]["source"] == "raw"
    assert cfg["cache"]["fingerprint"] == CacheReader(world["cache"]).fingerprint   # same spec file, same fingerprint
    run = load_run(a)
    assert isinstance(run.model, TopBlocksHeads) and set(run.tops) == {"video", "audio", "text"}


def test_cached_top_blocks_run_trains_its_blocks(runs, world):
    from extract.spec import load_spec
    from heads.runs import load_run
    from ahflows.checkpoint_a import initial_tops

    run = load_run(runs["C"])
    start, _ = initial_tops(load_spec(world["spec"]), ("video", "audio", "text"), N_TOP)
    for m in ("video", "audio", "text"):
        before, after = start[m].state_dict(), run.tops[m].state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), m
    assert json.loads((runs["C"] / "config.json").read_text())["encoders"]["source"] == "cache"


def test_train_heads_unfreeze_refuses_a_cache_without_prefix(world, tmp_path):
    _one_line_error(_invoke("train-heads", world["bare"], tmp_path / "x", "--unfreeze-top", N_TOP, *SMALL),
                    "prefix", str(world["bare"]))


def test_evaluate_both_kinds_and_the_raw_media_fallback(runs, world, tmp_path):
    from extract.store import CacheReader
    from heads.runs import load_run
    from ahflows.raw_media import load_run_with_media
    from heads.data import load_split
    from heads.infer import layers_needed, predict_split

    for name in ("A", "B", "C"):
        res = _invoke("evaluate", runs[name], world["cache"], "--split", "test", "--json", "--device", "cpu")
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout.strip().splitlines()[-1])["videos"] == 4

    # The fine-tuned run over a cache without prefix states (a run made with that cache's spec: same
    # fingerprint): one line without --data; with --data its encoders run on the raw media.
    bare = CacheReader(world["bare"])
    a2 = tmp_path / "A2"
    shutil.copytree(runs["A"], a2)
    cfg = json.loads((a2 / "config.json").read_text())
    cfg["cache"]["fingerprint"] = bare.fingerprint
    (a2 / "config.json").write_text(json.dumps(cfg))
    _one_line_error(_invoke("evaluate", a2, world["bare"], "--split", "test"), "prefix", "--data")
    res = _invoke("evaluate", a2, world["bare"], "--split", "test", "--json", "--data", world["data"],
                  "--workers", 0, "--device", "cpu")
    assert res.exit_code == 0, res.output

    cached_run = load_run(runs["A"], cache=CacheReader(world["cache"]))
    assert layers_needed(cached_run) == ("prefix",)
    raw_run = load_run_with_media(a2, cache=bare, data_root=world["data"])
    assert layers_needed(raw_run) == ()
    assert layers_needed(load_run(runs["B"])) == ("last",)
    _, p_cached, y = predict_split(cached_run, load_split(CacheReader(world["cache"]), "test",
                                                          layers=layers_needed(cached_run), device="cpu"))
    _, p_raw, y2 = predict_split(raw_run, load_split(bare, "test", layers=(), device="cpu"))
    np.testing.assert_allclose(p_raw, p_cached, atol=1e-5)
    np.testing.assert_array_equal(y, y2)


def test_ensemble_combines_a_finetuned_and_a_frozen_run(runs, world, tmp_path):
    from heads.runs import load_run
    from heads.data import load_split
    from heads.infer import layers_needed, predict_split

    try:
        from ahflows.ensemble import run_ensemble
    except ImportError:  # the ensemble module is optional here: the same numbers through predict_split
        run_ensemble = None
    if run_ensemble is not None:
        rec = run_ensemble([runs["A"], runs["B"]], world["cache"], tmp_path / "ens", 2, device="cpu")
        assert (tmp_path / "ens" / "metrics.json").is_file() and rec["test"] is not None
        assert [r["path"] for r in rec["runs"]] == [str(runs["A"]), str(runs["B"])]
    from extract.store import CacheReader

    reader = CacheReader(world["cache"])
    loaded = [load_run(runs[k], cache=reader) for k in ("A", "B")]
    layers = tuple(dict.fromkeys(x for r in loaded for x in layers_needed(r)))
    data = load_split(reader, "test", layers=layers, device="cpu")
    probs = [predict_split(r, data, windows=2)[1] for r in loaded]
    assert all(np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all() for p in probs)
    assert not np.allclose(probs[0], probs[1])
    if run_ensemble is not None:
        rows = (tmp_path / "ens" / "predictions.csv").read_text().splitlines()[1:]
        got = {r.split(",")[0]: float(r.split(",")[2]) for r in rows if r.split(",")[1] == "test"}
        want = dict(zip(data.video_ids, np.mean(probs, axis=0)))
        assert set(got) == set(want) and all(abs(got[v] - want[v]) <= 5e-5 for v in got)


def test_bad_requests_get_one_line(world, tmp_path):
    from extract.store import CacheReader
    from heads.data import DataError, load_split

    _one_line_error(_invoke("finetune", world["data"], tmp_path / "z", "--spec", world["spec"], "--unfreeze-top", 0,
                            *SMALL), "--unfreeze-top")
    with pytest.raises(DataError, match="no 'prefix' layer.*--data"):
        load_split(CacheReader(world["bare"]), "val", layers=("prefix",), device="cpu")


@pytest.mark.slow
def test_finetune_resume_reaches_the_uninterrupted_numbers(world, tmp_path):
    args = ["--spec", world["spec"], "--epochs", 2, "--workers", 0, "--batch-size", 2, "--accum", 1, "--lr", "1e-3",
            *SMALL]
    assert _invoke("finetune", world["data"], tmp_path / "full", *args).exit_code == 0
    res = _invoke("finetune", world["data"], tmp_path / "part", *args, "--stop-after", 1)
    assert res.exit_code == 0 and not (tmp_path / "part" / "metrics.json").exists()
    assert _invoke("finetune", world["data"], tmp_path / "part", *args, "--resume").exit_code == 0
    for name in ("history.csv", "model.safetensors", "encoder_top.safetensors"):
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
