"""Frozen encoders (VideoMAE, HuBERT, RoBERTa) loaded through the transformers Auto classes.

An encoder is a hub id (+ revision) or a local folder in HF format; both go through `from_pretrained`.
`FrozenEncoders` turns one video's clips / audio / transcript into the token sequences of the layers the spec
asks for: 'last' (the final sequence) and 'prefix' (the hidden state entering the top `unfreeze_top` blocks).
heads/topblocks.py copies those top blocks so that TopBlocks(prefix) == last: checkpoint A trains from the
cache. extract/tiny_encoders.py writes small random models of the same architectures for tests and demos.

The `*_forward` functions hold the preprocessing + forward logic without any grad/autocast policy, so the
end-to-end fine-tuning path runs exactly the same code with gradients on.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from extract.loading import (EncoderError, load_backbone, load_preprocessor, resolve_spec, text_token_limit,
                             weights_id_of)
from extract.precision import autocast_context, resolve_precision
from extract.spec import ExtractionSpec
from extract.vocab import MODALITIES

# Files that define a local encoder's numbers (weights, config, preprocessing, tokenizer).
_ID_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")


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

    def __init__(self, spec: ExtractionSpec, device: str | torch.device = "cpu", precision: str = "auto"):
        # the precision the forwards run in (extract/precision.py): auto = bf16 on CUDA, fp32 on the CPU
        self.precision = resolve_precision(precision, device)
        procs = {m: load_preprocessor(spec, m) for m in MODALITIES}
        self.extractor, self.tokenizer = procs["audio"], procs["text"]
        spec = resolve_spec(spec, procs)
        self.device = torch.device(device)
        self.layers = tuple(spec.layers)
        self.models = {m: load_backbone(spec, m, self.device) for m in MODALITIES}
        self.dims: dict[str, int] = {m: int(self.models[m].config.hidden_size) for m in MODALITIES}
        # The resolved spec: preprocessing from the models, weights identified by content (the fingerprint).
        self.spec = spec.with_weights_id({m: weights_id_of(spec, m, self.models[m]) for m in MODALITIES})

    def weights_id(self) -> dict[str, str]:
        return dict(self.spec.weights_id)

    def loading_report(self) -> dict[str, list[str]]:
        """Per modality, the checkpoint weights that were skipped as known-unused (recorded in the manifest)."""
        return {m: list(model.unused_weights) for m, model in self.models.items()}

    def _autocast(self):
        return autocast_context(self.precision, self.device)

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


def load_encoders(spec: ExtractionSpec, device: str = "cpu", precision: str = "auto") -> FrozenEncoders:
    return FrozenEncoders(spec, device, precision)
