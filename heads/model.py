"""The ConflictAwareAH heads (paper section 3): attention pooling, conflict-aware fusion, full and text heads.

Attention pooling with a learned query w over projected tokens y_i = W x_i + b:
    a = softmax_i(w . y_i),   e = sum_i a_i y_i
Because the weights sum to one, e = W (sum_i a_i x_i) + b, and w . y_i = (W^T w) . x_i + w . b where the
constant w . b drops out of the softmax. The 'fused' form scores the RAW tokens with u = W^T w, pools them,
and projects once (the cost on Lv video tokens falls from Lv*Din*D to ~2*Lv*Din MACs); the 'literal'
form projects every token first. Both give the same numbers (tested) and share the same weights.
An empty sequence pools like a single all-zero token: e = b in both forms.

Fusion over the present modalities m_1..m_k: f = [m_1; ...; m_k; |m_i - m_j| for each pair i < j]
(the paper's 6D vector [v; a; t; |v-a|; |v-t|; |a-t|] for all three, without the pairs under
conflict=False), then FFN (LayerNorm, Linear(F, 2F), GELU, Dropout, Linear(2F, F)) and the head
(LayerNorm, Linear(F, 512), GELU, Dropout(0.3), Linear(512, 1)) -> l_full. The text head is the same head
on t alone -> l_text; without the text modality there is no text head (l_text is None, and the loss
weight w and the blend alpha are treated as 0).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from heads.config import POOLINGS, ConfigError, ModelConfig
from heads.tokens import Tokens


class AttentionPool(nn.Module):
    """Linear projection + learned-query soft-attention pooling, masked padding, fused or literal."""

    def __init__(self, in_dim: int, dim: int, pooling: str = "fused"):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.query = nn.Parameter(torch.randn(dim) * 0.02)
        self.pooling = pooling

    def forward(self, tokens: Tokens) -> Tensor:
        if self.pooling == "fused":
            return self._fused(tokens)
        return self._literal(tokens)

    def scores(self, tokens: Tokens) -> Tensor:
        """Unnormalised attention scores (w . (W x_i + b) minus the constant w . b), fused form."""
        x = tokens.values.to(self.proj.weight.dtype)
        return x @ (self.proj.weight.t() @ self.query)

    def weights(self, tokens: Tokens) -> Tensor:
        """Attention weights: (B, L) for dense tokens (0 on padding), (T,) for ragged ones."""
        with torch.autocast(tokens.values.device.type, enabled=False):
            return _softmax(self.scores(tokens), tokens)

    def _fused(self, tokens: Tokens) -> Tensor:
        # In the weights' precision with autocast off: two matrix-vector products, cheap and exact. Ragged
        # tokens are padded first: batched products beat the scatter/index ops, forward and backward
        # (measured on 2 CPU cores: 17 vs 32 ms for 16 x ~1100 audio tokens).
        tokens = tokens.to_padded()
        with torch.autocast(tokens.values.device.type, enabled=False):
            x = tokens.values.to(self.proj.weight.dtype)
            a = _softmax(x @ (self.proj.weight.t() @ self.query), tokens)
            pooled = _weighted_sum(a, x, tokens)
            return self.proj(pooled)

    def _literal(self, tokens: Tokens) -> Tensor:
        y = self.proj(tokens.values.to(self.proj.weight.dtype))      # every token projected (autocast applies)
        with torch.autocast(tokens.values.device.type, enabled=False):
            y = y.to(self.proj.weight.dtype)
            a = _softmax(y @ self.query, tokens)
            pooled = _weighted_sum(a, y, tokens)
            empty = (tokens.lengths() == 0)[:, None]
            return torch.where(empty, self.proj.bias.expand_as(pooled), pooled)


def _softmax(s: Tensor, tokens: Tokens) -> Tensor:
    if tokens.ragged:
        return _segment_softmax(s, tokens.segments, tokens.batch_size)
    if tokens.mask is None:
        return torch.softmax(s, dim=-1)
    mask = tokens.mask
    s = s.masked_fill(~mask, float("-inf"))
    s = torch.where(mask.any(-1, keepdim=True), s, torch.zeros_like(s))   # all-padding rows: no NaN
    return torch.softmax(s, dim=-1) * mask


def _segment_softmax(s: Tensor, seg: Tensor, n: int) -> Tensor:
    """Softmax of `s` within each segment, vectorised with scatter/index ops."""
    smax = torch.full((n,), float("-inf"), dtype=s.dtype, device=s.device)
    smax = smax.scatter_reduce(0, seg, s.detach(), reduce="amax", include_self=True)
    e = torch.exp(s - smax[seg])    # the max is only a shift for stability: detached, exact
    denom = torch.zeros(n, dtype=s.dtype, device=s.device).index_add(0, seg, e)
    return e / denom[seg]


def _weighted_sum(a: Tensor, x: Tensor, tokens: Tokens) -> Tensor:
    if tokens.ragged:
        out = x.new_zeros(tokens.batch_size, x.shape[-1])
        return out.index_add(0, tokens.segments, a[:, None] * x)
    return torch.einsum("bl,bld->bd", a, x)


def make_head(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """LayerNorm -> Linear(in, hidden) -> GELU -> Dropout -> Linear(hidden, 1)."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, 1))


def conflict_features(emb: dict[str, Tensor], pairs: list[tuple[str, str]]) -> list[Tensor]:
    return [torch.abs(emb[x] - emb[y]) for x, y in pairs]


class ConflictAwareModel(nn.Module):
    """Maps {modality: Tokens} to (l_full (B,), l_text (B,) or None)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.pools = nn.ModuleDict({m: AttentionPool(cfg.input_dims[m], cfg.dim, cfg.pooling) for m in cfg.present})
        f = cfg.fusion_dim
        self.ffn = nn.Sequential(nn.LayerNorm(f), nn.Linear(f, cfg.ffn_width), nn.GELU(),
                                 nn.Dropout(cfg.ffn_dropout), nn.Linear(cfg.ffn_width, f))
        self.head = make_head(f, cfg.head_hidden, cfg.head_dropout)
        self.text_head = make_head(cfg.dim, cfg.head_hidden, cfg.head_dropout) if cfg.has_text else None

    def set_pooling(self, pooling: str) -> None:
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
        for p in self.pools.values():
            p.pooling = pooling

    def embed(self, tokens: dict[str, Tokens]) -> dict[str, Tensor]:
        """Pooled, projected embedding (B, D) per present modality."""
        missing = [m for m in self.cfg.present if m not in tokens]
        if missing:
            raise ConfigError(f"model input lacks modality {', '.join(missing)}")
        return {m: self.pools[m](tokens[m]) for m in self.cfg.present}

    def fuse(self, emb: dict[str, Tensor]) -> Tensor:
        """f = [m_1; ...; m_k; conflict pairs] (B, fusion_dim)."""
        parts = [emb[m] for m in self.cfg.present] + conflict_features(emb, self.cfg.pairs)
        return torch.cat(parts, dim=-1)

    def heads(self, emb: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        l_full = self.head(self.ffn(self.fuse(emb))).squeeze(-1)
        l_text = self.text_head(emb["text"]).squeeze(-1) if self.text_head is not None else None
        return l_full, l_text

    def forward(self, tokens: dict[str, Tokens]) -> tuple[Tensor, Tensor | None]:
        return self.heads(self.embed(tokens))

    def window_forward(self, tokens: dict[str, Tokens], windows: int,
                       per_video: Sequence[str] = ()) -> tuple[Tensor, Tensor | None]:
        """Logits of n videos x `windows` windows, row v * windows + w. The modalities in `per_video` come
        once per video (audio, the full transcript): pooled once, repeated for each window."""
        emb = self.embed(tokens)
        return self.heads({m: e.repeat_interleave(windows, 0) if m in per_video else e for m, e in emb.items()})



def build_model(cfg: ModelConfig, seed: int | None = None) -> ConflictAwareModel:
    """A freshly initialised model; with `seed`, initialisation is reproducible."""
    if seed is None:
        return ConflictAwareModel(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ConflictAwareModel(cfg)


def blend(l_full: Tensor, l_text: Tensor | None, alpha: float) -> Tensor:
    """p = alpha sigmoid(l_text) + (1 - alpha) sigmoid(l_full); without a text head p = sigmoid(l_full)."""
    p_full = torch.sigmoid(l_full.float())
    if l_text is None:
        return p_full
    return alpha * torch.sigmoid(l_text.float()) + (1 - alpha) * p_full
