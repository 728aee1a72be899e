"""Stage 1 can never be silently wrong about its encoders: incomplete weights, preprocessing that disagrees
with the model's own processor, code in a model folder and an unreachable hub are refused in one line; the
fingerprint depends on what the weights are, not where they lie."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import extract_args
from extract import loading
from extract.encoders import load_encoders
from extract.loading import EncoderError, load_backbone, resolve_spec
from extract.spec import load_spec


@pytest.fixture(scope="module")
def spec(tiny_specs):
    return load_spec(tiny_specs["zarr"])


@pytest.fixture()
def tiny_copy(tiny_specs, tmp_path) -> Path:
    """A private copy of the tiny encoders (folder + spec with relative paths) that a test may damage."""
    src = tiny_specs["zarr"].parent
    for m in ("video", "audio", "text"):
        shutil.copytree(src / m, tmp_path / "enc" / m)
    shutil.copy(tiny_specs["zarr"], tmp_path / "enc" / "cache_spec.yaml")
    return tmp_path / "enc" / "cache_spec.yaml"


def _drop_block(folder: Path, block: str) -> None:
    weights = folder / "model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if block not in k}
    save_file(tensors, weights, metadata={"format": "pt"})


def _custom_code(folder: Path, marker: Path) -> Path:
    """Make a model folder's config map to a Python file that, if ever run, writes `marker`."""
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    return marker


# ---- weights ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality,block", [("video", "encoder.layer.3."), ("audio", "encoder.layers.3."),
                                            ("text", "encoder.layer.0.attention")])
def test_a_missing_block_is_refused_naming_modality_and_key(tiny_copy, modality, block):
    _drop_block(tiny_copy.parent / modality, block)
    with pytest.raises(EncoderError) as err:
        load_backbone(load_spec(tiny_copy), modality)
    msg = str(err.value)
    assert "\n" not in msg and f"{modality} encoder" in msg and block in msg and "missing" in msg


def test_extract_with_a_damaged_encoder_exits_non_zero_and_writes_nothing(tiny_copy, synth_tree, ahcli_fork,
                                                                         tmp_path):
    _drop_block(tiny_copy.parent / "video", "encoder.layer.3.output")
    cache = tmp_path / "cache"
    res = ahcli_fork.run(*extract_args(synth_tree[0] / "data", cache, tiny_copy))
    assert res.rc != 0
    assert len(res.err_lines) == 1 and "video encoder" in res.err and "encoder.layer.3.output" in res.err
    assert not (cache / "videos").exists() or not any((cache / "videos").iterdir())


def test_unused_checkpoint_weights_are_allowed_by_name_and_recorded(tiny_copy):
    folder = tiny_copy.parent / "text"
    tensors = load_file(folder / "model.safetensors")
    tensors["classifier.dense.weight"] = tensors["embeddings.word_embeddings.weight"][:4].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert load_backbone(load_spec(tiny_copy), "text").unused_weights == ["classifier.dense.weight"]
    tensors["head.other.weight"] = tensors["classifier.dense.weight"].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EncoderError, match="not use, e.g. head.other.weight"):
        load_backbone(load_spec(tiny_copy), "text")


def test_a_model_folder_with_custom_code_is_refused_and_runs_nothing(tiny_copy, tmp_path):
    marker = _custom_code(tiny_copy.parent / "audio", tmp_path / "code-ran")
    with pytest.raises(EncoderError, match="custom code"):
        load_encoders(load_spec(tiny_copy))
    assert not marker.exists()


# ---- preprocessing ------------------------------------------------------------------------------------------


def test_video_preprocessing_comes_from_the_models_processor(spec):
    resolved = resolve_spec(spec)
    assert (resolved.video.size, resolved.video.mean, resolved.video.std) == (32, (0.485, 0.456, 0.406),
                                                                           (0.229, 0.224, 0.225))
    pre = resolved.preprocessing
    assert pre["video"]["source"] == "processor" and pre["audio"] == {"sampling_rate": 16000, "do_normalize": True}
    assert pre["text"]["model_max_length"] == 512
    no_norm = dataclasses.replace(resolved, preprocessing={**pre, "audio": {**pre["audio"], "do_normalize": False}})
    assert no_norm.fingerprint() != resolved.fingerprint()          # the recorded preprocessing counts


def test_a_spec_mean_that_disagrees_with_the_processor_is_refused_unless_overridden(spec):
    bad = dataclasses.replace(spec, video=dataclasses.replace(spec.video, mean=(0.5, 0.5, 0.5)))
    with pytest.raises(EncoderError) as err:
        resolve_spec(bad)
    msg = str(err.value)
    assert "[0.5, 0.5, 0.5]" in msg and "[0.485, 0.456, 0.406]" in msg and "override_processor" in msg
    forced = dataclasses.replace(bad, video=dataclasses.replace(bad.video, override_processor=True))
    assert resolve_spec(forced).video.mean == (0.5, 0.5, 0.5)


def test_an_audio_rate_the_feature_extractor_does_not_use_is_refused(spec):
    bad = dataclasses.replace(spec, audio=dataclasses.replace(spec.audio, sample_rate=8000))
    with pytest.raises(EncoderError, match="8000 differs from the feature extractor's 16000"):
        resolve_spec(bad)


# ---- hub ids -------------------------------------------------------------------------------------------------


def test_an_unreachable_hub_fails_at_once_with_what_to_do(spec, monkeypatch):
    monkeypatch.setattr(loading, "_reachable", lambda url: False)
    hub = dataclasses.replace(spec, text=dataclasses.replace(spec.text, model="nobody/not-cached", revision="v1"))
    with pytest.raises(EncoderError) as err:
        load_encoders(hub)
    msg = str(err.value)
    assert "\n" not in msg and "cannot be reached" in msg
    assert "hf download nobody/not-cached --revision v1 --local-dir DIR" in msg and "text.model: DIR" in msg


# ---- a portable fingerprint ----------------------------------------------------------------------------------


def test_moving_the_encoder_folders_keeps_the_fingerprint(report_run_case, tmp_path):
    from ahflows.predict import predict_recording
    from extract.run import ExtractOptions, extract
    from extract.store import CacheReader
    from report_case import one_thread

    case = report_run_case
    moved = tmp_path / "elsewhere" / "encoders"
    shutil.copytree(Path(case.spec).parent, moved)
    spec = moved / Path(case.spec).name
    reader = CacheReader(case.cache)
    digest = reader.digest()
    with one_thread():
        enc = load_encoders(load_spec(spec))
        assert enc.spec.video.model == str(moved / "video")
        assert enc.spec.fingerprint() == reader.fingerprint
        # a run trained before the move still scores a recording with the moved encoders
        vid = reader.video_ids("test")[0]
        res = predict_recording([case.run_b], case.data / vid, spec, text="maybe", encoders=enc)
        assert 0.0 <= res.probability <= 1.0 and res.fingerprint == reader.fingerprint
        # and extraction with the moved spec finds the cache complete: nothing re-extracted, same digest
        summary = extract(case.data, case.cache, spec, ExtractOptions(device="cpu", workers=0, progress=False))
    assert summary.extracted == 0 and not summary.failed
    assert CacheReader(case.cache).digest() == digest


def test_yes_piped_into_extract_runs_no_code_from_a_model_folder(tiny_copy, synth_tree, tmp_path):
    import subprocess
    import sys

    from conftest import REPO, cli_env

    marker = _custom_code(tiny_copy.parent / "video", tmp_path / "code-ran")
    argv = extract_args(synth_tree[0] / "data", tmp_path / "cache", tiny_copy)
    p = subprocess.run([sys.executable, "-m", "ahcli", *argv], input="y\n" * 50, capture_output=True, text=True,
                       timeout=300, env=cli_env(), cwd=REPO)
    assert p.returncode != 0 and "custom code" in p.stderr
    assert not marker.exists()
