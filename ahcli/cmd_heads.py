"""`ahcli train-heads` and `ahcli evaluate`: stage 2 over a cache (wiring only; the work is in heads/)."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


class TextSource(str, Enum):
    full = "full"
    window = "window"


class Pooling(str, Enum):
    fused = "fused"
    literal = "literal"


def register(app: typer.Typer) -> None:
    app.command("train-heads")(train_heads_cmd)
    app.command("evaluate")(evaluate_cmd)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def _load(reader, split: str, modalities, text_window: bool, device: str, progress):
    from heads.data import load_split

    task = progress.add_task(f"loading {split}", total=None)
    data = load_split(reader, split, device=device, modalities=modalities, text_window=text_window,
                      progress=lambda i, n: progress.update(task, completed=i, total=n))
    progress.remove_task(task)
    return data


def train_heads_cmd(
    cache: Path = typer.Argument(..., help="Cache folder written by `ahcli extract`."),
    out: Path = typer.Argument(..., help="Run folder to write (model.safetensors, config.json, metrics.json, history.csv)."),
    modalities: str = typer.Option("vat", help="Modalities to fuse: any non-empty subset of the letters v, a, t."),
    no_conflict: bool = typer.Option(False, "--no-conflict", help="Drop the pairwise |x - y| conflict features."),
    alpha: float = typer.Option(0.6, help="Weight of the text head in the blended probability (0 without text)."),
    label_smoothing: float = typer.Option(
        0.0, help="Label smoothing eps: y~ = y(1-eps) + 0.5 eps. The paper's checkpoint B uses 0.1 "
        "(--label-smoothing 0.1); checkpoint A uses 0."),
    text_weight: float = typer.Option(0.5, help="Weight w of the text-head loss in (1-w) BCE_full + w BCE_text."),
    seed: int = typer.Option(0, help="Seed for initialisation, batch order, window draws and dropout."),
    epochs: int = typer.Option(60, help="Maximum number of epochs."),
    patience: int = typer.Option(15, help="Stop after this many epochs without a better val Macro F1."),
    lr: float = typer.Option(3e-5, help="AdamW learning rate (cosine-annealed to --lr-min)."),
    lr_min: float = typer.Option(3e-7, help="Final learning rate of the cosine schedule."),
    weight_decay: float = typer.Option(1e-2, help="AdamW weight decay."),
    batch_size: int = typer.Option(4, help="Videos per micro-batch."),
    accum: int = typer.Option(4, help="Micro-batches accumulated per optimizer step."),
    dim: int = typer.Option(768, help="Shared projection width D."),
    head_hidden: int = typer.Option(512, help="Hidden width of the full and text heads."),
    head_dropout: float = typer.Option(0.3, help="Dropout inside the heads."),
    ffn_dropout: float = typer.Option(0.1, help="Dropout inside the fusion FFN (not given in the paper)."),
    pooling: Pooling = typer.Option(Pooling.fused, help="Attention pooling form: fused (cheap) or literal (reference); same numbers."),
    text_source: TextSource = typer.Option(TextSource.full, help="Text tokens: the full transcript or the window-aligned one."),
    eval_windows: int = typer.Option(0, help="Cached eval windows averaged on val each epoch (0 = all)."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on CUDA (the CPU never uses it)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in OUT (or start it when there is none)."),
    json_out: bool = typer.Option(False, "--json", help="Print the final metrics.json on stdout."),
    stop_after: int = typer.Option(0, "--stop-after", hidden=True, help="Stop after this epoch's checkpoint (testing)."),
) -> None:
    """Train the attention-pooling, conflict-fusion and text heads over a cache (paper protocol)."""
    from extract.store import CacheReader
    from heads.checkpoint import cache_record
    from heads.data import parse_modalities
    from heads.model import ModelConfig
    from heads.train import TrainConfig, check_out_folder, train_heads

    mods = parse_modalities(modalities)
    cfg = TrainConfig(seed=seed, epochs=epochs, patience=patience, lr=lr, lr_min=min(lr_min, lr),
                      weight_decay=weight_decay, batch_size=batch_size, accum=accum, text_weight=text_weight,
                      label_smoothing=label_smoothing, alpha=alpha, eval_windows=eval_windows,
                      text_source=text_source.value, amp=amp, device=device)
    check_out_folder(out, resume)          # before the (possibly long) load
    reader = CacheReader(cache)
    want_window = text_source is TextSource.window and "text" in mods
    with _progress() as progress:
        train = _load(reader, "train", mods, want_window, device, progress)
        val = _load(reader, "val", mods, want_window, device, progress)
    model_cfg = ModelConfig(input_dims=train.dims(cfg.layer), modalities=modalities, dim=dim,
                            conflict=not no_conflict, head_hidden=head_hidden, head_dropout=head_dropout,
                            ffn_dropout=ffn_dropout, pooling=pooling.value)
    console.print(f"train {len(train)} videos, val {len(val)} videos on {train.device}; "
                  f"modalities {model_cfg.modalities}, conflict {'on' if model_cfg.conflict else 'off'}")

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

        result = train_heads(train, val, model_cfg, cfg, out, resume=resume, stop_after=stop_after or None,
                             on_epoch=on_epoch, on_step=on_step, cache=cache_record(reader, cache))
    if not result.completed:
        console.print(f"stopped after epoch {len(result.history)}; continue with --resume")
        raise typer.Exit(0)
    record = result.metrics_record()
    if json_out:
        typer.echo(json.dumps(record))
    else:
        _metrics_table(f"best epoch {result.best_epoch} (val, threshold {result.threshold:.2f})", result.val_metrics)
        console.print(f"run written to {out}")


def evaluate_cmd(
    run: Path = typer.Argument(..., help="Run folder written by `ahcli train-heads`."),
    cache: Path = typer.Argument(..., help="The cache the run was trained on (its fingerprint is checked)."),
    split: str = typer.Option(..., "--split", help="Split to score: train, val, test or private."),
    windows: int = typer.Option(5, help="Cached windows averaged per video (capped by what the cache holds)."),
    alpha: float = typer.Option(None, help="Text-head blend weight (default: the run's)."),
    threshold: float = typer.Option(None, help="Decision threshold (default: the run's, tuned on val)."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
) -> None:
    """Score a run on one split: multi-window inference, blending, the run's threshold, the BAH metrics."""
    from extract.store import CacheReader
    from heads.checkpoint import load_run
    from heads.data import resolve_device
    from heads.infer import evaluate_split

    reader = CacheReader(cache)
    dev = resolve_device(device)
    r = load_run(run, cache=reader, device=dev)
    want_window = r.train_config.text_source == "window" and r.model_config.has_text
    with _progress() as progress:
        data = _load(reader, split, r.model_config.present, want_window, device, progress)
    res = evaluate_split(r, data, windows=windows, alpha=alpha, threshold=threshold, device=dev)
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
