"""Loading a finished run folder as a model ready for inference: the heads, and for a run with fine-tuned
top encoder blocks (checkpoint A) the blocks rebuilt from the HF configs in its config.json."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from extract.errors import AHError
from extract.store import CacheReader
from heads.calibration import Calibration, load_calibration
from heads.config import ConfigError, ModelConfig, TrainConfig
from heads.model import ConflictAwareModel
from heads.run_files import (CONFIG_FILE, METRICS_FILE, MODEL_FILE, RunError, check_fingerprint, load_tensors,
                             load_weights, read_config, read_metrics, unit_interval)
from heads.topblocks import (TOPS_FILE, TopBlocksHeads, cache_prefix_problem, head_model_of, load_tops,
                             tops_from_configs, tops_of)


@dataclass
class Run:
    path: Path
    model: torch.nn.Module                # ConflictAwareModel, or TopBlocksHeads (checkpoint A)
    model_config: ModelConfig
    train_config: TrainConfig
    threshold: float
    alpha: float
    metrics: dict[str, Any]
    cache: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    # For a run with fine-tuned top blocks: what runs its encoders on the raw media when a cache has no
    # 'prefix' states (an object with heads.infer.MediaSource's method; set by the caller, e.g. ahflows).
    media: Any = None
    # Whether the cache given to load_run holds the prefix states the top blocks read (None: not checked).
    prefix_cached: bool | None = None
    # Temperature scaling fitted on val (RUN/calibration.json, heads/calibration.py), or None.
    calibration: Calibration | None = None

    @property
    def fingerprint(self) -> str | None:
        return self.cache.get("fingerprint")

    @property
    def head_model(self) -> ConflictAwareModel:
        """The attention pooling + fusion + heads (the whole model of a frozen-encoder run)."""
        return head_model_of(self.model)

    @property
    def tops(self) -> torch.nn.ModuleDict | None:
        """The fine-tuned top encoder blocks per modality, or None (all encoder layers frozen)."""
        return tops_of(self.model)

    @property
    def unfreeze_top(self) -> int:
        return self.train_config.unfreeze_top


def load_run(run_dir: str | Path, cache: CacheReader | None = None, device: str | torch.device = "cpu",
             expect_fingerprint: str | None = None) -> Run:
    """Load a finished run folder (eval mode). With `cache` or `expect_fingerprint`, a run trained on
    another cache is refused. A run with fine-tuned top encoder blocks reads the cache's 'prefix' states
    (`heads.infer.layers_needed`); `run.prefix_cached` says whether `cache` has them."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    where = str(run_dir / CONFIG_FILE)
    try:
        model_cfg = ModelConfig.from_dict(cfg["model"], f"{where}: model")
        train_cfg = TrainConfig.from_dict(cfg["train"], f"{where}: train")
    except (ConfigError, KeyError) as exc:
        raise RunError(f"{where}: {exc}" if isinstance(exc, KeyError) else str(exc)) from exc
    cache_info = cfg.get("cache") or {}
    fp = expect_fingerprint if expect_fingerprint is not None else (cache.fingerprint if cache else None)
    check_fingerprint(run_dir, cache_info.get("fingerprint"), fp)
    metrics = read_metrics(run_dir)
    where = run_dir / METRICS_FILE
    threshold = unit_interval("threshold", metrics.get("threshold"), where)
    alpha = unit_interval("alpha", metrics.get("alpha", train_cfg.alpha), where)
    weights_path = run_dir / MODEL_FILE
    if not weights_path.is_file():
        raise RunError(f"{run_dir}: {MODEL_FILE} missing")
    _check_shapes(model_cfg, weights_path)              # before allocating: a hand-edited config cannot blow up
    tensors, _ = load_tensors(weights_path)
    model = ConflictAwareModel(model_cfg)
    load_weights(model, tensors, str(weights_path))
    run = Run(run_dir, model, model_cfg, train_cfg, threshold, alpha, metrics, cache_info, cfg,
              calibration=load_calibration(run_dir))
    if train_cfg.unfreeze_top:
        _attach_tops(run)
        if cache is not None:
            run.prefix_cached = cache_prefix_problem(cache.spec, train_cfg.unfreeze_top) is None
    run.model.to(device).eval()
    return run


def _check_shapes(model_cfg: ModelConfig, weights_path: Path) -> None:
    """The weight file's tensor shapes against the config's, read from the file's header and a model built on
    the meta device: nothing is allocated for a config that does not fit its weights."""
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in ConflictAwareModel(model_cfg).state_dict().items()}
    try:
        with safe_open(str(weights_path), framework="pt") as fh:
            have = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise RunError(f"{weights_path}: not a readable safetensors file ({exc})") from exc
    bad = sorted(k for k in want if k in have and want[k] != have[k])
    if bad:
        raise RunError(f"{weights_path}: weight {bad[0]} has shape {have[bad[0]]} but the config expects "
                       f"{want[bad[0]]} (config.json edited?)")


def _attach_tops(run: Run) -> None:
    """Rebuild the fine-tuned top blocks (from the HF configs in config.json + encoder_top.safetensors)."""
    where = str(run.path / CONFIG_FILE)
    enc = run.config.get("encoders")
    if not isinstance(enc, dict) or not {"unfreeze_top", "hf_configs", "spec"} <= set(enc):
        raise RunError(f"{where}: unfreeze_top is set but the 'encoders' section (hf_configs, spec) is missing")
    n = int(enc["unfreeze_top"])
    if n != run.unfreeze_top or set(enc["hf_configs"]) != set(run.model_config.present):
        raise RunError(f"{where}: the 'encoders' section does not match the train/model options")
    try:
        tops = tops_from_configs(enc["hf_configs"], n, where)
    except AHError as exc:
        raise RunError(str(exc)) from exc
    load_tops(run.path / enc.get("weights", TOPS_FILE), tops)
    run.model = TopBlocksHeads(tops, run.model)
