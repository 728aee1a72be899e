"""`ahcli demo OUT`: the whole pipeline on synthetic data (wiring only; the work is in ahflows/demo.py)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ahflows.demo import SYNTHETIC_NOTE, DemoOptions, run_demo
from extract.files import json_text


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_cmd)


def demo_cmd(
    out: Path = typer.Argument(..., help="Folder for everything the demo writes (a rerun reuses its finished stages)."),
    videos: int = typer.Option(300, help="Synthetic public videos (train/val/test); a private test set of a tenth is added."),
    seed: int = typer.Option(0, help="Seed of the synthetic data, the tiny encoders and the trainings."),
    quick: bool = typer.Option(False, "--quick", help="A fast smoke run: at most 4 epochs per training."),
    epochs: int = typer.Option(30, help="Epochs per training (checkpoints and ablation)."),
    dim: int = typer.Option(64, help="Shared projection width D of the heads (the tiny encoders' tokens are 64 wide)."),
    head_hidden: int = typer.Option(64, help="Hidden width of the full and text heads."),
    lr: float = typer.Option(1e-3, help="Learning rate of the heads (cosine-annealed to lr/100)."),
    text_weight: float = typer.Option(
        0.1, help="Weight w of the text head's loss (paper: 0.5; the synthetic labels need face AND text, so text "
        "alone is at chance and a large w hurts the full model, see docs/DEMO.md)."),
    workers: int = typer.Option(1, help="Extraction decoding processes (0: decode in the main process)."),
    threads: int = typer.Option(1, help="Torch intra-op threads (the tiny demo tensors run fastest on one)."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto (the tiny demo is fastest on the CPU)."),
    json_out: bool = typer.Option(False, "--json", help="Print the results table as one JSON object on stdout."),
) -> None:
    """Synthetic BAH tree -> tiny encoders -> cache -> checkpoints A and B -> ensemble -> ablation -> reports,
    then a table of the test results. The data and encoders are synthetic: the numbers are not BAH results."""
    console = Console()
    opts = DemoOptions(videos=videos, seed=seed, quick=quick, epochs=epochs, patience=epochs, dim=dim,
                       head_hidden=head_hidden, lr=lr, text_weight=text_weight, workers=workers,
                       device=device, threads=threads)
    res = run_demo(out, opts, console)
    if json_out:
        typer.echo(json_text({"rows": [dataclasses.asdict(r) for r in res.rows], "margin": res.margin,
                               "full_ahead": res.full_ahead, "summary": str(res.out / "README.md"),
                               "reports": [str(p) for p in res.reports], "timings_s": res.timings}))
        return
    table = Table(title="demo test split: synthetic data, tiny random encoders (NOT BAH results)")
    for col in ("model", "Macro F1", "F1-AH", "F1-NoAH", "note"):
        table.add_column(col, justify="left" if col in ("model", "note") else "right")
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for k, r in enumerate(res.rows):
        style = "bold" if k == 0 or r.name.startswith("ensemble") else None
        table.add_row(r.name, fmt(r.macro_f1), fmt(r.f1_ah), fmt(r.f1_noah), r.note, style=style,
                      end_section=k in (3, 5))
    console.print()
    console.print(table)
    console.print(SYNTHETIC_NOTE.replace("**", ""), highlight=False)
    if res.full_ahead is True:
        console.print(f"[green]The full model beats every single modality[/] (test Macro F1 {res.margin:+.3f} over "
                      "the best one).", highlight=False)
    elif res.full_ahead is False:
        console.print(f"[bold yellow]warning:[/] the full model does NOT beat every single modality here "
                      f"(test Macro F1 {res.margin:+.3f} vs the best one).", highlight=False)
    spent = sum(res.timings.values())
    console.print(f"reports: {', '.join(str(p) for p in res.reports)}; summary: {res.out / 'README.md'}; "
                  f"{spent:.0f} s of work this time" + (f" (reused: {', '.join(res.reused)})" if res.reused else ""),
                  highlight=False, soft_wrap=True)
