"""The extraction spec (`cache_spec.yaml`): typed, validated, fingerprinted.

The fingerprint hashes everything that changes the stored numbers. Encoder weights are identified by a
hash of their weight files (local folders) or by hub id + revision; `weights_id` fills that in once the
encoders are resolved (see extract/encoders.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extract.errors import AHError
from extract.files import read_yaml
from extract.vocab import LAYERS

MAX_SPEC_BYTES = 1 << 20
BACKENDS = ("zarr", "hdf5")
DTYPES = ("float16", "float32")


class SpecError(AHError):
    """A spec file that is missing, malformed or holds an invalid value."""


@dataclass(frozen=True)
class WindowSpec:
    frames: int = 16
    train: int = 8
    eval: int = 5


@dataclass(frozen=True)
class EncoderSpec:
    model: str = ""                  # a hub id or a local folder in HF format
    revision: str | None = None      # a hub revision (branch, tag or commit)


@dataclass(frozen=True)
class VideoSpec(EncoderSpec):
    model: str = "MCG-NJU/videomae-base"
    # None: taken from the model's image processor (extract.encoders.resolve_spec); a value the processor
    # disagrees with is refused unless override_processor is true.
    size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    override_processor: bool = False


@dataclass(frozen=True)
class AudioSpec(EncoderSpec):
    model: str = "facebook/hubert-base-ls960"
    sample_rate: int = 16000
    segment_seconds: float = 30.0


@dataclass(frozen=True)
class TextSpec(EncoderSpec):
    model: str = "SamLowe/roberta-base-go_emotions"
    max_tokens: int = 512
    window_aligned: bool = True


@dataclass(frozen=True)
class ExtractionSpec:
    version: int = 1
    backend: str = "zarr"
    dtype: str = "float16"
    compress: bool = False
    seed: int = 0
    windows: WindowSpec = field(default_factory=WindowSpec)
    layers: tuple[str, ...] = ("last",)
    unfreeze_top: int = 2
    video: VideoSpec = field(default_factory=VideoSpec)
    audio: AudioSpec = field(default_factory=AudioSpec)
    text: TextSpec = field(default_factory=TextSpec)
    # Filled in after the encoders are resolved: modality -> weights hash or "hub-id@revision", and what
    # the models' own preprocessors say (resampling, audio normalisation, the tokenizer's length limit).
    weights_id: tuple[tuple[str, str], ...] = ()
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def numeric_fields(self) -> dict[str, Any]:
        """Everything that changes the stored numbers (the backend and compression do not). Once the weights
        are identified by content (weights_id), where they lie does not count: a cache and its runs stay
        valid when the encoder folders move."""
        d = self.to_dict()
        d.pop("backend")
        d.pop("compress")
        d["video"].pop("override_processor")
        if self.weights_id:
            for modality in ("video", "audio", "text"):
                d[modality].pop("model")
                d[modality].pop("revision")
        return d

    def fingerprint(self) -> str:
        blob = json.dumps(self.numeric_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def with_weights_id(self, ids: dict[str, str]) -> "ExtractionSpec":
        return dataclasses.replace(self, weights_id=tuple(sorted(ids.items())))


def dataclass_from_mapping(cls, data: Any, where: str, error: type[AHError], noun: str = "key"):
    """Build a (config) dataclass from a mapping; unknown keys and bad values are one `error` line naming
    `where`. Shared by the spec and the run configs."""
    if not isinstance(data, dict):
        raise error(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise error(f"{where}: unknown {noun}(s) {', '.join(unknown)}")
    try:
        return cls(**data)
    except error as exc:
        raise error(f"{where}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise error(f"{where}: {exc}") from exc


def _build(cls, data: Any, where: str):
    if data is None:
        return cls()
    if isinstance(data, dict):          # YAML lists become the spec's tuples
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return dataclass_from_mapping(cls, data, where, SpecError)


def spec_from_dict(data: dict[str, Any], base_dir: Path | None = None) -> ExtractionSpec:
    """Build and validate a spec; relative local encoder folders resolve against `base_dir`."""
    if not isinstance(data, dict):
        raise SpecError("spec: expected a mapping at the top level")
    data = dict(data)
    sub = {
        "windows": _build(WindowSpec, data.pop("windows", None), "windows"),
        "video": _build(VideoSpec, data.pop("video", None), "video"),
        "audio": _build(AudioSpec, data.pop("audio", None), "audio"),
        "text": _build(TextSpec, data.pop("text", None), "text"),
    }
    if "weights_id" in data:
        data["weights_id"] = tuple(tuple(x) for x in data["weights_id"])
    spec = _build(ExtractionSpec, data, "spec")
    spec = dataclasses.replace(spec, **sub)
    if base_dir is not None:
        spec = dataclasses.replace(
            spec,
            video=dataclasses.replace(spec.video, model=_resolve_model(spec.video.model, base_dir)),
            audio=dataclasses.replace(spec.audio, model=_resolve_model(spec.audio.model, base_dir)),
            text=dataclasses.replace(spec.text, model=_resolve_model(spec.text.model, base_dir)),
        )
    validate(spec)
    return spec


def _resolve_model(model: str, base_dir: Path) -> str:
    """A path-like model that exists relative to the spec's folder becomes absolute; hub ids stay."""
    p = Path(model).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = base_dir / p
    if model.startswith((".", "/", "~")) or candidate.exists():
        return str(candidate.resolve())
    return model


def validate(spec: ExtractionSpec) -> None:
    if spec.backend not in BACKENDS:
        raise SpecError(f"backend: {spec.backend!r} is not one of {', '.join(BACKENDS)}")
    if spec.dtype not in DTYPES:
        raise SpecError(f"dtype: {spec.dtype!r} is not one of {', '.join(DTYPES)}")
    bad = [x for x in spec.layers if x not in LAYERS]
    if bad or not spec.layers:
        raise SpecError(f"layers: must be a non-empty subset of {', '.join(LAYERS)}, got {list(spec.layers)}")
    w = spec.windows
    if min(w.frames, w.train, w.eval) < 1:
        raise SpecError("windows: frames, train and eval must all be >= 1")
    if spec.unfreeze_top < 1:
        raise SpecError("unfreeze_top: must be >= 1")
    for name, value in (("audio.sample_rate", spec.audio.sample_rate), ("audio.segment_seconds", spec.audio.segment_seconds),
                        ("text.max_tokens", spec.text.max_tokens)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise SpecError(f"{name}: must be a positive number, got {value!r}")
    if any(v is not None and len(v) != 3 for v in (spec.video.mean, spec.video.std)):
        raise SpecError("video: mean and std need 3 values (RGB)")
    if spec.video.size is not None and spec.video.size < 1:
        raise SpecError("video: size must be >= 1")


def load_spec(path: str | Path) -> ExtractionSpec:
    path = Path(path)
    if not path.exists():
        raise SpecError(f"{path}: spec file not found")
    data = read_yaml(path, SpecError, "spec", max_bytes=MAX_SPEC_BYTES)
    try:
        return spec_from_dict(data, base_dir=path.parent.resolve())
    except (SpecError, TypeError) as exc:
        raise SpecError(f"{path}: {exc}") from exc


def diff_fields(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two nested spec dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_fields(va, vb, name + ".")
        elif va != vb:
            out.append(name)
    return out
