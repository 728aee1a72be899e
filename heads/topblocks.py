"""Checkpoint A's model: the top n encoder blocks of each modality (trainable) in front of the heads.

`TopBlocksHeads` maps the hidden states that ENTER the top n blocks ('prefix') to the heads' logits:
prefix -> TopBlocks (a copy of the encoder's top blocks) -> the 'last' tokens -> heads.
Both training paths share it, so they share weights, checkpoints and run folders:
- cached (`train-heads --unfreeze-top n`): the prefix states come from the cache; only n blocks per encoder
  run per step;
- end to end (`finetune`, ahflows/finetune.py): the frozen lower blocks run on the raw media every step and
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
import copy
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from extract.errors import AHError
from extract.spec import ExtractionSpec, SpecError, spec_from_dict
from extract.vocab import MODALITIES, PREFIX
from heads.split_data import SplitData
from heads.model import ConflictAwareModel
from heads.run_files import RunError, load_tensors, load_weights, save_tensors
from heads.tokens import Tokens

TOPS_FILE = "encoder_top.safetensors"


class TopBlocksError(AHError):
    """A cache or run folder that cannot feed or rebuild the fine-tuned top encoder blocks."""


# ---- the blocks ------------------------------------------------------------------------------------


def block_parts(model: nn.Module, modality: str) -> tuple[nn.ModuleList, nn.Module | None]:
    """(the transformer blocks, the module applied after them inside last_hidden_state, if any)."""
    if modality not in MODALITIES:
        raise TopBlocksError(f"unknown modality {modality!r}")
    encoder = getattr(model, "encoder", None)
    blocks = getattr(encoder, "layer", None) or getattr(encoder, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TopBlocksError(f"{model.__class__.__name__}: no encoder.layer(s) block list found")
    final = None
    if modality == "video":
        final = getattr(model, "layernorm", None)  # VideoMAE without mean pooling: LayerNorm after the blocks
    elif modality == "audio" and getattr(model.config, "do_stable_layer_norm", False):
        final = encoder.layer_norm  # pre-LN HuBERT (large): LayerNorm after the blocks
    return blocks, final



def segment_ids(lengths: Sequence[int], device=None) -> torch.Tensor:
    """(sum(lengths),) int64 ids 0, 0, ..., 1, 1, ...: which encoder segment each cached token came from."""
    counts = torch.as_tensor(list(lengths), dtype=torch.long, device=device)
    return torch.repeat_interleave(torch.arange(len(counts), device=device), counts)


def _same_segment(seg: torch.Tensor):
    """A mask function (transformers masking_utils) that keeps attention inside each packed segment."""
    def same(batch_idx, head_idx, q_idx, kv_idx):
        return seg[batch_idx, q_idx] == seg[batch_idx, kv_idx]
    return same


class TopBlocks(nn.Module):
    """A copy of the top `n` blocks of one encoder: maps the cached 'prefix' state to the 'last' one.

    forward(prefix (B, L, D), mask (B, L) bool True = real token, segments (B, L) int | None) -> (B, L, D).
    `segments` restricts attention to tokens of the same encoder segment (long audio / text were encoded in
    segments), which makes the result exact for them too. VideoMAE takes neither (fixed-length clips).
    """

    def __init__(self, model: nn.Module, modality: str, n: int):
        super().__init__()
        blocks, final = block_parts(model, modality)
        if not 1 <= n <= len(blocks):
            raise TopBlocksError(f"TopBlocks: n={n} is not in 1..{len(blocks)}")
        self.modality = modality
        self.n = n
        self.config = copy.deepcopy(model.config)
        self.blocks = nn.ModuleList(copy.deepcopy(list(blocks[len(blocks) - n :])))
        self.final = copy.deepcopy(final) if final is not None else None
        self.layerdrop = float(getattr(self.config, "layerdrop", 0.0) or 0.0) if modality == "audio" else 0.0

    def _attention_mask(self, prefix: torch.Tensor, mask, segments):
        from transformers.masking_utils import create_bidirectional_mask

        if mask is None and segments is None:
            return None
        if mask is None:
            mask = torch.ones(prefix.shape[:2], dtype=torch.bool, device=prefix.device)
        return create_bidirectional_mask(
            config=self.config, inputs_embeds=prefix, attention_mask=mask.to(prefix.device).bool(),
            and_mask_function=None if segments is None else _same_segment(segments.to(prefix.device)),
        )

    def forward(self, prefix: torch.Tensor, mask: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        hidden = prefix
        if self.modality == "video":
            if segments is not None or (mask is not None and not bool(mask.all())):
                raise TopBlocksError("TopBlocks(video): VideoMAE blocks take no padding mask or segments")
            kwargs = {}
        else:
            kwargs = {"attention_mask": self._attention_mask(prefix, mask, segments)}
        for block in self.blocks:
            if self.training and self.layerdrop > 0 and float(torch.rand([])) < self.layerdrop:
                continue  # HuBERT LayerDrop, as in its encoder loop
            hidden = block(hidden, **kwargs)
        if self.final is not None:
            hidden = self.final(hidden)
        return hidden


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


def tops_from_configs(configs: dict[str, dict], n: int, where: str = "run") -> nn.ModuleDict:
    """Randomly initialised blocks of the right architecture (weights are loaded next)."""
    from transformers import AutoConfig, AutoModel

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
    save_tensors(path, {f"{m}.{k}": v for m, top in tops.items() for k, v in top.state_dict().items()})


def load_tops(path: Path, tops: nn.ModuleDict) -> None:
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
    if PREFIX not in (spec.get("layers") or []):
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
    return all(PREFIX in table[m] for m in modalities)
