"""Stage 2 trusts nothing it reads: a NaN in a cached array, or bytes that no longer match their checksum,
stop train-heads, evaluate and ensemble with one line naming the video and the repair command."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from extract.record import array_checksum, declared_checksum
from extract.store import CacheReader
from heads.data import DataError, load_split


@pytest.fixture()
def cache_copy(report_run_case, tmp_path) -> Path:
    shutil.copytree(report_run_case.cache, tmp_path / "cache")
    return tmp_path / "cache"


def _unit(cache: Path, video_id: str) -> Path:
    return CacheReader(cache)._attrs(video_id)["_path"]


def _plant_nan(cache: Path, video_id: str, key: str = "video/last", fix_checksum: bool = True) -> None:
    """A NaN in one array of one video; its stored checksum recomputed so only the NaN check can see it."""
    import zarr
    from zarr.storage import LocalStore

    unit = _unit(cache, video_id)
    arr = zarr.open_group(store=LocalStore(unit), mode="r+", zarr_format=3)[key]
    values = np.asarray(arr[...])
    values.flat[0] = np.nan
    arr[...] = values
    if fix_checksum:
        doc = json.loads((unit / "zarr.json").read_text())
        attrs = doc["attributes"][next(iter(doc["attributes"]))]
        decl = attrs["arrays"][key]
        algorithm = declared_checksum(decl)[0]                 # crc32c (sha256 in older units)
        decl[algorithm] = array_checksum(values, algorithm)
        (unit / "zarr.json").write_text(json.dumps(doc))


def test_a_nan_in_one_train_video_stops_the_load_naming_it(cache_copy):
    vid = CacheReader(cache_copy).video_ids("train")[1]
    _plant_nan(cache_copy, vid)
    with pytest.raises(DataError) as err:
        load_split(CacheReader(cache_copy), "train", device="cpu")
    msg = str(err.value)
    assert vid in msg and "NaN" in msg and "--repair" in msg and "\n" not in msg


def test_bytes_that_do_not_match_their_checksum_stop_the_load_unless_not_verified(cache_copy):
    vid = CacheReader(cache_copy).video_ids("train")[0]
    _plant_nan(cache_copy, vid, key="audio/last", fix_checksum=False)
    with pytest.raises(DataError, match="checksum mismatch"):
        load_split(CacheReader(cache_copy), "train", device="cpu")
    with pytest.raises(DataError, match="NaN"):                       # the NaN check is never skipped
        load_split(CacheReader(cache_copy), "train", device="cpu", verify=False)


def test_train_heads_evaluate_and_ensemble_refuse_a_nan_video(report_run_case, cache_copy, ahcli_fork, tmp_path):
    reader = CacheReader(cache_copy)
    train_vid, test_vid = reader.video_ids("train")[2], reader.video_ids("test")[0]

    def refused(argv, vid) -> None:
        res = ahcli_fork.run(*argv)
        errors = [line for line in res.err_lines if line.startswith("error:")]
        assert res.rc != 0 and len(errors) == 1 and vid in errors[0] and "NaN" in errors[0], (argv[0], res.err)

    _plant_nan(cache_copy, test_vid, key="text/last")
    refused(("evaluate", report_run_case.run_b, cache_copy, "--split", "test"), test_vid)
    refused(("ensemble", report_run_case.run_b, "--cache", cache_copy, "--out", tmp_path / "ens"), test_vid)
    _plant_nan(cache_copy, train_vid)
    refused(("train-heads", cache_copy, tmp_path / "run", "--epochs", "1", "--dim", "16", "--head-hidden", "16"),
            train_vid)


def _manifest_edit(cache: Path, **changes) -> None:
    path = cache / "manifest.json"
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("damage,words", [
    ("unsealed", "not sealed"),
    ("fingerprint", "does not match its own spec"),
    ("removed", "missing or unreadable on disk"),
    ("truncated", "missing or unreadable on disk"),
])
def test_a_cache_that_is_not_whole_is_refused_before_loading(cache_copy, damage, words):
    reader = CacheReader(cache_copy)
    vid = reader.video_ids("train")[0]
    if damage == "unsealed":
        _manifest_edit(cache_copy, sealed=False)
    elif damage == "fingerprint":
        _manifest_edit(cache_copy, fingerprint="0123456789abcdef")
    elif damage == "removed":
        shutil.rmtree(_unit(cache_copy, vid))
    else:
        (_unit(cache_copy, vid) / "zarr.json").write_text('{"attributes": ')
    with pytest.raises(DataError) as err:
        load_split(CacheReader(cache_copy), "train", device="cpu")
    assert words in str(err.value) and "\n" not in str(err.value)
