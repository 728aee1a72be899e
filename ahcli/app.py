"""The root typer app. Each command group lives in its own module with a `register(app)` function;
heavy imports (torch, transformers) stay inside the commands so `ahcli --help` is instant."""
from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from ahcli import cmd_bench, cmd_data, cmd_demo, cmd_ensemble, cmd_extract, cmd_finetune, cmd_heads, cmd_report
from extract.errors import AHError

app = typer.Typer(
    name="ahcli",
    help="ConflictAwareAH: recognise ambivalence/hesitancy in BAH interview videos. "
    "Stage 1 extracts frozen-encoder tokens once into a cache; stage 2 trains the heads over it in seconds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (cmd_data, cmd_extract, cmd_heads, cmd_ensemble, cmd_finetune, cmd_report, cmd_demo, cmd_bench):
    module.register(app)


def main() -> None:
    try:
        app()
    except AHError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
