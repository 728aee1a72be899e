"""`ahcli predict`: a cached video scored from its raw files agrees with `evaluate`-style inference on the
cache; without face crops the full frames are used and the output says so; foreign specs are refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ahflows.predict import PredictError, derive_video_id, predict_recording


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def case(report_run_case):
    return report_run_case


@pytest.fixture(scope="session")
def encoders(case):
    from extract.encoders import load_encoders
    from extract.spec import load_spec

    return load_encoders(load_spec(case.spec), device="cpu")


def _files(case, vid: str) -> dict[str, Path]:
    name = vid.rsplit("/", 1)[1]
    return {"mp4": case.data / vid, "faces": case.data / "cropped-aligned-faces" / vid,
            "yml": case.data / "transcription" / vid / f"{name[:-4]}.yml"}


def _cached_probs(case, run_dir: Path, split: str) -> dict[str, float]:
    from extract.store import CacheReader
    from heads.runs import load_run
    from heads.data import load_split
    from heads.infer import data_needs
    from heads.infer import predict_split

    reader = CacheReader(case.cache)
    run = load_run(run_dir, cache=reader)
    needs = data_needs([run])
    data = load_split(reader, split, layers=needs.layers, device="cpu", modalities=needs.modalities)
    ids, probs, _ = predict_split(run, data, windows=5)
    return dict(zip(ids, probs))


@pytest.mark.parametrize("which", ["run_b", "run_a"])
def test_predict_on_a_cached_video_agrees_with_evaluate(case, encoders, which):
    from extract.store import CacheReader

    reader = CacheReader(case.cache)
    run = getattr(case, which)
    vid = reader.video_ids("test")[0]
    f = _files(case, vid)
    res = predict_recording([run], f["mp4"], case.spec, faces=f["faces"], transcript=f["yml"], encoders=encoders)
    assert res.video_id == vid
    assert res.window_starts == reader.meta(vid)["window_starts"][:5]          # the cache's own windows
    assert res.frames_source == "faces" and not res.notes
    assert res.probability == pytest.approx(_cached_probs(case, run, "test")[vid], abs=1e-4)
    assert res.prediction == int(res.probability >= res.threshold)


def test_predict_full_frames_and_plain_text(case, encoders):
    from extract.store import CacheReader

    vid = CacheReader(case.cache).video_ids("val")[0]
    f = _files(case, vid)
    res = predict_recording([case.run_b], f["mp4"], case.spec, text="I am happy, maybe.", encoders=encoders)
    assert res.frames_source == "full frames"
    assert any("full mp4 frames" in n for n in res.notes)
    assert 0.0 <= res.probability <= 1.0
    assert res.window_starts == CacheReader(case.cache).meta(vid)["window_starts"][:5]


def test_predict_with_an_ensemble_folder_uses_its_threshold(case, encoders):
    from extract.store import CacheReader

    vid = CacheReader(case.cache).video_ids("test")[1]
    f = _files(case, vid)
    res = predict_recording([case.ensemble], f["mp4"], case.spec, faces=f["faces"], transcript=f["yml"],
                            encoders=encoders)
    ens = json.loads((case.ensemble / "metrics.json").read_text())
    assert res.threshold == ens["threshold"] and len(res.runs) == 2
    assert res.probability == pytest.approx(sum(r.probability for r in res.runs) / 2)
    csv_p = next(float(line.split(",")[2]) for line in (case.ensemble / "predictions.csv").read_text().splitlines()
                 if line.startswith(vid + ","))
    assert res.probability == pytest.approx(csv_p, abs=2e-4)               # the csv holds 4 decimals


def test_predict_refuses_another_spec(case, tmp_path, encoders):
    text = case.spec.read_text(encoding="utf-8")
    for m in ("video", "audio", "text"):
        text = text.replace(f"model: ./{m}", f"model: {case.spec.parent / m}")
    assert "\nseed: 0" in text
    other = tmp_path / "spec.yaml"
    other.write_text(text.replace("\nseed: 0", "\nseed: 1", 1), encoding="utf-8")
    from extract.store import CacheReader

    vid = CacheReader(case.cache).video_ids("test")[0]
    with pytest.raises(PredictError, match="trained on cache fingerprint"):
        predict_recording([case.run_b], _files(case, vid)["mp4"], other, text="hello")


def test_predict_bad_inputs(case, tmp_path):
    with pytest.raises(PredictError, match="video file not found"):
        predict_recording([case.run_b], tmp_path / "none.mp4", case.spec)
    assert derive_video_id(Path("/x/data/Videos/123/Visite_1/a b.mp4")) == "Videos/123/Visite_1/a b.mp4"
    assert derive_video_id(Path("/x/clip.mp4")) == "clip.mp4"


def test_cli_predict_json(case):
    from ahcli.app import app
    from extract.store import CacheReader

    vid = CacheReader(case.cache).video_ids("test")[0]
    f = _files(case, vid)
    res = CliRunner().invoke(app, ["predict", str(case.run_b), "--video", str(f["mp4"]), "--faces", str(f["faces"]),
                                   "--transcript", str(f["yml"]), "--spec", str(case.spec), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["video_id"] == vid
    assert d["probability"] == pytest.approx(_cached_probs(case, case.run_b, "test")[vid], abs=1e-4)
