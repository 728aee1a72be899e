"""Stage 1 end to end : the cached tokens are the HF models' outputs on the right frames,
audio and text for both backends; a kill -9 of `python -m ahcli extract` resumes to the clean digest;
torchrun with 2 CPU processes gives the single-process digest; clear one-line errors; determinism and
provenance. Fixtures (the tree, the tiny encoders, the reference caches) come from tests/conftest.py."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BACKENDS, REPO, cli_env, extract_args
from extract.bah import read_bah
from extract.loading import resolve_spec, weights_id_of
from extract.media import read_audio, read_faces
from extract.spec import load_spec
from extract.store import CacheReader
from extract.windows import clip_indices, window_starts, window_text

RTOL = ATOL = 2e-3  # fp16 storage: 2^-11 relative rounding, plus a last-ulp difference in fp32 summation order


def _digest(cache: Path) -> str:
    return CacheReader(cache).digest()


def _units(cache: Path) -> list[Path]:
    return [p for p in (cache / "videos").iterdir() if not p.name.startswith(".")] if (cache / "videos").is_dir() else []


# ------------------------------------------------------------------------ tokens equal the HF models'

class _Reference:
    """The tiny encoders called directly through transformers (Auto classes and the saved processors)."""

    def __init__(self, spec_path: Path):
        from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoModel, AutoTokenizer

        self.spec = load_spec(spec_path)
        self.n_top = self.spec.unfreeze_top
        folder = spec_path.parent
        self.video = AutoModel.from_pretrained(folder / "video").eval()
        self.image_processor = AutoImageProcessor.from_pretrained(folder / "video")
        self.size = int(self.image_processor.crop_size["height"])       # the frames' side, as the model wants
        self.audio = AutoModel.from_pretrained(folder / "audio").eval()
        self.feature_extractor = AutoFeatureExtractor.from_pretrained(folder / "audio")
        self.text = AutoModel.from_pretrained(folder / "text", add_pooling_layer=False).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder / "text")

    def _layers(self, out) -> dict[str, np.ndarray]:
        return {"last": out.last_hidden_state.numpy(), "prefix": out.hidden_states[-(self.n_top + 1)].numpy()}

    @torch.inference_mode()
    def video_clips(self, clips: np.ndarray) -> dict[str, np.ndarray]:
        pixels = torch.cat([self.image_processor(list(c), return_tensors="pt")["pixel_values"] for c in clips])
        return self._layers(self.video(pixel_values=pixels, output_hidden_states=True))

    @torch.inference_mode()
    def audio_wave(self, wave: np.ndarray) -> dict[str, np.ndarray]:
        values = self.feature_extractor(wave, sampling_rate=16000, return_tensors="pt")["input_values"]
        return {k: v[0] for k, v in self._layers(self.audio(input_values=values, output_hidden_states=True)).items()}

    @torch.inference_mode()
    def text_string(self, text: str) -> dict[str, np.ndarray]:
        ids = self.tokenizer(text, return_tensors="pt")
        return {k: v[0] for k, v in self._layers(self.text(**ids, output_hidden_states=True)).items()}


@pytest.fixture(scope="module")
def reference(tiny_specs) -> _Reference:
    return _Reference(tiny_specs["zarr"])


def _clips(video, starts: list[int], size: int) -> np.ndarray:
    return np.stack([read_faces([video.face_frames[i] for i in clip_indices(s, 16, video.frame_count)], size)
                     for s in starts])


def _close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.dtype == np.float16, what
    assert got.shape == want.shape, (what, got.shape, want.shape)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=RTOL, atol=ATOL, err_msg=what)


@pytest.fixture(scope="module")
def expected_tokens(synth_tree, reference) -> dict[str, dict]:
    """video_id -> metadata and per-layer reference tokens from the HF models, for videos of every split,
    a padded (shorter than 16 frames) one and a 44.1 kHz stereo one. Computed once for both backends."""
    ds = read_bah(synth_tree[0] / "data")
    assert len(ds.videos) == 18 and ds.problems == []
    spec = reference.spec
    facts = {v["video_id"]: v for v in synth_tree[1]["videos"]}
    chosen = {next(v.video_id for v in ds.videos if v.split == s) for s in ("train", "val", "test", "private")}
    chosen.add(next(v.video_id for v in ds.videos if v.frame_count < 16))
    chosen.add(next(v for v, f in facts.items() if f["audio_channels"] == 2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and spinning threads hurt on a busy machine
    try:
        out = {}
        for video in (v for v in ds.videos if v.video_id in chosen):
            count = spec.windows.train if video.split == "train" else spec.windows.eval
            starts = window_starts(video.video_id, video.frame_count, count, 16, spec.seed)
            want = {"video": video, "starts": starts}
            for layer, arr in reference.video_clips(_clips(video, starts, reference.size)).items():
                want[f"video/{layer}"] = arr
            for layer, arr in reference.audio_wave(read_audio(video.mp4, 16000)).items():
                want[f"audio/{layer}"] = arr
            for layer, arr in reference.text_string(video.transcript).items():
                want[f"text/{layer}"] = arr
            windows = [reference.text_string(window_text(video.chunks, s / video.fps, (s + 16) / video.fps))
                       for s in starts]
            want["text_window_lengths"] = [len(w["last"]) for w in windows]
            for layer in ("last", "prefix"):
                want[f"text_window/{layer}"] = np.concatenate([w[layer] for w in windows])
            out[video.video_id] = want
        # A control for the tolerance: the clips one frame later (or earlier) than the stored starts.
        video = next(v for v in ds.videos if v.frame_count >= 20)
        count = spec.windows.train if video.split == "train" else spec.windows.eval
        moved = [s + 1 if s + 16 < video.frame_count else s - 1
                 for s in window_starts(video.video_id, video.frame_count, count, 16, spec.seed)]
        out["_moved"] = {"video_id": video.video_id,
                         "video/last": reference.video_clips(_clips(video, moved, reference.size))["last"]}
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_tokens_equal_a_direct_call_of_the_hf_models(backend, ref_caches, expected_tokens):
    reader = CacheReader(ref_caches[backend])
    assert len(reader.video_ids()) == 18
    for vid, want in expected_tokens.items():
        if vid == "_moved":
            continue
        video, rec = want["video"], reader.record(vid)
        assert rec.window_starts == want["starts"]
        assert (rec.split, rec.label, rec.pid, rec.question) == (video.split, video.label, video.pid, video.question)
        assert (rec.frame_count, rec.padded) == (video.frame_count, video.frame_count < 16)
        assert rec.fps == pytest.approx(video.fps) and rec.duration == pytest.approx(video.duration)
        for name in ("video", "audio", "text", "text_window"):
            for layer in ("last", "prefix"):
                _close(rec.arrays[f"{name}/{layer}"], want[f"{name}/{layer}"], f"{vid} {name}/{layer}")
        assert rec.arrays["audio_segments"].tolist() == [len(want["audio/last"])]  # one segment: < 30 s
        assert rec.arrays["text_window_lengths"].tolist() == want["text_window_lengths"]
    # The tolerance is meaningful: clips one frame off are far outside it.
    moved = expected_tokens["_moved"]
    got = reader.record(moved["video_id"], keys=["video/last"]).arrays["video/last"].astype(np.float32)
    assert not np.allclose(got, moved["video/last"], rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------ kill -9 and resume

def _lingering(marker: str, grace: float = 10.0) -> list[int]:
    """Processes whose command line holds `marker`, once the dying ones had `grace` seconds to go."""
    deadline = time.monotonic() + grace
    while True:
        pids = []
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and marker.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def test_kill9_of_python_m_ahcli_extract_then_rerun_gives_the_clean_digest(tmp_path, synth_tree, tiny_specs,
                                                                           ref_caches, ahcli_fork):
    cache = tmp_path / "cache"
    args = extract_args(synth_tree[0] / "data", cache, tiny_specs["zarr"])
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ahcli", *args], env=cli_env(), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 240
        while proc.poll() is None and len(_units(cache)) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the extraction ended before it was killed"
    assert _lingering(str(cache)) == [], "a decoding worker outlived the killed extraction"
    done = len(_units(cache))
    assert 3 <= done < 18
    assert CacheReader(cache).verify() == [], "a reader must never see a half-written video"

    res = ahcli_fork.run(*args)  # the same command again
    assert res.rc == 0, res.err
    assert f"skipped {done} already complete" in res.out and f"extracted {18 - done} videos" in res.out
    r = CacheReader(cache)
    assert r.digest() == _digest(ref_caches["zarr"]) and r.verify() == [] and r.sealed


# ------------------------------------------------------------------------------------- torchrun

@pytest.mark.slow
def test_torchrun_two_cpu_processes_give_the_single_process_digest(tmp_path, synth_tree, tiny_specs, ref_caches):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ahcli", *extract_args(synth_tree[0] / "data", cache, tiny_specs["hdf5"])]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cli_env(), cwd=REPO)
    log = f"stdout:\n{p.stdout[-2000:]}\nstderr:\n{p.stderr[-4000:]}"
    assert p.returncode == 0, log
    assert p.stdout.count("extracted 18 videos") == 1, log  # rank 0 reports the sum of both ranks
    r = CacheReader(cache)
    assert r.sealed and r.verify() == [] and len(r.video_ids()) == 18, log
    assert r.digest() == _digest(ref_caches["zarr"]) == _digest(ref_caches["hdf5"]), log
    assert r.manifest["provenance"]["torch_threads"] == 1


# ------------------------------------------------------------------------------ one clear line

def _one_line(res, *needles: str, rc: int = 2) -> str:
    assert res.rc == rc, (res.rc, res.err, res.out)
    assert "Traceback" not in res.err + res.out
    assert len(res.err_lines) == 1 and res.err_lines[0].startswith("error: "), res.err
    for needle in needles:
        assert needle in res.err_lines[0], (needle, res.err_lines[0])
    return res.err_lines[0]


def test_fingerprint_mismatch_is_one_line_naming_the_field(tmp_path, synth_tree, tiny_specs, ref_caches, ahcli_fork):
    cache = tmp_path / "cache"
    shutil.copytree(ref_caches["zarr"], cache)
    other = tiny_specs["zarr"].with_name("cache_spec_seed5.yaml")
    other.write_text(tiny_specs["zarr"].read_text().replace("\nseed: 0", "\nseed: 5", 1))
    before = sorted((p.relative_to(cache), p.stat().st_mtime_ns) for p in cache.rglob("*"))
    res = ahcli_fork.run(*extract_args(synth_tree[0] / "data", cache, other))
    _one_line(res, str(cache), "differing fields: seed", "--force")
    assert sorted((p.relative_to(cache), p.stat().st_mtime_ns) for p in cache.rglob("*")) == before


def test_missing_encoder_folder_missing_spec_and_not_bah_are_one_line(tmp_path, synth_tree, tiny_specs, ahcli_fork):
    data = synth_tree[0] / "data"
    lonely = tmp_path / "spec_only" / "cache_spec.yaml"  # the tiny spec without its encoder folders
    lonely.parent.mkdir()
    shutil.copy(tiny_specs["zarr"], lonely)
    _one_line(ahcli_fork.run(*extract_args(data, tmp_path / "c1", lonely)),
              str(lonely.parent / "video"), "encoder folder not found")
    missing = tmp_path / "nowhere.yaml"
    _one_line(ahcli_fork.run(*extract_args(data, tmp_path / "c2", missing)), str(missing), "spec file not found")
    (tmp_path / "not_bah").mkdir()
    _one_line(ahcli_fork.run(*extract_args(tmp_path / "not_bah", tmp_path / "c3", tiny_specs["zarr"])),
              str(tmp_path / "not_bah"), "not a BAH data tree")
    _one_line(ahcli_fork.run(*extract_args(synth_tree[0], tmp_path / "c4", tiny_specs["zarr"])),
              f"did you mean {data}")
    assert not any((tmp_path / c).exists() for c in ("c1", "c2", "c3", "c4")), "nothing written on refusal"


# ----------------------------------------------------------------------- determinism, provenance

def test_same_spec_and_seed_give_bit_identical_caches_with_provenance(ref_caches, tiny_specs, ahcli_fork):
    """Two extraction runs (the reference caches: separate processes, zarr and hdf5) hold the same bytes;
    the kill/resume and torchrun tests compare fresh interpreters' caches with these too."""
    readers = {b: CacheReader(c) for b, c in ref_caches.items()}
    assert readers["zarr"].digest() == readers["hdf5"].digest()
    for v in readers["zarr"].video_ids():
        a, b = readers["zarr"].record(v), readers["hdf5"].record(v)
        assert a.meta() == b.meta() and a.arrays.keys() == b.arrays.keys()
        for name in a.arrays:
            assert a.arrays[name].tobytes() == b.arrays[name].tobytes(), (v, name)

    spec = load_spec(tiny_specs["zarr"])
    spec = resolve_spec(spec).with_weights_id({m: weights_id_of(spec, m) for m in ("video", "audio", "text")})
    has_git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode == 0

    def known_commit(sha: str) -> bool:  # a commit of this repository (HEAD may move while the tests run)
        if not has_git:
            return sha == "unknown"
        kind = subprocess.run(["git", "cat-file", "-t", sha], cwd=REPO, capture_output=True, text=True)
        return len(sha) == 40 and kind.stdout.strip() == "commit"

    for backend, r in readers.items():
        info = json.loads(ahcli_fork.run("cache", "info", ref_caches[backend], "--json").out)
        assert info["fingerprint"] == r.fingerprint == spec.fingerprint()
        assert info["digest"] == r.digest()
        prov = info["provenance"]
        assert known_commit(prov["git_commit"]) and prov["torch_threads"] == 1
        for pkg in ("torch", "transformers", "numpy", "zarr", "h5py"):
            assert prov[pkg] == metadata.version(pkg)
        assert r.spec["weights_id"] and all(w.startswith("sha256:") for _, w in r.spec["weights_id"])
        for v in r.video_ids()[:3]:
            attrs = r._attrs(v)  # the unit's own record of where it came from
            assert attrs["fingerprint"] == spec.fingerprint() and attrs["written_by"]["git_commit"] == prov["git_commit"]
