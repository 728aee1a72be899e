"""Run folders: what `train-heads` writes and `evaluate`/`ensemble` read. safetensors + JSON/CSV only.

A finished run folder holds:
  model.safetensors   the best epoch's weights
  config.json         {"format", "version", "model", "train", "cache": {fingerprint, path}, "provenance", "extra"}
  metrics.json        best epoch, threshold, alpha, windows, validation metrics (written last: the run is
                      complete when it exists)
  history.csv         one row per epoch
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
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from extract.errors import AHError
from heads.model import ConfigError, ConflictAwareModel, ModelConfig

FORMAT = "conflict-aware-ah/heads-run"
VERSION = 1
CONFIG_KEYS = {"format", "version", "model", "train", "cache", "provenance", "extra", "encoders"}
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
STATE_FILE = "state.safetensors"
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_macro_f1", "val_f1_ah", "val_f1_noah", "threshold", "lr")


class RunError(AHError):
    """A run folder that is missing, incomplete, inconsistent or made on another cache."""


# ---- atomic writes ---------------------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, then rename over `path` (atomic on POSIX); makes the folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for v in flat.values():
            if v.numel():
                fh.write(memoryview(v.reshape(-1).view(torch.uint8).numpy()))
    os.replace(tmp, path)


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunError(f"{path}: not a readable safetensors file ({exc})") from exc


# ---- run folder files ------------------------------------------------------------------------------


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict[str, Any]:
    """The extraction stage's provenance record when it offers one, else commit + versions."""
    try:
        from extract.store import provenance as store_provenance

        rec = store_provenance()
        if isinstance(rec, dict):
            return rec
    except Exception:  # noqa: BLE001 - provenance is informative; never block training on it
        pass
    import numpy
    import sklearn

    return {"git_commit": git_commit(), "python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": numpy.__version__, "sklearn": sklearn.__version__}


def cache_record(reader=None, path: str | Path | None = None) -> dict[str, Any]:
    if reader is None:
        return {"fingerprint": None, "path": None if path is None else str(path)}
    where = Path(path if path is not None else getattr(reader, "path", "."))
    return {"fingerprint": getattr(reader, "fingerprint", None), "path": str(where.resolve())}


def make_config(model_cfg: ModelConfig, train_cfg, cache: dict[str, Any], extra: dict | None = None,
                encoders: dict | None = None) -> dict:
    cfg = {"format": FORMAT, "version": VERSION, "model": model_cfg.to_dict(), "train": train_cfg.to_dict(),
           "cache": cache, "provenance": provenance(), "extra": extra or {}}
    if encoders is not None:
        cfg["encoders"] = encoders
    return cfg


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(float(v)) if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


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


# ---- loading a run ---------------------------------------------------------------------------------


@dataclass
class Run:
    path: Path
    model: torch.nn.Module                # ConflictAwareModel, or heads.topblocks.TopBlocksHeads (checkpoint A)
    model_config: ModelConfig
    train_config: Any                     # heads.train.TrainConfig
    threshold: float
    alpha: float
    metrics: dict[str, Any]
    cache: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    # For a run with fine-tuned top blocks: a heads.finetune.RawMedia that runs its encoders on the raw
    # media (`load_run(..., data_root=ROOT)`), used when a cache has no 'prefix' states.
    media: Any = None
    # Whether the cache given to load_run holds the prefix states the top blocks read (None: not checked).
    prefix_cached: bool | None = None

    @property
    def fingerprint(self) -> str | None:
        return self.cache.get("fingerprint")

    @property
    def head_model(self) -> ConflictAwareModel:
        """The attention pooling + fusion + heads (the whole model of a frozen-encoder run)."""
        from heads.topblocks import head_model_of

        return head_model_of(self.model)

    @property
    def tops(self) -> torch.nn.ModuleDict | None:
        """The fine-tuned top encoder blocks per modality, or None (all encoder layers frozen)."""
        from heads.topblocks import tops_of

        return tops_of(self.model)

    @property
    def unfreeze_top(self) -> int:
        return int(getattr(self.train_config, "unfreeze_top", 0) or 0)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: not valid JSON ({exc})") from exc


def read_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunError(f"{run_dir}: not a run folder ({CONFIG_FILE} missing)")
    cfg = _read_json(path)
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise RunError(f"{path}: not a heads run config (format {cfg.get('format') if isinstance(cfg, dict) else '?'!r})")
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


def load_run(run_dir: str | Path, cache=None, device: str | torch.device = "cpu",
             expect_fingerprint: str | None = None, data_root: str | Path | None = None,
             private_root: str | Path | None = None, workers: int = 0) -> Run:
    """Load a finished run folder (eval mode). With `cache` (a CacheReader) or `expect_fingerprint`,
    a run trained on another cache is refused.

    A run with fine-tuned top encoder blocks reads the cache's 'prefix' states (`heads.infer.layers_needed`);
    when the cache has none, `data_root` (the BAH tree) lets `predict_split` run its encoders on the raw
    media at the cache's window starts instead (`private_root`: the private split's tree, `workers`:
    decoding processes). With neither, loading a split for it fails with one line saying what to do."""
    from heads.train import TrainConfig  # late import: train.py writes these folders

    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    where = str(run_dir / CONFIG_FILE)
    try:
        model_cfg = ModelConfig.from_dict(cfg["model"], f"{where}: model")
        train_cfg = TrainConfig.from_dict(cfg["train"], f"{where}: train")
    except ConfigError as exc:
        raise RunError(str(exc)) from exc
    cache_info = cfg.get("cache") or {}
    fp = expect_fingerprint if expect_fingerprint is not None else getattr(cache, "fingerprint", None)
    check_fingerprint(run_dir, cache_info.get("fingerprint"), fp)
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise RunError(f"{run_dir}: run is incomplete ({METRICS_FILE} missing); finish it with --resume")
    metrics = _read_json(metrics_path)
    weights_path = run_dir / MODEL_FILE
    if not weights_path.is_file():
        raise RunError(f"{run_dir}: {MODEL_FILE} missing")
    tensors, _ = load_tensors(weights_path)
    model = ConflictAwareModel(model_cfg)
    load_weights(model, tensors, str(weights_path))
    run = Run(run_dir, model, model_cfg, train_cfg, float(metrics["threshold"]),
              float(metrics.get("alpha", train_cfg.alpha)), metrics, cache_info, cfg)
    if getattr(train_cfg, "unfreeze_top", 0):
        _attach_tops(run, cache, data_root, private_root, workers, device)
    run.model.to(device).eval()
    return run


def _attach_tops(run: Run, cache, data_root, private_root, workers: int, device) -> None:
    """Rebuild the fine-tuned top blocks (from the HF configs in config.json + encoder_top.safetensors)."""
    from heads import topblocks

    where = str(run.path / CONFIG_FILE)
    enc = run.config.get("encoders")
    if not isinstance(enc, dict) or not {"unfreeze_top", "hf_configs", "spec"} <= set(enc):
        raise RunError(f"{where}: unfreeze_top is set but the 'encoders' section (hf_configs, spec) is missing")
    n = int(enc["unfreeze_top"])
    if n != run.unfreeze_top or set(enc["hf_configs"]) != set(run.model_config.present):
        raise RunError(f"{where}: the 'encoders' section does not match the train/model options")
    try:
        tops = topblocks.tops_from_configs(enc["hf_configs"], n, where)
    except AHError as exc:
        raise RunError(str(exc)) from exc
    topblocks.load_tops(run.path / enc.get("weights", topblocks.TOPS_FILE), tops)
    run.model = topblocks.TopBlocksHeads(tops, run.model)
    if cache is not None:
        run.prefix_cached = topblocks.cache_prefix_problem(getattr(cache, "spec", None), n) is None
    if data_root is not None:
        from heads.finetune import RawMedia

        run.media = RawMedia(Path(data_root), enc["spec"], n, device=device,
                             private_root=None if private_root is None else Path(private_root), workers=workers)
