"""Every `ahcli` command and every one of its options and arguments explains itself in --help, and the
prose reflows to the terminal (no hard line breaks from the source inside a paragraph)."""
from __future__ import annotations

import typer.main

from ahcli.app import app


def _commands(group, prefix: str = "") -> dict:
    """'data check' -> its command, for every leaf command under `group` (typer's groups are not click's)."""
    out = {}
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            out.update(_commands(cmd, f"{prefix}{name} "))
        else:
            out[prefix + name] = cmd
    return out


def test_every_command_option_and_argument_has_help():
    commands = _commands(typer.main.get_command(app))
    assert {"extract", "train-heads", "ensemble", "ablate", "bench", "data check", "cache verify"} <= set(commands)
    missing = [f"{name} {p.name}" for name, cmd in commands.items() for p in cmd.params
               if not (getattr(p, "help", None) or "").strip()]
    assert missing == []
    assert [name for name, cmd in commands.items() if not (cmd.help or "").strip()] == []


def test_help_paragraphs_have_no_hard_line_breaks():
    # typer joins the first paragraph's lines but keeps the later paragraphs' line breaks as they are.
    commands = _commands(typer.main.get_command(app))
    broken = [name for name, cmd in commands.items() for par in (cmd.help or "").strip().split("\n\n")[1:]
              if "\n" in par.strip()]
    assert broken == []
