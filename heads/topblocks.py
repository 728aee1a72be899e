"""Checkpoint A's model: the top n encoder blocks of each modality (trainable) in front of the heads.

`TopBlocksHeads` maps the hidden states that ENTER the top n blocks ('prefix') to the heads' logits:
prefix -> TopBlocks (extract.encoders, a copy of the encoder's top blocks) -> the 'last' tokens -> heads.
Both training paths share it, so they share weights, checkpoints and run folders:
- cached (`train-heads --unfreeze-top n`): the prefix states come from the cache; only n blocks per encoder
  run per step;
- end to end (`finetune`, heads/finetune.py): the frozen lower blocks run on the raw media every step and
  produce the same prefix states (in fp32).
Audio and text go through the blocks one row per encoder segment (`Tokens.parts`), padded with a key mask,
so attention stays within what the encoder saw together: the result equals the full encoder's output
exactly (tested), long recordings and transcripts included.

A run folder of such a model holds, beside the heads' model.safetensors, `encoder_top.safetensors` (the
blocks' weights, keys '<modality>.<TopBlocks key>') and a config.json section "encoders" with the block
count, the HF configs of the encoders (to rebuild the blocks without the encoder weights) and the spec.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from extract.errors import AHError
from heads.data import SplitData, Tokens
from heads.model import ConflictAwareModel

TOPS_FILE = "encoder_top.safetensors"
INPUT_LAYER = "prefix"


class TopBlocksError(AHError):
    """A cache or run folder that cannot feed or rebuild the fine-tuned top encoder blocks."""


class TopBlocksHeads(nn.Module):
    """{modality: prefix Tokens} -> (l_full, l_text): the top blocks of each encoder, then the heads."""

    def __init__(self, tops: nn.ModuleDict, heads: ConflictAwareModel):
        super().__init__()
        missing = [m for m in heads.cfg.present if m not in tops]
        if missing:
            raise TopBlocksError(f"no top blocks for modality {', '.join(missing)}")
        self.tops = tops
        self.head_model = heads

    @property
    def cfg(self):
        return self.head_model.cfg

    @property
    def n_top(self) -> int:
        return next(iter(self.tops.values())).n

    def last(self, modality: str, tokens: Tokens) -> Tokens:
        """The 'last' tokens of one modality recomputed from its prefix tokens by the top blocks."""
        return apply_top(self.tops[modality], tokens)

    def embed(self, tokens: dict[str, Tokens]) -> dict[str, Tensor]:
        return {m: self.head_model.pools[m](self.last(m, tokens[m])) for m in self.cfg.present}

    def forward(self, tokens: dict[str, Tokens]) -> tuple[Tensor, Tensor | None]:
        return self.head_model.heads(self.embed(tokens))

    def window_forward(self, tokens: dict[str, Tokens], windows: int,
                       per_video: Sequence[str] = ()) -> tuple[Tensor, Tensor | None]:
        """Logits of n videos x `windows` windows, row v * windows + w. The modalities in `per_video` come
        once per video (audio, the full transcript) and are run through their blocks once, not per window."""
        emb = {}
        for m in self.cfg.present:
            e = self.head_model.pools[m](self.last(m, tokens[m]))
            emb[m] = e.repeat_interleave(windows, 0) if m in per_video else e
        return self.head_model.heads(emb)


def head_model_of(model: nn.Module) -> ConflictAwareModel:
    """The heads of a model: itself, or a TopBlocksHeads' head_model."""
    return model.head_model if isinstance(model, TopBlocksHeads) else model


def tops_of(model: nn.Module) -> nn.ModuleDict | None:
    return model.tops if isinstance(model, TopBlocksHeads) else None


def apply_top(top: nn.Module, tokens: Tokens) -> Tokens:
    """Run a TopBlocks over Tokens. Video clips are fixed-length (B, L, D). Ragged audio/text run one row per
    encoder segment (a sample's tokens of one `parts` id; the whole sample without parts), padded to the
    longest row with a key mask: attention stays within what the encoder saw together, and its cost is per
    segment (a long recording is never one huge masked sequence). The output keeps the input's token order."""
    dtype = next(top.parameters()).dtype
    if not tokens.ragged:
        if tokens.mask is None:
            return Tokens(top(tokens.values.to(dtype)), tokens.batch_size)
        out = top(tokens.values.to(dtype), tokens.mask, segments=tokens.parts)
        return Tokens(out.masked_fill(~tokens.mask[..., None], 0), tokens.batch_size, mask=tokens.mask)
    if tokens.values.shape[0] == 0:
        return Tokens(tokens.values.to(dtype), tokens.batch_size, segments=tokens.segments)
    key = tokens.segments if tokens.parts is None else tokens.segments * (int(tokens.parts.max()) + 1) + tokens.parts
    _, rows = torch.unique_consecutive(key, return_inverse=True)
    dense = Tokens(tokens.values, int(rows.max()) + 1, segments=rows).to_padded()
    out = top(dense.values.to(dtype), dense.mask)[dense.mask]        # row-major = the input's token order
    return Tokens(out, tokens.batch_size, segments=tokens.segments)


# ---- building and saving the blocks ----------------------------------------------------------------


def hf_config_dict(model: nn.Module) -> dict[str, Any]:
    """An encoder's HF config as plain JSON (enough to rebuild its blocks without its weights)."""
    return json.loads(model.config.to_json_string(use_diff=False))


def initial_tops(spec, modalities: Sequence[str], n: int) -> tuple[nn.ModuleDict, dict[str, dict]]:
    """The top n blocks of each encoder of `spec` (an ExtractionSpec or its dict), copied from the encoder's
    weights and trainable; with the encoders' HF configs."""
    from extract.encoders import TopBlocks, load_backbone

    spec = as_spec(spec)
    tops, configs = nn.ModuleDict(), {}
    for m in modalities:
        model = load_backbone(spec, m)
        tops[m] = TopBlocks(model, m, n).requires_grad_(True)
        configs[m] = hf_config_dict(model)
        del model
    return tops, configs


def tops_from_configs(configs: dict[str, dict], n: int, where: str = "run") -> nn.ModuleDict:
    """Randomly initialised blocks of the right architecture (weights are loaded next)."""
    from transformers import AutoConfig, AutoModel

    from extract.encoders import TopBlocks

    tops = nn.ModuleDict()
    for m, d in configs.items():
        d = dict(d)
        try:
            cfg = AutoConfig.for_model(d.pop("model_type"), **d)
        except (KeyError, ValueError, TypeError) as exc:
            raise TopBlocksError(f"{where}: the {m} encoder config cannot be rebuilt ({exc})") from exc
        cfg.num_hidden_layers = n                      # only the blocks that are kept
        with _quiet_init():
            try:
                model = AutoModel.from_config(cfg, attn_implementation="sdpa")
            except (ValueError, ImportError):
                model = AutoModel.from_config(cfg)
        tops[m] = TopBlocks(model, m, n)
    return tops


@contextlib.contextmanager
def _quiet_init():
    """Weight init of the throw-away skeleton: seeded so it never disturbs the caller's random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def save_tops(path: Path, tops: nn.ModuleDict) -> None:
    from heads.checkpoint import save_tensors

    save_tensors(path, {f"{m}.{k}": v for m, top in tops.items() for k, v in top.state_dict().items()})


def load_tops(path: Path, tops: nn.ModuleDict) -> None:
    from heads.checkpoint import RunError, load_tensors, load_weights

    if not Path(path).is_file():
        raise RunError(f"{Path(path).parent}: {Path(path).name} missing (the fine-tuned encoder blocks)")
    tensors, _ = load_tensors(path)
    load_weights(tops, tensors, str(path))


def encoders_record(spec, configs: dict[str, dict], n: int, source: str) -> dict[str, Any]:
    """config.json's "encoders" section of a run with fine-tuned top blocks."""
    spec_dict = spec if isinstance(spec, dict) else spec.to_dict()
    return {"unfreeze_top": int(n), "source": source, "weights": TOPS_FILE, "spec": spec_dict,
            "hf_configs": configs}


def as_spec(spec):
    """An ExtractionSpec from a spec or its dict (e.g. a cache manifest's)."""
    from extract.spec import ExtractionSpec, SpecError, spec_from_dict

    if isinstance(spec, ExtractionSpec):
        return spec
    try:
        return spec_from_dict(dict(spec))
    except (SpecError, TypeError) as exc:
        raise TopBlocksError(f"the encoder spec cannot be read ({exc})") from exc


# ---- cached prefix states --------------------------------------------------------------------------


def cache_prefix_problem(spec: dict | None, n: int) -> str | None:
    """Why a cache (its spec dict) cannot feed top-n blocks, or None when it can."""
    spec = spec or {}
    if "prefix" not in (spec.get("layers") or []):
        return ("the cache holds no 'prefix' layer (re-extract with 'prefix' added to the spec's layers "
                f"and unfreeze_top {n})")
    have = int(spec.get("unfreeze_top") or 0)
    if have != n:
        return (f"the cache's 'prefix' states enter the top {have} blocks, not {n} (use --unfreeze-top {have}, "
                f"or re-extract with unfreeze_top {n})")
    return None


def data_has_prefix(data: SplitData, modalities: Sequence[str], text_source: str = "full") -> bool:
    table = {"video": data.video, "audio": data.audio,
             "text": data.text_window if text_source == "window" else data.text}
    return all(INPUT_LAYER in table[m] for m in modalities)


@torch.no_grad()
def cached_window_logits(core: TopBlocksHeads, data: SplitData, *, windows: int | None, text_source: str = "full",
                         batch_size: int = 64, device=None, amp: bool = True):
    """infer.window_logits for a TopBlocksHeads over cached prefix states: audio and the full transcript
    go through their blocks once per video, video clips once per window."""
    from heads.infer import WindowLogits, autocast

    device = torch.device(device) if device is not None else next(core.parameters()).device
    w = data.max_windows if not windows else min(int(windows), data.max_windows)
    n = len(data)
    per = max(1, int(batch_size) // max(w, 1))             # videos per forward
    present = core.cfg.present
    shared = ["audio"] + (["text"] if text_source == "full" else [])
    was_training = core.training
    core.eval()
    full, text, valid = [], [], []
    try:
        for s in range(0, n, per):
            rows = torch.arange(s, min(s + per, n), device=data.device)
            r_rep = rows.repeat_interleave(w)
            wins = torch.arange(w, device=data.device).repeat(rows.numel())
            ok = wins < data.n_windows[r_rep]
            wins = torch.minimum(wins, data.n_windows[r_rep] - 1)
            tokens: dict[str, Tokens] = {}
            if "video" in present:
                tokens["video"] = Tokens(data.video[INPUT_LAYER][r_rep, wins], r_rep.numel())
            if "audio" in present:
                tokens["audio"] = data.audio[INPUT_LAYER].gather(rows)
            if "text" in present:
                tokens["text"] = (data.text[INPUT_LAYER].gather(rows) if text_source == "full"
                                  else data.text_window[INPUT_LAYER].gather(r_rep * data.max_windows + wins))
            tokens = {m: t.to(device, non_blocking=True) for m, t in tokens.items()}
            with autocast(device, amp):
                lf, lt = core.window_forward(tokens, w, per_video=shared)
            full.append(lf.float().cpu())
            if lt is not None:
                text.append(lt.float().cpu())
            valid.append(ok.cpu())
    finally:
        core.train(was_training)
    shape = (n, w)
    return WindowLogits(torch.cat(full).view(shape), torch.cat(text).view(shape) if text else None,
                        torch.cat(valid).view(shape))


__all__ = ["TopBlocksHeads", "head_model_of", "tops_of", "TopBlocksError", "TOPS_FILE", "apply_top", "initial_tops", "tops_from_configs",
           "save_tops", "load_tops", "encoders_record", "cache_prefix_problem", "data_has_prefix",
           "cached_window_logits", "hf_config_dict", "as_spec"]
