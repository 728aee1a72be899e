"""`ahcli finetune`: checkpoint A end to end from the raw BAH tree (wiring only; the work is in ahflows/finetune.py).

It takes train-heads' options (shared from ahcli/cmd_heads.py) and writes the same run folder, plus the
fine-tuned encoder blocks (encoder_top.safetensors). The faster equivalent over a cache that holds the
'prefix' states is `ahcli train-heads CACHE OUT --unfreeze-top 2`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ahcli.options import (OPT_ACCUM, OPT_ALPHA, OPT_AMP, OPT_PRECISION, OPT_BATCH_SIZE, OPT_CHECKPOINT_EVERY, OPT_DEVICE, OPT_DIM,
                           OPT_ENCODER_LR_SCALE, OPT_EPOCHS, OPT_EVAL_WINDOWS, OPT_FFN_DROPOUT, OPT_FFN_HIDDEN,
                           OPT_HEAD_DROPOUT, OPT_HEAD_HIDDEN, OPT_JSON, OPT_LABEL_SMOOTHING, OPT_LR, OPT_LR_MIN,
                           OPT_MODALITIES, OPT_NO_CONFLICT, OPT_PATIENCE, OPT_POOLING, OPT_POS_WEIGHT, OPT_RESUME,
                           OPT_SEED, OPT_STOP_AFTER, OPT_TENSORBOARD, OPT_TEXT_SOURCE, OPT_TEXT_WEIGHT,
                           OPT_WEIGHT_DECAY, Pooling, TextSource, console, model_options, report_result, train_config,
                           train_with_progress, warn_partial, with_interrupt_help)
from ahcli.session import OPT_LOG_EVERY, Session, command_line
from ahflows.epoch_scalars import EpochScalars
from ahflows.finetune import finetune
from extract.locks import folder_lock
from heads.resume import check_out_folder

TRAIN_LOG = "train.log"


def register(app: typer.Typer) -> None:
    app.command("finetune", help=with_interrupt_help(finetune_cmd.__doc__))(finetune_cmd)


def finetune_cmd(
    data: Path = typer.Argument(..., help="BAH root (the DATA folder with Videos/, cropped-aligned-faces/, split/ ...)."),
    out: Path = typer.Argument(..., help="Run folder to write (as train-heads, plus encoder_top.safetensors)."),
    spec: Path = typer.Option(..., "--spec", help="Extraction spec naming the encoders, windows and preprocessing "
                              "(extract the cache you evaluate on with the same spec)."),
    unfreeze_top: int = typer.Option(2, help="Top blocks of each encoder trained (the paper's checkpoint A: 2)."),
    workers: int = typer.Option(2, help="DataLoader processes decoding faces and audio (0 decodes in this process)."),
    allow_symlinks: bool = typer.Option(False, "--allow-symlinks", help="Follow symlinks that leave the BAH root."),
    modalities: str = OPT_MODALITIES,
    no_conflict: bool = OPT_NO_CONFLICT,
    alpha: float = OPT_ALPHA,
    label_smoothing: float = OPT_LABEL_SMOOTHING,
    pos_weight: str = OPT_POS_WEIGHT,
    text_weight: float = OPT_TEXT_WEIGHT,
    seed: int = OPT_SEED,
    epochs: int = OPT_EPOCHS,
    patience: int = OPT_PATIENCE,
    lr: float = OPT_LR,
    lr_min: float = OPT_LR_MIN,
    weight_decay: float = OPT_WEIGHT_DECAY,
    batch_size: int = OPT_BATCH_SIZE,
    accum: int = OPT_ACCUM,
    dim: int = OPT_DIM,
    head_hidden: int = OPT_HEAD_HIDDEN,
    head_dropout: float = OPT_HEAD_DROPOUT,
    ffn_dropout: float = OPT_FFN_DROPOUT,
    ffn_hidden: Optional[int] = OPT_FFN_HIDDEN,
    pooling: Pooling = OPT_POOLING,
    text_source: TextSource = OPT_TEXT_SOURCE,
    eval_windows: int = OPT_EVAL_WINDOWS,
    encoder_lr_scale: float = OPT_ENCODER_LR_SCALE,
    device: str = OPT_DEVICE,
    amp: bool = OPT_AMP,
    precision: str = OPT_PRECISION,
    resume: bool = OPT_RESUME,
    checkpoint_every: float = OPT_CHECKPOINT_EVERY,
    json_out: bool = OPT_JSON,
    stop_after: int = OPT_STOP_AFTER,
    tensorboard: bool = OPT_TENSORBOARD,
    log_every: float = OPT_LOG_EVERY,
) -> None:
    """Fine-tune end to end from the raw media: the top N encoder blocks (lr x --encoder-lr-scale) and the
    heads, one random 16-frame window per train video each epoch, the paper's protocol (checkpoint A)."""

    cfg = train_config(seed=seed, epochs=epochs, patience=patience, lr=lr, lr_min=lr_min, weight_decay=weight_decay,
                       batch_size=batch_size, accum=accum, text_weight=text_weight, label_smoothing=label_smoothing,
                       alpha=alpha, eval_windows=eval_windows, text_source=text_source, amp=amp, device=device,
                       unfreeze_top=unfreeze_top, encoder_lr_scale=encoder_lr_scale,
                       checkpoint_seconds=checkpoint_every, pos_weight=pos_weight, precision=precision)
    opts = model_options(modalities=modalities, no_conflict=no_conflict, dim=dim, head_hidden=head_hidden,
                         head_dropout=head_dropout, ffn_dropout=ffn_dropout, pooling=pooling, ffn_hidden=ffn_hidden)
    check_out_folder(out, resume)
    with Session("finetune", log_every, console) as run, folder_lock(out, "run folder"):
        run.attach(out / TRAIN_LOG)
        run.resume = command_line(("--resume",))
        scalars = EpochScalars(out) if tensorboard else None

        def on_data(d) -> None:
            lost = [p for p in d.problems if p.fatal]
            run.say(f"train {len(d.train)} videos, val {len(d.val)} videos; top {unfreeze_top} blocks of each "
                    f"encoder unfrozen (lr {lr * encoder_lr_scale:g}), heads at lr {lr:g}")
            if lost:
                run.say(f"{len(lost)} video(s) left out (unreadable): {lost[0].video_id}: "
                        f"{lost[0].problem}{' ...' if len(lost) > 1 else ''}", style="yellow")
            warn_partial(run, d.coverage.values(), data)

        try:
            result = train_with_progress(finetune, run, scalars, data_root=data, spec_path=spec, out=out,
                                         model_options=opts, cfg=cfg, workers=workers, allow_symlinks=allow_symlinks,
                                         resume=resume, stop_after=stop_after or None, on_data=on_data)
        finally:
            if scalars is not None:
                scalars.close()
        report_result(result, out, json_out, run)
