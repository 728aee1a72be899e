"""`ahcli ensemble` (checkpoint ensembles + challenge submission) and `ahcli ablate` (Tables 4-6).
Wiring only: the work is in ahflows/ensemble.py and ahflows/ablate.py."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from ahcli.options import console, progress_bar
from ahflows.ablate import run_ablation
from ahflows.ablation_table import METRICS, full_vs_single
from ahflows.ensemble import run_ensemble
from ahflows.submission import NO_PROBS, WITH_PROBS


def register(app: typer.Typer) -> None:
    app.command("ensemble")(ensemble_cmd)
    app.command("ablate")(ablate_cmd)


def _warn(msg: str) -> None:
    console.print(f"[bold yellow]warning:[/] {msg}", highlight=False, soft_wrap=True)


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
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    json_out: bool = typer.Option(False, "--json", help="Print metrics.json on stdout."),
) -> None:
    """Average runs' blended probabilities, re-tune the threshold on val, score val/test, write the submission."""

    with progress_bar() as progress:
        task = progress.add_task("scoring", total=None)
        record = run_ensemble(runs, cache, out, windows, data_root=data, private_root=private_root,
                              allow_missing=allow_missing, device=device, warn=_warn,
                              on_split=lambda s: progress.update(task, description=f"scoring {s}"))
    if json_out:
        typer.echo(json.dumps(record))
        return
    table = Table(title=f"ensemble of {len(runs)} run(s), {windows} window(s); threshold {record['threshold']:.2f} (tuned on val)")
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
    Console().print(table)
    written = [out / "metrics.json", out / "predictions.csv"]
    if (out / WITH_PROBS).is_file():
        written += [out / WITH_PROBS, out / NO_PROBS]
    console.print("wrote " + ", ".join(str(p) for p in written), highlight=False)


def ablate_cmd(
    cache: Path = typer.Argument(..., help="Cache folder written by `ahcli extract`."),
    out: Path = typer.Argument(..., help="Folder for ablation.md, ablation.csv and trainings.jsonl."),
    seeds: int = typer.Option(3, help="Seeds per configuration (0..SEEDS-1); cells are mean ± std over them."),
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
    batch_size: Optional[int] = typer.Option(None, help="Videos per micro-batch (default: 4)."),
    accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step (default: 4)."),
    alpha: Optional[float] = typer.Option(None, help="Text blend used to select epochs and thresholds (default: 0.6)."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on CUDA (the CPU never uses it)."),
) -> None:
    """The paper's Tables 4, 5 and 6 from one cache: modality subsets, conflict features, alpha, transcript,
    inference windows and the 2-checkpoint ensemble, mean ± std over seeds."""
    options = dict(epochs=epochs, patience=patience, lr=lr, lr_min=lr_min, weight_decay=weight_decay, dim=dim,
                   head_hidden=head_hidden, head_dropout=head_dropout, ffn_dropout=ffn_dropout,
                   batch_size=batch_size, accum=accum, alpha=alpha)
    base = {k: v for k, v in options.items() if v is not None}
    if not amp:
        base["amp"] = False
    with progress_bar() as progress:
        task = progress.add_task("loading", total=None)
        epoch_task = progress.add_task("epoch", total=None, visible=False)

        def on_load(split: str) -> None:
            progress.update(task, description=f"loading {split}")

        def on_training(desc: str, k: int, total: int) -> None:
            progress.update(task, description=f"training {desc}", completed=k - 1, total=total)
            progress.update(epoch_task, completed=0, visible=True)

        def on_epoch(rec, prog) -> None:
            progress.update(epoch_task, description=f"  epoch {rec.epoch} (best val F1 {prog.best_f1:.3f})",
                            completed=rec.epoch, total=prog.epochs)

        res = run_ablation(cache, out, seeds, base, quick, windows=windows, device=device, resume=resume,
                           frozen_a=frozen_a, on_load=on_load, on_training=on_training, on_epoch=on_epoch)
    _print_summary(res)
    margin = full_vs_single(res.aggregated)
    if margin is not None:
        console.print(f"full model vs best single modality (test Macro F1): {margin:+.3f}", highlight=False)
    console.print(f"wrote {out / 'ablation.md'} and {out / 'ablation.csv'} ({res.seconds:.0f} s)", highlight=False)


def _print_summary(res) -> None:
    table = Table(title="ablation (mean ± std over seeds)")
    for col in ("table", "config", "split", "Macro F1", "F1-AH", "F1-NoAH"):
        table.add_column(col, justify="right" if col[0].isupper() else "left")
    for r in res.aggregated:
        table.add_row(r.table, r.config, r.split,
                      *[f"{getattr(r, k):.3f} ± {r.std.get(k, 0.0):.3f}" for k in METRICS])
    Console().print(table)
