"""`ahcli sweep`: a grid of train-heads configurations x seeds over one cache, then an ensemble chosen on val.

The grid file (YAML, read safely):
    seeds: [0, 1, 2]
    grid:
      label_smoothing: [0.0, 0.1]
      head_hidden: [256, 512]
Every key of `grid` is a `train-heads` option written with underscores; the runs are the product of the
lists times the seeds. OUT holds:
  sweep.json            the grid and every run's name, options and seed (a rerun must use the same grid)
  runs/cNN-sS/          one run folder per configuration NN and seed S, exactly as `train-heads` writes it
  runs.csv              each run: options, seed, its own val Macro F1 [95% interval], val/test Macro F1 as the
                        ensemble scores it, test Macro F1 [95% interval] at its own threshold, times chosen
  selection.csv         each step of the greedy selection: members, run added, val and test Macro F1
  ensemble/             the selected ensemble, written as `ahcli ensemble` writes it (metrics.json,
                        predictions.csv, submission/) plus a "selection" section in metrics.json
Resumable: a finished run folder (metrics.json present) is skipped, an interrupted one continues from its
checkpoint; the train and val splits are loaded once (only when something is left to train) and every run
trains over them. Runs that may train together (heads/stacked.py: one model configuration, options that differ
only per member such as seed or label_smoothing) train as ONE stacked pass and are then written as ordinary run
folders; a stack is not checkpointed (a stopped stack is retrained by the rerun), an interrupted single run
continues from its checkpoint. Fine-tuned top blocks (unfreeze_top) train one run at a time.
The ensemble is rebuilt from the run folders at the end of every call (seconds).
"""
from __future__ import annotations

import csv
import io
import itertools
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ahflows.checkpoint_a import train_from_cache
from ahflows.ensemble import (SplitScores, check_out_folder, load_runs, score_splits, scored_splits, split_intervals,
                              write_ensemble)
from ahflows.selection import Selection, greedy_select
from ahflows.submission import check_missing, private_order, private_split_file, quantise
from extract.devices import resolve_device
from extract.errors import AHError
from extract.files import atomic_write_json, atomic_write_text, read_json_object, read_yaml, refuse_foreign_folder
from extract.listing import split_coverage
from extract.locks import folder_lock
from extract.stopping import never
from extract.store import CacheReader
from extract.vocab import MODALITIES, TRAIN_SPLITS, parse_modalities
from heads.config import ConfigError, ModelConfig, TrainConfig
from heads.data import load_split
from heads.infer import window_logits
from heads.metrics import bah_metrics
from heads.resume import check_out_folder as check_run_folder
from heads.resume import finalize
from heads.run_files import CONFIG_FILE, STATE_FILE, RunError, cache_record, make_config, read_metrics
from heads.stacked import stack_problem, train_stacked
from heads.train import parameter_counts
from heads.train_state import TrainResult
from heads.uncertainty import bootstrap_intervals, format_interval, participant_ids

SWEEP_FILE = "sweep.json"
RUNS_DIR = "runs"
ENSEMBLE_DIR = "ensemble"
SWEEP_OWN_FILES = (".lock", "sweep.log")
GRID_MAX_BYTES = 1 << 20
# train-heads options a grid may not vary: where things go and how the command runs, not what is trained
NOT_SWEPT = frozenset({"cache", "out", "resume", "json_out", "stop_after", "tensorboard", "log_every", "device",
                       "checkpoint_every", "seed", "stream"})


class SweepError(AHError):
    """A grid file that cannot be read or names an unknown option, or an OUT made with another grid."""


@dataclass
class Point:
    name: str                          # run folder name under OUT/runs
    options: dict[str, Any]            # the grid's options of this configuration
    seed: int


@dataclass
class Grid:
    seeds: list[int]
    grid: dict[str, list[Any]]

    def points(self) -> list[Point]:
        keys = list(self.grid)
        combos = list(itertools.product(*(self.grid[k] for k in keys))) or [()]
        width = max(2, len(str(len(combos) - 1)))
        return [Point(f"c{c:0{width}d}-s{seed}", dict(zip(keys, values)), seed)
                for c, values in enumerate(combos) for seed in self.seeds]


def _coerce(key: str, value: Any, default: Any, where: Path) -> Any:
    """A YAML value as the option's type (the type of its train-heads default)."""
    bad = SweepError(f"{where}: grid option {key}: {value!r} is not a valid value "
                     f"(the default is {default.value if isinstance(default, Enum) else default!r})")
    if isinstance(value, (list, dict)) or value is None and default is not None:
        raise bad
    if isinstance(default, Enum):
        try:
            return type(default)(str(value)).value
        except ValueError:
            raise bad from None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(default, int) and not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise bad
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if isinstance(default, str) or default is None:
        if isinstance(value, bool):
            raise bad
        return value if default is None and isinstance(value, (int, float)) else str(value)
    return value


def read_grid(path: Path, defaults: Mapping[str, Any]) -> Grid:
    """The grid file, every key checked against the train-heads options (`defaults`: option -> default)."""
    path = Path(path)
    doc = read_yaml(path, SweepError, "grid file", max_bytes=GRID_MAX_BYTES)
    if not isinstance(doc, dict):
        raise SweepError(f"{path}: a grid file is a mapping with 'seeds' and 'grid'")
    unknown_top = sorted(set(map(str, doc)) - {"seeds", "grid"})
    if unknown_top:
        raise SweepError(f"{path}: unknown key {unknown_top[0]!r} (a grid file has 'seeds' and 'grid')")
    seeds = doc.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                          and s >= 0 for s in seeds) or len(set(seeds)) < len(seeds):
        raise SweepError(f"{path}: 'seeds' must be a non-empty list of distinct integers >= 0, got {seeds!r}")
    grid = doc.get("grid") or {}
    if not isinstance(grid, dict):
        raise SweepError(f"{path}: 'grid' must map train-heads options to lists of values")
    allowed = sorted(k for k in defaults if k not in NOT_SWEPT)
    out: dict[str, list[Any]] = {}
    for key, values in grid.items():
        key = str(key)
        if key not in allowed:
            hint = " (use 'seeds' for seeds)" if key == "seed" else ""
            raise SweepError(f"{path}: {key!r} is not a train-heads option a grid can vary{hint}; "
                             f"options: {', '.join(allowed)}")
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid option {key}: give a non-empty list of values, got {values!r}")
        out[key] = [_coerce(key, v, defaults[key], path) for v in values]
        if key == "modalities":
            for v in out[key]:
                try:
                    parse_modalities(v)
                except AHError as exc:
                    raise SweepError(f"{path}: grid option modalities: {exc}") from exc
    return Grid(list(seeds), out)


# ---- the sweep -------------------------------------------------------------------------------------


Build = Callable[[dict[str, Any]], tuple[dict[str, Any], TrainConfig]]


@dataclass
class SweepResult:
    out: Path
    points: list[Point]
    trained: list[str] = field(default_factory=list)      # runs trained (or finished) by this call
    skipped: list[str] = field(default_factory=list)      # runs already finished before it
    stopped: bool = False
    selection: Selection | None = None
    ensemble: dict | None = None                          # the ensemble's metrics.json
    runs: list[dict[str, Any]] = field(default_factory=list)   # the rows of runs.csv


def is_sweep_folder(path: Path) -> bool:
    try:
        return read_json_object(Path(path) / SWEEP_FILE, SweepError).get("format") == "conflict-aware-ah/sweep"
    except (SweepError, FileNotFoundError):
        return False


def _check_same_grid(out: Path, record: dict) -> None:
    path = out / SWEEP_FILE
    if not path.is_file():
        return
    old = read_json_object(path, SweepError, "sweep record")
    if old.get("points") != record["points"]:
        raise SweepError(f"{path}: OUT was made with another grid (runs or options differ); use a new OUT "
                         "or the same grid file")


def _finished(run_dir: Path) -> bool:
    try:
        read_metrics(run_dir)
        return True
    except RunError:
        return False


def run_sweep(
    cache: Path,
    out: Path,
    grid_path: Path,
    defaults: Mapping[str, Any],
    build: Build,
    *,
    windows: int = 5,
    max_members: int = 10,
    device: str = "auto",
    data_root: Path | None = None,
    private_root: Path | None = None,
    allow_missing: bool = False,
    allow_partial: bool = False,
    on_training: Callable[[str, int, int], None] | None = None,
    on_epoch: Callable[..., None] | None = None,
    on_split: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] = never,
    warn: Callable[[str], None] | None = None,
    calibrated: bool = False,
) -> SweepResult:
    """Train every point of the grid over `cache` into OUT/runs (skipping finished runs), select an ensemble
    on val and write it to OUT/ensemble (see the module doc). `defaults`: the train-heads options and their
    defaults; `build(options)` turns a full option mapping into (ModelConfig options without input_dims,
    TrainConfig). Returns with `stopped` set when `should_stop` (or on_epoch raising TrainingStopped)
    interrupted a run: the finished runs stay, a rerun continues. `calibrated`: the ensemble is written
    temperature-scaled (ahflows.ensemble.write_ensemble)."""
    out, cache = Path(out), Path(cache)
    grid = read_grid(grid_path, defaults)
    points = grid.points()
    configs = {}
    for p in points:                                         # every value checked before anything is written
        try:
            configs[p.name] = build({**defaults, **p.options, "seed": p.seed, "device": device})
        except (ConfigError, ValueError) as exc:
            raise SweepError(f"{grid_path}: {p.name} ({_describe(p.options)}): {exc}") from exc
    if windows < 1 or max_members < 1:
        raise SweepError(f"windows and max_members must be >= 1 (got {windows}, {max_members})")
    refuse_foreign_folder(out, is_sweep_folder, "a sweep folder", ours=SWEEP_OWN_FILES)
    record = {"format": "conflict-aware-ah/sweep", "grid": {"seeds": grid.seeds, "grid": grid.grid},
              "points": [{"name": p.name, "options": p.options, "seed": p.seed} for p in points]}
    reader = CacheReader(cache)
    res = SweepResult(out, points)
    with folder_lock(out, "sweep folder"):
        _check_same_grid(out, record)
        atomic_write_json(out / SWEEP_FILE, record)
        todo = [p for p in points if not _finished(out / RUNS_DIR / p.name)]
        res.skipped = [p.name for p in points if p not in todo]
        if todo and not _train(reader, out, todo, configs, res, device, on_training, on_epoch, should_stop):
            res.stopped = True
            return res
        if should_stop():
            res.stopped = True
            return res
        _select(reader, out, points, res, windows, max_members, device, data_root, private_root, allow_missing,
                allow_partial, on_split, should_stop, warn, calibrated)
    return res


def _describe(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def _train(reader: CacheReader, out: Path, todo: Sequence[Point], configs: dict, res: SweepResult, device: str,
           on_training, on_epoch, should_stop) -> bool:
    """Train the unfinished runs over ONE load of train and val. False when stopped."""
    cfgs = [configs[p.name] for p in todo]
    mods = sorted({m for kw, _ in cfgs for m in parse_modalities(kw["modalities"])}, key=MODALITIES.index)
    layers = list(dict.fromkeys(cfg.input_layer for _, cfg in cfgs))
    window = any(cfg.text_source == "window" for _, cfg in cfgs)
    covs = {s: split_coverage(reader, s) for s in TRAIN_SPLITS}
    dev = resolve_device(device)
    train = load_split(reader, "train", layers=layers, device=dev, modalities=mods, text_window=window)
    val = load_split(reader, "val", layers=layers, device=dev, modalities=mods, text_window=window)
    videos = {s: c.counts() for s, c in covs.items()}
    model_cfgs = {p.name: ModelConfig(input_dims=train.dims(configs[p.name][1].input_layer), **configs[p.name][0])
                  for p in todo}
    done = 0
    for group in _stack_groups(out, todo, configs, model_cfgs):
        if should_stop():
            return False
        names = ", ".join(p.name for p in group)
        if on_training is not None:
            what = f"{group[0].name} ({_describe(group[0].options)}, seed {group[0].seed})" if len(group) == 1 \
                else f"{names} together (one stacked pass)"
            on_training(what, done + 1, len(todo))
        if len(group) == 1:
            p = group[0]
            results = [train_from_cache(train, val, model_cfgs[p.name], configs[p.name][1], out / RUNS_DIR / p.name,
                                        spec=reader.spec, resume=True, cache=cache_record(reader),
                                        on_epoch=on_epoch, videos=videos)]
        else:
            results = train_stacked(train, val, model_cfgs[group[0].name], [configs[p.name][1] for p in group],
                                    on_epoch=None if on_epoch is None else
                                    (lambda i, rec, prog: on_epoch(rec, prog) if i == 0 else None), videos=videos)
        if not all(r.completed for r in results):
            return False
        if len(group) > 1:
            for p, r in zip(group, results):
                _write_run(out / RUNS_DIR / p.name, r, reader, val)
        res.trained += [p.name for p in group]
        done += len(group)
    return True


def _stack_groups(out: Path, todo: Sequence[Point], configs: dict, model_cfgs: dict) -> list[list[Point]]:
    """The unfinished runs in groups that train as one stack (heads.stacked.stack_problem says None); a run
    interrupted with a checkpoint continues alone from it."""
    groups: list[list[Point]] = []
    for p in todo:
        if not (out / RUNS_DIR / p.name / STATE_FILE).exists():
            for g in groups:
                if not (out / RUNS_DIR / g[0].name / STATE_FILE).exists() and stack_problem(
                        [model_cfgs[q.name] for q in g + [p]], [configs[q.name][1] for q in g + [p]]) is None:
                    g.append(p)
                    break
            else:
                groups.append([p])
        else:
            groups.append([p])
    return groups


def _write_run(run_dir: Path, result: TrainResult, reader: CacheReader, val) -> None:
    """A stacked member's run folder, as train-heads writes it (config.json, then model, history and last
    metrics.json with the val intervals)."""
    check_run_folder(run_dir, resume=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg, mcfg = result.train_config, result.model_config
    with folder_lock(run_dir, "run folder"):
        atomic_write_json(run_dir / CONFIG_FILE, make_config(mcfg, cfg, cache_record(reader),
                                                             parameters=parameter_counts(result.model)))
        alpha = cfg.alpha if mcfg.has_text else 0.0
        wl = window_logits(result.model, val, windows=cfg.eval_windows or None, modalities=mcfg.present,
                           layer=cfg.input_layer, text_source=cfg.text_source, batch_size=cfg.eval_batch_size,
                           device=resolve_device(cfg.device), amp=cfg.amp)
        probs = wl.probs(alpha).numpy().astype(np.float64)
        labels = val.labels.cpu().numpy().astype(np.float64)
        keep = ~np.isnan(labels)
        ids = [v for v, k in zip(val.video_ids, keep) if k]
        result.intervals = {"val": bootstrap_intervals(labels[keep], probs[keep], result.threshold,
                                                       participant_ids(reader, ids))}
        finalize(run_dir, result)


def _select(reader: CacheReader, out: Path, points: Sequence[Point], res: SweepResult, windows: int,
            max_members: int, device: str, data_root, private_root, allow_missing: bool, allow_partial: bool,
            on_split, should_stop, warn, calibrated: bool = False) -> None:
    run_dirs = [out / RUNS_DIR / p.name for p in points]
    ens_out = out / ENSEMBLE_DIR
    check_out_folder(ens_out, run_dirs)
    loaded = load_runs(run_dirs, reader, resolve_device(device), data_root, private_root)
    order = private_order(reader, private_split_file(data_root, private_root))
    if order is not None:
        check_missing(order, allow_missing)
    splits, coverage = scored_splits(reader, allow_partial, "the ensemble cannot be selected")
    scores = score_splits(reader, loaded, [s for s in splits if s != "train"], windows, device, on_split,
                          should_stop)
    if scores is None:
        res.stopped = True
        return
    val, test = scores["val"], scores.get("test")
    vk = val.labelled
    tk = None if test is None else test.labelled
    has_test = test is not None and bool(tk.any())
    sel = greedy_select([p[vk] for p in val.per_run], val.labels[vk], max_members,
                        [p[tk] for p in test.per_run] if has_test else None, test.labels[tk] if has_test else None)
    members = sel.members
    chosen = {s: SplitScores(s, sc.video_ids, sc.labels, [sc.per_run[i] for i in members],
                             quantise(np.mean([sc.per_run[i] for i in members], axis=0)))
              for s, sc in scores.items()}
    extra = {"selection": {"method": "greedy forward selection with replacement on val Macro F1",
                           "members": [points[i].name for i in members], "kept_step": sel.best_step,
                           "steps": [vars(s) | {"added": points[s.added].name} for s in sel.steps]}}
    with folder_lock(ens_out, "ensemble folder"):
        res.ensemble = write_ensemble(ens_out, reader, [loaded[i] for i in members], chosen, coverage, order,
                                      windows, warn, extra=extra, calibrated=calibrated)
    res.selection = sel
    res.runs = _run_rows(reader, points, loaded, scores, sel, windows)
    _write_tables(out, points, sel, res.runs)


def _run_rows(reader: CacheReader, points: Sequence[Point], loaded, scores: dict[str, SplitScores],
              sel: Selection, windows: int) -> list[dict[str, Any]]:
    counts = sel.counts(len(points))
    rows = []
    for i, (p, run) in enumerate(zip(points, loaded)):
        own = run.metrics.get("val") or {}
        row = {"run": p.name, "seed": p.seed, "options": json.dumps(p.options, sort_keys=True),
               "threshold": run.threshold, "val_macro_f1": own.get("macro_f1"),
               "val_macro_f1_ci": format_interval(((run.metrics.get("intervals") or {}).get("val") or {})
                                                  .get("macro_f1")),
               "val_macro_f1_selection": sel.single_val[i], "test_macro_f1": None, "test_macro_f1_ci": "-",
               "chosen": counts[i]}
        test = scores.get("test")
        if test is not None and test.labelled.any():
            k = test.labelled
            row["test_macro_f1"] = bah_metrics(test.labels[k], probs=test.per_run[i][k],
                                               threshold=run.threshold)["macro_f1"]
            iv = split_intervals(reader, test, test.per_run[i], run.threshold)
            row["test_macro_f1_ci"] = format_interval(iv["macro_f1"] if iv else None)
        rows.append(row)
    return rows


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _write_tables(out: Path, points: Sequence[Point], sel: Selection, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(out / "runs.csv", _csv(rows))
    steps = [{"step": s.members, "added": points[s.added].name, "val_macro_f1": s.val_macro_f1,
              "threshold": s.threshold, "test_macro_f1": "" if s.test_macro_f1 is None else s.test_macro_f1,
              "kept": int(s.members == sel.best_step)} for s in sel.steps]
    atomic_write_text(out / "selection.csv", _csv(steps))


__all__ = ["run_sweep", "read_grid", "Grid", "Point", "SweepResult", "SweepError", "is_sweep_folder",
           "NOT_SWEPT", "SWEEP_FILE", "RUNS_DIR", "ENSEMBLE_DIR"]
