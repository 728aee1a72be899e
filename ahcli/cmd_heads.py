"""`ahcli train-heads` and `ahcli evaluate`: stage 2 over a cache (wiring only; the work is in heads/).

The training options are module-level typer options shared with `ahcli finetune` (ahcli/cmd_finetune.py):
one help text per option, the same names on both commands.
"""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from ahflows.checkpoint_a import train_from_cache
from ahflows.raw_media import load_run_with_media
from extract.store import CacheReader
from extract.vocab import parse_modalities
from heads.config import ModelConfig, TrainConfig
from heads.data import load_split, resolve_device
from heads.infer import evaluate_split, layers_needed, require_inputs
from heads.resume import check_out_folder
from heads.run_files import cache_record, RunError
from heads.topblocks import cache_prefix_problem


console = Console(stderr=True)


class TextSource(str, Enum):
    full = "full"
    window = "window"


class Pooling(str, Enum):
    fused = "fused"
    literal = "literal"


# ---- training options shared by train-heads and finetune ------------------------------------------------

OPT_MODALITIES = typer.Option("vat", help="Modalities to fuse: any non-empty subset of the letters v, a, t.")
OPT_NO_CONFLICT = typer.Option(False, "--no-conflict", help="Drop the pairwise |x - y| conflict features.")
OPT_ALPHA = typer.Option(0.6, help="Weight of the text head in the blended probability (0 without text).")
OPT_LABEL_SMOOTHING = typer.Option(
    0.0, help="Label smoothing eps: y~ = y(1-eps) + 0.5 eps. The paper's checkpoint B uses 0.1 "
    "(--label-smoothing 0.1); checkpoint A uses 0.")
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
OPT_POOLING = typer.Option(Pooling.fused, help="Attention pooling form: fused (cheap) or literal (reference); same numbers.")
OPT_TEXT_SOURCE = typer.Option(TextSource.full, help="Text tokens: the full transcript or the window-aligned one.")
OPT_EVAL_WINDOWS = typer.Option(0, help="Eval windows averaged on val each epoch (0 = all the spec gives).")
OPT_ENCODER_LR_SCALE = typer.Option(
    0.1, help="Learning rate of the unfrozen encoder blocks = --lr x this (paper: 3e-6 for 3e-5).")
OPT_DEVICE = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N.")
OPT_AMP = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on CUDA (the CPU never uses it).")
OPT_RESUME = typer.Option(False, "--resume", help="Continue the interrupted run in OUT (or start it when there is none).")
OPT_JSON = typer.Option(False, "--json", help="Print the final metrics.json on stdout.")
OPT_STOP_AFTER = typer.Option(0, "--stop-after", hidden=True, help="Stop after this epoch's checkpoint (testing).")
OPT_CHECKPOINT_EVERY = typer.Option(
    60.0, "--checkpoint-every", help="Least seconds between resume checkpoints (~1 GB each at the paper's sizes); "
    "the last epoch is always written. 0: after every epoch.")


def train_config(*, seed, epochs, patience, lr, lr_min, weight_decay, batch_size, accum, text_weight,
                 label_smoothing, alpha, eval_windows, text_source, amp, device, unfreeze_top=0,
                 encoder_lr_scale=0.1, checkpoint_seconds=60.0):
    return TrainConfig(seed=seed, epochs=epochs, patience=patience, lr=lr, lr_min=min(lr_min, lr),
                       weight_decay=weight_decay, batch_size=batch_size, accum=accum, text_weight=text_weight,
                       label_smoothing=label_smoothing, alpha=alpha, eval_windows=eval_windows,
                       text_source=TextSource(text_source).value, amp=amp, device=device,
                       unfreeze_top=unfreeze_top, encoder_lr_scale=encoder_lr_scale,
                       checkpoint_seconds=checkpoint_seconds)


def model_options(*, modalities, no_conflict, dim, head_hidden, head_dropout, ffn_dropout, pooling) -> dict:
    """heads.model.ModelConfig options besides input_dims."""
    return dict(modalities=modalities, dim=dim, conflict=not no_conflict, head_hidden=head_hidden,
                head_dropout=head_dropout, ffn_dropout=ffn_dropout, pooling=Pooling(pooling).value)


def register(app: typer.Typer) -> None:
    app.command("train-heads")(train_heads_cmd)
    app.command("evaluate")(evaluate_cmd)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def _load(reader, split: str, modalities, text_window: bool, device: str, progress, layers=("last",)):
    task = progress.add_task(f"loading {split}", total=None)
    data = load_split(reader, split, layers=layers, device=device, modalities=modalities, text_window=text_window,
                      progress=lambda i, n: progress.update(task, completed=i, total=n))
    progress.remove_task(task)
    return data


def train_with_progress(train_fn, **kw):
    """Run a trainer (heads.train.train_heads or heads.finetune.finetune) with per-epoch lines and a
    per-step bar; returns its TrainResult."""
    console.print("per epoch: loss = train/val, * = best so far, t = threshold tuned on val", style="dim")
    with _progress() as progress:
        task = progress.add_task("epoch 1", total=None)

        def on_step(i: int, n: int) -> None:
            progress.update(task, completed=i, total=n)

        def on_epoch(rec, prog) -> None:
            mark = "*" if prog.best_epoch == rec.epoch else " "
            console.print(f"epoch {rec.epoch:3d}{mark} loss {rec.train_loss:.4f}/{rec.val_loss:.4f}  "
                          f"val F1 {rec.val_macro_f1:.4f} (AH {rec.val_f1_ah:.3f}, NoAH {rec.val_f1_noah:.3f}) "
                          f"t={rec.threshold:.2f}", highlight=False, soft_wrap=True)
            progress.update(task, description=f"epoch {rec.epoch + 1}", completed=0)

        return train_fn(on_epoch=on_epoch, on_step=on_step, **kw)


def report_result(result, out: Path, json_out: bool) -> None:
    if not result.completed:
        console.print(f"stopped after epoch {len(result.history)}; continue with --resume")
        raise typer.Exit(0)
    record = result.metrics_record()
    if json_out:
        typer.echo(json.dumps(record))
    else:
        _metrics_table(f"best epoch {result.best_epoch} (val, threshold {result.threshold:.2f})", result.val_metrics)
        console.print(f"run written to {out}")


def train_heads_cmd(
    cache: Path = typer.Argument(..., help="Cache folder written by `ahcli extract`."),
    out: Path = typer.Argument(..., help="Run folder to write (model.safetensors, config.json, metrics.json, history.csv)."),
    modalities: str = OPT_MODALITIES,
    no_conflict: bool = OPT_NO_CONFLICT,
    alpha: float = OPT_ALPHA,
    label_smoothing: float = OPT_LABEL_SMOOTHING,
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
    pooling: Pooling = OPT_POOLING,
    text_source: TextSource = OPT_TEXT_SOURCE,
    eval_windows: int = OPT_EVAL_WINDOWS,
    unfreeze_top: int = typer.Option(
        0, help="Also train the top N blocks of each encoder (checkpoint A's fast path: the cache must hold "
        "the 'prefix' states, `layers: [last, prefix]` with `unfreeze_top: N` in its spec). 0 = heads only."),
    encoder_lr_scale: float = OPT_ENCODER_LR_SCALE,
    device: str = OPT_DEVICE,
    amp: bool = OPT_AMP,
    resume: bool = OPT_RESUME,
    checkpoint_every: float = OPT_CHECKPOINT_EVERY,
    json_out: bool = OPT_JSON,
    stop_after: int = OPT_STOP_AFTER,
) -> None:
    """Train the attention-pooling, conflict-fusion and text heads over a cache (paper protocol); with
    --unfreeze-top N also the top N blocks of each encoder, from the cached 'prefix' states."""

    mods = parse_modalities(modalities)
    cfg = train_config(seed=seed, epochs=epochs, patience=patience, lr=lr, lr_min=lr_min, weight_decay=weight_decay,
                       batch_size=batch_size, accum=accum, text_weight=text_weight, label_smoothing=label_smoothing,
                       alpha=alpha, eval_windows=eval_windows, text_source=text_source, amp=amp, device=device,
                       unfreeze_top=unfreeze_top, encoder_lr_scale=encoder_lr_scale,
                       checkpoint_seconds=checkpoint_every)
    check_out_folder(out, resume)          # before the (possibly long) load
    reader = CacheReader(cache)
    if unfreeze_top:
        problem = cache_prefix_problem(reader.spec, unfreeze_top)
        if problem is not None:
            raise RunError(f"{cache}: --unfreeze-top {unfreeze_top}: {problem}")
    want_window = text_source is TextSource.window and "text" in mods
    with _progress() as progress:
        train = _load(reader, "train", mods, want_window, device, progress, (cfg.input_layer,))
        val = _load(reader, "val", mods, want_window, device, progress, (cfg.input_layer,))
    model_cfg = ModelConfig(input_dims=train.dims(cfg.input_layer), **model_options(
        modalities=modalities, no_conflict=no_conflict, dim=dim, head_hidden=head_hidden,
        head_dropout=head_dropout, ffn_dropout=ffn_dropout, pooling=pooling))
    top = f", top {unfreeze_top} encoder blocks unfrozen" if unfreeze_top else ""
    console.print(f"train {len(train)} videos, val {len(val)} videos on {train.device}; "
                  f"modalities {model_cfg.modalities}, conflict {'on' if model_cfg.conflict else 'off'}{top}")
    result = train_with_progress(train_from_cache, train=train, val=val, model_cfg=model_cfg, cfg=cfg, out=out,
                                 resume=resume, stop_after=stop_after or None, cache=cache_record(reader),
                                 spec=reader.spec)
    report_result(result, out, json_out)


def evaluate_cmd(
    run: Path = typer.Argument(..., help="Run folder written by `ahcli train-heads` or `ahcli finetune`."),
    cache: Path = typer.Argument(..., help="The cache the run was trained on (its fingerprint is checked)."),
    split: str = typer.Option(..., "--split", help="Split to score: train, val, test or private."),
    windows: int = typer.Option(5, help="Cached windows averaged per video (capped by what the cache holds)."),
    alpha: float = typer.Option(None, help="Text-head blend weight (default: the run's)."),
    threshold: float = typer.Option(None, help="Decision threshold (default: the run's, tuned on val)."),
    data: Path = typer.Option(
        None, "--data", help="BAH tree (the DATA folder) for a fine-tuned run over a cache without 'prefix' "
        "states: its encoders then run on the raw media at the cache's window starts."),
    private_root: Path = typer.Option(None, help="With --data: the private split's tree, if not at the usual place."),
    workers: int = typer.Option(2, help="With --data: decoding processes (0 decodes in this process)."),
    device: str = OPT_DEVICE,
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
) -> None:
    """Score a run on one split: multi-window inference, blending, the run's threshold, the BAH metrics."""

    reader = CacheReader(cache)
    dev = resolve_device(device)
    r = load_run_with_media(run, cache=reader, device=dev, data_root=data, private_root=private_root, workers=workers)
    require_inputs(r, reader)               # a fine-tuned run needs prefix states or --data: one line before loading
    layers = layers_needed(r, reader)
    want_window = r.train_config.text_source == "window" and r.model_config.has_text
    with _progress() as progress:
        loaded = _load(reader, split, r.model_config.present, want_window and bool(layers), device, progress, layers)
    if not layers:
        console.print(f"{run}: running its fine-tuned encoders on the raw media of {data} (the cache has no "
                      "'prefix' states)", style="dim")
    res = evaluate_split(r, loaded, windows=windows, alpha=alpha, threshold=threshold, device=dev)
    if json_out:
        typer.echo(json.dumps(res))
        return
    if res["metrics"] is None:
        console.print(f"{split}: {res['videos']} videos, none labelled: no metrics (use `ahcli ensemble` for submissions)")
        return
    _metrics_table(f"{split}: {res['videos']} videos, {res['windows']} window(s), alpha {res['alpha']}, "
                   f"threshold {res['threshold']:.2f}", res["metrics"])


def _metrics_table(title: str, m: dict) -> None:
    table = Table(title=title)
    for col in ("Macro F1", "F1-AH", "F1-NoAH", "weighted F1", "accuracy", "AP"):
        table.add_column(col, justify="right")
    ap = "-" if m.get("ap") is None else f"{m['ap']:.4f}"
    table.add_row(f"{m['macro_f1']:.4f}", f"{m['f1_ah']:.4f}", f"{m['f1_noah']:.4f}", f"{m['weighted_f1']:.4f}",
                  f"{m['accuracy']:.4f}", ap)
    Console().print(table)
