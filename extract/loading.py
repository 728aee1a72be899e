"""Loading the frozen encoders safely: local folders or hub ids (offline nodes fail at once, in one line),
no code from a model folder ever run, every used weight present (a load that would leave a block random is
refused), and the preprocessing resolved from the models' own processors and recorded in the spec.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from torch import nn

from extract.errors import AHError
from extract.spec import ExtractionSpec
from extract.vocab import MODALITIES

# Files that define a local encoder's numbers (weights, config, preprocessing, tokenizer).
_ID_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")


class EncoderError(AHError):
    """An encoder that cannot be found, loaded or fed (the message names the model and the problem)."""


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
    """The `from_pretrained` name and its kwargs; local folders are checked first, hub ids for reachability."""
    ms = _model_spec(spec, modality)
    if _is_local(ms.model):
        return str(_check_local(ms.model, modality)), {}
    kw = {"revision": ms.revision} if ms.revision else {}
    return ms.model, kw | hub_access(ms.model, modality, kw)


HUB_PROBE_SECONDS = 3.0   # a reachability check, instead of the hub client's retries when there is no network


def hub_access(model_id: str, modality: str, kw: dict[str, Any]) -> dict[str, Any]:
    """Extra `from_pretrained` kwargs for a hub model: the local Hugging Face cache alone when it holds the
    model (no network at all); else the hub, after a quick check that it answers, so an offline node fails at
    once with one line saying how to bring the weights instead of after a storm of retries."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model_id, "config.json", revision=kw.get("revision")), str):
        return {"local_files_only": True}
    if constants.HF_HUB_OFFLINE or not _reachable(constants.ENDPOINT):
        pin = f" --revision {kw['revision']}" if kw.get("revision") else ""
        raise EncoderError(f"{model_id}: the model hub cannot be reached and the {modality} encoder is not in the local "
                           f"Hugging Face cache; on a machine with a network run `hf download {model_id}{pin} "
                           f"--local-dir DIR`, copy DIR here and set {modality}.model: DIR in the spec")
    return {}


@functools.lru_cache(maxsize=None)    # once per process: every preprocessor and model load asks again
def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 443), timeout=HUB_PROBE_SECONDS):
            return True
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


@contextmanager
def quiet_loading():
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
    """`loader.from_pretrained` with no code from the model folder ever run, one line on any failure."""
    try:
        with quiet_loading():
            return loader.from_pretrained(name, trust_remote_code=False, **kwargs)
    except EncoderError:
        raise
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError...; one line for the user
        raise EncoderError(f"{name}: cannot load the {modality} encoder ({_first_line(exc)})") from exc


def _refuse_remote_code(name: str, modality: str, kw: dict[str, Any]) -> None:
    """A config that maps to custom code (auto_map) is refused before any loading: the model must be an
    architecture transformers itself implements."""
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig, name, modality, **kw)
    if getattr(config, "auto_map", None):
        raise EncoderError(f"{name}: the {modality} encoder's config.json maps to custom code (auto_map); this tool "
                           "never runs code from a model folder: use a model of a transformers architecture")


def load_backbone(spec: ExtractionSpec, modality: str, device: str | torch.device = "cpu") -> nn.Module:
    """The HF model of one modality: fp32, SDPA attention where supported, eval mode, all weights frozen."""
    from transformers import AutoModel

    name, kw = _source(spec, modality)
    _refuse_remote_code(name, modality, kw)
    kw = dict(kw, dtype=torch.float32, output_loading_info=True)
    if modality == "text":
        kw["add_pooling_layer"] = False  # only the token sequence is used; a classifier checkpoint has no pooler
    try:
        model, info = _from_pretrained(AutoModel, name, modality, attn_implementation="sdpa", **kw)
    except EncoderError as exc:
        if "sdpa" not in str(exc).lower() and "attn" not in str(exc).lower():
            raise
        model, info = _from_pretrained(AutoModel, name, modality, **kw)  # no SDPA: default attention
    model.unused_weights = check_loading(info, modality, name)
    model.eval().requires_grad_(False)
    _check_model(spec, modality, model, name)
    return model.to(device)


# Checkpoint weights the frozen backbones never use (pre-training and classification heads): allowed when a
# checkpoint holds them, and recorded. Anything else unexpected means another architecture.
UNUSED_WEIGHTS = {
    "video": ("decoder.", "encoder_to_decoder.", "mask_token", "fc_norm.", "classifier."),
    "audio": ("quantizer.", "project_q.", "project_hid.", "final_proj.", "label_embeddings_concat", "lm_head.",
              "masked_spec_embed"),
    "text": ("classifier.", "pooler.", "lm_head."),
}


def check_loading(info: dict[str, Any], modality: str, name: str) -> list[str]:
    """Refuse a load that left any used weight random (missing or mismatched keys) or found weights of
    another architecture; returns the known-unused checkpoint keys it skipped."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(m[0] if isinstance(m, (tuple, list)) else m) for m in info.get("mismatched_keys") or [])
    if missing or mismatched:
        keys = missing or mismatched
        what = "missing from" if missing else "of the wrong shape in"
        raise EncoderError(f"{name}: {len(keys)} {modality} encoder weight(s) {what} the checkpoint, e.g. "
                           f"{', '.join(keys[:3])}: they would be random; re-download or re-save the model folder")
    unexpected = sorted(info.get("unexpected_keys") or [])
    foreign = [k for k in unexpected if not k.startswith(UNUSED_WEIGHTS[modality])]
    if foreign:
        raise EncoderError(f"{name}: the {modality} checkpoint holds {len(foreign)} weight(s) this architecture does "
                           f"not use, e.g. {', '.join(foreign[:3])}: is it the right model?")
    if info.get("error_msgs"):
        raise EncoderError(f"{name}: loading the {modality} encoder reported: {_first_line(info['error_msgs'][0])}")
    return unexpected


def _check_model(spec: ExtractionSpec, modality: str, model: nn.Module, name: str) -> None:
    cfg = model.config
    n_layers = int(cfg.num_hidden_layers)
    if "prefix" in spec.layers and not 1 <= spec.unfreeze_top <= n_layers:
        raise EncoderError(f"{name}: unfreeze_top {spec.unfreeze_top} is not in 1..{n_layers} (its layer count)")
    if modality == "video":
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        if spec.video.size is not None and size != spec.video.size:     # None: the processor's, resolved later
            raise EncoderError(f"{name}: video.size {spec.video.size} does not match the model's image_size {size}")
        if cfg.num_frames != spec.windows.frames:
            raise EncoderError(
                f"{name}: windows.frames {spec.windows.frames} does not match the model's num_frames {cfg.num_frames}"
            )


def load_preprocessor(spec: ExtractionSpec, modality: str):
    """The tokenizer (text), feature extractor (audio) or image processor (video; None when the model
    folder has none: the spec must then give size, mean and std)."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer

    name, kw = _source(spec, modality)
    if modality == "video":
        if _is_local(name) and not (Path(name) / "preprocessor_config.json").is_file():
            return None
        return _from_pretrained(AutoImageProcessor, name, modality, **kw)
    if modality == "audio":
        return _from_pretrained(AutoFeatureExtractor, name, modality, **kw)
    return _from_pretrained(AutoTokenizer, name, modality, **kw)


# ------------------------------------------------------------------------------------------ preprocessing

BILINEAR = 2   # PIL's code: how extract/media.py resizes frames to size x size


def processor_video(processor) -> dict[str, Any]:
    """The input size, normalisation and resampling a VideoMAE image processor applies."""
    crop, size = getattr(processor, "crop_size", None), processor.size
    if getattr(processor, "do_center_crop", False) and crop is not None and crop.get("height"):
        side = crop["height"]
    else:
        side = size.get("shortest_edge") or size.get("height")
    return {"size": int(side), "mean": tuple(float(x) for x in processor.image_mean),
            "std": tuple(float(x) for x in processor.image_std), "resample": int(processor.resample)}


def _resolve_video(spec: ExtractionSpec, processor) -> ExtractionSpec:
    """spec.video with size/mean/std from the model's processor where the spec leaves them out; a spec value
    the processor disagrees with is refused unless video.override_processor is true."""
    v = spec.video
    given = {"size": v.size, "mean": v.mean, "std": v.std}
    if processor is None:
        missing = [k for k, val in given.items() if val is None]
        if missing:
            raise EncoderError(f"{v.model}: no image processor (preprocessor_config.json) in the video model: give "
                               f"video.{', video.'.join(missing)} in the spec")
        return spec
    model = processor_video(processor)
    for key, val in given.items():
        if val is not None and not np.allclose(val, model[key]) and not v.override_processor:
            raise EncoderError(f"video.{key} {_fmt(val)} in the spec differs from the model's image processor "
                               f"({_fmt(model[key])}, {v.model}): remove video.{key} to use the model's, or set "
                               "video.override_processor: true")
    if model["resample"] != BILINEAR and not v.override_processor:
        raise EncoderError(f"{v.model}: its image processor resizes with PIL resample {model['resample']}; this tool "
                           f"resizes bilinearly ({BILINEAR}): set video.override_processor: true to accept that")
    video = dataclasses.replace(v, **{k: val if val is not None else model[k] for k, val in given.items()})
    return dataclasses.replace(spec, video=video)


def _fmt(value) -> str:
    return str(list(value)) if isinstance(value, (tuple, list)) else str(value)


def resolve_spec(spec: ExtractionSpec, processors: dict[str, Any] | None = None) -> ExtractionSpec:
    """The spec with what the models' own preprocessors say: video size/mean/std (see _resolve_video) and,
    recorded in `preprocessing` (part of the fingerprint), the resampling, the audio feature extractor's
    rate and normalisation and the tokenizer's length limit. `processors`: already loaded ones by modality."""
    procs = dict(processors or {})
    for m in MODALITIES:
        if m not in procs:
            procs[m] = load_preprocessor(spec, m)
    spec = _resolve_video(spec, procs["video"])
    extractor, tokenizer = procs["audio"], procs["text"]
    rate = int(extractor.sampling_rate)
    if rate != spec.audio.sample_rate:
        raise EncoderError(f"audio.sample_rate {spec.audio.sample_rate} differs from the feature extractor's "
                           f"{rate} ({spec.audio.model})")
    video = processor_video(procs["video"]) if procs["video"] is not None else {}
    record = {
        "video": {"source": "processor" if video else "spec", "resize": "size x size, bilinear",
                  "processor_resample": video.get("resample")},
        "audio": {"sampling_rate": rate, "do_normalize": bool(getattr(extractor, "do_normalize", False))},
        "text": {"model_max_length": int(min(tokenizer.model_max_length, 1_000_000)),
                 "max_tokens_used": text_token_limit(tokenizer, spec)},
    }
    return dataclasses.replace(spec, preprocessing=record)


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
    # The commit the hub resolved the model to (a branch or tag moves; a commit does not).
    commit = getattr(getattr(model, "config", None), "_commit_hash", None) or kw.get("revision") or "main"
    return f"{name}@{commit}"


def text_token_limit(tokenizer, spec: ExtractionSpec) -> int:
    limit = int(spec.text.max_tokens)
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        limit = min(limit, model_max)
    return limit
