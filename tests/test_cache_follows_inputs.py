"""The cache follows its inputs: a label corrected in a split file reaches the cache on the next `extract`
(metadata only, no re-encoding); a video listed in two places is an error for that video."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import BACKENDS, extract_args
from extract.bah import read_bah
from extract.inputs import changed_inputs
from extract.store import CacheReader


def _tree_copy(synth_tree, tmp_path):
    shutil.copytree(synth_tree[0] / "data", tmp_path / "data")
    return tmp_path / "data"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_corrected_label_updates_the_cache(backend, synth_tree, tiny_specs, ref_caches, ahcli_fork, tmp_path):
    data = _tree_copy(synth_tree, tmp_path)
    cache = tmp_path / "cache"
    shutil.copytree(ref_caches[backend], cache)
    split_file = data / "split" / "train.txt"
    lines = split_file.read_text().splitlines()
    vid, label, text = lines[0].split(",", 2)
    lines[0] = f"{vid},{1 - int(label)},{text}"
    split_file.write_text("\n".join(lines) + "\n")
    before = CacheReader(cache)
    digest, arrays = before.digest(), before.record(vid).arrays

    res = ahcli_fork.run(*extract_args(data, cache, tiny_specs[backend]))
    assert res.rc == 0, res.err
    after = CacheReader(cache)
    assert after.meta(vid)["label"] == 1 - int(label) and after.sealed
    assert not after.verify()                                            # index.json agrees with the unit
    assert all((after.record(vid).arrays[k] == a).all() for k, a in arrays.items())   # not re-encoded
    assert after.digest() != digest                                      # the label is part of the content
    assert any(e["video_id"] == vid and e["label"] == 1 - int(label) for e in after._index()["videos"])


def test_a_video_listed_in_two_splits_is_an_error_for_that_video(synth_tree, tmp_path):
    data = _tree_copy(synth_tree, tmp_path)
    first = (data / "split" / "train.txt").read_text().splitlines()[0]
    vid = first.split(",", 1)[0]
    with open(data / "split" / "test.txt", "a") as fh:
        fh.write(f"{vid},1,another label\n")
    ds = read_bah(data)
    assert vid not in {v.video_id for v in ds.videos}
    assert any(p.video_id == vid and p.fatal and "listed again" in p.problem for p in ds.problems)


def test_edited_media_or_transcript_is_reported_and_extracted_again(synth_tree, tiny_specs, ref_caches, ahcli_fork,
                                                                    tmp_path):
    data = _tree_copy(synth_tree, tmp_path)
    cache = tmp_path / "cache"
    shutil.copytree(ref_caches["zarr"], cache)
    split_file = data / "split" / "train.txt"
    lines = split_file.read_text().splitlines()
    text_vid, label, text = lines[0].split(",", 2)
    lines[0] = f"{text_vid},{label},{text} and then I changed my mind"
    split_file.write_text("\n".join(lines) + "\n")
    media_vid = lines[1].split(",", 1)[0]
    crop = sorted(v.face_frames for v in read_bah(data).videos if v.video_id == media_vid)[0][0]
    crop.write_bytes(crop.read_bytes() + b"\0")          # a re-cropped face: another size and time
    before = CacheReader(cache)
    others = [v for v in before.video_ids("train") if v not in (text_vid, media_vid)][:3]
    old = {v: before.record(v).arrays for v in [text_vid, *others]}

    res = ahcli_fork.run("cache", "verify", cache, "--data", data, "--json")
    assert res.rc == 1, res.err
    flagged = {p["video_id"]: p["problem"] for p in json.loads(res.out)["problems"]}
    assert set(flagged) == {text_vid, media_vid}
    assert "transcript" in flagged[text_vid] and "media" in flagged[media_vid]

    res = ahcli_fork.run(*extract_args(data, cache, tiny_specs["zarr"]), "--json")
    assert res.rc == 0, res.err
    summary = json.loads(res.out)
    assert summary["extracted"] == 2, summary
    after = CacheReader(cache)
    assert not (after.record(text_vid).arrays["text/last"].shape == old[text_vid]["text/last"].shape
                and (after.record(text_vid).arrays["text/last"] == old[text_vid]["text/last"]).all())
    assert all((after.record(v).arrays[k] == a).all() for v in others for k, a in old[v].items())
    assert ahcli_fork.run("cache", "verify", cache, "--data", data).rc == 0


def test_units_without_a_recorded_signature_are_not_extracted_again():
    assert changed_inputs(None, {"text": "a", "media": "b"}) == []
    assert changed_inputs({"text": "a", "media": "b"}, {"text": "a", "media": "c"}) == ["media"]
