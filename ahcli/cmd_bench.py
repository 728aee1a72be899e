"""`ahcli bench`: the performance goals, measured on this machine, written to BENCHMARKS.md."""
from __future__ import annotations

import shlex
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from ahbench.run import render_markdown, run_bench, save
from ahcli.session import OPT_LOG_EVERY, Heartbeat, duration
from extract.devices import resolve_device
from extract.files import json_text

console = Console(stderr=True)


def bench(
    quick: bool = typer.Option(False, "--quick", help="Short run (a couple of minutes on 2 CPU cores): fewer repeats, "
                               "head epochs timed on a subset and scaled to BAH size."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object on stdout."),
    device: str = typer.Option("auto", help="'auto' (CUDA when available), 'cpu' or 'cuda[:N]'."),
    full_run: bool = typer.Option(None, "--full-run/--no-full-run", show_default="on CUDA, or without --quick",
                                  help="Also time one whole train-heads run at BAH scale (paper protocol; "
                                  "measured 3.2 min on 2 CPU cores, early stop at 18 of 60 epochs)."),
    workers: int = typer.Option(2, help="Decoding workers for the end-to-end extraction benchmark."),
    results_dir: Path = typer.Option(Path("bench-results"), help="Folder of per-machine JSON results."),
    markdown: Path = typer.Option(Path("BENCHMARKS.md"), help="Markdown report rendered from every result in --results-dir."),
    log_every: float = OPT_LOG_EVERY,
) -> None:
    """Decode, encoder, cache, extraction and head-training throughput at BAH scale, against the goals."""

    flags = ["--quick"] * quick + ([] if full_run is None else ["--full-run" if full_run else "--no-full-run"])
    command = shlex.join(["ahcli", "bench", *flags, "--device", device, "--workers", str(workers)])

    def checkpoint(partial: dict) -> None:
        partial["command"] = command
        save(partial, results_dir)
        markdown.write_text(render_markdown(results_dir), encoding="utf-8")

    current = ["starting"]

    def log(text: str) -> None:
        current[0] = text
        console.print(f"[bold]bench:[/] {escape(text)}", highlight=False)

    with Heartbeat(log_every, lambda spent: None if console.is_terminal else console.print(
            f"bench: {current[0]} still running, elapsed {duration(spent)}", highlight=False)):
        results = run_bench(str(resolve_device(device)), quick, workers, log=log, checkpoint=checkpoint,
                            full_run=full_run)
    path = save(results, results_dir)
    console.print(f"results: {path}; report: {markdown}")
    if as_json:
        print(json_text(results, indent=2, sort_keys=True))


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
