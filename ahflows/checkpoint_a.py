"""Checkpoint A from the cache: the top n blocks of each encoder, copied from the encoders' own weights,
ready to train over the cached 'prefix' states (`ahcli train-heads --unfreeze-top n`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from extract.loading import load_backbone
from extract.spec import ExtractionSpec
from heads.config import ConfigError, ModelConfig, TrainConfig
from heads.split_data import SplitData
from heads.topblocks import TopBlocks, as_spec, cache_prefix_problem, encoders_record, hf_config_dict
from heads.train import train_heads
from heads.train_state import TrainResult


def initial_tops(spec: ExtractionSpec | dict, modalities: Sequence[str], n: int) -> tuple[nn.ModuleDict, dict[str, dict]]:
    """The top n blocks of each encoder of `spec` (an ExtractionSpec or its dict), copied from the encoder's
    weights and trainable; with the encoders' HF configs."""
    spec = as_spec(spec)
    tops, configs = nn.ModuleDict(), {}
    for m in modalities:
        model = load_backbone(spec, m)
        tops[m] = TopBlocks(model, m, n).requires_grad_(True)
        configs[m] = hf_config_dict(model)
        del model
    return tops, configs


def cached_tops(spec: dict[str, Any], modalities: Sequence[str], n: int) -> tuple[nn.ModuleDict, dict[str, Any]]:
    """The blocks to train from a cache with this spec (refused in one line when its prefix states do not
    enter the top n blocks) and config.json's "encoders" section describing them."""
    problem = cache_prefix_problem(spec, n)
    if problem is not None:
        raise ConfigError(f"--unfreeze-top {n}: {problem}")
    tops, configs = initial_tops(spec, modalities, n)
    return tops, encoders_record(spec, configs, n, source="cache")


def train_from_cache(train: SplitData, val: SplitData, model_cfg: ModelConfig, cfg: TrainConfig,
                     out: str | Path | None = None, *, spec: dict[str, Any], **kwargs: Any) -> TrainResult:
    """heads.train.train_heads over a cache with this spec; with cfg.unfreeze_top, checkpoint A's top blocks
    are built from the encoders' weights first (`cached_tops`)."""
    if cfg.unfreeze_top:
        kwargs["tops"], kwargs["encoders"] = cached_tops(spec, model_cfg.present, cfg.unfreeze_top)
    return train_heads(train, val, model_cfg, cfg, out, **kwargs)
