"""`ahcli sweep` (a grid of train-heads runs + an ensemble selected on val) and `ahcli compare` (is a
difference noise?). Wiring only: the work is in ahflows/sweep.py, ahflows/selection.py and ahflows/compare.py."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from ahcli.cmd_heads import train_heads_cmd
from ahcli.options import OPT_ALLOW_PARTIAL, OPT_DEVICE, console, model_options, progress_bar, reflow, train_config
from ahcli.session import OPT_LOG_EVERY, Session, command_line
from ahflows.calibrate import calibrate_run
from ahflows.compare import compare_folders
from ahflows.sweep import ENSEMBLE_DIR, SweepResult, run_sweep
from extract.files import json_text
from heads.train_state import TrainingStopped
from heads.uncertainty import format_interval

# the option names train-heads hands to ahcli.options.train_config / model_options (checkpoint_every is
# train_config's checkpoint_seconds); tests/test_sweep.py checks that every option a grid may vary is one
MODEL_KEYS = tuple(inspect.signature(model_options).parameters)
TRAIN_KEYS = tuple(k for k in inspect.signature(train_config).parameters if k != "checkpoint_seconds")


def register(app: typer.Typer) -> None:
    app.command("sweep", help=reflow(sweep_cmd.__doc__))(sweep_cmd)
    app.command("compare", help=reflow(compare_cmd.__doc__))(compare_cmd)
    app.command("calibrate", help=reflow(calibrate_cmd.__doc__))(calibrate_cmd)


def train_heads_defaults() -> dict[str, Any]:
    """Every `train-heads` option (underscored) with its default: the names a grid file may use."""
    out = {}
    for name, p in inspect.signature(train_heads_cmd).parameters.items():
        default = getattr(p.default, "default", p.default)
        out[name] = None if default is ... else default
    return out


def build_configs(o: dict[str, Any]):
    """train-heads' own option handling: (ModelConfig options, TrainConfig)."""
    cfg = train_config(**{k: o[k] for k in TRAIN_KEYS if k in o}, checkpoint_seconds=o["checkpoint_every"])
    return model_options(**{k: o[k] for k in MODEL_KEYS if k in o}), cfg


def sweep_cmd(
    cache: Path = typer.Argument(..., help="Cache folder written by `ahcli extract`."),
    out: Path = typer.Argument(..., help="Sweep folder: runs/, runs.csv, selection.csv, ensemble/."),
    grid: Path = typer.Option(..., "--grid", help="YAML file: `seeds: [0, 1, 2]` and `grid:` mapping train-heads "
                              "options (underscores: label_smoothing, head_hidden, ...) to lists of values."),
    windows: int = typer.Option(5, help="Cached eval windows averaged per video and run for the ensemble."),
    max_members: int = typer.Option(10, "--max-members", help="Greedy selection steps (members, repeats counted)."),
    data: Optional[Path] = typer.Option(None, "--data", help="BAH root: the submission follows the private split "
                                        "file's order (as `ahcli ensemble --data`)."),
    private_root: Optional[Path] = typer.Option(None, help="Private test set root holding split/test.txt."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Placeholder lines for private videos "
                                       "missing from the cache instead of refusing."),
    allow_partial: bool = OPT_ALLOW_PARTIAL,
    calibrate: bool = typer.Option(False, "--calibrate", help="Write the ensemble temperature-scaled (as "
                                   "`ahcli ensemble --calibrate`)."),
    device: str = OPT_DEVICE,
    json_out: bool = typer.Option(False, "--json", help="Print the ensemble's metrics.json and the runs on stdout."),
    log_every: float = OPT_LOG_EVERY,
) -> None:
    """Train a grid of train-heads configurations x seeds over one cache (a finished run is skipped, so a rerun
    resumes), then select an ensemble on val by greedy forward selection with replacement and write it as
    `ahcli ensemble` does, with participant-bootstrap 95% intervals.

    SIGINT/SIGTERM: the run in progress checkpoints its epoch and stops; rerun the same command to continue.
    OUT is locked while it is written and keeps a log in OUT/sweep.log."""
    with Session("sweep", log_every, console) as run:
        run.resume = command_line()
        with progress_bar() as progress, run.stop.finishing():
            task = progress.add_task("sweep", total=None)

            def on_training(desc: str, k: int, total: int) -> None:
                run.attach(out / "sweep.log")
                progress.update(task, description=f"training {desc}", completed=k - 1, total=total)
                run.progress(f"sweep: training {k}/{total}: {desc}")

            def on_epoch(rec, prog) -> None:
                run.log(f"  epoch {rec.epoch}: val F1 {rec.val_macro_f1:.4f} (best {prog.best_f1:.4f})")
                if run.stop.requested:
                    raise TrainingStopped

            def on_split(s: str) -> None:
                run.attach(out / "sweep.log")
                progress.update(task, description=f"scoring {s}")
                run.progress(f"sweep: scoring {s}")

            res = run_sweep(cache, out, grid, train_heads_defaults(), build_configs, windows=windows,
                            max_members=max_members, device=device, data_root=data, private_root=private_root,
                            allow_missing=allow_missing, allow_partial=allow_partial, on_training=on_training,
                            on_epoch=on_epoch, on_split=on_split, should_stop=run.stop,
                            warn=lambda m: run.say(f"warning: {m}", style="yellow"), calibrated=calibrate)
        if res.stopped:
            raise run.interrupted(f"{len(res.skipped) + len(res.trained)} of {len(res.points)} runs finished in "
                                  f"{out}", command_line())
        _show_sweep(res, json_out, run)


def _show_sweep(res: SweepResult, json_out: bool, run: Session) -> None:
    if json_out:
        typer.echo(json_text({"ensemble": res.ensemble, "runs": res.runs}))
        return
    table = Table(title=f"{len(res.points)} runs ({len(res.skipped)} already finished)")
    for col in ("run", "options", "seed", "val Macro F1 [95%]", "test Macro F1 [95%]", "chosen"):
        table.add_column(col, justify="left" if col in ("run", "options") else "right")
    for r in res.runs:
        table.add_row(r["run"], r["options"], str(r["seed"]), r["val_macro_f1_ci"], r["test_macro_f1_ci"],
                      str(r["chosen"]))
    Console().print(table)
    steps = Table(title="greedy selection on val (test at the val threshold; * = kept)")
    for col in ("members", "added", "val Macro F1", "test Macro F1"):
        steps.add_column(col, justify="right")
    for s in res.selection.steps:
        mark = "*" if s.members == res.selection.best_step else ""
        steps.add_row(f"{s.members}{mark}", res.points[s.added].name, f"{s.val_macro_f1:.4f}",
                      "-" if s.test_macro_f1 is None else f"{s.test_macro_f1:.4f}")
    Console().print(steps)
    iv = res.ensemble.get("intervals") or {}
    run.say(f"ensemble: val Macro F1 {format_interval((iv.get('val') or {}).get('macro_f1'))}, test "
            f"{format_interval((iv.get('test') or {}).get('macro_f1'))} (participant bootstrap, 95%)")
    run.say(f"wrote {res.out / 'runs.csv'}, {res.out / 'selection.csv'} and {res.out / ENSEMBLE_DIR}")


def compare_cmd(
    a: Path = typer.Argument(..., help="A run folder or an ensemble folder."),
    b: Path = typer.Argument(..., help="Another run or ensemble folder, on the same cache."),
    cache: Path = typer.Option(..., "--cache", help="The cache both were made on (fingerprints are checked)."),
    windows: int = typer.Option(5, help="Cached eval windows averaged per video for a run folder."),
    resamples: int = typer.Option(1000, help="Bootstrap resamples of the participants."),
    seed: int = typer.Option(0, help="Seed of the bootstrap draws."),
    device: str = OPT_DEVICE,
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
) -> None:
    """Is A's Macro F1 distinguishable from B's? A paired participant bootstrap of the difference on test and
    val: both are scored on the same resampled participants; the difference is called real when its 95%
    interval excludes 0. Each folder is scored at its own threshold (a run's, or an ensemble's, tuned on val)."""
    res = compare_folders(a, b, cache, windows=windows, n_resamples=resamples, seed=seed, device=device)
    if json_out:
        typer.echo(json_text(res))
        return
    table = Table(title=f"A = {a}, B = {b}: Macro F1, paired participant bootstrap ({resamples} resamples)")
    for col in ("split", "A", "B", "A - B [95%]", "participants", "verdict"):
        table.add_column(col, justify="right")
    for split, d in res["splits"].items():
        verdict = "A better" if d["difference"]["low"] > 0 else "B better" if d["difference"]["high"] < 0 else \
            "no distinguishable difference"
        table.add_row(split, f"{d['a']:.4f}", f"{d['b']:.4f}", format_interval(d["difference"], 4),
                      str(d["participants"]), verdict)
    Console().print(table)


def calibrate_cmd(
    run: Path = typer.Argument(..., help="A finished run folder (`ahcli train-heads` or `ahcli finetune`)."),
    cache: Path = typer.Option(..., "--cache", help="The cache the run was trained on (its fingerprint is checked)."),
    windows: int = typer.Option(5, help="Cached eval windows averaged per video (as `ahcli evaluate`)."),
    device: str = OPT_DEVICE,
    json_out: bool = typer.Option(False, "--json", help="Print calibration.json on stdout."),
) -> None:
    """Temperature scaling of a run, fitted on val: RUN/calibration.json (T, the threshold re-tuned on the
    calibrated val probabilities, ECE and NLL before/after on val and test) and RUN/reliability.png. `evaluate`,
    `predict` and `compare` then use the calibrated probabilities. An ensemble is calibrated when it is made:
    `ahcli ensemble ... --calibrate`."""
    cal = calibrate_run(run, cache, windows=windows, device=device)
    if json_out:
        typer.echo(json_text(cal.to_dict()))
        return
    table = Table(title=f"{run}: T = {cal.temperature:.4f} (fitted on val), threshold {cal.threshold:.2f} "
                  f"(was {cal.threshold_before:.2f}); ECE: {cal.bins} equal-width bins of the A/H probability")
    for col in ("split", "ECE before", "ECE after", "NLL before", "NLL after"):
        table.add_column(col, justify="right")
    for split, s in cal.scores.items():
        table.add_row(split, f"{s['ece_before']:.4f}", f"{s['ece_after']:.4f}", f"{s['nll_before']:.4f}",
                      f"{s['nll_after']:.4f}")
    Console().print(table)
    console.print(f"wrote {run / 'calibration.json'} and {run / 'reliability.png'}")
