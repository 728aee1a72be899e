"""The records of a training run: one epoch's numbers, the result, progress, and the state a resume needs."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from heads.config import ModelConfig, TrainConfig


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_macro_f1: float
    val_f1_ah: float
    val_f1_noah: float
    threshold: float
    lr: float


@dataclass
class TrainResult:
    model: nn.Module                      # best epoch's weights, eval mode: ConflictAwareModel, or
                                          # heads.topblocks.TopBlocksHeads with unfrozen top blocks
    model_config: ModelConfig
    train_config: TrainConfig
    best_epoch: int
    threshold: float
    val_metrics: dict[str, Any]
    history: list[EpochRecord]
    stopped_early: bool
    seconds: float
    completed: bool = True                # False when stopped by `stop_after` or a callback
    # Per split: videos used / videos its split file lists (extract.listing.Coverage.counts), when known.
    videos: dict[str, Any] | None = None
    # Participant-bootstrap intervals per split ({"val": heads.uncertainty.bootstrap_intervals(...)}), when made.
    intervals: dict[str, Any] | None = None

    def metrics_record(self) -> dict[str, Any]:
        alpha = self.train_config.alpha if self.model_config.has_text else 0.0
        rec = {"best_epoch": self.best_epoch, "threshold": self.threshold, "alpha": alpha,
               "windows": self.train_config.eval_windows or None, "epochs_run": len(self.history),
               "stopped_early": self.stopped_early, "val": self.val_metrics, "seconds": round(self.seconds, 3)}
        if self.videos is not None:
            rec["videos"] = self.videos
        if self.intervals is not None:
            rec["intervals"] = self.intervals
        return rec


class TrainingStopped(Exception):
    """Raised by a callback to stop training after the current epoch's checkpoint (simulates a crash)."""


@dataclass
class TrainProgress:
    epochs: int
    epoch: int
    best_epoch: int = 0
    best_f1: float = -1.0


@dataclass
class TrainState:
    """Everything an epoch boundary needs to continue (besides model and optimizer tensors)."""
    epoch: int = 0
    best_epoch: int = 0
    best_f1: float = -1.0
    best_threshold: float = 0.5
    best_metrics: dict = field(default_factory=dict)
    bad_epochs: int = 0
    history: list = field(default_factory=list)
    seconds: float = 0.0

    def record(self, rec: EpochRecord, val_metrics: dict) -> bool:
        """Add a finished epoch; True when it is the best so far (ties keep the earlier epoch)."""
        self.epoch = rec.epoch
        self.history.append(asdict(rec))
        if rec.val_macro_f1 > self.best_f1:
            self.best_epoch, self.best_f1, self.best_threshold = rec.epoch, rec.val_macro_f1, rec.threshold
            self.best_metrics = val_metrics
            self.bad_epochs = 0
            return True
        self.bad_epochs += 1
        return False
