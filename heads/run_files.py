"""The run folder's files: what `train-heads` writes and `evaluate`/`ensemble` read. safetensors + JSON/CSV only.

A finished run folder holds:
  model.safetensors   the best epoch's weights
  config.json         {"format", "version", "model", "train", "cache": {fingerprint, path}, "provenance", "extra"}
  metrics.json        best epoch, threshold, alpha, windows, validation metrics (written last: the run is
                      complete when it exists)
  history.csv         one row per epoch (appended and flushed as each epoch ends, rewritten whole at the end)
  encoder_top.safetensors   (runs with fine-tuned top encoder blocks only: checkpoint A, heads/topblocks.py)
                      the blocks' weights; config.json then has an "encoders" section describing them
While training, the folder also holds `state.safetensors` (latest model + optimizer, with the scheduler,
early-stopping counters and history as JSON in the file's metadata) and `best-eNNN.safetensors` (the best
weights so far). Every file is written to a temporary name and renamed into place, so a run killed at
any moment leaves either the previous complete file or the new one. Nothing is ever unpickled.
"""
from __future__ import annotations

import csv
import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from extract.errors import AHError
from extract.files import atomic_write, atomic_write_text, read_json_object
from extract.provenance import provenance
from extract.store import CacheReader
from heads.config import ModelConfig

FORMAT = "conflict-aware-ah/heads-run"
VERSION = 1
CONFIG_KEYS = {"format", "version", "model", "train", "cache", "provenance", "extra", "encoders", "parameters"}
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
STATE_FILE = "state.safetensors"
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_macro_f1", "val_f1_ah", "val_f1_noah", "threshold", "lr")


class RunError(AHError):
    """A run folder that is missing, incomplete, inconsistent or made on another cache."""


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write a safetensors file (the documented format: u64 header size, JSON header, raw
    little-endian bytes). Written tensor by tensor with plain file writes, which release the GIL, so a
    background checkpoint barely slows the training loop; read back with safetensors' own loader."""
    path = Path(path)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for k, v in flat.items():
        if v.dtype not in _DTYPES:
            raise RunError(f"{path}: cannot store tensor {k} of dtype {v.dtype}")
        n = v.numel() * v.element_size()
        header[k] = {"dtype": _DTYPES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def write(fh) -> None:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for v in flat.values():
            if v.numel():
                fh.write(memoryview(v.reshape(-1).view(torch.uint8).numpy()))

    atomic_write(path, write)


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunError(f"{path}: not a readable safetensors file ({exc})") from exc


def cache_record(reader: CacheReader | None = None) -> dict[str, Any]:
    """config.json's "cache" section: the fingerprint and folder of the cache a run was trained on."""
    if reader is None:
        return {"fingerprint": None, "path": None}
    return {"fingerprint": reader.fingerprint, "path": str(Path(reader.path).resolve())}


def make_config(model_cfg: ModelConfig, train_cfg, cache: dict[str, Any], extra: dict | None = None,
                encoders: dict | None = None, parameters: dict[str, int] | None = None) -> dict:
    """config.json of a run; `parameters`: trainable parameter counts ({"heads": N, "encoder_blocks": M})."""
    cfg = {"format": FORMAT, "version": VERSION, "model": model_cfg.to_dict(), "train": train_cfg.to_dict(),
           "cache": cache, "provenance": provenance(), "extra": extra or {}, "parameters": parameters or {}}
    if encoders is not None:
        cfg["encoders"] = encoders
    return cfg


def _history_csv(rows: list[dict[str, Any]], header: bool) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n", extrasaction="ignore")
    if header:
        w.writeheader()
    for r in rows:
        w.writerow({k: (repr(float(v)) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, _history_csv(rows, header=True))


def append_history(path: Path, row: dict[str, Any]) -> None:
    """One finished epoch's row, appended and flushed to disk at once: a running or killed run can be plotted
    (`ahcli report RUN`) or followed (`tail -f RUN/history.csv`). The file is rewritten whole from the
    checkpoint on resume and at the end, so it always equals the run's history in the end."""
    with open(path, "a", encoding="utf-8", newline="") as fh:
        fh.write(_history_csv([row], header=False))
        fh.flush()
        os.fsync(fh.fileno())


def read_history(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items()} for r in rows]


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_model(path: Path, model: torch.nn.Module, metadata: dict[str, str] | None = None) -> None:
    save_tensors(path, model_tensors(model), metadata)


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load weights, refusing missing/unexpected names and wrong shapes with one clear line."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing:
        raise RunError(f"{where}: weight(s) missing for this config: {', '.join(missing[:4])}"
                       + (" ..." if len(missing) > 4 else ""))
    if unexpected:
        raise RunError(f"{where}: weight(s) not in this config: {', '.join(unexpected[:4])}"
                       + (" ..." if len(unexpected) > 4 else ""))
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise RunError(f"{where}: weight {k} has shape {tuple(v.shape)} but the config expects "
                           f"{tuple(own[k].shape)}")
    model.load_state_dict(tensors)


def read_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunError(f"{run_dir}: not a run folder ({CONFIG_FILE} missing)")
    cfg = read_json_object(path, RunError, "run config")
    if cfg.get("format") != FORMAT:
        raise RunError(f"{path}: not a heads run config (format {cfg.get('format')!r})")
    unknown = sorted(set(cfg) - CONFIG_KEYS)
    if unknown:
        raise RunError(f"{path}: unknown option(s) {', '.join(unknown)}")
    if cfg.get("version") != VERSION:
        raise RunError(f"{path}: run format version {cfg.get('version')!r}, this program reads {VERSION}")
    return cfg


def check_fingerprint(run_dir: Path, run_fp: str | None, cache_fp: str | None) -> None:
    if cache_fp is not None and run_fp != cache_fp:
        raise RunError(f"{run_dir}: run was trained on cache fingerprint {run_fp}, but this cache is "
                       f"{cache_fp}; evaluate it on the cache it was trained on")


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """metrics.json of a finished run (its presence marks the run complete)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise RunError(f"{run_dir}: run is incomplete ({METRICS_FILE} missing); finish it with --resume")
    return read_json_object(path, RunError, "run metrics")


def is_run_folder(path: Path) -> bool:
    """A folder this program wrote as a run (its config.json says so)."""
    try:
        return read_config(path) is not None
    except (RunError, FileNotFoundError):
        return False


def unit_interval(name: str, value: Any, where: Path | None = None) -> float:
    """An alpha or a threshold: a finite number in [0, 1] (NaN >= t is always False: every video would be
    scored 'no A/H' without a word); one line naming `where` it came from otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise RunError(f"{where}: {name} must be a number in [0, 1], got {value!r}" if where else
                       f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)
