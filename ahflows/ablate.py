"""The paper's ablation tables (4, 5 and 6) from one cache, several seeds, in one call (`ahcli ablate`).

Each split is loaded from the cache ONCE and every training reuses it (train_heads is called directly).
Only what needs weights is trained; every inference-time setting reuses the trained models:

  per seed, trained                                   derived at inference (no retraining)
  7 modality subsets v a t va vt at vat (Table 5)     vat = the full model = checkpoint A when frozen:
  vat without conflict features (Table 4)               alpha 0 / 0.5 / 0.6 / 1 (Table 4)
  vat on the window-aligned transcript (Table 4,        1 / 3 / 5 inference windows (Table 6)
      only when the cache holds it)                     single checkpoint and the A+B ensemble (Table 6)
  vat with label smoothing 0.1 = checkpoint B
  vat with the top-2 blocks unfrozen = checkpoint A, only when the cache holds the 'prefix' states and the
      trainer offers `unfreeze_top`; otherwise A is the frozen eps = 0 model (the table says which)
  With `unfreeze_top` n (the paper's section 4.4) every variant above but B trains its top n blocks, and A is
  the full model itself (ahflows/ablation_plan.py).

Protocol, as in the paper's section 4.4: the full model, alpha 0.6, no label smoothing, and `windows`
inference windows (the paper: 1) unless a row says otherwise. Every (model, alpha, windows) setting gets its
own threshold, swept on val at that setting ([0.25, 0.75], step 0.01) as the paper does for its chosen
checkpoint; val and test are scored at it. The ensemble averages A's and B's blended probabilities
(5 windows each), rounded to 4 decimals as `ahcli ensemble` does. A cell is the mean ± the sample standard
deviation (ddof = 1) over seeds; with one seed the tables print "n = 1" instead of a deviation.
`frozen_a` uses the frozen model as A even when the cache allows the top-2 training (faster).
`quick` trains only v, a, t and vat (single modalities vs the full model, plus the inference-time rows).
`seed_offset` shifts the seeds; `label_smoothing` is the eps of every training but B.
Finished trainings are appended to OUT/trainings.jsonl; `resume=True` reuses those made with the same
cache, options and seed.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ahflows.ablation_plan import (SUBSETS, AblationError, AblationOptions, Training, choose_a, make_plan,
                                   require_prefix, split_overrides, unfreeze_supported)
from ahflows.ablation_table import Row, aggregate, markdown, write_csv
from ahflows.checkpoint_a import train_from_cache
from ahflows.paper_tables import write_ablation_latex
from ahflows.submission import quantise
from extract.files import atomic_write_text
from extract.listing import require_complete, split_coverage
from extract.locks import folder_lock
from extract.stopping import never
from extract.store import CacheReader
from extract.vocab import LAST, PREFIX, PUBLIC_SPLITS, parse_modalities
from heads.config import ModelConfig, TrainConfig
from heads.load import load_split
from heads.infer import predict_split
from heads.metrics import bah_metrics, sweep_threshold
from heads.run_files import cache_record
from heads.runs import Run
from heads.stacked import SeedStacks

ALPHAS = (0.0, 0.5, 0.6, 1.0)
WINDOWS = (1, 3, 5)
ENSEMBLE_WINDOWS = 5
LOG_FILE = "trainings.jsonl"


# ---- scoring -----------------------------------------------------------------------------------------


def score(table: str, config: str, seed: int, val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray] | None,
          **extra) -> list[Row]:
    """Threshold swept on val at this setting; a row for val and one for test at that threshold."""
    t, _ = sweep_threshold(val[0], val[1], 0.25, 0.75, 0.01)
    rows = []
    for split, pair in (("val", val), ("test", test)):
        if pair is None:
            continue
        m = bah_metrics(pair[1], probs=pair[0], threshold=t)
        rows.append(Row(table, config, split, seed, m["macro_f1"], m["f1_ah"], m["f1_noah"], m["ap"],
                        m["accuracy"], t, **extra))
    return rows


def _labelled(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = ~np.isnan(labels)
    return probs[keep], labels[keep]


def as_run(result, name: str, cache: dict[str, Any]):
    """A heads.runs.Run around a freshly trained model (no folder written: nothing to re-read)."""
    alpha = result.train_config.alpha if result.model_config.has_text else 0.0
    return Run(Path(name), result.model, result.model_config, result.train_config, float(result.threshold),
               float(alpha), result.metrics_record(), cache)


def evaluate_training(run, t: Training, seed: int, evals: dict[str, Any], windows: int, cap: int,
                      full_model: bool) -> tuple[list[Row], dict[str, list[float]]]:
    """All rows one trained model gives, and its 5-window probabilities for the ensemble."""
    cache: dict[tuple[int, float | None], dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    def probs(w: int, alpha: float | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        key = (min(w, cap), alpha)
        if key not in cache:
            out = {}
            for split, data in evals.items():
                _, p, y = predict_split(run, data, windows=w, alpha=alpha)
                out[split] = _labelled(p, y)
            cache[key] = out
        return cache[key]

    def rows(table: str, config: str, w: int, alpha: float | None = None) -> list[Row]:
        p = probs(w, alpha)
        a = run.alpha if alpha is None else alpha
        return score(table, config, seed, p["val"], p.get("test"), alpha=a if run.model_config.has_text else 0.0,
                     windows=min(w, cap), best_epoch=run.metrics.get("best_epoch"),
                     seconds=run.metrics.get("seconds"))

    out: list[Row] = []
    if t.name in SUBSETS:
        out += rows("5", f"modality={t.modalities}", windows)
    if t.name == "vat-noconflict":
        out += rows("4", "no_conflict", windows)
    if t.name == "vat-window":
        out += rows("4", "window_text", windows)
    if full_model:                                   # the frozen full model: the inference-time rows
        for a in ALPHAS:
            out += rows("4", f"alpha={a:g}", windows, a)
        for w in WINDOWS:
            out += rows("6", f"windows={w}", w)
    ens = {k: v[0].tolist() for k, v in probs(ENSEMBLE_WINDOWS).items()}
    return out, ens


def ensemble_rows(seed: int, a: dict[str, list[float]], b: dict[str, list[float]], labels: dict[str, np.ndarray],
                  cap: int) -> list[Row]:
    pairs = {s: (quantise((np.asarray(a[s]) + np.asarray(b[s])) / 2), labels[s]) for s in a}
    return score("6", "ensemble_AB", seed, pairs["val"], pairs.get("test"), alpha=None,
                 windows=min(ENSEMBLE_WINDOWS, cap))


def single_rows(seed: int, name: str, ens: dict[str, list[float]], labels: dict[str, np.ndarray],
                cap: int) -> list[Row]:
    pairs = {s: (np.asarray(v), labels[s]) for s, v in ens.items()}
    return score("6", name, seed, pairs["val"], pairs.get("test"), windows=min(ENSEMBLE_WINDOWS, cap))


# ---- the run -------------------------------------------------------------------------------------------


@dataclass
class AblationResult:
    rows: list[Row]                   # one per config x split x seed
    aggregated: list[Row]             # one per config x split
    markdown: str
    seconds: float
    stopped: bool = False             # interrupted: only OUT/trainings.jsonl was written (see ablate())
    trainings: tuple[int, int] = (0, 0)   # (finished, planned)


def _log_key(fingerprint: str, base: dict, quick: bool, windows: int, extra: dict | None = None) -> str:
    return json.dumps({"fp": fingerprint, "base": base, "quick": quick, "windows": windows, **(extra or {})},
                      sort_keys=True)


def _read_log(path: Path, key: str) -> dict[tuple[str, int], dict]:
    done: dict[tuple[str, int], dict] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue                 # a line cut by a kill
        if rec.get("key") == key:
            done[(rec["name"], int(rec["seed"]))] = rec
    return done


def _rows_from(rec: dict) -> list[Row]:
    return [Row(**r) for r in rec["rows"]]


@dataclass
class AblationData:
    """The splits every training shares, loaded once, and what identifies their cache."""
    train: Any                        # heads.data.SplitData
    val: Any
    test: Any | None
    spec: dict[str, Any]              # the cache's spec (window-aligned text? prefix states?)
    fingerprint: str
    cache: dict[str, Any]             # heads.run_files.cache_record: {fingerprint, path}
    name: str                         # shown in ablation.md
    videos: dict[str, Any] = field(default_factory=dict)   # split -> videos used or scored / listed


def load_data(cache: Path, opts: AblationOptions, device: str = "auto",
              on_load: Callable[[str], None] | None = None) -> AblationData:
    """train, val and (when listed) test, each read from the cache once, with every layer the plan needs.
    A val or test split the cache holds only part of is refused unless `opts.allow_partial`; --unfreeze-top
    on a cache without the matching prefix states is refused before anything loads."""

    reader = CacheReader(cache)
    if opts.unfreeze_top:
        require_prefix(reader.spec, opts.unfreeze_top, str(cache))
    covs = {s: split_coverage(reader, s) for s in PUBLIC_SPLITS}
    for s in ("val", "test"):
        require_complete(covs[s], str(cache), opts.allow_partial)
    a_ok, _ = choose_a(reader.spec, opts)
    window_text = make_plan(reader.spec, opts.quick, a_ok, "").window_text
    layers = (LAST, PREFIX) if a_ok else (LAST,)

    def load(split: str):
        if on_load is not None:
            on_load(split)
        return load_split(reader, split, layers=layers, device=device, text_window=window_text)

    test = load("test") if reader.video_ids("test") else None
    videos = {s: c.counts() for s, c in covs.items() if c.listed}
    return AblationData(load("train"), load("val"), test, reader.spec, reader.fingerprint,
                        cache_record(reader), str(cache), videos)


def run_ablation(
    cache: Path,
    out: Path,
    seeds: int = 3,
    base: dict[str, Any] | None = None,
    quick: bool = False,
    *,
    windows: int = 1,
    device: str = "auto",
    resume: bool = False,
    frozen_a: bool = False,
    on_load: Callable[[str], None] | None = None,
    on_training: Callable[[str, int, int], None] | None = None,
    on_epoch: Callable[[Any, Any], None] | None = None,
    should_stop: Callable[[], bool] = never,
    **more: Any,
) -> AblationResult:
    """Train and score every ablation config for `seeds` seeds (seed_offset..seed_offset+seeds-1); write
    OUT/ablation.md, OUT/ablation.tex and OUT/ablation.csv. `base` overrides TrainConfig/ModelConfig options
    for every training; `more` takes AblationOptions' only_seed, merge, allow_partial, seed_offset, unfreeze_top and
    label_smoothing. OUT is locked while it is written."""
    t0 = time.perf_counter()
    base = dict(base or {})
    _, train_over = split_overrides(base)
    TrainConfig(**train_over)                         # refuse bad values before loading anything
    opts = AblationOptions(seeds, base, quick, windows, device, resume, frozen_a, **more)
    _check(opts)
    if opts.unfreeze_top:                              # before OUT is created or locked
        require_prefix(CacheReader(cache).spec, opts.unfreeze_top, str(cache))
    with folder_lock(out, "ablation folder"):
        data = load_data(cache, opts, train_over.get("device", device), on_load)
        return ablate(data, out, opts, on_training=on_training, on_epoch=on_epoch, started=t0,
                      should_stop=should_stop)


def _check(opts: AblationOptions) -> None:
    opts.check()
    for folder in opts.merge:
        if not (Path(folder) / LOG_FILE).is_file():
            raise AblationError(f"{folder}: not an ablation folder to merge (no {LOG_FILE})")


def _reused(log_path: Path, key: str, opts: AblationOptions) -> dict[tuple[str, int], dict]:
    """Finished trainings to reuse: OUT's own with --resume, and every merged folder's (same cache and options)."""
    done = _read_log(log_path, key) if opts.resume else {}
    for folder in opts.merge:
        for k, rec in _read_log(Path(folder) / LOG_FILE, key).items():
            done.setdefault(k, rec)
    return done


def ablate(data: AblationData, out: Path, opts: AblationOptions, *,
           on_training: Callable[[str, int, int], None] | None = None,
           on_epoch: Callable[[Any, Any], None] | None = None, started: float | None = None,
           should_stop: Callable[[], bool] = never) -> AblationResult:
    """The ablation over splits already in memory (run_ablation loads them). When `should_stop` says so (asked
    before each training; a training stopped by on_epoch's TrainingStopped counts too), the finished trainings
    stay in OUT/trainings.jsonl, the one in progress is dropped, no table is written and the result says
    `stopped`: `--resume` continues from there and ends with the same tables."""
    t0 = time.perf_counter() if started is None else started
    _check(opts)
    base, quick, windows, device = dict(opts.base), opts.quick, opts.windows, opts.device
    model_over, train_over = split_overrides(base)
    if opts.unfreeze_top:
        require_prefix(data.spec, opts.unfreeze_top, data.name)
    a_ok, a_reason = choose_a(data.spec, opts)
    plan = make_plan(data.spec, quick, a_ok, a_reason, unfreeze_top=opts.unfreeze_top,
                     label_smoothing=opts.label_smoothing)
    train, val = data.train, data.val
    evals = {"val": val} | ({"test": data.test} if data.test is not None else {})
    cap = min(int(d.max_windows) for d in evals.values())
    labels = {s: d.labels.cpu().numpy()[~np.isnan(d.labels.cpu().numpy())] for s, d in evals.items()}

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_FILE
    key = _log_key(data.fingerprint, base, quick, windows, opts.key_extra())
    done = _reused(log_path, key, opts)
    # Keep only this ablation's complete records (a kill may have cut the last line), then append to it.
    atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in done.values()))
    rows: list[Row] = []
    seeds = opts.seed_list
    stacks = SeedStacks(train, val, on_epoch)       # a training's seeds train together (heads/stacked.py)
    total = len(plan.trainings) * len(seeds)
    k = 0
    for seed in seeds:
        ens: dict[str, dict[str, list[float]]] = {}
        for t in plan.trainings:
            k += 1
            rec = done.get((t.name, seed))
            if rec is None and should_stop():
                return AblationResult([], [], "", time.perf_counter() - t0, stopped=True, trainings=(k - 1, total))
            if on_training is not None:
                on_training(f"{t.name} seed {seed}", k, total)
            if rec is None:
                mods = parse_modalities(t.modalities)
                mcfg = ModelConfig(input_dims=train.dims("last"), modalities=t.modalities, conflict=t.conflict,
                                   **model_over)
                tkw = dict(train_over, seed=seed, text_source=t.text_source if "text" in mods else "full",
                           label_smoothing=t.label_smoothing)
                if t.unfreeze_top:
                    tkw["unfreeze_top"] = t.unfreeze_top
                tcfg = TrainConfig(**{"device": device, **tkw})
                later = [s for s in seeds if s > seed and (t.name, s) not in done]
                result = stacks.take(t.name, mcfg, tcfg, later) or train_from_cache(
                    train, val, mcfg, tcfg, spec=data.spec, on_epoch=on_epoch, cache=data.cache)
                if not result.completed:               # stopped by a signal: dropped, redone on --resume
                    return AblationResult([], [], "", time.perf_counter() - t0, stopped=True,
                                          trainings=(k - 1, total))
                run = as_run(result, t.name, data.cache)
                r_rows, r_ens = evaluate_training(run, t, seed, evals, windows, cap,
                                                  full_model=(t.name == "vat"))
                rec = {"key": key, "name": t.name, "seed": seed, "best_epoch": result.best_epoch,
                       "epochs_run": len(result.history), "seconds": round(result.seconds, 3),
                       "rows": [dataclasses.asdict(r) for r in r_rows], "ens": r_ens}
                with open(log_path, "a", encoding="utf-8") as fh:     # one line per finished training
                    fh.write(json.dumps(rec) + "\n")
            rows += _rows_from(rec)
            ens[t.name] = rec["ens"]
        if not quick:
            rows += single_rows(seed, "single_A", ens[plan.checkpoint_a], labels, cap)
            rows += single_rows(seed, "single_B", ens["vat-eps0.1"], labels, cap)
            rows += ensemble_rows(seed, ens[plan.checkpoint_a], ens["vat-eps0.1"], labels, cap)
    for r in rows:                                    # videos scored / listed of each row's split
        counts = data.videos.get(r.split) or {}
        r.videos, r.listed = counts.get("scored"), counts.get("listed")
    agg = aggregate(rows)
    seconds = time.perf_counter() - t0
    meta = {"cache": data.name, "fingerprint": data.fingerprint, "seeds": seeds, "videos": data.videos,
            "trainings": total, "seconds": seconds, "device": str(train.device),
            "base": base | opts.key_extra(),
            "windows": windows, "quick": quick, "a_note": plan.a_note, "window_text": plan.window_text, "cap": cap}
    md = markdown(agg, meta)
    write_csv(out / "ablation.csv", rows + agg)
    atomic_write_text(out / "ablation.md", md)
    write_ablation_latex(out, agg)
    return AblationResult(rows, agg, md, seconds, trainings=(total, total))


__all__ = ["run_ablation", "ablate", "load_data", "AblationData", "AblationResult", "AblationError", "AblationOptions",
           "Training", "make_plan", "split_overrides", "unfreeze_supported", "SUBSETS", "ALPHAS", "WINDOWS", "LOG_FILE"]
