"""The two configurations a run is made of: the model's (ModelConfig) and the protocol's (TrainConfig).

Both are plain dataclasses stored in a run folder's config.json; `from_dict` refuses unknown keys and invalid
values with one line naming where they came from.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

from extract.errors import AHError
from extract.precision import PRECISIONS
from extract.spec import dataclass_from_mapping
from extract.vocab import LAST, PREFIX, TEXT_SOURCES, modality_letters, parse_modalities

POOLINGS = ("fused", "literal")


class ConfigError(AHError):
    """A model or training configuration with an unknown option or an invalid value."""


@dataclass
class ModelConfig:
    input_dims: dict[str, int] = field(default_factory=dict)   # modality -> cached token width
    modalities: str = "vat"        # any non-empty subset of the letters v, a, t
    dim: int = 768                 # shared projection width D
    conflict: bool = True          # pairwise |x - y| features among the present modalities
    ffn_mult: int = 2              # FFN hidden width = ffn_mult x fusion width (paper: 2 x 6D) ...
    ffn_hidden: int | None = None  # ... unless given here as an absolute width (e.g. 1536 = 2 x D)
    ffn_dropout: float = 0.1       # not given in the paper
    head_hidden: int = 512
    head_dropout: float = 0.3
    pooling: str = "fused"         # 'fused' or 'literal': the same function, different cost

    def __post_init__(self) -> None:
        try:
            self.modalities = modality_letters(parse_modalities(self.modalities))
        except AHError as exc:
            raise ConfigError(str(exc)) from exc
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling: {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if min(self.dim, self.ffn_mult, self.head_hidden, self.ffn_width) < 1:
            raise ConfigError("dim, ffn_mult, ffn_hidden and head_hidden must be >= 1")
        if not (0 <= self.ffn_dropout < 1 and 0 <= self.head_dropout < 1):
            raise ConfigError("dropout rates must lie in [0, 1)")
        self.input_dims = {str(k): int(v) for k, v in self.input_dims.items()}
        missing = [m for m in self.present if m not in self.input_dims]
        if missing:
            raise ConfigError(f"input_dims: no token width for modality {', '.join(missing)}")

    @property
    def present(self) -> tuple[str, ...]:
        return parse_modalities(self.modalities)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(itertools.combinations(self.present, 2)) if self.conflict else []

    @property
    def fusion_dim(self) -> int:
        return self.dim * (len(self.present) + len(self.pairs))

    @property
    def ffn_width(self) -> int:
        """The FFN's hidden width: ffn_hidden when given, else ffn_mult x the fusion width."""
        return int(self.ffn_hidden) if self.ffn_hidden is not None else self.ffn_mult * self.fusion_dim

    @property
    def has_text(self) -> bool:
        return "text" in self.present

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model config") -> "ModelConfig":
        return dataclass_from_dict(cls, data, where)


def dataclass_from_dict(cls, data: Any, where: str):
    """Build a config dataclass, refusing unknown options and bad values with one clear line."""
    return dataclass_from_mapping(cls, data, where, ConfigError, "option")


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 60                 # maximum epochs
    patience: int = 15               # epochs without a better val Macro F1 before stopping
    lr: float = 3e-5
    lr_min: float = 3e-7             # cosine annealing floor
    weight_decay: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.999
    batch_size: int = 4              # micro-batch size
    accum: int = 4                   # micro-batches per optimizer step (run together as one forward)
    text_weight: float = 0.5         # w in the joint loss
    label_smoothing: float = 0.0     # eps; the paper's checkpoint B uses 0.1
    # pos_weight of the BCE: n_neg/n_pos of the 'train' labels (leak-free, the default), of 'train+val' (the
    # paper's ~0.96 on BAH), or a number.
    pos_weight: str = "train"
    alpha: float = 0.6               # blend weight of the text head at evaluation
    threshold_lo: float = 0.25
    threshold_hi: float = 0.75
    threshold_step: float = 0.01
    eval_windows: int = 0            # eval windows averaged on val; 0 = all cached
    text_source: str = "full"        # 'full' transcript or 'window'-aligned transcript
    layer: str = LAST                # cached layer the heads read
    amp: bool = True                 # bf16 autocast on CUDA (never on the CPU)
    # 'auto' (amp decides: bf16 on CUDA, fp32 on the CPU), 'bf16', 'fp16' (with a loss scaler) or 'fp32';
    # explicit half precision on the CPU is refused when training starts (extract/precision.py)
    precision: str = "auto"
    eval_batch_size: int = 64        # (video, window) samples per evaluation forward
    device: str = "auto"             # where to train; not part of a run's identity
    unfreeze_top: int = 0            # top encoder blocks trained too (0: heads only); reads the 'prefix' layer
    encoder_lr_scale: float = 0.1    # their learning rate = lr x this (paper: 3e-6 for lr 3e-5)
    # Least seconds between resume checkpoints (model + optimizer: ~1 GB at the paper's sizes, seconds to
    # write); the last epoch and an interrupted run are always written. 0: after every epoch.
    checkpoint_seconds: float = 60.0

    RUNTIME = ("device", "eval_batch_size", "checkpoint_seconds")   # options a resumed run may change

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"), (self.patience >= 1, "patience must be >= 1"),
            (self.batch_size >= 1 and self.accum >= 1, "batch_size and accum must be >= 1"),
            (self.lr > 0 and 0 <= self.lr_min <= self.lr, "need lr > 0 and 0 <= lr_min <= lr"),
            (self.weight_decay >= 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
             "need weight_decay >= 0 and betas in [0, 1)"),
            (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
            (0 <= self.text_weight <= 1, "text_weight must lie in [0, 1]"),
            (0 <= self.label_smoothing < 1, "label_smoothing must lie in [0, 1)"),
            (0 <= self.alpha <= 1, "alpha must lie in [0, 1]"),
            (0 <= self.threshold_lo <= self.threshold_hi <= 1 and self.threshold_step > 0,
             "thresholds: need 0 <= lo <= hi <= 1 and step > 0"),
            (self.text_source in TEXT_SOURCES, f"text_source must be one of {', '.join(TEXT_SOURCES)}"),
            (_pos_weight_ok(self.pos_weight), "pos_weight must be 'train', 'train+val' or a positive number"),
            (self.eval_windows >= 0, "eval_windows must be >= 0"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (self.unfreeze_top >= 0, "unfreeze_top must be >= 0"),
            (self.encoder_lr_scale > 0, "encoder_lr_scale must be > 0"),
            (self.checkpoint_seconds >= 0, "checkpoint_seconds must be >= 0"),
            (self.unfreeze_top == 0 or self.layer == LAST,
             "with unfreeze_top the heads read the top blocks' output: layer must be 'last'"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        d = self.to_dict()
        for k in self.RUNTIME:
            d.pop(k)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "train config") -> "TrainConfig":
        return dataclass_from_dict(cls, data, where)

    @property
    def amp_mode(self) -> str | bool:
        """What heads.infer.autocast takes: the explicit precision, else amp (True: bf16 on CUDA)."""
        return self.amp if self.precision == "auto" else self.precision

    @property
    def input_layer(self) -> str:
        """The cached layer a batch is read from: the heads' layer, or 'prefix' under unfrozen top blocks."""
        return PREFIX if self.unfreeze_top else self.layer


POS_WEIGHT_SOURCES = ("train", "train+val")


def _pos_weight_ok(value: str) -> bool:
    if value in POS_WEIGHT_SOURCES:
        return True
    try:
        return 0 < float(value) < float("inf")
    except (TypeError, ValueError):
        return False
