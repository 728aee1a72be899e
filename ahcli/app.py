"""The root typer app. Each command group lives in its own module with a `register(app)` function;
heavy imports (torch, transformers) stay inside the commands so `ahcli --help` is instant."""
from __future__ import annotations

import os
import sys
import warnings
from importlib import metadata

import typer
from rich.console import Console
from rich.markup import escape

from ahcli import cmd_bench, cmd_data, cmd_demo, cmd_ensemble, cmd_extract, cmd_finetune, cmd_heads, cmd_report
from ahcli import cmd_sweep
from ahcli.session import DEBUG_ENV, UNEXPECTED, active, failure_line, last_failure
from extract.errors import AHError
from extract.stopping import Interrupted

DIST = "conflict-aware-ah"

app = typer.Typer(
    name="ahcli",
    help="ConflictAwareAH: recognise ambivalence/hesitancy in BAH interview videos. "
    "Stage 1 extracts frozen-encoder tokens once into a cache; stage 2 trains the heads over it in seconds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def version() -> str:
    try:
        return metadata.version(DIST)
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"ahcli {version()}")
        raise typer.Exit(0)


@app.callback()
def root(
    show_version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                      help="Print the version and exit."),
) -> None:
    """ConflictAwareAH: recognise ambivalence/hesitancy in BAH interview videos. Stage 1 extracts frozen-encoder
    tokens once into a cache; stage 2 trains the heads over it in seconds."""


for module in (cmd_data, cmd_extract, cmd_heads, cmd_ensemble, cmd_finetune, cmd_report, cmd_demo, cmd_bench,
               cmd_sweep):
    module.register(app)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (e.g. a threshold tuned on one class) as one yellow `warning:` line on stderr, logged
    by the running command's session; never a file:line dump, never on stdout (which may carry --json)."""
    text = f"warning: {message}"
    run = active()
    if run is not None:
        run.say(text, style="yellow")
    else:
        Console(stderr=True).print(escape(text), style="yellow", highlight=False, soft_wrap=True)


def main() -> None:
    warnings.showwarning = _show_warning
    caught = (AHError, Interrupted, KeyboardInterrupt, OSError) + (() if os.environ.get(DEBUG_ENV) else UNEXPECTED)
    try:
        app()
    except caught as exc:
        text, code = last_failure() or failure_line(exc)
        shown = f"[bold red]error:[/] {escape(str(exc))}" if isinstance(exc, AHError) else escape(text)
        Console(stderr=True).print(shown, highlight=False, soft_wrap=True)
        sys.exit(code)
