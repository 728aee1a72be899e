"""`ahcli train-heads` and `ahcli evaluate`: stage 2 over a cache (wiring only; the work is in heads/).

The training options are module-level typer options shared with `ahcli finetune` (ahcli/cmd_finetune.py):
one help text per option, the same names on both commands.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ahcli.options import (OPT_ACCUM, OPT_ALLOW_PARTIAL, OPT_ALPHA, OPT_AMP, OPT_PRECISION, OPT_BATCH_SIZE, OPT_CHECKPOINT_EVERY,
                           OPT_DEVICE, OPT_DIM, OPT_ENCODER_LR_SCALE, OPT_EPOCHS, OPT_EVAL_WINDOWS, OPT_FFN_DROPOUT,
                           OPT_FFN_HIDDEN, OPT_HEAD_DROPOUT, OPT_HEAD_HIDDEN, OPT_JSON, OPT_LABEL_SMOOTHING, OPT_LR,
                           OPT_LR_MIN, OPT_MODALITIES, OPT_NO_CONFLICT, OPT_PATIENCE, OPT_POOLING, OPT_POS_WEIGHT,
                           OPT_RESUME, OPT_SEED, OPT_STOP_AFTER, OPT_TENSORBOARD, OPT_TEXT_SOURCE, OPT_TEXT_WEIGHT,
                           OPT_WEIGHT_DECAY, Pooling, TextSource, console, metrics_table, model_options, progress_bar,
                           report_result, train_config, train_with_progress, warn_partial, with_interrupt_help)
from ahcli.session import OPT_LOG_EVERY, Session, command_line
from ahflows.checkpoint_a import train_from_cache
from ahflows.epoch_scalars import EpochScalars
from ahflows.raw_media import load_run_with_media
from extract.devices import resolve_device
from extract.files import json_text
from extract.listing import require_complete, split_coverage
from extract.locks import folder_lock
from extract.store import CacheReader
from extract.vocab import TRAIN_SPLITS, check_split, parse_modalities
from heads.config import ModelConfig
from heads.infer import evaluate_split, layers_needed, require_inputs
from heads.resume import check_out_folder
from heads.run_files import RunError, cache_record
from heads.uncertainty import participant_ids
from heads.stream import open_split, should_stream
from heads.topblocks import cache_prefix_problem

TRAIN_LOG = "train.log"


def register(app: typer.Typer) -> None:
    app.command("train-heads", help=with_interrupt_help(train_heads_cmd.__doc__))(train_heads_cmd)
    app.command("evaluate")(evaluate_cmd)




def _load(reader, split: str, modalities, text_window: bool, device: str, progress, layers=("last",),
          run: Session | None = None, stream: bool = False):
    what = f"checking {split} (streamed)" if stream else f"loading {split}"
    task = progress.add_task(what, total=None)
    ticker = run.ticker(what, "videos") if run is not None else None

    def step(i: int, n: int) -> None:
        progress.update(task, completed=i, total=n)
        if ticker is not None:
            ticker.update(i, n, force=i == n)

    data = open_split(reader, split, layers=layers, device=device, modalities=modalities, text_window=text_window,
                      progress=step, stream=stream)
    progress.remove_task(task)
    return data






def train_heads_cmd(
    cache: Path = typer.Argument(..., help="Cache folder written by `ahcli extract`."),
    out: Path = typer.Argument(..., help="Run folder to write (model.safetensors, config.json, metrics.json, history.csv)."),
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
    unfreeze_top: int = typer.Option(
        0, help="Also train the top N blocks of each encoder (checkpoint A's fast path: the cache must hold "
        "the 'prefix' states, `layers: [last, prefix]` with `unfreeze_top: N` in its spec). 0 = heads only."),
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
    stream: Optional[bool] = typer.Option(
        None, "--stream/--in-memory", help="Read the train and val splits from the cache as each epoch needs them "
        "(memory stays a few batches, whatever the cache's size; every video is verified once first) instead of "
        "holding them in memory. Default: in memory when both fit in the available memory, else streamed."),
) -> None:
    """Train the attention-pooling, conflict-fusion and text heads over a cache (paper protocol); with
    --unfreeze-top N also the top N blocks of each encoder, from the cached 'prefix' states."""

    mods = parse_modalities(modalities)
    cfg = train_config(seed=seed, epochs=epochs, patience=patience, lr=lr, lr_min=lr_min, weight_decay=weight_decay,
                       batch_size=batch_size, accum=accum, text_weight=text_weight, label_smoothing=label_smoothing,
                       alpha=alpha, eval_windows=eval_windows, text_source=text_source, amp=amp, device=device,
                       unfreeze_top=unfreeze_top, encoder_lr_scale=encoder_lr_scale,
                       checkpoint_seconds=checkpoint_every, pos_weight=pos_weight, precision=precision)
    check_out_folder(out, resume)          # before the (possibly long) load
    reader = CacheReader(cache)
    if unfreeze_top:
        problem = cache_prefix_problem(reader.spec, unfreeze_top)
        if problem is not None:
            raise RunError(f"{cache}: --unfreeze-top {unfreeze_top}: {problem}")
    with Session("train-heads", log_every, console) as run, folder_lock(out, "run folder"):
        run.attach(out / TRAIN_LOG)
        run.resume = command_line(("--resume",))
        scalars = EpochScalars(out) if tensorboard else None
        covs = [split_coverage(reader, s) for s in TRAIN_SPLITS]
        warn_partial(run, covs, cache)
        want_window = text_source is TextSource.window and "text" in mods
        if stream is None:
            stream = should_stream(reader, ("train", "val"), (cfg.input_layer,), modalities=mods,
                                   text_window=want_window)
        with progress_bar() as progress:
            train = _load(reader, "train", mods, want_window, device, progress, (cfg.input_layer,), run, stream)
            val = _load(reader, "val", mods, want_window, device, progress, (cfg.input_layer,), run, stream)
        model_cfg = ModelConfig(input_dims=train.dims(cfg.input_layer), **model_options(
            modalities=modalities, no_conflict=no_conflict, dim=dim, head_hidden=head_hidden,
            head_dropout=head_dropout, ffn_dropout=ffn_dropout, pooling=pooling, ffn_hidden=ffn_hidden))
        top = f", top {unfreeze_top} encoder blocks unfrozen" if unfreeze_top else ""
        run.say(f"train {len(train)} videos, val {len(val)} videos "
                f"{'streamed from the cache' if stream else 'on ' + str(train.device)}; "
                f"modalities {model_cfg.modalities}, conflict {'on' if model_cfg.conflict else 'off'}{top}")
        try:
            result = train_with_progress(train_from_cache, run, scalars, train=train, val=val, model_cfg=model_cfg,
                                         cfg=cfg, out=out, resume=resume, stop_after=stop_after or None,
                                         cache=cache_record(reader), spec=reader.spec,
                                         videos={c.split: c.counts() for c in covs})
        finally:
            if scalars is not None:
                scalars.close()
        report_result(result, out, json_out, run)


def evaluate_cmd(
    run: Path = typer.Argument(..., help="Run folder written by `ahcli train-heads` or `ahcli finetune`."),
    cache: Path = typer.Argument(..., help="The cache the run was trained on (its fingerprint is checked)."),
    split: str = typer.Option(..., "--split", help="Split to score: train, val, test or private."),
    allow_partial: bool = OPT_ALLOW_PARTIAL,
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
    """Score a run on one split: multi-window inference, blending, the run's threshold, the BAH metrics. A split
    the cache holds only part of (videos its split file lists that failed or were never extracted) is refused
    unless --allow-partial; the result states videos scored / listed."""

    check_split(split)
    reader = CacheReader(cache)
    cov = require_complete(split_coverage(reader, split), str(cache), allow_partial)
    dev = resolve_device(device)
    r = load_run_with_media(run, cache=reader, device=dev, data_root=data, private_root=private_root, workers=workers)
    require_inputs(r, reader)               # a fine-tuned run needs prefix states or --data: one line before loading
    layers = layers_needed(r, reader)
    want_window = r.train_config.text_source == "window" and r.model_config.has_text
    with progress_bar() as progress:
        loaded = _load(reader, split, r.model_config.present, want_window and bool(layers), device, progress, layers)
    if not layers:
        console.print(f"{run}: running its fine-tuned encoders on the raw media of {data} (the cache has no "
                      "'prefix' states)", style="dim")
    res = evaluate_split(r, loaded, windows=windows, alpha=alpha, threshold=threshold, device=dev,
                         groups=participant_ids(reader, loaded.video_ids))
    res |= {"listed": len(cov.listed), "missing": cov.missing}
    if json_out:
        typer.echo(json_text(res))
        return
    if res["metrics"] is None:
        console.print(f"{split}: {res['videos']}/{len(cov.listed)} listed videos, none labelled: no metrics (use "
                      "`ahcli ensemble` for submissions)")
        return
    metrics_table(f"{split}: {res['videos']}/{len(cov.listed)} listed videos"
                  f"{' (PARTIAL: --allow-partial)' if cov.partial else ''}, {res['windows']} window(s), alpha {res['alpha']}, "
                   f"threshold {res['threshold']:.2f}"
                   + (f", calibrated (T = {res['temperature']:.3f})" if res.get("temperature") else ""),
                   res["metrics"], res.get("intervals"))


