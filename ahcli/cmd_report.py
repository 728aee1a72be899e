"""`ahcli report`, `ahcli explain`, `ahcli predict`: looking at results (wiring only; the work is in heads/)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from ahcli.options import OPT_ALLOW_PARTIAL, console
from ahflows.explain import explain_video
from ahflows.predict import predict_recording
from ahflows.plots import DPI, FORMATS, Figures
from ahflows.report import write_report
from extract.files import json_text

out = Console()


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)
    app.command("explain")(explain_cmd)
    app.command("predict")(predict_cmd)


def report_cmd(
    folder: Path = typer.Argument(..., help="A run folder (train-heads/finetune), an ensemble folder or an ablation folder."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache to score a run folder on (default: the one its config.json records, when it exists)."),
    windows: int = typer.Option(5, help="Cached eval windows averaged per video when a run is scored."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    allow_partial: bool = OPT_ALLOW_PARTIAL,
    formats: str = typer.Option(
        ",".join(FORMATS), "--format", help="Comma list of figure formats among png, pdf, svg; report.md shows the "
        "first. Default: PNG plus vector PDF and SVG."),
    dpi: int = typer.Option(DPI, "--dpi", help="Resolution of raster figures (PNG) in dots per inch."),
    json_out: bool = typer.Option(False, "--json", help="Print {kind, report, images, files, notes} as one JSON object on stdout."),
) -> None:
    """Write plots and report.md into FOLDER: training curves, Macro F1 against the threshold on val,
    confusion matrices (val, test; row-normalised as in metrics.json), the organisers' precision-recall
    curves; bar charts for an ablation (no error bars for one seed). Every figure as PNG, PDF and SVG unless
    --format says otherwise. A run still training or interrupted gets its curves and best epoch so far (from
    history.csv, written every epoch)."""
    figures = Figures.parse(formats, dpi)
    with console.status(f"writing the report of {folder}"):
        res = write_report(folder, cache=cache, windows=windows, device=device, allow_partial=allow_partial,
                           figures=figures)
    if json_out:
        typer.echo(json_text({"kind": res.kind, "report": str(res.report), "images": [str(p) for p in res.images],
                              "files": [str(p) for p in res.files], "notes": res.notes}))
        return
    for note in res.notes:
        console.print(f"[yellow]note[/] {note}", highlight=False, soft_wrap=True)
    console.print(f"{res.kind} report: {res.report} ({len(res.images)} figures as "
                  f"{', '.join(f.upper() for f in figures.formats)})")


def explain_cmd(
    run: Path = typer.Argument(..., help="Run folder written by `ahcli train-heads`."),
    cache: Path = typer.Argument(..., help="The cache the run was trained on (its fingerprint is checked)."),
    video_id: str = typer.Argument(..., help="Video id as in the split file, e.g. Videos/<pid>/Visite_1/<name>.mp4."),
    data: Optional[Path] = typer.Option(None, "--data", help="BAH root the cache was made from: shows the transcript's words (the cache holds embeddings only)."),
    windows: int = typer.Option(5, help="Cached eval windows to average (as `evaluate`)."),
    top: int = typer.Option(10, help="How many of the most attended transcript tokens and audio bins to list."),
    json_out: bool = typer.Option(False, "--json", help="Print the whole explanation as one JSON object on stdout."),
) -> None:
    """Why was this video flagged? Head probabilities, the conflict pair that drove the full logit, and where
    the attention pooling looked (video windows, audio time, transcript tokens)."""
    exp = explain_video(run, cache, video_id, data_root=data, windows=windows, top_k=top)
    if json_out:
        typer.echo(exp.to_json())
        return
    _print_explanation(exp, top)


def _print_explanation(exp, top: int) -> None:
    p = exp.probs
    label = "unlabelled" if exp.label is None else ("A/H" if exp.label else "No A/H")
    out.print(f"[bold]{exp.video_id}[/] ({exp.split}, truth: {label}), {exp.windows_used} window(s)", highlight=False)
    verdict = "[bold red]flagged A/H[/]" if p.flagged else "[green]not flagged[/]"
    text = "-" if p.text is None else f"{p.text:.3f}"
    out.print(f"full head p {p.full:.3f} (logit {p.full_logit:+.2f}), text head p {text}, blended p {p.blended:.3f} "
              f"(alpha {p.alpha:.2f}) vs threshold {p.threshold:.2f}: {verdict}", highlight=False)

    t = Table(title="gradient x input of the full logit per fusion block (+ pushes towards A/H)")
    t.add_column("block")
    t.add_column("contribution", justify="right")
    for b in sorted(exp.blocks, key=lambda b: -abs(b.contribution)):
        name = f"[bold]{b.name}[/] (top conflict pair)" if b.name == exp.top_pair else b.name
        t.add_row(name, f"{b.contribution:+.3f}")
    out.print(t)

    if exp.video:
        t = Table(title="video windows: probability and the most attended time slice")
        for c in ("window", "frames", "seconds", "p (blended)", "peak at", "peak weight"):
            t.add_column(c, justify="right")
        for w in exp.video:
            t.add_row(str(w.index), f"{w.start_frame}-{w.start_frame + w.slice_frames * len(w.slice_weights) - 1}",
                      f"{w.start_s:.2f}-{w.end_s:.2f}", f"{w.p_blended:.3f}", f"{w.peak_s:.2f} s",
                      f"{max(w.slice_weights):.3f}")
        out.print(t)
    if exp.audio_bins:
        ranked = sorted(exp.audio_bins, key=lambda b: -b.weight)[: min(top, 5)]
        out.print("audio attention, top time bins: " + ", ".join(
            f"{b.start_s:.2f}-{b.end_s:.2f} s ({b.weight:.3f})" for b in ranked), highlight=False)
    for tw in exp.text:
        where = "transcript" if tw.window is None else f"window {tw.window} transcript"
        shown = ", ".join(f"{(tok.text or f'#{tok.position}').strip() or repr(tok.text)!s} ({tok.weight:.3f})"
                          for tok in tw.top)
        out.print(f"{where}, most attended tokens: {shown}", highlight=False)
        if tw.top_words:
            out.print(f"{where}, most attended words: " + ", ".join(f"{w.text} ({w.weight:.3f})" for w in tw.top_words),
                      highlight=False)
    for note in exp.notes:
        console.print(f"[yellow]note[/] {note}", highlight=False, soft_wrap=True)


def predict_cmd(
    runs: List[Path] = typer.Argument(..., help="Run folder(s) to average, or one ensemble folder (its members and threshold)."),
    video: Path = typer.Option(..., "--video", help="The recording (mp4 with an audio track)."),
    spec: Path = typer.Option(..., "--spec", help="The extraction spec the runs' cache was made with (encoders, windows)."),
    faces: Optional[Path] = typer.Option(None, "--faces", help="Folder of face crops frame-<N>.jpg; without it the full mp4 frames are used, resized."),
    transcript: Optional[Path] = typer.Option(None, "--transcript", help="Whisper-style transcript YAML (text + timestamped chunks)."),
    text: Optional[str] = typer.Option(None, "--text", help="The transcript as plain text (instead of --transcript)."),
    windows: int = typer.Option(5, help="Random-start windows to average (seeded by the spec's seed and the video id)."),
    video_id: Optional[str] = typer.Option(None, "--video-id", help="Id seeding the window starts (default: the path from its Videos/ component, else the file name)."),
    threshold: Optional[float] = typer.Option(None, help="Decision threshold (default: the run's, or the ensemble's)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
) -> None:
    """Score a new recording that is in no cache: run the spec's frozen encoders on it, then the heads."""
    with console.status("encoding the recording and scoring it"):
        res = predict_recording(runs, video, spec, faces=faces, transcript=transcript, text=text, windows=windows,
                                video_id=video_id, threshold=threshold)
    if json_out:
        typer.echo(res.to_json())
        return
    verdict = "[bold red]A/H[/]" if res.prediction else "[green]No A/H[/]"
    out.print(f"{res.video_id}: p(A/H) = {res.probability:.4f}, threshold {res.threshold:.2f} -> {verdict}",
              highlight=False)
    if len(res.runs) > 1:
        for r in res.runs:
            out.print(f"  {r.run}: p {r.probability:.4f} (its threshold {r.threshold:.2f})", highlight=False)
    out.print(f"windows at frames {res.window_starts} from the {res.frames_source}", highlight=False)
    for note in res.notes:
        console.print(f"[yellow]note[/] {note}", highlight=False, soft_wrap=True)
