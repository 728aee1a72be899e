"""Frozen encoders (VideoMAE, HuBERT, RoBERTa) loaded through the transformers Auto classes.

An encoder is a hub id (+ revision) or a local folder in HF format; both go through `from_pretrained`.
`FrozenEncoders` turns one video's clips / audio / transcript into the token sequences of the layers the spec
asks for: 'last' (the final sequence) and 'prefix' (the hidden state entering the top `unfreeze_top` blocks).
`TopBlocks` copies those top blocks so that TopBlocks(prefix) == last: checkpoint A trains from the cache.
`write_tiny_encoders` writes small random models of the same architectures for tests and demos.

The `*_forward` functions hold the preprocessing + forward logic without any grad/autocast policy, so the
end-to-end fine-tuning path runs exactly the same code with gradients on.
"""
from __future__ import annotations

import copy
import hashlib
import math
import re
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from extract.errors import AHError
from extract.spec import ExtractionSpec

MODALITIES = ("video", "audio", "text")
_AUTOCAST_DTYPE = torch.bfloat16
# Files that define a local encoder's numbers (weights, config, preprocessing, tokenizer).
_ID_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")


class EncoderError(AHError):
    """An encoder that cannot be found, loaded or fed (the message names the model and the problem)."""


# ----------------------------------------------------------------------------------------------- loading


def _model_spec(spec: ExtractionSpec, modality: str):
    if modality not in MODALITIES:
        raise EncoderError(f"unknown modality {modality!r} (expected one of {', '.join(MODALITIES)})")
    return getattr(spec, modality)


def _is_local(model: str) -> bool:
    p = Path(model).expanduser()
    return p.is_absolute() or model.startswith((".", "~")) or p.exists()


def _check_local(model: str, modality: str) -> Path:
    path = Path(model).expanduser()
    if not path.is_dir():
        raise EncoderError(f"{path}: {modality} encoder folder not found")
    if not (path / "config.json").is_file():
        raise EncoderError(f"{path}: no config.json in the {modality} encoder folder")
    return path


def _source(spec: ExtractionSpec, modality: str) -> tuple[str, dict[str, Any]]:
    """The `from_pretrained` name and its revision kwargs; local folders are checked first."""
    ms = _model_spec(spec, modality)
    if _is_local(ms.model):
        return str(_check_local(ms.model, modality)), {}
    return ms.model, ({"revision": ms.revision} if ms.revision else {})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


@contextmanager
def _quiet():
    """No per-file progress bars or info chatter from transformers while loading/writing encoders."""
    from transformers.utils import logging as hf_logging

    bar, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _from_pretrained(loader, name: str, modality: str, **kwargs):
    try:
        with _quiet():
            return loader.from_pretrained(name, **kwargs)
    except EncoderError:
        raise
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError...; one line for the user
        raise EncoderError(f"{name}: cannot load the {modality} encoder ({_first_line(exc)})") from exc


def load_backbone(spec: ExtractionSpec, modality: str, device: str | torch.device = "cpu") -> nn.Module:
    """The HF model of one modality: fp32, SDPA attention where supported, eval mode, all weights frozen."""
    from transformers import AutoModel

    name, kw = _source(spec, modality)
    kw = dict(kw, dtype=torch.float32)
    if modality == "text":
        kw["add_pooling_layer"] = False  # only the token sequence is used; a classifier checkpoint has no pooler
    try:
        model = _from_pretrained(AutoModel, name, modality, attn_implementation="sdpa", **kw)
    except EncoderError as exc:
        if "sdpa" not in str(exc).lower() and "attn" not in str(exc).lower():
            raise
        model = _from_pretrained(AutoModel, name, modality, **kw)  # architecture without SDPA: default attention
    model.eval().requires_grad_(False)
    _check_model(spec, modality, model, name)
    return model.to(device)


def _check_model(spec: ExtractionSpec, modality: str, model: nn.Module, name: str) -> None:
    cfg = model.config
    n_layers = int(cfg.num_hidden_layers)
    if "prefix" in spec.layers and not 1 <= spec.unfreeze_top <= n_layers:
        raise EncoderError(f"{name}: unfreeze_top {spec.unfreeze_top} is not in 1..{n_layers} (its layer count)")
    if modality == "video":
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        if size != spec.video.size:
            raise EncoderError(f"{name}: video.size {spec.video.size} does not match the model's image_size {size}")
        if cfg.num_frames != spec.windows.frames:
            raise EncoderError(
                f"{name}: windows.frames {spec.windows.frames} does not match the model's num_frames {cfg.num_frames}"
            )


def load_preprocessor(spec: ExtractionSpec, modality: str):
    """The tokenizer (text), feature extractor (audio) or None (video: normalised in torch from the spec)."""
    from transformers import AutoFeatureExtractor, AutoTokenizer

    if modality == "video":
        return None
    name, kw = _source(spec, modality)
    if modality == "audio":
        return _from_pretrained(AutoFeatureExtractor, name, modality, **kw)
    return _from_pretrained(AutoTokenizer, name, modality, **kw)


def weights_id_of(spec: ExtractionSpec, modality: str, model: nn.Module | None = None) -> str:
    """sha256 over a local folder's files (weights, config, tokenizer) or 'hub-id@revision'."""
    name, kw = _source(spec, modality)
    if _is_local(_model_spec(spec, modality).model):
        digest = hashlib.sha256()
        for path in sorted(Path(name).iterdir()):
            if path.is_file() and path.suffix in _ID_SUFFIXES and not path.name.startswith("."):
                digest.update(path.name.encode() + b"\0")
                with path.open("rb") as fh:
                    for block in iter(lambda: fh.read(1 << 22), b""):
                        digest.update(block)
        return "sha256:" + digest.hexdigest()
    commit = kw.get("revision") or getattr(getattr(model, "config", None), "_commit_hash", None) or "main"
    return f"{name}@{commit}"


# ---------------------------------------------------------------------------------------------- forwards


def _select(model: nn.Module, inputs: dict[str, torch.Tensor], layers: Sequence[str], n: int) -> dict:
    """Run the model once and pick 'last' and/or 'prefix' (= hidden_states[-(n+1)], input of the top n blocks)."""
    want_prefix = "prefix" in layers
    # A plain flag (not an index list): selecting indices is only in newer transformers releases.
    out = model(**inputs, output_hidden_states=want_prefix)
    res = {}
    if "last" in layers:
        res["last"] = out.last_hidden_state
    if want_prefix:
        res["prefix"] = out.hidden_states[-(n + 1)]
    return res


def normalize_clips(clips, mean: Sequence[float], std: Sequence[float], device) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> float32 pixel_values (B, T, 3, H, W): x/255, then (x - mean)/std, on `device`."""
    x = torch.as_tensor(clips).to(device, non_blocking=True)
    if x.dtype != torch.uint8 or x.ndim != 5 or x.shape[-1] != 3:
        raise EncoderError(f"video clips must be uint8 (B, T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    m = torch.tensor(mean, dtype=torch.float32, device=x.device)
    s = torch.tensor(std, dtype=torch.float32, device=x.device)
    x = x.float().mul_(1.0 / 255.0).sub_(m).div_(s)
    return x.permute(0, 1, 4, 2, 3).contiguous()


def video_forward(model, spec: ExtractionSpec, clips, layers: Sequence[str], device) -> dict[str, torch.Tensor]:
    """Clips (B, T, H, W, 3) uint8 at spec.video.size -> {layer: (B, Lv, Dv)} on `device`."""
    shape = tuple(clips.shape)
    want = (spec.windows.frames, spec.video.size, spec.video.size, 3)
    if len(shape) != 5 or shape[1:] != want:
        raise EncoderError(f"video clips must be (B, {', '.join(map(str, want))}), got {shape}")
    pixels = normalize_clips(clips, spec.video.mean, spec.video.std, device)
    return _select(model, {"pixel_values": pixels}, layers, spec.unfreeze_top)


def conv_receptive_field(config) -> int:
    """Samples one output frame of the wav2vec2/HuBERT conv feature encoder sees (400 for the base models)."""
    field, jump = 1, 1
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        field += (kernel - 1) * jump
        jump *= stride
    return field


def conv_output_length(config, n_samples: int) -> int:
    """Tokens the conv feature encoder gives for `n_samples` (after padding to the receptive field)."""
    length = max(int(n_samples), conv_receptive_field(config))
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        length = (length - kernel) // stride + 1
    return length


def audio_segment_bounds(n_samples: int, sample_rate: int, segment_seconds: float) -> list[tuple[int, int]]:
    """Split [0, n) into the fewest equal consecutive segments of at most segment_seconds (no tiny tail)."""
    max_len = max(int(round(segment_seconds * sample_rate)), 1)
    count = max(math.ceil(n_samples / max_len), 1)
    edges = np.linspace(0, n_samples, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def audio_segment_lengths(config, spec: ExtractionSpec, n_samples: int) -> list[int]:
    """Tokens per audio segment, in order (sum = La): what `TopBlocks(segments=...)` needs for long audio."""
    bounds = audio_segment_bounds(n_samples, spec.audio.sample_rate, spec.audio.segment_seconds)
    return [conv_output_length(config, b - a) for a, b in bounds]


def audio_forward(model, extractor, spec: ExtractionSpec, wave, layers: Sequence[str], device) -> dict:
    """One recording (N,) float -> {layer: (La, Da)}: consecutive segments encoded alone, then concatenated."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise EncoderError(f"audio must be a mono wave (N,), got shape {wave.shape}")
    min_len = conv_receptive_field(model.config)
    parts: dict[str, list[torch.Tensor]] = {}
    for a, b in audio_segment_bounds(len(wave), spec.audio.sample_rate, spec.audio.segment_seconds):
        seg = wave[a:b]
        if len(seg) < min_len:  # shorter than one conv frame: zero-pad so it still gives one token
            seg = np.pad(seg, (0, min_len - len(seg)))
        feats = extractor(seg, sampling_rate=spec.audio.sample_rate, return_tensors="pt")
        inputs = {"input_values": feats["input_values"].to(device)}
        for key, value in _select(model, inputs, layers, spec.unfreeze_top).items():
            parts.setdefault(key, []).append(value[0])
    return {key: torch.cat(chunks, dim=0) for key, chunks in parts.items()}


def text_token_limit(tokenizer, spec: ExtractionSpec) -> int:
    limit = int(spec.text.max_tokens)
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        limit = min(limit, model_max)
    return limit


def text_segments(tokenizer, spec: ExtractionSpec, text: str) -> list[list[int]]:
    """Token ids of each segment (special tokens included, each at most the token limit); never empty."""
    ids = tokenizer(text or "", add_special_tokens=False, verbose=False)["input_ids"]
    body = text_token_limit(tokenizer, spec) - tokenizer.num_special_tokens_to_add(pair=False)
    if body < 1:
        raise EncoderError(f"text.max_tokens {spec.text.max_tokens} leaves no room besides the special tokens")
    chunks = [ids[i : i + body] for i in range(0, len(ids), body)] or [[]]
    prefix, suffix = _special_template(tokenizer)
    return [prefix + chunk + suffix for chunk in chunks]


def _special_template(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens a single sequence gets before / after its body (RoBERTa: <s> ... </s>)."""
    probe = "hello world"
    body = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for k in range(len(full) - len(body) + 1):
        if full[k : k + len(body)] == body:
            return list(full[:k]), list(full[k + len(body) :])
    raise EncoderError("the text tokenizer's special-token template could not be determined")


TEXT_BATCH = 32  # segments per text-encoder forward: many short window transcripts go through in one call


def texts_forward(model, tokenizer, spec: ExtractionSpec, texts: Sequence[str], layers: Sequence[str], device) -> list[dict]:
    """Several transcripts -> one {layer: (Lt, Dt)} each. Every transcript is cut into consecutive segments of
    at most max_tokens; all segments run as right-padded batches (RoBERTa's positions skip padding and the
    mask hides it, so each equals its own unpadded run) and each transcript's sequences are concatenated."""
    segments = [text_segments(tokenizer, spec, text) for text in texts]
    flat = [ids for segs in segments for ids in segs]
    rows: dict[str, list[torch.Tensor]] = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for lo in range(0, len(flat), TEXT_BATCH):
        group = flat[lo : lo + TEXT_BATCH]
        width = max(len(ids) for ids in group)
        input_ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, ids in enumerate(group):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = 1
        inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
        for key, value in _select(model, inputs, layers, spec.unfreeze_top).items():
            rows.setdefault(key, []).extend(value[i, : len(ids)] for i, ids in enumerate(group))
    out, k = [], 0
    for segs in segments:
        out.append({key: torch.cat(r[k : k + len(segs)], dim=0) for key, r in rows.items()})
        k += len(segs)
    return out


def text_forward(model, tokenizer, spec: ExtractionSpec, text: str, layers: Sequence[str], device) -> dict:
    """A transcript -> {layer: (Lt, Dt)}: consecutive segments of at most max_tokens, sequences concatenated."""
    return texts_forward(model, tokenizer, spec, [text], layers, device)[0]


# ---------------------------------------------------------------------------------------- FrozenEncoders


class FrozenEncoders:
    """The three frozen encoders of a spec; every encode_* returns float32 CPU tensors per stored layer."""

    def __init__(self, spec: ExtractionSpec, device: str | torch.device = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        self.layers = tuple(spec.layers)
        self.models = {m: load_backbone(spec, m, self.device) for m in MODALITIES}
        self.extractor = load_preprocessor(spec, "audio")
        self.tokenizer = load_preprocessor(spec, "text")
        self.dims: dict[str, int] = {m: int(self.models[m].config.hidden_size) for m in MODALITIES}
        self._weights_id: dict[str, str] | None = None

    def weights_id(self) -> dict[str, str]:
        if self._weights_id is None:
            self._weights_id = {m: weights_id_of(self.spec, m, self.models[m]) for m in MODALITIES}
        return dict(self._weights_id)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=_AUTOCAST_DTYPE)
        return nullcontext()

    def _to_cpu(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # On CUDA, cast to the cache's dtype before the copy (half the bytes when it stores float16).
        dtype = getattr(torch, self.spec.dtype) if self.device.type == "cuda" else torch.float32
        return {key: value.to(dtype).cpu() for key, value in out.items()}

    def encode_video(self, clips: np.ndarray) -> dict[str, torch.Tensor]:
        """(B, T, H, W, 3) uint8 -> {layer: (B, Lv, Dv)}."""
        with torch.inference_mode(), self._autocast():
            out = video_forward(self.models["video"], self.spec, clips, self.layers, self.device)
        return self._to_cpu(out)

    def encode_audio(self, wave: np.ndarray) -> dict[str, torch.Tensor]:
        """One video's mono wave at spec.audio.sample_rate -> {layer: (La, Da)}."""
        with torch.inference_mode(), self._autocast():
            out = audio_forward(self.models["audio"], self.extractor, self.spec, wave, self.layers, self.device)
        return self._to_cpu(out)

    def encode_text(self, text: str) -> dict[str, torch.Tensor]:
        """A transcript -> {layer: (Lt, Dt)}."""
        with torch.inference_mode(), self._autocast():
            out = text_forward(self.models["text"], self.tokenizer, self.spec, text, self.layers, self.device)
        return self._to_cpu(out)

    def encode_texts(self, texts: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        """Several transcripts (e.g. one video's window-aligned ones) batched -> one {layer: (Lt, Dt)} each."""
        with torch.inference_mode(), self._autocast():
            outs = texts_forward(self.models["text"], self.tokenizer, self.spec, texts, self.layers, self.device)
        return [self._to_cpu(o) for o in outs]

    def audio_segment_lengths(self, n_samples: int) -> list[int]:
        """Tokens per audio segment of a wave of n_samples (sum = La of encode_audio)."""
        return audio_segment_lengths(self.models["audio"].config, self.spec, n_samples)

    def text_segment_lengths(self, text: str) -> list[int]:
        """Tokens per transcript segment (sum = Lt of encode_text)."""
        return [len(ids) for ids in text_segments(self.tokenizer, self.spec, text)]


def load_encoders(spec: ExtractionSpec, device: str = "cpu") -> FrozenEncoders:
    return FrozenEncoders(spec, device)


# ------------------------------------------------------------------------------------ top blocks / finetune


def _block_parts(model: nn.Module, modality: str) -> tuple[nn.ModuleList, nn.Module | None]:
    """(the transformer blocks, the module applied after them inside last_hidden_state, if any)."""
    if modality not in MODALITIES:
        raise EncoderError(f"unknown modality {modality!r}")
    encoder = getattr(model, "encoder", None)
    blocks = getattr(encoder, "layer", None) or getattr(encoder, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise EncoderError(f"{model.__class__.__name__}: no encoder.layer(s) block list found")
    final = None
    if modality == "video":
        final = getattr(model, "layernorm", None)  # VideoMAE without mean pooling: LayerNorm after the blocks
    elif modality == "audio" and getattr(model.config, "do_stable_layer_norm", False):
        final = encoder.layer_norm  # pre-LN HuBERT (large): LayerNorm after the blocks
    return blocks, final


def unfreeze_top(model: nn.Module, modality: str, n: int) -> list[nn.Parameter]:
    """Freeze everything, then enable grads on the top n blocks (+ a LayerNorm after them); return those."""
    blocks, final = _block_parts(model, modality)
    if not 1 <= n <= len(blocks):
        raise EncoderError(f"unfreeze_top: n={n} is not in 1..{len(blocks)}")
    model.requires_grad_(False)
    modules = list(blocks[len(blocks) - n :]) + ([final] if final is not None else [])
    params = [p for module in modules for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def segment_ids(lengths: Sequence[int], device=None) -> torch.Tensor:
    """(sum(lengths),) int64 ids 0, 0, ..., 1, 1, ...: which encoder segment each cached token came from."""
    counts = torch.as_tensor(list(lengths), dtype=torch.long, device=device)
    return torch.repeat_interleave(torch.arange(len(counts), device=device), counts)


class TopBlocks(nn.Module):
    """A copy of the top `n` blocks of one encoder: maps the cached 'prefix' state to the 'last' one.

    forward(prefix (B, L, D), mask (B, L) bool True = real token, segments (B, L) int | None) -> (B, L, D).
    `segments` restricts attention to tokens of the same encoder segment (long audio / text were encoded in
    segments), which makes the result exact for them too. VideoMAE takes neither (fixed-length clips).
    """

    def __init__(self, model: nn.Module, modality: str, n: int):
        super().__init__()
        blocks, final = _block_parts(model, modality)
        if not 1 <= n <= len(blocks):
            raise EncoderError(f"TopBlocks: n={n} is not in 1..{len(blocks)}")
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
        and_fn = None
        if segments is not None:
            seg = segments.to(prefix.device)

            def and_fn(batch_idx, head_idx, q_idx, kv_idx):
                return seg[batch_idx, q_idx] == seg[batch_idx, kv_idx]

        return create_bidirectional_mask(
            config=self.config, inputs_embeds=prefix, attention_mask=mask.to(prefix.device).bool(),
            and_mask_function=and_fn,
        )

    def forward(self, prefix: torch.Tensor, mask: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        hidden = prefix
        if self.modality == "video":
            if segments is not None or (mask is not None and not bool(mask.all())):
                raise EncoderError("TopBlocks(video): VideoMAE blocks take no padding mask or segments")
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


# ------------------------------------------------------------------------------------------ tiny encoders

_TINY_HIDDEN = 64
_TINY_LAYERS = 4
_TINY_HEADS = 4
_TINY_IMAGE = 32
_TINY_CORPUS = """
I am happy with the treatment and I feel great about it.
I am not sure, maybe I will try it, but I don't know if it will work.
Honestly I feel anxious and worried about the side effects.
It is good, I guess, although sometimes I think it is bad for me.
I really want to quit smoking but I also enjoy it, so I hesitate.
Perhaps I could exercise more, yet I am tired and it is hard.
The doctor said it is fine and I trust her, absolutely.
I hate the pills, they make me sick, but they help a little.
Well, um, I suppose it depends, I might change my mind later.
I love my family and they support me every day.
This is terrible, I am angry and frustrated with everything.
Probably yes, or probably no, I cannot decide right now.
I would like to eat healthier, but fast food is easy and cheap.
Sure, it could be useful, however I have some doubts.
I'm totally fine with it, no problem at all.
Sometimes I feel sad, sometimes I feel hopeful, it is mixed.
Kind of, sort of, I mean, it is not really clear to me.
I am confident that the vaccine is safe and effective.
I worry that the vaccine is risky, I am hesitant to take it.
Thank you, that was a nice and pleasant conversation.
"""


def _tiny_video(path: Path) -> None:
    from transformers import VideoMAEConfig, VideoMAEImageProcessor, VideoMAEModel

    cfg = VideoMAEConfig(
        image_size=_TINY_IMAGE, patch_size=8, num_channels=3, num_frames=16, tubelet_size=2,
        hidden_size=_TINY_HIDDEN, num_hidden_layers=_TINY_LAYERS, num_attention_heads=_TINY_HEADS,
        intermediate_size=2 * _TINY_HIDDEN, use_mean_pooling=False,  # like videomae-base: LayerNorm on top
    )
    VideoMAEModel(cfg).save_pretrained(path)
    VideoMAEImageProcessor(
        size={"shortest_edge": _TINY_IMAGE}, crop_size={"height": _TINY_IMAGE, "width": _TINY_IMAGE},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(path)


def _tiny_audio(path: Path) -> None:
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    cfg = HubertConfig(
        hidden_size=_TINY_HIDDEN, num_hidden_layers=_TINY_LAYERS, num_attention_heads=_TINY_HEADS,
        intermediate_size=2 * _TINY_HIDDEN, conv_dim=(32,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        feat_extract_norm="group", do_stable_layer_norm=False,  # the hubert-base layout (50 tokens/s)
    )
    HubertModel(cfg).save_pretrained(path)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False,
    ).save_pretrained(path)


def _tiny_tokenizer(path: Path) -> int:
    """A real byte-level BPE (RoBERTa layout) trained on a small built-in corpus; returns the vocab size."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    lines = [line for line in _TINY_CORPUS.strip().splitlines() if line]
    bpe.train_from_iterator(
        lines * 4, vocab_size=600, min_frequency=1, show_progress=False,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    vocab = bpe.get_vocab()
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _bpe_merges(bpe)]
    tok = RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=512)
    tok.save_pretrained(path)
    return len(vocab)


def _bpe_merges(bpe) -> list:
    import json

    return json.loads(bpe.to_str())["model"]["merges"]


def _tiny_text(path: Path) -> None:
    from transformers import RobertaConfig, RobertaModel

    vocab_size = _tiny_tokenizer(path)
    cfg = RobertaConfig(
        vocab_size=vocab_size, hidden_size=_TINY_HIDDEN, num_hidden_layers=_TINY_LAYERS,
        num_attention_heads=_TINY_HEADS, intermediate_size=2 * _TINY_HIDDEN, max_position_embeddings=514,
        type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    RobertaModel(cfg, add_pooling_layer=False).save_pretrained(path)


def _template_spec_text() -> str | None:
    template = Path(__file__).resolve().parent.parent / "cache_spec.yaml"
    return template.read_text(encoding="utf-8") if template.is_file() else None


def _set_yaml_values(text: str, updates: dict[tuple[str | None, str], str]) -> str:
    """Replace `key: value` lines (top level: section None) keeping their comments and layout."""
    out, section = [], None
    for line in text.splitlines():
        top = re.match(r"^([A-Za-z_]\w*):\s*(#.*)?$", line)
        if top:
            section = top.group(1)
        m = re.match(r"^(\s*)([A-Za-z_]\w*):(\s*)([^#]*?)(\s*#.*)?$", line)
        if m and not top:
            where = section if m.group(1) else None
            if not m.group(1):
                section = None
            if (where, m.group(2)) in updates:
                line = f"{m.group(1)}{m.group(2)}:{m.group(3) or ' '}{updates[(where, m.group(2))]}{m.group(5) or ''}"
        out.append(line)
    return "\n".join(out) + "\n"


def _tiny_spec_text() -> str:
    updates = {
        (None, "layers"): "[last, prefix]",
        # './video', not 'video': explicitly local, so a deleted folder is named, never looked up on the hub.
        ("video", "model"): "./video", ("video", "revision"): "null", ("video", "size"): str(_TINY_IMAGE),
        ("audio", "model"): "./audio", ("audio", "revision"): "null",
        ("text", "model"): "./text", ("text", "revision"): "null",
    }
    expected = ExtractionSpec().to_dict()
    expected.pop("weights_id")
    expected["layers"] = ["last", "prefix"]
    for modality in MODALITIES:
        expected[modality].update(model=f"./{modality}", revision=None)
    expected["video"]["size"] = _TINY_IMAGE
    template = _template_spec_text()
    if template is not None:
        text = _set_yaml_values(template, updates)
        loaded = yaml.safe_load(text)
        got = {k: loaded.get(k) for k in ("layers", "video", "audio", "text")}
        if all(got[k] == expected[k] for k in ("layers",)) and all(
            loaded[m]["model"] == f"./{m}" for m in MODALITIES
        ) and loaded["video"]["size"] == _TINY_IMAGE:
            return "# Tiny random encoders for tests and demos (written by `write_tiny_encoders`).\n" + text
    return yaml.safe_dump(expected, sort_keys=False)


def write_tiny_encoders(out_dir: Path, seed: int = 0) -> Path:
    """Small random VideoMAE / HuBERT / RoBERTa in HF format under out_dir/{video,audio,text}, plus
    out_dir/cache_spec.yaml pointing at them. The same seed writes identical weights. Returns the spec path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]), _quiet():
        for offset, (modality, writer) in enumerate(
            (("video", _tiny_video), ("audio", _tiny_audio), ("text", _tiny_text))
        ):
            torch.manual_seed(int(seed) * 1000 + offset)
            writer(out_dir / modality)
    spec_path = out_dir / "cache_spec.yaml"
    spec_path.write_text(_tiny_spec_text(), encoding="utf-8")
    return spec_path
