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

Protocol, as in the paper's section 4.4: the full model, alpha 0.6, no label smoothing, and `windows`
inference windows (the paper: 1) unless a row says otherwise. Every (model, alpha, windows) setting gets its
own threshold, swept on val at that setting ([0.25, 0.75], step 0.01) as the paper does for its chosen
checkpoint; val and test are scored at it. The ensemble averages A's and B's blended probabilities
(5 windows each), rounded to 4 decimals as `ahcli ensemble` does. A cell is the mean ± the sample standard
deviation (ddof = 1; 0 for one seed) over seeds.
`frozen_a` uses the frozen model as A even when the cache allows the top-2 training (faster).
`quick` trains only v, a, t and vat (single modalities vs the full model, plus the inference-time rows).
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

from ahflows.ablation_table import B_SMOOTHING, Row, aggregate, markdown, write_csv
from ahflows.checkpoint_a import train_from_cache
from ahflows.submission import quantise
from extract.errors import AHError
from extract.files import atomic_write_text
from extract.listing import require_complete, split_coverage
from extract.locks import folder_lock
from extract.stopping import never
from extract.store import CacheReader
from extract.vocab import LAST, PREFIX, PUBLIC_SPLITS, parse_modalities
from heads.config import ModelConfig, TrainConfig
from heads.data import load_split
from heads.infer import predict_split
from heads.metrics import bah_metrics, sweep_threshold
from heads.run_files import cache_record
from heads.runs import Run
from heads.topblocks import cache_prefix_problem

SUBSETS = ("v", "a", "t", "va", "vt", "at", "vat")
QUICK_SUBSETS = ("v", "a", "t", "vat")
ALPHAS = (0.0, 0.5, 0.6, 1.0)
WINDOWS = (1, 3, 5)
ENSEMBLE_WINDOWS = 5
CONTROLLED = ("seed", "modalities", "conflict", "text_source", "label_smoothing", "unfreeze_top")
MODEL_KEYS = ("dim", "head_hidden", "head_dropout", "ffn_dropout", "ffn_mult", "ffn_hidden", "pooling")
LOG_FILE = "trainings.jsonl"


class AblationError(AHError):
    """Options the ablation cannot run with (a controlled option overridden, an unusable cache)."""


# ---- what to train -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Training:
    name: str
    modalities: str = "vat"
    conflict: bool = True
    text_source: str = "full"
    label_smoothing: float = 0.0
    unfreeze_top: int = 0


@dataclass
class Plan:
    trainings: list[Training]
    checkpoint_a: str                 # name of the training used as checkpoint A
    a_note: str                       # which A was used, and why
    window_text: bool


def unfreeze_supported(spec: dict | None, n: int = 2) -> tuple[bool, str]:
    """True when the cache holds the prefix states the top n blocks read (else why not)."""
    problem = cache_prefix_problem(spec, n)
    if problem is not None:
        return False, problem
    return True, f"top-{n} encoder blocks unfrozen, trained from the cached prefix states (encoder lr = lr/10)"


def make_plan(spec: dict | None, quick: bool, a_unfrozen: bool, a_reason: str) -> Plan:
    spec = spec or {}
    window_text = bool((spec.get("text") or {}).get("window_aligned")) and not quick
    subsets = QUICK_SUBSETS if quick else SUBSETS
    t = [Training(s, modalities=s) for s in subsets]
    a_name = "vat"
    a_note = f"checkpoint A = vat, eps 0, all encoder layers frozen ({a_reason})"
    if not quick:
        t.append(Training("vat-noconflict", conflict=False))
        if window_text:
            t.append(Training("vat-window", text_source="window"))
        t.append(Training("vat-eps0.1", label_smoothing=B_SMOOTHING))
        if a_unfrozen:
            t.append(Training("vat-top2", unfreeze_top=2))
            a_name, a_note = "vat-top2", f"checkpoint A = vat, eps 0, {a_reason}"
    return Plan(t, a_name, a_note, window_text)


def split_overrides(base: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model overrides, train overrides); the options the ablation varies itself are refused."""
    bad = sorted(k for k in base if k in CONTROLLED)
    if bad:
        raise AblationError(f"ablate varies {', '.join(bad)} itself; leave them out of the base options")
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(k for k in base if k not in train_keys and k not in MODEL_KEYS)
    if unknown:
        raise AblationError(f"unknown training option(s) {', '.join(unknown)}")
    model = {k: v for k, v in base.items() if k in MODEL_KEYS}
    train = {k: v for k, v in base.items() if k in train_keys}
    if "lr" in train and "lr_min" not in train:
        train["lr_min"] = min(3e-7, float(train["lr"]))
    return model, train


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


def _log_key(fingerprint: str, base: dict, quick: bool, windows: int) -> str:
    return json.dumps({"fp": fingerprint, "base": base, "quick": quick, "windows": windows}, sort_keys=True)


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


def choose_a(spec: dict | None, quick: bool, frozen_a: bool) -> tuple[bool, str]:
    if quick or frozen_a:
        return False, "--quick" if quick else "asked for (--frozen-a)"
    return unfreeze_supported(spec)


def load_data(cache: Path, quick: bool = False, frozen_a: bool = False, device: str = "auto",
              on_load: Callable[[str], None] | None = None, allow_partial: bool = False) -> AblationData:
    """train, val and (when listed) test, each read from the cache once, with every layer the plan needs.
    A val or test split the cache holds only part of is refused unless `allow_partial`."""

    reader = CacheReader(cache)
    covs = {s: split_coverage(reader, s) for s in PUBLIC_SPLITS}
    for s in ("val", "test"):
        require_complete(covs[s], str(cache), allow_partial)
    a_ok, _ = choose_a(reader.spec, quick, frozen_a)
    window_text = make_plan(reader.spec, quick, a_ok, "").window_text
    layers = (LAST, PREFIX) if a_ok else (LAST,)

    def load(split: str):
        if on_load is not None:
            on_load(split)
        return load_split(reader, split, layers=layers, device=device, text_window=window_text)

    test = load("test") if reader.video_ids("test") else None
    videos = {s: c.counts() for s, c in covs.items() if c.listed}
    return AblationData(load("train"), load("val"), test, reader.spec, reader.fingerprint,
                        cache_record(reader), str(cache), videos)


@dataclass
class AblationOptions:
    seeds: int = 3                    # seeds 0..seeds-1
    base: dict[str, Any] = field(default_factory=dict)   # TrainConfig/ModelConfig options for every training
    quick: bool = False
    windows: int = 1                  # inference windows of Tables 4 and 5
    device: str = "auto"
    resume: bool = False
    frozen_a: bool = False
    only_seed: int | None = None      # run this seed alone (one job per seed; merged with `merge`)
    merge: list[Path] = field(default_factory=list)    # ablation folders whose finished trainings to reuse
    allow_partial: bool = False       # score val/test even when the cache lacks some listed videos

    @property
    def seed_list(self) -> list[int]:
        return [self.only_seed] if self.only_seed is not None else list(range(self.seeds))


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
    """Train and score every ablation config for `seeds` seeds (0..seeds-1); write OUT/ablation.md and
    OUT/ablation.csv. `base` overrides TrainConfig/ModelConfig options for every training; `more` takes
    AblationOptions' only_seed, merge and allow_partial. OUT is locked while it is written."""
    t0 = time.perf_counter()
    base = dict(base or {})
    _, train_over = split_overrides(base)
    TrainConfig(**train_over)                         # refuse bad values before loading anything
    opts = AblationOptions(seeds, base, quick, windows, device, resume, frozen_a, **more)
    _check(opts)
    with folder_lock(out, "ablation folder"):
        data = load_data(cache, quick, frozen_a, train_over.get("device", device), on_load, opts.allow_partial)
        return ablate(data, out, opts, on_training=on_training, on_epoch=on_epoch, started=t0,
                      should_stop=should_stop)


def _check(opts: AblationOptions) -> None:
    if opts.seeds < 1 or opts.windows < 1:
        raise AblationError("seeds and windows must be >= 1")
    if opts.only_seed is not None and not 0 <= opts.only_seed < opts.seeds:
        raise AblationError(f"--only-seed {opts.only_seed}: must lie in 0..{opts.seeds - 1} (--seeds {opts.seeds})")
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
    a_ok, a_reason = choose_a(data.spec, quick, opts.frozen_a)
    plan = make_plan(data.spec, quick, a_ok, a_reason)
    train, val = data.train, data.val
    evals = {"val": val} | ({"test": data.test} if data.test is not None else {})
    cap = min(int(d.max_windows) for d in evals.values())
    labels = {s: d.labels.cpu().numpy()[~np.isnan(d.labels.cpu().numpy())] for s, d in evals.items()}

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_FILE
    key = _log_key(data.fingerprint, base, quick, windows)
    done = _reused(log_path, key, opts)
    # Keep only this ablation's complete records (a kill may have cut the last line), then append to it.
    atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in done.values()))
    rows: list[Row] = []
    seeds = opts.seed_list
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
                result = train_from_cache(train, val, mcfg, tcfg, spec=data.spec, on_epoch=on_epoch, cache=data.cache)
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
            "trainings": total, "seconds": seconds, "device": str(train.device), "base": base,
            "windows": windows, "quick": quick, "a_note": plan.a_note, "window_text": plan.window_text, "cap": cap}
    md = markdown(agg, meta)
    write_csv(out / "ablation.csv", rows + agg)
    atomic_write_text(out / "ablation.md", md)
    return AblationResult(rows, agg, md, seconds, trainings=(total, total))


__all__ = ["run_ablation", "ablate", "load_data", "AblationData", "AblationResult", "AblationError", "Training",
           "make_plan", "split_overrides", "SUBSETS", "ALPHAS", "WINDOWS"]
