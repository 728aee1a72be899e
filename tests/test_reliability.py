"""Fault injection (SIGKILL at named moments, both backends), cache integrity and --repair, hostile
input at the extraction level, no code execution on load, and crash safety of training.

Kills use AH_FAULT_AT=<point>:<n> (extract/faults.py): the extraction SIGKILLs itself the n-th time it
reaches <point>, so each moment is hit exactly, whatever the machine's load. Fixtures: tests/conftest.py."""
from __future__ import annotations

import ast
import io
import json
import os
import shutil
import signal
import time
import tokenize
from pathlib import Path

import h5py
import pytest
import yaml

from conftest import BACKENDS, REPO, extract_args
from extract.encoders import conv_output_length
from extract.media import read_audio
from extract.store import CacheReader
from extract.windows import window_starts
from helpers_bah import copy_tree, line_of, write_jpeg, write_mp4

N_VIDEOS = 18  # the shared synthetic tree: 16 public + 2 private


def _dot_entries(cache: Path) -> list[Path]:
    """Temporary or trash files/units anywhere a writer puts them."""
    return [p for d in (cache, cache / "videos", cache / "errors") if d.is_dir() for p in d.iterdir()
            if p.name.startswith(".")]


def _lingering(marker: str, exclude: set[int], grace: float = 10.0) -> list[str]:
    """Processes whose command line holds `marker` (e.g. decoding workers that outlived a killed extraction),
    after giving the kernel `grace` seconds to finish those that are dying."""
    deadline = time.monotonic() + grace
    while True:
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) not in exclude:
                try:
                    if marker.encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                        state = Path(f"/proc/{d}/stat").read_text().split(") ", 1)[1][0]
                        out.append(f"{d} ({state})")
                except (OSError, IndexError):
                    pass
        if not out or time.monotonic() > deadline:
            return out
        time.sleep(0.05)


# ------------------------------------------------------------------------ 1. SIGKILL at 10 moments

# (AH_FAULT_AT, the moment; whether the killed process must leave a temporary file behind)
MOMENTS = [
    ("create_manifest:1", "creating the cache: manifest in its temporary file, not linked", True),
    ("unit_array:1", "a video's unit: its first array written, the others not", True),
    ("unit_array:8", "a video's unit: 8 of its 11 arrays written", True),
    ("unit_written:1", "a complete temporary unit, not yet renamed into place", True),
    ("unit_renamed:1", "just after a rename: folder not fsynced, error file not cleared", None),
    ("video_encoded:3", "a video encoded while earlier videos' writes are in flight", None),
    ("unit_array:30", "arrays of several concurrent writes", True),
    ("unit_written:3", "the third complete temporary unit of the run", True),
    ("seal_index:1", "the final seal: index.json written, manifest not marked sealed", False),
    ("json_replace:2", "the final seal: the sealed manifest in its temporary file", True),
]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_at_10_moments_then_resume_gives_the_clean_digest(backend, tmp_path, synth_tree, tiny_specs,
                                                                  ref_caches, ahcli_fork):
    ref = CacheReader(ref_caches[backend])
    want_digest = ref.digest()
    cache = tmp_path / "cache"
    args = extract_args(synth_tree[0] / "data", cache, tiny_specs[backend])
    marker = str(tiny_specs["zarr"])  # in the command line of every process forked by the runner
    complete: set[str] = set()
    mid_write = 0
    for fault, moment, leaves_tmp in MOMENTS:
        pid = ahcli_fork.start(*args, env={"AH_FAULT_AT": fault})
        res = ahcli_fork.wait()
        assert res.rc == -signal.SIGKILL, f"{fault} ({moment}) was never reached: rc {res.rc}\n{res.err}"
        own_tmp = [p for p in _dot_entries(cache) if p.name.startswith(f".tmp.{pid}.")]
        if leaves_tmp is not None:
            assert bool(own_tmp) is leaves_tmp, (fault, [p.name for p in _dot_entries(cache)])
        mid_write += bool(own_tmp)
        assert _lingering(marker, {ahcli_fork.proc.pid}) == [], "a process outlived the killed extraction"
        if not (cache / "manifest.json").exists():
            continue
        r = CacheReader(cache)
        assert r.verify() == [], f"after a kill at {fault} a reader sees a damaged video"
        now = set(r.video_ids())
        assert complete <= now, f"complete videos lost by a kill at {fault}: {sorted(complete - now)}"
        for v in now - complete:  # every video a reader can see holds the clean run's bytes
            got, want = r.record(v), ref.record(v)
            assert got.meta() == want.meta() and all(
                got.arrays[k].tobytes() == want.arrays[k].tobytes() for k in want.arrays), v
        complete = now
    assert 0 < len(complete) == N_VIDEOS, "the runs before the seal kills extracted everything"
    assert mid_write >= 7

    res = ahcli_fork.run(*args)  # the same command, uninterrupted
    assert res.rc == 0, res.err
    r = CacheReader(cache)
    assert r.digest() == want_digest and r.verify() == [] and r.sealed
    assert r.errors() == [] and len(r.video_ids()) == N_VIDEOS
    assert _dot_entries(cache) == [], "temporary files of killed runs are cleaned up"
    index = json.loads((cache / "index.json").read_text())
    assert [v["video_id"] for v in index["videos"]] == ref.video_ids()


# ---------------------------------------------------------------------- 2. verify names, --repair fixes

def _unit(cache: Path, video_id: str) -> Path:
    return CacheReader(cache)._attrs(video_id)["_path"]


def _flip_byte(unit: Path, backend: str, name: str) -> None:
    """Flip one bit in the stored data of array `name` (not in the container's bookkeeping)."""
    if backend == "zarr":
        path = next(p for p in sorted((unit / name).rglob("*"), key=str) if p.is_file() and p.name != "zarr.json")
        offset = path.stat().st_size // 2
    else:
        with h5py.File(unit, "r") as f:
            ds = f[name]
            if ds.chunks:
                info = ds.id.get_chunk_info(0)
                offset = info.byte_offset + info.size // 2
            else:
                offset = ds.id.get_offset() + ds.id.get_storage_size() // 2
        path = unit
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate_chunk(unit: Path, backend: str) -> None:
    path = unit / "video" / "last" / "c.0.0.0" if backend == "zarr" else unit
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


def _drop_window_start(unit: Path, backend: str) -> None:
    """Metadata that disagrees with the arrays: one window start fewer than stored windows."""
    if backend == "zarr":
        doc = json.loads((unit / "zarr.json").read_text())
        doc["attributes"]["ah"]["meta"]["window_starts"].pop()
        (unit / "zarr.json").write_text(json.dumps(doc))
    else:
        with h5py.File(unit, "r+") as f:
            attrs = json.loads(f.attrs["ah"])
            attrs["meta"]["window_starts"].pop()
            f.attrs["ah"] = json.dumps(attrs)


def _files(unit: Path) -> dict[str, tuple[int, int, int]]:
    paths = [unit] if unit.is_file() else sorted(p for p in unit.rglob("*") if p.is_file())
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in paths}


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_names_every_damaged_video_and_repair_reextracts_only_those(backend, tmp_path, synth_tree,
                                                                          tiny_specs, ref_caches, ahcli_fork):
    cache = tmp_path / "cache"
    shutil.copytree(ref_caches[backend], cache)
    r = CacheReader(cache)
    ids = r.video_ids()
    free = list(ids)
    damage: dict[str, str] = {}  # video_id -> what verify must say about it
    for name in r.array_names(ids[0]):  # a flipped byte in every kind of stored array, one video each
        v = next(v for v in free if r.record(v, keys=[name]).arrays[name].size)
        free.remove(v)
        _flip_byte(_unit(cache, v), backend, name)
        damage[v] = f"{name}: checksum mismatch"
    v = free.pop(0)
    _truncate_chunk(_unit(cache, v), backend)
    damage[v] = "unreadable"
    v = free.pop(0)
    unit = _unit(cache, v)
    shutil.rmtree(unit) if unit.is_dir() else unit.unlink()
    damage[v] = "listed in index.json but missing on disk"
    v = free.pop(0)
    _drop_window_start(_unit(cache, v), backend)
    damage[v] = "window starts"
    assert len(damage) == 14 and len(free) == 4
    untouched = {v: _files(_unit(cache, v)) for v in free}

    res = ahcli_fork.run("cache", "verify", cache)
    assert res.rc == 1 and "Traceback" not in res.out + res.err
    named: dict[str, list[str]] = {}
    for line in res.out.splitlines():
        assert line.startswith("bad "), line
        vid, problem = line[4:].split(": ", 1)
        named.setdefault(vid, []).append(problem)
    assert set(named) == set(damage), "verify names exactly the damaged videos"
    for v, needle in damage.items():
        assert any(needle in p for p in named[v]), (v, needle, named[v])

    res = ahcli_fork.run(*extract_args(synth_tree[0] / "data", cache, tiny_specs[backend], "--repair"))
    assert res.rc == 0, res.err
    assert "extracted 14 videos" in res.out and "skipped 4 already complete" in res.out, res.out
    r = CacheReader(cache)
    assert r.verify() == [] and r.sealed and r.digest() == CacheReader(ref_caches[backend]).digest()
    assert {v: _files(_unit(cache, v)) for v in free} == untouched, "sound videos were rewritten"
    assert ahcli_fork.run("cache", "verify", cache).rc == 0


# -------------------------------------------------------------------------- 3. hostile input

def _paths(data: Path, vid: str) -> tuple[Path, Path, Path]:
    name = vid.rsplit("/", 1)[1]
    return data / vid, data / "cropped-aligned-faces" / vid, data / "transcription" / vid / f"{name[:-4]}.yml"


def _set_transcript(data: Path, fact: dict, text: str, line_bytes: bytes | None = None) -> None:
    """Replace a video's transcript in its YAML and its split line (the split line wins in the reader)."""
    vid, split = fact["video_id"], fact["split"]
    _paths(data, vid)[2].write_text(yaml.safe_dump({"text": text, "chunks": [
        {"text": text, "timestamp": [0.0, None]}] if text else []}), encoding="utf-8")
    split_file = data / "split" / f"{split}.txt"
    old = line_of(data, split, vid).encode("utf-8")
    new = f"{vid},{fact['label']},".encode() + (line_bytes if line_bytes is not None else text.encode())
    split_file.write_bytes(split_file.read_bytes().replace(old, new))


def _corrupt_frame_in_first_window(data: Path, fact: dict) -> str:
    count = 8 if fact["split"] == "train" else 5
    start = window_starts(fact["video_id"], fact["frames"], count, 16, 0)[0]
    jpg = _paths(data, fact["video_id"])[1] / f"frame-{min(start + 8, fact['frames'] - 1)}.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200] + b"\x00garbage" * 40)
    return str(jpg)


def _hostile_tree(out: Path, dst: Path, facts: list[dict]) -> tuple[Path, dict, dict]:
    """Copy the synthetic tree and break one public video per case. Returns (data, must_fail, extracted):
    must_fail: video_id -> text its error must hold; extracted: case -> video_id."""
    data = copy_tree(out, dst)
    public = [f for f in facts if f["split"] != "private"]
    roles = iter(sorted(public, key=lambda f: -f["frames"]))  # the longest videos first
    fail: dict[str, str] = {}
    ok: dict[str, str] = {}

    f = next(roles)
    _paths(data, f["video_id"])[0].write_bytes(b"")
    fail[f["video_id"]] = "empty file (0 bytes)"
    f = next(roles)
    mp4 = _paths(data, f["video_id"])[0]
    mp4.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 3])
    fail[f["video_id"]] = f"{mp4}: unreadable media"
    f = next(roles)
    fail[f["video_id"]] = _corrupt_frame_in_first_window(data, f) + ": unreadable image"
    f = next(roles)
    bomb = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    bomb += [f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    _paths(data, f["video_id"])[2].write_text("\n".join(bomb) + "\n")
    fail[f["video_id"]] = "aliases"
    f = next(roles)
    faces = _paths(data, f["video_id"])[1]
    shutil.move(str(faces), dst / "faces_outside_the_root")
    os.symlink(dst / "faces_outside_the_root", faces)
    fail[f["video_id"]] = "symlink leaving the dataset root"
    with open(data / "split" / "train.txt", "a", encoding="utf-8") as fh:
        fh.write("../../etc/passwd,0,I am not a video\n")
    fail["../../etc/passwd"] = "refused"

    f = next(roles)
    write_mp4(_paths(data, f["video_id"])[0], seconds=f["frames"] / f["fps"], fps=f["fps"], video=False)
    ok["no_video_stream"] = f["video_id"]
    f = next(roles)
    write_mp4(_paths(data, f["video_id"])[0], seconds=f["frames"] / f["fps"], fps=f["fps"], size=32,
              audio_rate=48000, channels=2, tone_hz=440.0)
    ok["stereo_48k"] = f["video_id"]
    f = next(roles)
    for jpg in _paths(data, f["video_id"])[1].iterdir():
        if int(jpg.stem.split("-")[1]) >= 5:
            jpg.unlink()
    write_mp4(_paths(data, f["video_id"])[0], seconds=0.2, fps=25, size=32)
    ok["video_0.2s"] = f["video_id"]
    f = next(roles)
    _set_transcript(data, f, "")
    ok["empty_transcript"] = f["video_id"]
    f = next(roles)
    _set_transcript(data, f, " ".join(["word,"] * 5000))
    ok["transcript_5000_words"] = f["video_id"]
    f = next(roles)
    _set_transcript(data, f, "caf\u00e9", line_bytes=b"caf\xe9 au lait \xff")
    ok["non_utf8_split_line"] = f["video_id"]
    f = next(roles)
    faces = _paths(data, f["video_id"])[1]
    write_jpeg(faces / "frame-0.jpg", size=(48, 40), mode="L")
    write_jpeg(faces / "frame-1.jpg", size=(64, 64), mode="CMYK")
    write_jpeg(faces / "frame-2.jpg", size=(20, 90))
    ok["mixed_face_jpegs"] = f["video_id"]
    val = data / "split" / "val.txt"            # CRLF: read and noted, never a failed "video"
    val.write_bytes(val.read_bytes().replace(b"\n", b"\r\n"))
    return data, fail, ok


def test_hostile_inputs_are_named_and_everything_else_is_extracted(tmp_path, synth_tree, tiny_specs, ref_caches,
                                                                   ahcli_fork):
    out, result = synth_tree
    data, fail, ok = _hostile_tree(out, tmp_path / "tree", result["videos"])
    cache = tmp_path / "cache"
    res = ahcli_fork.run(*extract_args(data, cache, tiny_specs["zarr"]))
    assert res.rc == 1, (res.rc, res.err)  # some videos failed
    assert "Traceback" not in res.out + res.err and res.err_lines == []
    r = CacheReader(cache)
    errors = {e["video_id"]: e["message"] for e in r.errors()}
    failed_lines = {line.split(": ", 1)[0].strip()[len("failed "):]: line for line in res.out.splitlines()
                    if line.strip().startswith("failed ")}
    assert set(errors) == set(fail) == set(failed_lines), (sorted(errors), sorted(fail))
    for vid, needle in fail.items():
        assert needle in errors[vid] and needle in failed_lines[vid], (vid, needle, errors[vid])
        assert "\n" not in errors[vid]
    notes = [line for line in res.out.splitlines() if line.strip().startswith("note ")]
    for case, needle in (("no_video_stream", "no video stream"), ("empty_transcript", "empty transcript"),
                         ("non_utf8_split_line", "not UTF-8")):
        assert any(ok[case] in n and needle in n for n in notes), (case, notes)
    assert any("split/val.txt: CRLF line endings" in n for n in notes), notes

    # Everything else is extracted; untouched videos hold exactly the clean run's bytes.
    ref = CacheReader(ref_caches["zarr"])
    untouched = set(ref.video_ids()) - set(fail) - set(ok.values())
    assert set(r.video_ids()) == untouched | set(ok.values()) and len(untouched) == 6
    assert r.verify() == [] and r.sealed
    for v in untouched:
        got, want = r.record(v), ref.record(v)
        assert all(got.arrays[k].tobytes() == want.arrays[k].tobytes() for k in want.arrays), v

    spec_windows = {"train": 8, "val": 5, "test": 5}
    short = r.record(ok["video_0.2s"])
    assert short.padded and short.frame_count == 5 and short.window_starts == [0] * spec_windows[short.split]
    assert short.arrays["video/last"].shape[0] == spec_windows[short.split]
    stereo = r.record(ok["stereo_48k"])
    wave = read_audio(_paths(data, ok["stereo_48k"])[0], 16000)
    assert abs(len(wave) / 16000 - stereo.duration) < 0.1  # 16 kHz samples, not 48 kHz ones
    audio_cfg = json.loads((tiny_specs["zarr"].parent / "audio" / "config.json").read_text())

    class _Cfg:
        conv_kernel, conv_stride = audio_cfg["conv_kernel"], audio_cfg["conv_stride"]

    assert len(stereo.arrays["audio/last"]) == conv_output_length(_Cfg, len(wave)) == stereo.arrays["audio_segments"][0]
    long = r.record(ok["transcript_5000_words"])
    segments = long.arrays["text_segments"]
    assert len(segments) >= 10 and segments.max() <= 512 and segments.sum() == len(long.arrays["text/last"])
    empty = r.record(ok["empty_transcript"])
    assert len(empty.arrays["text/last"]) == 2  # <s></s>: nothing else to encode


# ---------------------------------------------------------------- 4. loading never executes code

PACKAGES = ("extract", "heads", "ahflows", "ahcli", "ahbench")
SAFE_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
UNSAFE_YAML = {"unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all", "Loader", "FullLoader",
               "UnsafeLoader", "CLoader", "CFullLoader", "CUnsafeLoader"}


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(files) > 20
    return files


def _code_names(src: str) -> list[tuple[int, str]]:
    """NAME tokens only (comments, docstrings and strings are text, not code)."""
    return [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(src).readline)
            if t.type == tokenize.NAME]


def _safe_loader(node: ast.expr, module: ast.Module) -> bool:
    """`Loader=` is yaml.SafeLoader (or C/Base variants) or a class of this module deriving only from those."""
    if isinstance(node, ast.Attribute):
        return node.attr in SAFE_LOADERS
    if isinstance(node, ast.Name):
        if node.id in SAFE_LOADERS:
            return True
        for cls in (n for n in ast.walk(module) if isinstance(n, ast.ClassDef) and n.name == node.id):
            return bool(cls.bases) and all(_safe_loader(b, module) for b in cls.bases)
    return False


def _unsafe_calls(path: Path) -> list[str]:
    src = path.read_text(encoding="utf-8")
    module = ast.parse(src)
    out = [f"{path}:{line}: {name}" for line, name in _code_names(src)
           if "pickle" in name.lower() and name != "allow_pickle" or name in ("dill", "joblib", "shelve", "marshal")]
    for node in ast.walk(module):
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and not (
                isinstance(node.value, ast.Constant) and node.value.value is False):
            out.append(f"{path}:{node.value.lineno}: trust_remote_code")     # only an explicit False is safe
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "yaml" \
                and node.attr in UNSAFE_YAML:
            out.append(f"{path}:{node.lineno}: yaml.{node.attr}")
        if isinstance(node, ast.ClassDef) and any(
                isinstance(b, (ast.Attribute, ast.Name)) and getattr(b, "attr", getattr(b, "id", "")) in UNSAFE_YAML
                for b in node.bases):
            out.append(f"{path}:{node.lineno}: class {node.name} derives from an unsafe YAML loader")
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        if func == "yaml.load" and not ("Loader" in kw and _safe_loader(kw["Loader"], module)):
            out.append(f"{path}:{node.lineno}: yaml.load without a SafeLoader")
        if func.endswith("torch.load") or func == "load" and "weights_only" in kw:
            wo = kw.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                out.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
        if func.endswith(("np.load", "numpy.load")):
            ap = kw.get("allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                out.append(f"{path}:{node.lineno}: np.load with allow_pickle")
    return out


def test_packages_never_unpickle_or_run_remote_or_yaml_code():
    problems = [p for f in _sources() for p in _unsafe_calls(f)]
    assert problems == []


def test_the_code_scan_catches_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport torch, yaml\n"
        "torch.load('x.pt')\ntorch.load('x.pt', weights_only=False)\ntorch.load('y.pt', weights_only=True)\n"
        "yaml.load(open('a'))\nyaml.load(open('a'), Loader=yaml.FullLoader)\nyaml.unsafe_load('x')\n"
        "class L(yaml.UnsafeLoader):\n    pass\nyaml.load(open('a'), Loader=L)\n"
        "class S(yaml.SafeLoader):\n    pass\nyaml.load(open('a'), Loader=S)\nyaml.safe_load('x')\n"
        "m = AutoModel.from_pretrained('x', trust_remote_code=True)\n"
        "# a comment about pickle is text\ns = 'pickle in a string is text'\n")
    found = _unsafe_calls(bad)
    assert {int(p.split(":")[1]) for p in found} == {1, 3, 4, 6, 7, 8, 9, 11, 16}, found


# ----------------------------------------------------------------- 5. training: kill, resume, tampering

HEADS_ARGS = ["--epochs", "24", "--patience", "24", "--dim", "64", "--head-hidden", "64", "--batch-size", "2",
              "--accum", "1", "--lr", "1e-3", "--device", "cpu", "--checkpoint-every", "0", "--json"]


def _checkpoint_files_load(run: Path) -> None:
    """Every file a reader can see is whole: JSON parses, safetensors files load completely."""
    from safetensors import safe_open

    for p in run.iterdir():
        if p.name.startswith("."):
            continue
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                for key in f.keys():
                    f.get_tensor(key)
                meta = f.metadata() or {}
            if p.name == "state.safetensors":
                json.loads(meta["state"])


def _mtime(p: Path) -> int | None:
    try:
        return p.stat().st_mtime_ns
    except FileNotFoundError:
        return None


@pytest.mark.slow
def test_train_heads_killed_mid_run_resumes_to_the_same_final_metrics(tmp_path, ref_caches, ahcli_fork):
    cache = ref_caches["zarr"]
    full = tmp_path / "full"
    res = ahcli_fork.run("train-heads", cache, full, *HEADS_ARGS)
    assert res.rc == 0, res.err
    run = tmp_path / "run"
    state = run / "state.safetensors"
    kills = 0
    for delay in (0.0, 0.03, 0.11):  # after a fresh checkpoint: inside the next epoch or its writes
        before = _mtime(state)
        pid = ahcli_fork.start("train-heads", cache, run, *HEADS_ARGS, *(["--resume"] if kills else []))
        deadline = time.monotonic() + 120
        while _mtime(state) in (None, before) and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        res = ahcli_fork.wait()
        assert res.rc == -signal.SIGKILL, f"the run ended before it was killed: {res.rc} {res.err[-500:]}"
        kills += 1
        assert not (run / "metrics.json").exists(), "an interrupted run must not look finished"
        assert state.exists(), "the last complete checkpoint is kept"
        _checkpoint_files_load(run)
        if kills == 1:  # the same command without --resume refuses to overwrite the run, in one line
            again = ahcli_fork.run("train-heads", cache, run, *HEADS_ARGS)
            assert again.rc == 2 and len(again.err_lines) == 1 and "--resume" in again.err_lines[0], again.err

    res = ahcli_fork.run("train-heads", cache, run, *HEADS_ARGS, "--resume")
    assert res.rc == 0, res.err
    want, got = json.loads((full / "metrics.json").read_text()), json.loads((run / "metrics.json").read_text())
    want.pop("seconds", None), got.pop("seconds", None)
    assert got == want
    assert (run / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    assert (run / "history.csv").read_text() == (full / "history.csv").read_text()
    assert not state.exists() and not list(run.glob("best-e*.safetensors"))

    # The run records where it came from: the cache's fingerprint, the commit and the versions.
    config = json.loads((run / "config.json").read_text())
    assert config["cache"]["fingerprint"] == CacheReader(cache).fingerprint
    assert config["provenance"]["torch"] and "git_commit" in json.dumps(config["provenance"])


@pytest.fixture(scope="module")
def heads_run(tmp_path_factory, ref_caches, ahcli_fork) -> Path:
    run = tmp_path_factory.mktemp("heads_run") / "run"
    res = ahcli_fork.run("train-heads", ref_caches["zarr"], run, "--epochs", "1", "--dim", "16", "--head-hidden", "16",
                         "--device", "cpu")
    assert res.rc == 0, res.err
    res = ahcli_fork.run("evaluate", run, ref_caches["zarr"], "--split", "test", "--json")  # untouched: loads
    assert res.rc == 0, res.err
    return run


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["train"].__setitem__("warmup", 3), "warmup"),
    (lambda c: c["model"].__setitem__("dim", 48), "shape"),
    (lambda c: c["model"].__setitem__("bogus_option", True), "bogus_option"),
], ids=["unknown_train_option", "wrong_shape", "unknown_model_option"])
def test_run_folder_with_an_edited_config_is_refused_in_one_line(edit, needle, tmp_path, heads_run, ref_caches,
                                                                 ahcli_fork):
    cache = ref_caches["zarr"]
    run = tmp_path / "run"
    shutil.copytree(heads_run, run)
    config = json.loads((run / "config.json").read_text())
    edit(config)
    (run / "config.json").write_text(json.dumps(config))
    res = ahcli_fork.run("evaluate", run, cache, "--split", "test", "--json")
    assert res.rc == 2 and "Traceback" not in res.err + res.out, (res.rc, res.err)
    assert len(res.err_lines) == 1 and res.err_lines[0].startswith("error: ") and needle in res.err_lines[0], res.err
    assert "config.json" in res.err_lines[0] or str(run) in res.err_lines[0]
