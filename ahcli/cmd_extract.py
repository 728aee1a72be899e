"""Stage 1 commands: `encoders tiny`, `extract`, `cache info`, `cache verify`."""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ahcli.session import OPT_LOG_EVERY, Session, command_line
from extract.bah import read_bah
from extract.files import json_text
from extract.inputs import stale_units
from extract.run import ExtractOptions, extract, phase_report
from extract.store import CacheReader
from extract.tiny_encoders import write_tiny_encoders
from extract.vocab import SPLITS, check_split

console = Console()
err = Console(stderr=True)
encoders_app = typer.Typer(help="Encoder utilities.", no_args_is_help=True)
cache_app = typer.Typer(help="Inspect and check an embedding cache.", no_args_is_help=True)


@encoders_app.command("tiny")
def encoders_tiny(
    out: Path = typer.Argument(..., help="Folder to write DIR/video, DIR/audio, DIR/text and DIR/cache_spec.yaml into."),
    seed: int = typer.Option(0, help="Seed of the random initialisation (same seed, same weights)."),
    json_out: bool = typer.Option(False, "--json", help="Print the folder and the spec path as JSON on stdout."),
) -> None:
    """Write small random-initialised VideoMAE, HuBERT and RoBERTa models in HF format, plus a spec using them."""
    spec = write_tiny_encoders(out, seed=seed)
    if json_out:
        typer.echo(json_text({"folder": str(out), "spec": str(spec)}))
        return
    console.print(f"wrote tiny encoders to {out} (spec: {spec})")


def extract_cmd(
    data: Path = typer.Argument(..., help="BAH root (the unzipped data.zip: Videos/, cropped-aligned-faces/, split/ ...)."),
    cache: Path = typer.Argument(..., help="Cache folder to create or resume."),
    spec: Path = typer.Option(Path("cache_spec.yaml"), "--spec", help="Extraction spec (encoders, windows, layers, backend)."),
    splits: str = typer.Option("train,val,test,private", help="Comma-separated splits to extract."),
    device: str = typer.Option("auto", help="'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'."),
    precision: str = typer.Option(
        "auto", "--precision", help="Encoder forwards: auto (bf16 autocast on CUDA, fp32 on the CPU: the default), "
        "bf16, fp16 or fp32; bf16/fp16 need CUDA (refused on the CPU). Recorded in the manifest's provenance."),
    batch_size: int = typer.Option(16, help="Clips per video-encoder forward pass (a video's windows are split into batches of this size)."),
    workers: int = typer.Option(2, help="DataLoader worker processes decoding frames and audio (0: decode in the main process)."),
    force: bool = typer.Option(False, help="Wipe an existing cache made with a different spec and start over."),
    repair: bool = typer.Option(False, help="Verify the cache first and re-extract only the videos found bad."),
    private_root: Optional[Path] = typer.Option(None, help="Private test set root (default: ROOT/../test-set-30-participants-unlabeled/data)."),
    allow_symlinks: bool = typer.Option(False, help="Follow symlinks that leave the dataset root (refused by default)."),
    progress: bool = typer.Option(True, help="Show a progress bar on a terminal, plain lines every --log-every seconds elsewhere (--no-progress: neither; the log in CACHE/logs still gets the lines)."),
    log_every: float = OPT_LOG_EVERY,
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout (the lines go to stderr)."),
) -> None:
    """Run the frozen encoders once over a BAH tree and store their token sequences in CACHE.

    Resumable: a rerun skips videos already complete. Videos that fail are listed in CACHE/errors and the
    exit status is 1; every other video is still extracted. Under `torchrun --nproc-per-node K -m ahcli
    extract ...` (or several nodes, docs/CLUSTER.md) each process extracts a disjoint share. One process
    writes a cache at a time: a second extraction on it is refused. The last line says where the time went
    (waiting for decoding, each encoder, waiting for cache writes) and names the bottleneck when there is one.

    SIGINT/SIGTERM: the videos already encoded are written (seconds: at most the current video and the
    writes in flight), the cache is left unsealed, one line names the command that resumes, exit 130/143.
    A second signal stops at once; the cache stays consistent either way. Each run keeps a log in CACHE/logs/.
    """
    names = tuple(s.strip() for s in splits.split(",") if s.strip())
    for name in names:
        check_split(name)
    opts = ExtractOptions(splits=names, device=device, batch_size=batch_size, workers=workers, force=force,
                          repair=repair, private_root=private_root, allow_symlinks=allow_symlinks, progress=progress,
                          precision=precision)
    rank = int(os.environ.get("RANK", "0"))
    with Session("extract", log_every, err) as run:
        opts.progress = progress and run.live
        run.quiet = not progress
        ticker = run.ticker("extract" if rank == 0 else f"extract rank {rank}", "videos")

        def on_ready(path: Path, dist) -> None:    # the cache is open (and ours): from here a signal finishes
            run.attach_stamped(path / "logs", "extract", f"-rank{dist.rank}" if dist.active else "")
            run.stop.enter_unit()

        def on_progress(p) -> None:
            rate = f"{p.clips / p.seconds:.1f} clips/s" if p.seconds > 0 else ""
            ticker.update(p.done, p.total, ", ".join(x for x in (rate, f"{p.failed} failed" if p.failed else "") if x),
                          force=p.done == p.total)

        summary = extract(data, cache, spec, opts, on_progress=on_progress, should_stop=run.stop, on_ready=on_ready)
        run.stop.leave_unit()
        if summary.interrupted:
            left = summary.total - summary.done
            raise run.interrupted(f"{summary.extracted} video(s) written to {cache} this run, {left} left "
                                  f"(cache unsealed)", command_line())
        if rank != 0:  # only rank 0 reports under torchrun
            return
        out = err if json_out else console
        run.say(f"extracted {summary.extracted} videos ({summary.clips} clips, {summary.clips_per_s:.1f} clips/s), "
                f"skipped {summary.skipped} already complete, failed {len(summary.failed)}", console=out)
        if summary.extracted:
            run.say(phase_report(summary), console=out)
        for video_id, message in summary.notes:  # odd inputs that were still extracted (no audio track, ...)
            run.say(f"  note {video_id}: {message}", console=out)
        for video_id, message in sorted(summary.failed.items()):
            run.say(f"  failed {video_id}: {message}", console=out)
        if json_out:
            typer.echo(json_text(summary.to_json()))
    if summary.failed:
        raise typer.Exit(1)


@cache_app.command("info")
def cache_info(
    cache: Path = typer.Argument(..., help="Cache folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Counts per split, fingerprint, sizes, completeness and a digest over all stored content."""
    info = CacheReader(cache).info()
    if as_json:
        print(json_text(info, indent=2, sort_keys=True))
        return
    table = Table(title=f"cache {cache}")
    table.add_column("key")
    table.add_column("value", overflow="fold")
    for key, value in info.items():
        if key == "spec":
            continue
        table.add_row(str(key), json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value))
    console.print(table)


@cache_app.command("verify")
def cache_verify(
    cache: Path = typer.Argument(..., help="Cache folder."),
    as_json: bool = typer.Option(False, "--json", help="Print {\"ok\", \"problems\": [{video_id, problem}]} on stdout."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="BAH root the cache was extracted from: also report videos whose media, transcript, "
        "split or label changed since extraction (`ahcli extract` again brings them up to date)."),
) -> None:
    """Check every video: complete, checksums, shapes/dtypes/lengths consistent, no NaN/Inf. Exit 1 naming each bad video."""
    reader = CacheReader(cache)
    problems = reader.verify()
    if data is not None:
        splits = [s for s in SPLITS if reader.video_ids(s)]
        problems += stale_units(reader, read_bah(data, splits=splits))
    if as_json:
        typer.echo(json_text({"cache": str(cache), "ok": not problems, "problems": problems}))
        raise typer.Exit(1 if problems else 0)
    for p in problems:
        console.print(f"[red]bad[/] {p['video_id']}: {p['problem']}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)
    console.print("cache OK")


def register(app: typer.Typer) -> None:
    app.add_typer(encoders_app, name="encoders")
    # This typer keeps the single line breaks of a docstring's later paragraphs: give it reflowed text.
    doc = inspect.cleandoc(extract_cmd.__doc__ or "")
    app.command("extract", help="\n\n".join(" ".join(par.split()) for par in doc.split("\n\n")))(extract_cmd)
    app.add_typer(cache_app, name="cache")
