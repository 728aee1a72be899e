"""`ahcli ensemble` (checkpoint ensembles + challenge submission) and `ahcli ablate` (Tables 4-6).
Wiring only: the work is in ahflows/ensemble.py and ahflows/ablate.py."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from ahcli.options import OPT_ALLOW_PARTIAL, console, progress_bar, reflow
from ahcli.session import OPT_LOG_EVERY, Session, command_line
from ahflows.ablate import LOG_FILE, run_ablation
from ahflows.ablation_table import METRICS, cell, full_vs_single
from ahflows.ensemble import check_out_folder, run_ensemble
from ahflows.submission import ZIP_FILE, trial_files
from extract.files import json_text
from heads.train_state import TrainingStopped


def register(app: typer.Typer) -> None:
    app.command("ensemble", help=reflow(ensemble_cmd.__doc__))(ensemble_cmd)
    app.command("ablate", help=reflow(ablate_cmd.__doc__))(ablate_cmd)


def _warn(run: Session, msg: str) -> None:
    run.say(f"warning: {msg}", style="yellow")


def ensemble_cmd(
    runs: List[Path] = typer.Argument(..., help="Run folders written by `ahcli train-heads` (or `ahcli finetune`)."),
    cache: Path = typer.Option(..., "--cache", help="The cache every run was trained on (fingerprints are checked)."),
    out: Path = typer.Option(..., "--out", help="Folder for metrics.json, predictions.csv and submission/."),
    windows: int = typer.Option(5, help="Cached eval windows averaged per video and run (capped by the cache)."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="BAH root (the unzipped data.zip): the submission follows the order of "
        "ROOT/../test-set-30-participants-unlabeled/data/split/test.txt. Without it: the cache's video_id order."),
    private_root: Optional[Path] = typer.Option(None, help="Private test set root holding split/test.txt (overrides --data's default)."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Write placeholder lines (p1 = 0.5) for private videos missing from the cache instead of refusing."),
    template: Optional[Path] = typer.Option(
        None, "--template", help="The organisers' template (their with_probabilities/ or no_probabilities/ "
        "trial-0.txt): the submission lists exactly its ids in its order; refused, naming the ids, when it "
        "and the cache's private predictions disagree."),
    trial: int = typer.Option(0, "--trial", help="Attempt number N: the files are trial-N.txt (the challenge takes 0-4)."),
    calibrate: bool = typer.Option(
        False, "--calibrate", help="Temperature-scale the ensemble probability (T fitted on val; the threshold "
        "is tuned on the calibrated values): predictions, metrics and the submission's p0/p1 are calibrated; "
        "OUT/calibration.json keeps T and the ECE before/after."),
    allow_partial: bool = OPT_ALLOW_PARTIAL,
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    json_out: bool = typer.Option(False, "--json", help="Print metrics.json on stdout."),
    log_every: float = OPT_LOG_EVERY,
) -> None:
    """Average runs' blended probabilities, re-tune the threshold on val, score val/test, write the submission.

    A val or test split the cache holds only part of is refused unless --allow-partial; metrics.json and the
    table state videos scored / listed. SIGINT/SIGTERM stop between two splits (nothing is written: the files
    are written at the end, so rerun the same command), exit 130/143. OUT/ensemble.log keeps the run's lines."""

    with Session("ensemble", log_every, console) as run:
        check_out_folder(out, runs)                     # before the log file goes into OUT
        if out.is_dir():
            run.attach(out / "ensemble.log")
        with progress_bar() as progress, run.stop.finishing():
            task = progress.add_task("scoring", total=None)

            def on_split(s: str) -> None:
                progress.update(task, description=f"scoring {s}")
                run.attach(out / "ensemble.log")
                run.progress(f"ensemble: scoring {s}")

            record = run_ensemble(runs, cache, out, windows, data_root=data, private_root=private_root,
                                  allow_missing=allow_missing, allow_partial=allow_partial, device=device,
                                  template=template, trial=trial, calibrated=calibrate,
                                  warn=lambda m: _warn(run, m), on_split=on_split, should_stop=run.stop)
        if record is None:
            raise run.interrupted("nothing written (the ensemble's files are written at the end)", command_line())
        _show(record, runs, windows, out, json_out, run, trial)


def _show(record: dict, runs, windows: int, out: Path, json_out: bool, run: Session, trial: int = 0) -> None:
    if json_out:
        typer.echo(json_text(record))
        return
    videos = record.get("videos") or {}

    def count(split: str) -> str:
        v = videos.get(split)
        return "" if not v else f" {v['scored']}/{v['listed']}{'!' if v['scored'] < v['listed'] else ''}"

    table = Table(title=f"ensemble of {len(runs)} run(s), {windows} window(s); threshold {record['threshold']:.2f} "
                  f"(tuned on val); videos scored/listed: val{count('val')}, test{count('test') or ' -'}")
    table.add_column("model")
    for col in ("val Macro F1", "test Macro F1", "test F1-AH", "test F1-NoAH", "test AP", "test accuracy"):
        table.add_column(col, justify="right")

    def add(name: str, val: dict | None, test: dict | None) -> None:
        def f(m, k):
            return "-" if m is None or m.get(k) is None else f"{m[k]:.4f}"
        table.add_row(name, f(val, "macro_f1"), f(test, "macro_f1"), f(test, "f1_ah"), f(test, "f1_noah"),
                      f(test, "ap"), f(test, "accuracy"))

    for r in record["runs"]:
        add(f"{Path(r['path']).name} (t={r['threshold']:.2f})", r["val"], r["test"])
    add("[bold]ensemble[/]", record["val"], record["test"])
    iv = record.get("intervals") or {}
    if iv.get("val"):                      # participant-bootstrap 95% intervals (heads/uncertainty.py)
        def ci(split: str, k: str) -> str:
            m = (iv.get(split) or {}).get(k) or {}
            return "-" if m.get("low") is None else f"[{m['low']:.3f}, {m['high']:.3f}]"
        table.add_row("  95% interval", ci("val", "macro_f1"), ci("test", "macro_f1"), ci("test", "f1_ah"),
                      ci("test", "f1_noah"), ci("test", "ap"), "")
        table.caption = f"intervals: bootstrap over {iv['val']['participants']} val participants"
    Console().print(table)
    partial = [f"{s} {v['scored']}/{v['listed']}" for s, v in videos.items() if s in ("val", "test")
               and v["scored"] < v["listed"]]
    if partial:
        run.say(f"PARTIAL splits scored (--allow-partial): {', '.join(partial)} videos scored/listed", style="yellow")
    written = [out / "metrics.json", out / "predictions.csv", out / "ensemble.md", out / "ensemble.tex"]
    files = trial_files(trial)
    if (out / files[0]).is_file():
        written += [out / files[0], out / files[1], out / ZIP_FILE]
    run.say("wrote " + ", ".join(str(p) for p in written))
    cal = record.get("calibration")
    if cal:
        run.say(f"calibrated: T = {cal['temperature']:.4f} (fitted on val), val ECE {cal['val_ece_before']:.4f} -> "
                f"{cal['val_ece_after']:.4f}; threshold tuned on the calibrated probabilities ({out / cal['file']})")


def ablate_cmd(
    cache: Path = typer.Argument(..., help="Cache folder written by `ahcli extract`."),
    out: Path = typer.Argument(..., help="Folder for ablation.md, ablation.csv and trainings.jsonl."),
    seeds: int = typer.Option(3, help="Seeds per configuration (OFFSET..OFFSET+SEEDS-1); cells are mean ± std over them."),
    seed_offset: int = typer.Option(0, "--seed-offset", help="First seed (a demo made with --seed K trains seed K)."),
    unfreeze_top: int = typer.Option(
        0, "--unfreeze-top", help="Train every variant with the top N encoder blocks unfrozen (the paper's "
        "section 4.4), from a cache with the 'prefix' layer for N blocks (refused otherwise); checkpoint B "
        "stays frozen. 0: heads only."),
    label_smoothing: float = typer.Option(
        0.0, "--label-smoothing", help="Label smoothing eps of every variant except checkpoint B (which uses 0.1)."),
    text_weight: Optional[float] = typer.Option(None, "--text-weight", help="Weight w of the text-head loss (default: 0.5; the demo uses 0.1)."),
    quick: bool = typer.Option(False, "--quick", help="Train only v, a, t and vat (plus the inference-time rows)."),
    windows: int = typer.Option(1, help="Inference windows for Tables 4 and 5 (the paper: 1)."),
    frozen_a: bool = typer.Option(False, "--frozen-a", help="Use the frozen eps=0 model as checkpoint A even when the cache allows training its top-2 blocks (faster)."),
    resume: bool = typer.Option(False, "--resume", help="Reuse the trainings OUT/trainings.jsonl already holds (same cache and options)."),
    epochs: Optional[int] = typer.Option(None, help="Maximum epochs (default: the paper's 60)."),
    patience: Optional[int] = typer.Option(None, help="Early-stopping patience (default: 15)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: 3e-5, for 768-wide real features)."),
    lr_min: Optional[float] = typer.Option(None, help="Final learning rate of the cosine schedule (default: 3e-7)."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay (default: 1e-2)."),
    dim: Optional[int] = typer.Option(None, help="Shared projection width D (default: 768)."),
    head_hidden: Optional[int] = typer.Option(None, help="Hidden width of the heads (default: 512)."),
    head_dropout: Optional[float] = typer.Option(None, help="Dropout inside the heads (default: 0.3)."),
    ffn_dropout: Optional[float] = typer.Option(None, help="Dropout inside the fusion FFN (default: 0.1)."),
    ffn_hidden: Optional[int] = typer.Option(None, help="Hidden width of the fusion FFN (default: 2 x the fusion width)."),
    pos_weight: Optional[str] = typer.Option(None, help="BCE pos_weight: train (default), train+val or a number."),
    batch_size: Optional[int] = typer.Option(None, help="Videos per micro-batch (default: 4)."),
    accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step (default: 4)."),
    alpha: Optional[float] = typer.Option(None, help="Text blend used to select epochs and thresholds (default: 0.6)."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on CUDA (the CPU never uses it)."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on CUDA, fp32 on the CPU), bf16, fp16 (with a gradient scaler) or fp32 for every training; bf16/fp16 need CUDA."),
    only_seed: Optional[int] = typer.Option(
        None, "--only-seed", help="Train only this seed (0..SEEDS-1): one cluster job per seed, each into its own "
        "folder; then merge them with --merge (docs/CLUSTER.md)."),
    merge: List[Path] = typer.Option(
        [], "--merge", help="An ablation folder (repeatable) whose finished trainings are reused instead of "
        "retrained (same cache and options): `ablate CACHE OUT --seeds 3 --merge OUT-s0 --merge OUT-s1 ...` "
        "writes the merged tables without training."),
    allow_partial: bool = OPT_ALLOW_PARTIAL,
    json_out: bool = typer.Option(False, "--json", help="Print the aggregated rows as one JSON object on stdout."),
    log_every: float = OPT_LOG_EVERY,
) -> None:
    """The paper's Tables 4, 5 and 6 from one cache: modality subsets, conflict features, alpha, transcript,
    inference windows and the 2-checkpoint ensemble, mean ± std over seeds.

    SIGINT/SIGTERM: the training in progress stops at its epoch's end and is dropped (it is redone), every
    finished training stays in OUT/trainings.jsonl, one line names the command that resumes (--resume), exit
    130/143. OUT is locked while it is written and keeps a log in OUT/ablate.log."""
    options = dict(epochs=epochs, patience=patience, lr=lr, lr_min=lr_min, weight_decay=weight_decay, dim=dim,
                   head_hidden=head_hidden, head_dropout=head_dropout, ffn_dropout=ffn_dropout, ffn_hidden=ffn_hidden,
                   pos_weight=pos_weight, text_weight=text_weight,
                   batch_size=batch_size, accum=accum, alpha=alpha)
    base = {k: v for k, v in options.items() if v is not None}
    if not amp:
        base["amp"] = False
    if precision != "auto":
        base["precision"] = precision
    with Session("ablate", log_every, console) as run:
        run.resume = command_line(("--resume",))
        trainings = run.ticker("ablate", "trainings")
        with progress_bar() as progress, run.stop.finishing():
            task = progress.add_task("loading", total=None)
            epoch_task = progress.add_task("epoch", total=None, visible=False)

            def on_load(split: str) -> None:
                run.attach(out / "ablate.log")      # OUT exists (and is ours) once the splits load
                progress.update(task, description=f"loading {split}")
                run.progress(f"ablate: loading {split}")

            def on_training(desc: str, k: int, total: int) -> None:
                progress.update(task, description=f"training {desc}", completed=k - 1, total=total)
                progress.update(epoch_task, completed=0, visible=True)
                trainings.update(k - 1, total, f"next: {desc}")

            def on_epoch(rec, prog) -> None:
                progress.update(epoch_task, description=f"  epoch {rec.epoch} (best val F1 {prog.best_f1:.3f})",
                                completed=rec.epoch, total=prog.epochs)
                run.log(f"  epoch {rec.epoch}: val F1 {rec.val_macro_f1:.4f} (best {prog.best_f1:.4f})")
                if run.stop.requested:
                    raise TrainingStopped

            res = run_ablation(cache, out, seeds, base, quick, windows=windows, device=device, resume=resume,
                               frozen_a=frozen_a, on_load=on_load, on_training=on_training, on_epoch=on_epoch,
                               should_stop=run.stop, only_seed=only_seed, merge=list(merge),
                               allow_partial=allow_partial, seed_offset=seed_offset,
                               unfreeze_top=unfreeze_top, label_smoothing=label_smoothing)
        if res.stopped:
            raise run.interrupted(f"{res.trainings[0]} of {res.trainings[1]} trainings kept in {out / LOG_FILE}",
                                  command_line(("--resume",)))
        if json_out:
            typer.echo(json_text({"rows": [dataclasses.asdict(r) for r in res.aggregated],
                                   "seconds": res.seconds, "out": str(out)}))
        else:
            _print_summary(res)
        margin = full_vs_single(res.aggregated)
        if margin is not None:
            run.say(f"full model vs best single modality (test Macro F1): {margin:+.3f}")
        run.say(f"wrote {out / 'ablation.md'}, {out / 'ablation.tex'} and {out / 'ablation.csv'} ({res.seconds:.0f} s)")


def _print_summary(res) -> None:
    table = Table(title="ablation (mean ± std over seeds; videos: scored/listed in the split file)")
    for col in ("table", "config", "split", "Macro F1", "F1-AH", "F1-NoAH", "seeds", "videos"):
        table.add_column(col, justify="right" if col[0].isupper() or col[0] == "v" else "left",
                         no_wrap=col == "config")
    for r in res.aggregated:
        videos = "-" if r.listed is None else f"{r.videos}/{r.listed}" + (" PARTIAL" if r.videos < r.listed else "")
        table.add_row(r.table, r.config, r.split,
                      *[cell(r, k) for k in METRICS], f"n = {r.n_seeds}", videos)
    Console().print(table)
