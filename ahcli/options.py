"""What the CLI commands share: the training options of train-heads and finetune (one help text per option,
the same names on both), the console, progress bars and the per-epoch lines."""
from __future__ import annotations

import inspect
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ahcli.session import Session, command_line
from extract.files import json_text
from heads.config import TrainConfig
from heads.train_state import TrainingStopped

console = Console(stderr=True)


class TextSource(str, Enum):
    full = "full"
    window = "window"


class Pooling(str, Enum):
    fused = "fused"
    literal = "literal"


OPT_MODALITIES = typer.Option("vat", help="Modalities to fuse: any non-empty subset of the letters v, a, t.")
OPT_NO_CONFLICT = typer.Option(False, "--no-conflict", help="Drop the pairwise |x - y| conflict features.")
OPT_ALPHA = typer.Option(0.6, help="Weight of the text head in the blended probability (0 without text).")
OPT_LABEL_SMOOTHING = typer.Option(
    0.0, help="Label smoothing eps: y~ = y(1-eps) + 0.5 eps. The paper's checkpoint B uses 0.1 "
    "(--label-smoothing 0.1); checkpoint A uses 0.")
OPT_POS_WEIGHT = typer.Option(
    "train", "--pos-weight", help="BCE pos_weight: n_neg/n_pos of the 'train' labels (leak-free, default), of "
    "'train+val' (the paper's ~0.96 on BAH), or a number.")
OPT_TEXT_WEIGHT = typer.Option(0.5, help="Weight w of the text-head loss in (1-w) BCE_full + w BCE_text.")
OPT_SEED = typer.Option(0, help="Seed for initialisation, batch order, window draws and dropout.")
OPT_EPOCHS = typer.Option(60, help="Maximum number of epochs.")
OPT_PATIENCE = typer.Option(15, help="Stop after this many epochs without a better val Macro F1.")
OPT_LR = typer.Option(3e-5, help="AdamW learning rate of the heads (cosine-annealed to --lr-min).")
OPT_LR_MIN = typer.Option(3e-7, help="Final learning rate of the cosine schedule.")
OPT_WEIGHT_DECAY = typer.Option(1e-2, help="AdamW weight decay.")
OPT_BATCH_SIZE = typer.Option(4, help="Videos per micro-batch.")
OPT_ACCUM = typer.Option(4, help="Micro-batches accumulated per optimizer step.")
OPT_DIM = typer.Option(768, help="Shared projection width D.")
OPT_HEAD_HIDDEN = typer.Option(512, help="Hidden width of the full and text heads.")
OPT_HEAD_DROPOUT = typer.Option(0.3, help="Dropout inside the heads.")
OPT_FFN_DROPOUT = typer.Option(0.1, help="Dropout inside the fusion FFN (not given in the paper).")
OPT_FFN_HIDDEN = typer.Option(
    None, "--ffn-hidden", help="Hidden width of the fusion FFN as a number (default: 2 x the fusion width, the "
    "paper's 2 x 6D = 9216 with all three modalities; 1536 = 2 x D is the other reading, see docs/REPRODUCE.md).")
OPT_POOLING = typer.Option(Pooling.fused, help="Attention pooling form: fused (cheap) or literal (reference); same numbers.")
OPT_TEXT_SOURCE = typer.Option(TextSource.full, help="Text tokens: the full transcript or the window-aligned one.")
OPT_EVAL_WINDOWS = typer.Option(0, help="Eval windows averaged on val each epoch (0 = all the spec gives).")
OPT_ENCODER_LR_SCALE = typer.Option(
    0.1, help="Learning rate of the unfrozen encoder blocks = --lr x this (paper: 3e-6 for 3e-5).")
OPT_DEVICE = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N.")
OPT_AMP = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on CUDA (the CPU never uses it).")
OPT_PRECISION = typer.Option(
    "auto", "--precision", help="auto (bf16 on CUDA, fp32 on the CPU: today's default), bf16, fp16 (with a "
    "gradient scaler; the paper's choice) or fp32. bf16/fp16 need CUDA: refused on the CPU. Recorded in "
    "config.json; overrides --amp/--no-amp.")
OPT_RESUME = typer.Option(False, "--resume", help="Continue the interrupted run in OUT (or start it when there is none).")
OPT_JSON = typer.Option(False, "--json", help="Print the final metrics.json on stdout.")
OPT_STOP_AFTER = typer.Option(0, "--stop-after", hidden=True, help="Stop after this epoch's checkpoint (testing).")
OPT_TENSORBOARD = typer.Option(
    False, "--tensorboard", help="Also log the per-epoch scalars for TensorBoard in OUT/tensorboard (needs the "
    "optional tensorboard package).")
OPT_ALLOW_PARTIAL = typer.Option(
    False, "--allow-partial", help="Score a split even when the cache lacks some of the videos its split file "
    "lists (failed or not extracted); the output states videos scored / listed. Refused by default.")
INTERRUPT_HELP = ("SIGINT/SIGTERM: the epoch in progress is finished and checkpointed (at most one epoch plus a "
                  "checkpoint write: seconds on a GPU), one line names the command that resumes, exit 130/143; "
                  "a second signal stops at once, keeping the last checkpoint. The run folder is locked while "
                  "training (a second writer is refused) and keeps a log in OUT/train.log and the history "
                  "in OUT/history.csv, one row per epoch as it goes.")


def reflow(doc: str | None) -> str:
    """A docstring as help text: each paragraph on one line (typer keeps later paragraphs' line breaks)."""
    return "\n\n".join(" ".join(par.split()) for par in inspect.cleandoc(doc or "").split("\n\n"))


def with_interrupt_help(doc: str | None) -> str:
    """A training command's help: its docstring reflowed, then what a signal does."""
    return reflow(doc) + "\n\n" + INTERRUPT_HELP


OPT_CHECKPOINT_EVERY = typer.Option(
    60.0, "--checkpoint-every", help="Least seconds between resume checkpoints (~1 GB each at the paper's sizes); "
    "the last epoch is always written. 0: after every epoch.")


def train_config(*, seed, epochs, patience, lr, lr_min, weight_decay, batch_size, accum, text_weight,
                 label_smoothing, alpha, eval_windows, text_source, amp, device, unfreeze_top=0,
                 encoder_lr_scale=0.1, checkpoint_seconds=60.0, pos_weight="train", precision="auto"):
    return TrainConfig(seed=seed, epochs=epochs, patience=patience, lr=lr, lr_min=min(lr_min, lr),
                       weight_decay=weight_decay, batch_size=batch_size, accum=accum, text_weight=text_weight,
                       label_smoothing=label_smoothing, alpha=alpha, eval_windows=eval_windows,
                       text_source=TextSource(text_source).value, amp=amp, device=device,
                       unfreeze_top=unfreeze_top, encoder_lr_scale=encoder_lr_scale,
                       checkpoint_seconds=checkpoint_seconds, pos_weight=pos_weight, precision=precision)


def model_options(*, modalities, no_conflict, dim, head_hidden, head_dropout, ffn_dropout, pooling,
                  ffn_hidden=None) -> dict:
    """heads.model.ModelConfig options besides input_dims."""
    return dict(modalities=modalities, dim=dim, conflict=not no_conflict, head_hidden=head_hidden,
                head_dropout=head_dropout, ffn_dropout=ffn_dropout, ffn_hidden=ffn_hidden, pooling=Pooling(pooling).value)


def progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def train_with_progress(train_fn, run: Session, scalars=None, **kw):
    """Run a trainer (ahflows.checkpoint_a.train_from_cache or ahflows.finetune.finetune) with per-epoch lines
    (console and log), a per-step bar on a terminal or paced step lines elsewhere, optional TensorBoard
    scalars, and clean interruption: after a signal the epoch in progress finishes and is checkpointed.
    Returns its TrainResult."""
    run.say("per epoch: loss = train/val, * = best so far, t = threshold tuned on val", style="dim")
    steps = run.ticker("epoch 1", "steps")
    with progress_bar() as progress:
        task = progress.add_task("epoch 1", total=None)

        def on_step(i: int, n: int) -> None:
            progress.update(task, completed=i, total=n)
            steps.update(i, n)

        def on_epoch(rec, prog) -> None:
            mark = "*" if prog.best_epoch == rec.epoch else " "
            run.say(f"epoch {rec.epoch:3d}{mark} loss {rec.train_loss:.4f}/{rec.val_loss:.4f}  "
                    f"val F1 {rec.val_macro_f1:.4f} (AH {rec.val_f1_ah:.3f}, NoAH {rec.val_f1_noah:.3f}) "
                    f"t={rec.threshold:.2f}")
            if scalars is not None:
                scalars.epoch(rec)
            progress.update(task, description=f"epoch {rec.epoch + 1}", completed=0)
            steps.restart(f"epoch {rec.epoch + 1}")
            if run.stop.requested:
                raise TrainingStopped               # fit checkpoints this epoch and returns

        with run.stop.finishing():
            return train_fn(on_epoch=on_epoch, on_step=on_step, **kw)


def report_result(result, out: Path, json_out: bool, run: Session) -> None:
    if not result.completed:
        if run.stop.requested:
            raise run.interrupted(f"epoch {len(result.history)} checkpointed in {out}", command_line(("--resume",)))
        run.say(f"stopped after epoch {len(result.history)}; continue with --resume")
        raise typer.Exit(0)
    record = result.metrics_record()
    if json_out:
        typer.echo(json_text(record))
    else:
        metrics_table(f"best epoch {result.best_epoch} (val, threshold {result.threshold:.2f})", result.val_metrics,
                      (result.intervals or {}).get("val"))
        run.say(f"run written to {out}")


def warn_partial(run: Session, covs, where) -> None:
    """One line per split trained on with listed videos missing (training is not refused; scoring is)."""
    for cov in covs:
        if cov.partial:
            run.say(f"warning: {where}: training uses {cov.fraction()} listed {cov.split} videos "
                    f"({len(cov.missing)} missing, e.g. {cov.missing[0]})", style="yellow")


def metrics_table(title: str, m: dict, intervals: dict | None = None) -> None:
    """The BAH metrics; with `intervals` (heads.uncertainty.bootstrap_intervals) a row of 95% intervals."""
    table = Table(title=title)
    for col in ("Macro F1", "F1-AH", "F1-NoAH", "weighted F1", "accuracy", "AP"):
        table.add_column(col, justify="right")
    ap = "-" if m.get("ap") is None else f"{m['ap']:.4f}"
    table.add_row(f"{m['macro_f1']:.4f}", f"{m['f1_ah']:.4f}", f"{m['f1_noah']:.4f}", f"{m['weighted_f1']:.4f}",
                  f"{m['accuracy']:.4f}", ap)
    if intervals:
        def ci(k: str) -> str:
            iv = intervals.get(k) or {}
            return "-" if iv.get("low") is None else f"[{iv['low']:.3f}, {iv['high']:.3f}]"
        table.add_row(ci("macro_f1"), ci("f1_ah"), ci("f1_noah"), "", "", ci("ap"))
        table.caption = (f"95% intervals: {intervals.get('unit', 'participant')} bootstrap, "
                         f"{intervals.get('resamples')} resamples of {intervals.get('participants')}")
    Console().print(table)
