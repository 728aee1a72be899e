"""`ahcli synth OUT` (synthetic BAH tree) and `ahcli data check ROOT` (validate a BAH tree)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from extract.bah import PRIVATE_SUBDIR, read_bah
from extract.files import json_text
from extract.synth import write_synthetic_bah
from extract.vocab import SPLITS

data_app = typer.Typer(help="Inspect and validate a BAH dataset tree.", no_args_is_help=True)

# Columns of the per-split table: problem kind -> header.
_KIND_COLUMNS = {
    "missing_faces": "faces",
    "missing_transcript": "transcript",
    "no_audio": "audio",
    "frame_mismatch": "frames",
    "unreadable": "unreadable",
}


def check_report(root: Path, private_root: Optional[Path] = None, allow_symlinks: bool = False) -> dict:
    """Read the tree and summarise it: {"splits": {...}, "problems": [...]} plus per-split kind counts."""

    ds = read_bah(root, private_root=private_root, allow_symlinks=allow_symlinks)
    splits: dict[str, dict] = {}
    kinds: dict[str, dict[str, int]] = {}
    for name in SPLITS:
        vids = ds.split(name)
        positive = None if name == "private" else sum(v.label or 0 for v in vids)
        splits[name] = {"videos": len(vids), "positive": positive}
        kinds[name] = {k: 0 for k in _KIND_COLUMNS} | {"other": 0}
    for p in ds.problems:
        bucket = kinds.get(p.split or "", None)
        if bucket is not None:
            bucket[p.kind if p.kind in _KIND_COLUMNS else "other"] += 1
    problems = [{"video_id": p.video_id, "problem": p.problem, "fatal": p.fatal} for p in ds.problems]
    return {"splits": splits, "problems": problems, "kinds": kinds, "fatal": [p.fatal for p in ds.problems],
            "private_root": str(ds.private_root) if ds.private_root else None}


def _print_table(console: Console, report: dict) -> None:
    table = Table(title="BAH tree: videos read, A/H positives, and problems per kind (missing/empty faces, "
                        "missing/bad transcript, no audio track, frame-count mismatch, unreadable file, other)")
    for header in ["split", "videos", "A/H", *_KIND_COLUMNS.values(), "other"]:
        if header == "split":
            table.add_column(header, no_wrap=True, min_width=7)
        else:
            table.add_column(header, justify="right")
    for name, counts in report["splits"].items():
        pos = "-" if counts["positive"] is None else str(counts["positive"])
        k = report["kinds"][name]
        table.add_row(name, str(counts["videos"]), pos, *(str(k[c]) for c in _KIND_COLUMNS), str(k["other"]))
    console.print(table)
    if report["private_root"] is None:
        console.print("private test set: not found (expected ../test-set-30-participants-unlabeled/data)")
    for p, fatal in zip(report["problems"], report["fatal"]):   # a non-fatal one: the video is still read
        label = "[red]problem[/]" if fatal else "[yellow]problem (still read)[/]"
        console.print(f"{label} {p['video_id']}: {p['problem']}", highlight=False, soft_wrap=True)
    if not report["problems"]:
        console.print("[green]no problems[/]")


@data_app.command("check")
def check(
    root: Path = typer.Argument(..., help="BAH data root (the unzipped data.zip: split/, Videos/, ...)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of a table."),
    private_root: Optional[Path] = typer.Option(
        None, "--private-root",
        help="Private test set root (default: ROOT/../test-set-30-participants-unlabeled/data when present).",
    ),
    allow_symlinks: bool = typer.Option(False, "--allow-symlinks", help="Accept symlinks that leave the tree."),
) -> None:
    """Validate a BAH tree: per-split counts and every finding. Exit 0 when every video is read (notes, e.g. fewer
    face crops than mp4 frames, are listed but do not fail), 1 when a video would be left out, 2 not a BAH tree."""
    report = check_report(root, private_root, allow_symlinks)
    if as_json:
        typer.echo(json_text({"splits": report["splits"], "problems": report["problems"]}))
    else:
        _print_table(Console(), report)
    raise typer.Exit(1 if any(report["fatal"]) else 0)


def synth(
    out: Path = typer.Argument(..., help="Output folder: OUT/data and OUT/test-set-30-participants-unlabeled/data."),
    videos: int = typer.Option(60, "--videos", help="Number of labelled videos (train+val+test)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (the tree is deterministic given it)."),
    private: Optional[int] = typer.Option(None, "--private", help="Private-set videos (default: max(2, videos // 10))."),
    force: bool = typer.Option(False, "--force", help="Replace OUT/data and the private folder if they exist."),
    as_json: bool = typer.Option(False, "--json", help="Print the per-split counts as JSON on stdout."),
) -> None:
    """Write a synthetic BAH tree in the real layout, with planted cross-modal A/H signals."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


    if force:
        for sub in (out / "data", out / PRIVATE_SUBDIR):
            if sub.exists():
                shutil.rmtree(sub)
    total = videos + (max(2, videos // 10) if private is None else private)
    console = Console(stderr=True)
    with Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("videos", total=total)
        result = write_synthetic_bah(out, videos, seed, private, on_video=lambda _vid: bar.advance(task))
    if as_json:
        typer.echo(json_text(result["splits"]))
    else:
        counts = ", ".join(f"{k} {v['videos']}" for k, v in result["splits"].items())
        console.print(f"wrote {result['root']} ({counts}; video codec {result['codec']})", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
    app.command("synth")(synth)
