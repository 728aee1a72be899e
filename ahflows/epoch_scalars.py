"""Optional TensorBoard logging of a run's per-epoch scalars (`--tensorboard`): the numbers of history.csv,
under RUN/tensorboard. TensorBoard is an optional extra, imported only when asked for; without it the
option is refused in one line before any work."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from extract.errors import AHError

TB_DIR = "tensorboard"
# history.csv column -> TensorBoard tag
TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "val_macro_f1": "val/macro_f1", "val_f1_ah": "val/f1_ah",
        "val_f1_noah": "val/f1_noah", "threshold": "val/threshold", "lr": "lr"}


class TensorboardMissing(AHError):
    """--tensorboard without the tensorboard package."""


class EpochScalars:
    """Writes one step per epoch (step = the epoch number, so a resumed run continues the same curves)."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise TensorboardMissing(f"--tensorboard: the tensorboard package is not installed ({exc}); "
                                     "`pip install tensorboard`, or leave the option out") from None
        self.folder = Path(run_dir) / TB_DIR
        self.writer = SummaryWriter(log_dir=str(self.folder))

    def epoch(self, rec) -> None:
        values = asdict(rec)
        for key, tag in TAGS.items():
            self.writer.add_scalar(tag, float(values[key]), int(values["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
