"""`ahcli explain`: why one video got its score.

For one cached video and one run, over the same eval windows `evaluate` averages:
- the probability of each head (full head, text head; each averaged over the windows), the blended
  probability p = alpha p_text + (1 - alpha) p_full, the run's threshold and the decision;
- gradient x input of the full logit with respect to the fusion vector f = [v; a; t; |v-a|; |v-t|; |a-t|],
  summed per block and averaged over the windows. Positive values pushed the video towards A/H. Gradient
  x input is a first-order attribution (the FFN and head are not linear), so the block values need not add
  up to the logit; they rank what mattered. The conflict pair reported is the one that pushed the logit
  most in the direction it went (towards A/H for a positive full logit);
- the attention-pooling weights of each modality (each sums to 1 over its tokens): per video window, the
  weight of each tubelet (VideoMAE tokens are time-major: frames/tubelet time slices x patches); for the
  audio, per HuBERT token (token i ~ i x 20 ms) and per time bin; for the transcript, per token, mapped back
  to text by re-tokenising the transcript with the cache spec's tokenizer in the same segments the
  extraction used (the cache stores embeddings only). Token strings need the transcript: --data ROOT.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ahflows.single import CachedVideo, load_video
from extract.bah import PRIVATE_DIR, read_split_file, split_file, transcript_path
from extract.encoders import text_segments
from extract.errors import AHError
from extract.loading import load_preprocessor
from extract.spec import spec_from_dict
from extract.store import CacheReader
from extract.transcripts import parse_transcript
from extract.windows import window_text
from heads.model import ConflictAwareModel, blend
from heads.runs import load_run
from heads.topblocks import head_model_of

AUDIO_TOKEN_S = 0.02          # HuBERT / wav2vec2: one token per 320 samples at 16 kHz
BIN_WIDTHS = (0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
MAX_BINS = 20
SHORT = {"video": "v", "audio": "a", "text": "t"}


class ExplainError(AHError):
    """A run or video that cannot be explained (e.g. a run kind without pooled heads)."""


@dataclass
class HeadProbs:
    full: float                   # sigmoid(l_full), mean over windows
    text: float | None            # sigmoid(l_text), mean over windows; None without a text head
    blended: float                # what `evaluate` scores
    alpha: float
    threshold: float
    flagged: bool                 # blended >= threshold
    full_logit: float             # mean over windows


@dataclass
class Block:
    name: str                     # 'v', 'a', 't' or a pair 'v-a', 'v-t', 'a-t'
    contribution: float           # gradient x input summed over the block, mean over windows
    pair: bool


@dataclass
class WindowWeights:
    index: int
    start_frame: int
    start_s: float
    end_s: float
    p_full: float
    p_text: float | None
    p_blended: float
    slice_weights: list[float]    # attention per time slice (tubelet) of the window; sums to 1
    slice_frames: int             # frames per slice
    peak_s: float                 # middle of the most attended slice


@dataclass
class TimeBin:
    start_s: float
    end_s: float
    weight: float


@dataclass
class Token:
    position: int
    text: str | None              # None when the transcript could not be re-tokenised
    weight: float
    special: bool = False


@dataclass
class Word:
    text: str
    positions: list[int]          # the word's token positions
    weight: float                 # sum of its tokens' weights


@dataclass
class TextWeights:
    window: int | None            # None: the full transcript (shared by every window)
    tokens: list[Token]
    top: list[Token]
    top_words: list[Word] = field(default_factory=list)   # sub-word tokens merged (needs the token strings)


@dataclass
class Explanation:
    video_id: str
    split: str
    label: int | None
    run: str
    windows_used: int
    probs: HeadProbs
    blocks: list[Block]
    top_pair: str | None
    video: list[WindowWeights] = field(default_factory=list)
    audio_weights: list[float] = field(default_factory=list)
    audio_bins: list[TimeBin] = field(default_factory=list)
    text: list[TextWeights] = field(default_factory=list)
    attention_sums: dict[str, list[float]] = field(default_factory=dict)   # per modality: sum of each weight set
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


# ---- attribution -----------------------------------------------------------------------------------


def block_names(model_cfg) -> list[str]:
    names = [SHORT[m] for m in model_cfg.present]
    return names + [f"{SHORT[x]}-{SHORT[y]}" for x, y in model_cfg.pairs]


def fusion_attribution(model, emb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(l_full (B,), gradient x input per block (B, blocks)) for pooled embeddings `emb`."""
    cfg = model.cfg
    f = model.fuse({k: v.detach() for k, v in emb.items()}).requires_grad_(True)
    with torch.enable_grad():
        l_full = model.head(model.ffn(f)).squeeze(-1)
        (grad,) = torch.autograd.grad(l_full.sum(), f)
    gx = (grad * f).detach()
    return l_full.detach(), gx.view(gx.shape[0], -1, cfg.dim).sum(-1)


def leading_pair(blocks: Sequence[Block], full_logit: float) -> str | None:
    """The conflict pair that pushed the full logit most in the direction it went (towards A/H when the
    logit is >= 0, away otherwise); when no pair pushed that way, the pair with the largest |value|."""
    pairs = [b for b in blocks if b.pair]
    if not pairs:
        return None
    sign = 1.0 if full_logit >= 0 else -1.0
    along = [b for b in pairs if b.contribution * sign > 0]
    if along:
        return max(along, key=lambda b: b.contribution * sign).name
    return max(pairs, key=lambda b: abs(b.contribution)).name


# ---- mapping tokens to time and text ---------------------------------------------------------------


def tubelet_size(spec: dict[str, Any]) -> int:
    """The video encoder's tubelet size from its config.json (local folder); VideoMAE's 2 otherwise."""
    model = Path(str((spec.get("video") or {}).get("model", "")))
    try:
        return int(json.loads((model / "config.json").read_text(encoding="utf-8")).get("tubelet_size", 2))
    except (OSError, ValueError):
        return 2


def slice_weights(weights: torch.Tensor, frames: int, tubelet: int) -> list[float]:
    """(Lv,) token weights -> weight per time slice (time-major token order); one slice if the shape disagrees."""
    n_t = max(frames // max(tubelet, 1), 1)
    if weights.numel() % n_t:
        return [float(weights.sum())]
    return weights.view(n_t, -1).sum(-1).tolist()


def time_bins(weights: Sequence[float], step_s: float = AUDIO_TOKEN_S) -> list[TimeBin]:
    """Token weights (token i at i x step_s) summed into at most MAX_BINS bins of a round width."""
    w = np.asarray(weights, dtype=np.float64)
    duration = len(w) * step_s
    width = next((b for b in BIN_WIDTHS if duration / b <= MAX_BINS), BIN_WIDTHS[-1])
    idx = np.floor(np.arange(len(w)) * step_s / width + 1e-9).astype(int)
    sums = np.bincount(idx, weights=w) if len(w) else np.zeros(0)
    return [TimeBin(round(k * width, 3), round(min((k + 1) * width, duration), 3), float(s)) for k, s in enumerate(sums)]


def load_tokenizer(spec: dict[str, Any]):
    """The cache spec's text tokenizer (AutoTokenizer, local folder or hub cache); None when unavailable."""

    try:
        return spec_from_dict(spec), load_preprocessor(spec_from_dict(spec), "text")
    except AHError:
        return None, None


def token_strings(spec_obj, tokenizer, text: str, expected: int) -> tuple[list[str], list[bool]] | None:
    """Each cached text position's token (segments as the extraction made them); None on a length mismatch."""
    ids = [i for seg in text_segments(tokenizer, spec_obj, text) for i in seg]
    if len(ids) != expected:
        return None
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    strings = [tokenizer.convert_tokens_to_string([p]) for p in pieces]
    return strings, [i in special for i in ids]


def transcript_of(data_root: Path, video_id: str, split: str, duration: float) -> tuple[str, list]:
    """(full transcript as extracted: the split file's text, else the YAML's; chunks) of a video."""
    root = Path(data_root)
    base = root / PRIVATE_DIR if split == "private" else root
    path = split_file(base, split)
    if not path.is_file():
        raise ExplainError(f"{path}: split file not found (is {root} the BAH root the cache was made from?)")
    lines, _ = read_split_file(path, private=split == "private", split=split)
    text = next((line.transcript for line in lines if line.video_id == video_id), None)
    if text is None:
        raise ExplainError(f"{path}: no line for {video_id!r}")
    yml = transcript_path(base, video_id)
    chunks: list = []
    if yml.is_file():
        yaml_text, chunks = parse_transcript(yml, duration)
        text = text or yaml_text
    return text, chunks


def _tokens(weights: torch.Tensor, strings: tuple[list[str], list[bool]] | None, top_k: int) -> tuple[list[Token], list[Token]]:
    toks = [Token(i, None if strings is None else strings[0][i], float(w),
                  False if strings is None else strings[1][i]) for i, w in enumerate(weights.tolist())]
    ranked = sorted((t for t in toks if not t.special), key=lambda t: -t.weight)
    return toks, ranked[:top_k]


def words(tokens: Sequence[Token]) -> list[Word]:
    """Merge sub-word tokens into words: a word starts after a special or punctuation token or at a token
    whose text begins with white space (byte-level BPE marks word starts that way)."""
    out: list[Word] = []
    prev_special = True
    for t in tokens:
        if t.special or t.text is None or not any(c.isalnum() for c in t.text):
            prev_special = True          # special tokens and punctuation end a word
            continue
        if prev_special or t.text[:1].isspace() or not out:
            out.append(Word(t.text.strip(), [t.position], t.weight))
        else:
            out[-1].text += t.text
            out[-1].positions.append(t.position)
            out[-1].weight += t.weight
        prev_special = False
    return [w for w in out if w.text]


# ---- the explanation -------------------------------------------------------------------------------


def _segment(weights: torch.Tensor, tokens, row: int) -> torch.Tensor:
    if tokens.ragged:
        return weights[tokens.segments == row]
    if tokens.mask is not None:
        return weights[row][tokens.mask[row]]
    return weights[row]


def explain_video(run_dir: Path, cache: Path, video_id: str, *, data_root: Path | None = None,
                  windows: int = 5, top_k: int = 10) -> Explanation:
    """Explain one cached video's score under one run (CPU; one forward over its windows)."""

    reader = CacheReader(cache)
    run = load_run(run_dir, cache=reader, device="cpu")
    core = run.model
    heads = head_model_of(core)                     # checkpoint A: the pooled heads after the top blocks
    if not isinstance(heads, ConflictAwareModel):
        raise ExplainError(f"{run_dir}: explain reads pooled heads over cached tokens; this run's model is a "
                           f"{type(core).__name__}")
    view = CachedVideo(reader, video_id)
    data = load_video(view, [run])
    meta = reader.meta(video_id)
    cfg, mcfg = run.train_config, run.model_config
    layer = cfg.input_layer
    w = data.max_windows if not windows else min(int(windows), data.max_windows)
    rows = torch.zeros(w, dtype=torch.long)
    batch = data.batch(rows, torch.arange(w), modalities=mcfg.present, layer=layer, text_source=cfg.text_source)
    core.eval()
    with torch.no_grad():
        tokens = batch.tokens
        if core is not heads:                       # prefix states through the fine-tuned top blocks first
            tokens = {m: core.last(m, t) for m, t in tokens.items()}
        emb = heads.embed(tokens)
        l_text = heads.text_head(emb["text"]).squeeze(-1) if heads.text_head is not None else None
        attn = {m: heads.pools[m].weights(tokens[m]) for m in mcfg.present}
    l_full, blocks = fusion_attribution(heads, emb)
    alpha = run.alpha if mcfg.has_text else 0.0
    p_blend = blend(l_full, l_text, alpha)
    p_full = torch.sigmoid(l_full)
    p_text = torch.sigmoid(l_text) if l_text is not None else None
    probs = HeadProbs(float(p_full.mean()), None if p_text is None else float(p_text.mean()), float(p_blend.mean()),
                      float(alpha), float(run.threshold), bool(float(p_blend.mean()) >= run.threshold),
                      float(l_full.mean()))
    names = block_names(mcfg)
    mean_blocks = blocks.mean(0).tolist()
    block_list = [Block(n, float(v), "-" in n) for n, v in zip(names, mean_blocks)]
    top_pair = leading_pair(block_list, float(l_full.mean()))

    exp = Explanation(video_id, meta["split"], meta["label"], str(run_dir), w, probs, block_list, top_pair)
    spec = reader.spec
    fps = float(meta["fps"])
    frames = int((spec.get("windows") or {}).get("frames", 16))
    starts = list(meta["window_starts"])[:w]
    sums: dict[str, list[float]] = {}
    if "video" in attn:
        tub = tubelet_size(spec)
        sums["video"] = []
        for k in range(w):
            wk = _segment(attn["video"], tokens["video"], k)
            sl = slice_weights(wk, frames, tub)
            per = frames / len(sl)
            start = int(starts[k]) if k < len(starts) else 0
            peak = int(np.argmax(sl))
            exp.video.append(WindowWeights(k, start, start / fps, (start + frames) / fps, float(p_full[k]),
                                           None if p_text is None else float(p_text[k]), float(p_blend[k]),
                                           [float(x) for x in sl], int(per), (start + (peak + 0.5) * per) / fps))
            sums["video"].append(float(wk.sum()))
    if "audio" in attn:
        wa = _segment(attn["audio"], tokens["audio"], 0)      # the whole recording: the same every window
        exp.audio_weights = [float(x) for x in wa]
        exp.audio_bins = time_bins(exp.audio_weights)
        sums["audio"] = [float(wa.sum())]
    if "text" in attn:
        sums["text"] = _explain_text(exp, attn["text"], tokens["text"], cfg.text_source, spec, data_root,
                                     meta, starts, frames, fps, top_k)
    exp.attention_sums = sums
    return exp


def _explain_text(exp: Explanation, weights, tokens, source: str, spec: dict, data_root: Path | None, meta: dict,
                  starts: list[int], frames: int, fps: float, top_k: int) -> list[float]:
    rows = [0] if source == "full" else list(range(exp.windows_used))
    texts: list[str | None] = [None] * len(rows)
    spec_obj = tokenizer = None
    if data_root is None:
        exp.notes.append("transcript tokens shown by position only: pass --data ROOT (the BAH root the cache "
                         "was made from) to see the words")
    else:
        transcript, chunks = transcript_of(data_root, exp.video_id, exp.split, float(meta["duration"]))
        if source == "full":
            texts = [transcript]
        else:
            texts = [window_text(chunks, s / fps, (s + frames) / fps) for s in starts[: len(rows)]]
        spec_obj, tokenizer = load_tokenizer(spec)
        if tokenizer is None:
            exp.notes.append("the cache spec's text tokenizer could not be loaded: tokens shown by position only")
    sums = []
    for k, row in enumerate(rows):
        wk = _segment(weights, tokens, row)
        strings = None
        if tokenizer is not None and texts[k] is not None:
            strings = token_strings(spec_obj, tokenizer, texts[k], wk.numel())
            if strings is None:
                exp.notes.append(f"re-tokenised transcript{'' if source == 'full' else f' of window {k}'} does not "
                                 f"match the {wk.numel()} cached tokens: tokens shown by position only")
        toks, top = _tokens(wk, strings, top_k)
        ranked = sorted(words(toks), key=lambda w: -w.weight)[:top_k] if strings is not None else []
        exp.text.append(TextWeights(None if source == "full" else k, toks, top, ranked))
        sums.append(float(wk.sum()))
    return sums


__all__ = ["Explanation", "HeadProbs", "Block", "WindowWeights", "TimeBin", "Token", "TextWeights", "ExplainError",
           "Word", "explain_video", "leading_pair", "fusion_attribution", "block_names", "time_bins", "slice_weights",
           "token_strings", "transcript_of", "words"]
