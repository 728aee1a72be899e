"""A small real pipeline shared by the report / explain / predict tests, built once per test session.

From the session's synthetic tree (tests/conftest.py `synth_tree`: 16 public + 2 private videos) and tiny
encoders (`tiny_specs`): a cache extracted in-process, a frozen run "B" (eps 0.1), a run "A" with the top-2
blocks trained from the cached prefix states, and their ensemble. Tests must not modify these folders.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

_BUILT: dict[tuple[str, str], "Case"] = {}


@dataclass
class Case:
    out: Path             # the synth OUT folder (data + private)
    data: Path            # the BAH root
    spec: Path
    cache: Path
    run_b: Path
    run_a: Path
    ensemble: Path


def _train(cache: Path, out: Path, label_smoothing: float, unfreeze_top: int = 0, epochs: int = 3) -> Path:
    from extract.store import CacheReader
    from heads.run_files import cache_record
    from heads.data import load_split
    from heads.config import ModelConfig
    from heads.config import TrainConfig
    from ahflows.checkpoint_a import train_from_cache

    reader = CacheReader(cache)
    layers = ("last", "prefix") if unfreeze_top else ("last",)
    train = load_split(reader, "train", layers=layers, device="cpu")
    val = load_split(reader, "val", layers=layers, device="cpu")
    mcfg = ModelConfig(input_dims=train.dims("last"), modalities="vat", dim=16, head_hidden=16)
    extra = {"unfreeze_top": unfreeze_top} if unfreeze_top else {}
    tcfg = TrainConfig(epochs=epochs, patience=epochs, lr=3e-3, lr_min=3e-5, batch_size=8, accum=1, device="cpu",
                       label_smoothing=label_smoothing, **extra)
    train_from_cache(train, val, mcfg, tcfg, out, spec=reader.spec, cache=cache_record(reader))
    return out


@contextlib.contextmanager
def one_thread():
    """Torch on one intra-op thread for the duration: these tensors are tiny, and with 2 threads on busy
    cores OpenMP synchronisation makes each op many times slower. Extraction and `predict` must also run
    at the same thread count for their audio features to agree bit for bit."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def build(synth_out: Path, spec: Path, tmp_path_factory) -> Case:
    key = (str(synth_out), str(spec))
    if key not in _BUILT:
        with one_thread():
            _BUILT[key] = _build(synth_out, spec, tmp_path_factory)
    return _BUILT[key]


def _build(synth_out: Path, spec: Path, tmp_path_factory) -> Case:
    from extract.run import ExtractOptions, extract
    from ahflows.ensemble import run_ensemble

    root = tmp_path_factory.mktemp("report_case")
    data = Path(synth_out) / "data"
    cache = root / "cache"
    summary = extract(data, cache, spec, ExtractOptions(device="cpu", workers=0, progress=False))
    assert not summary.failed, summary.failed
    run_b = _train(cache, root / "runs" / "B", 0.1)
    run_a = _train(cache, root / "runs" / "A", 0.0, unfreeze_top=2, epochs=2)
    ens = root / "ensemble"
    run_ensemble([run_a, run_b], cache, ens, windows=5, data_root=data, device="cpu")
    return Case(Path(synth_out), data, Path(spec), cache, run_b, run_a, ens)
