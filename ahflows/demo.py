"""`ahcli demo OUT` / `make demo`: the whole pipeline on synthetic data, in one resumable command.

Stages (each one's output under OUT; a rerun reuses every finished stage):
  1. synth      OUT/synth/data (+ the private test folder): a synthetic BAH tree (`ahcli synth`)
  2. encoders   OUT/encoders: tiny random-initialised VideoMAE / HuBERT / RoBERTa + their spec (`ahcli encoders tiny`)
  3. extract    OUT/cache: the frozen-encoder token cache, 'last' and 'prefix' layers (`ahcli extract`; resumes)
  4. B          OUT/runs/B: checkpoint B, all encoders frozen, label smoothing 0.1 (`ahcli train-heads`)
  5. A          OUT/runs/A: checkpoint A, the top-2 encoder blocks trained from the cached prefix states, eps 0
                (`train-heads --unfreeze-top 2`); where the trainer lacks that path, the frozen eps = 0 model
  6. ensemble   OUT/ensemble: A + B averaged, threshold tuned on val, submission files (`ahcli ensemble`)
  7. ablation   OUT/ablation: the paper's Tables 4-6 (modality subsets, conflict features, alpha, transcript,
                windows, A/B/ensemble), 1 seed (`ahcli ablate --seeds 1`; with --quick only v, a, t, vat)
  8. report     PNG plots + report.md in OUT/ensemble and OUT/ablation (`ahcli report`)
Then a table of test Macro F1 / F1-AH / F1-NoAH (full model, each single modality, A, B, ensemble) is
printed and written to OUT/README.md with the stage timings. The data and the encoders are synthetic: the
numbers show the pipeline works, they are not BAH results.

Reuse: a stage is done when its marker OUT/.demo/<stage>.json exists (written last); the cache and the
training runs also resume from where a killed run stopped. OUT/.demo/options.json holds the options the
folder was made with; a rerun with different ones is refused (naming them) rather than mixing results.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ahflows.ablate import run_ablation, unfreeze_supported
from ahflows.ablation_table import METRICS, read_csv
from ahflows.checkpoint_a import train_from_cache
from ahflows.ensemble import run_ensemble
from ahflows.plots import Figures
from ahflows.report import write_report
from extract.errors import AHError
from extract.files import atomic_write_json, read_json_object
from extract.run import ExtractOptions, extract
from extract.store import CacheReader
from extract.synth import write_synthetic_bah
from extract.tiny_encoders import write_tiny_encoders
from extract.vocab import LAST, PREFIX
from heads.config import ModelConfig, TrainConfig
from heads.load import load_split
from heads.run_files import cache_record

SYNTHETIC_NOTE = ("**Synthetic demo.** The data come from `ahcli synth` (planted cross-modal signal) and the "
                  "encoders are tiny random-initialised models: these numbers show the pipeline at work, they "
                  "are not results on BAH.")
MARKERS = ".demo"
PNG_ONLY = Figures(("png",))
STAGES = ("synth", "encoders", "extract", "B", "A", "ensemble", "ablation", "report")
# Options that change results: a folder made with other values is not reused.
IDENTITY = ("videos", "seed", "quick", "epochs", "patience", "dim", "head_hidden", "lr", "batch_size", "text_weight")


class DemoError(AHError):
    """A demo folder made with other options, or a stage that failed."""


@dataclass
class DemoOptions:
    videos: int = 300             # public videos (train/val/test); a private test set of videos // 10 is added
    seed: int = 0
    quick: bool = False           # a fast smoke run (few epochs): for tests
    epochs: int = 30
    patience: int = 30
    dim: int = 64                 # head sizes suited to the tiny encoders' 64-wide tokens
    head_hidden: int = 64
    lr: float = 1e-3
    batch_size: int = 16          # videos per optimizer step (one micro-batch, no accumulation)
    # Weight w of the text head's loss. The paper's 0.5 assumes text is the strongest single modality (as on
    # BAH); the synthetic labels are face XOR text, so text alone is at chance and w = 0.5 pulls the shared
    # text embedding away from what the full head needs (test Macro F1 ~0.55 vs ~0.78 with 0.1).
    text_weight: float = 0.1
    workers: int = 1              # extraction decoding processes
    device: str = "cpu"
    # Intra-op threads. The demo's tensors are tiny: with 2 threads on 2 busy cores OpenMP synchronisation
    # makes each op 10-70x slower than with 1 (measured), so one thread, plus the decoding worker.
    threads: int = 1

    def __post_init__(self) -> None:
        if self.videos < 12:
            raise DemoError(f"--videos {self.videos}: the demo needs at least 12 videos (train/val/test of both classes)")
        if self.quick:
            self.epochs = min(self.epochs, 4)
            self.patience = min(self.patience, self.epochs)

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: d[k] for k in IDENTITY}

    def base(self) -> dict[str, Any]:
        """Training options shared by every run (checkpoints and ablation)."""
        return {"dim": self.dim, "head_hidden": self.head_hidden, "lr": self.lr, "lr_min": self.lr / 100,
                "epochs": self.epochs, "patience": self.patience, "batch_size": self.batch_size, "accum": 1,
                "text_weight": self.text_weight, "device": self.device}


class DemoPaths:
    """Where each stage of the demo writes, under OUT."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.synth = self.out / "synth"
        self.data = self.synth / "data"
        self.encoders = self.out / "encoders"
        self.spec = self.encoders / "cache_spec.yaml"
        self.cache = self.out / "cache"
        self.ensemble = self.out / "ensemble"
        self.ablation = self.out / "ablation"
        self.markers = self.out / MARKERS

    def run(self, name: str) -> Path:
        return self.out / "runs" / name

    def marker(self, stage: str) -> Path:
        return self.markers / f"{stage}.json"


@dataclass
class Row:
    name: str
    macro_f1: float | None
    f1_ah: float | None
    f1_noah: float | None
    note: str = ""


@dataclass
class DemoResult:
    out: Path
    rows: list[Row]
    timings: dict[str, float]               # seconds per stage (this invocation; 0 when reused)
    reused: list[str]
    full_ahead: bool | None                 # full model > every single modality on test Macro F1
    margin: float | None                    # full minus the best single modality
    a_note: str
    reports: list[Path] = field(default_factory=list)
    seconds: float = 0.0


# ---- small helpers ---------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    """A marker file's content, or None when it is missing or unreadable (the stage then runs again)."""
    try:
        return read_json_object(path)
    except (FileNotFoundError, AHError):
        return None


def check_options(paths: DemoPaths, opts: DemoOptions) -> None:
    """Record the options of a new demo folder; refuse a folder made with other ones."""
    path = paths.markers / "options.json"
    old = _read_json(path)
    if isinstance(old, dict):
        diff = sorted(k for k in IDENTITY if old.get(k) != opts.identity().get(k))
        if diff:
            was = ", ".join(f"{k}={old.get(k)}" for k in diff)
            raise DemoError(f"{paths.out}: made with other options ({was}); use another OUT folder or delete it")
        return
    if paths.out.exists() and any(p.name != MARKERS for p in paths.out.iterdir()):
        raise DemoError(f"{paths.out}: exists and is not a demo folder; choose an empty or new OUT folder")
    atomic_write_json(path, opts.identity())


# ---- the stages ------------------------------------------------------------------------------------


class Demo:
    """Runs the stages in order with a progress display each; `console` is a rich Console."""

    def __init__(self, out: Path, opts: DemoOptions, console):
        self.paths = DemoPaths(Path(out))
        self.opts = opts
        self.console = console
        self.timings: dict[str, float] = {}
        self.reused: list[str] = []
        self._splits: dict[str, Any] = {}
        self.a_note = ""

    # -- plumbing
    def _progress(self, transient: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        return Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=self.console, transient=transient)

    def stage(self, k: int, name: str, title: str, fn: Callable[[], dict]) -> dict:
        marker = self.paths.marker(name)
        self.console.rule(f"[bold][{k}/{len(STAGES)}] {title}", align="left")
        done = _read_json(marker)
        if isinstance(done, dict):
            self.console.print(f"  reused (finished earlier in {done.get('seconds', 0):.0f} s): {done.get('summary', '')}",
                               highlight=False)
            self.reused.append(name)
            self.timings[name] = 0.0
            return done
        t0 = time.perf_counter()
        info = fn()
        seconds = time.perf_counter() - t0
        self.timings[name] = seconds
        info = {**info, "seconds": round(seconds, 1)}
        atomic_write_json(marker, info)
        self.console.print(f"  done in {seconds:.0f} s: {info.get('summary', '')}", highlight=False)
        return info

    # -- 1. synthetic tree
    def synth(self) -> dict:
        if self.paths.synth.exists():          # a half-written tree from a killed run: start it over
            shutil.rmtree(self.paths.synth)
        private = max(2, self.opts.videos // 10)
        with self._progress() as p:
            task = p.add_task("writing videos", total=self.opts.videos + private)
            res = write_synthetic_bah(self.paths.synth, self.opts.videos, self.opts.seed, private,
                                      on_video=lambda _vid: p.advance(task))
        s = res["splits"]
        return {"summary": f"train {s['train']['videos']}, val {s['val']['videos']}, test {s['test']['videos']}, "
                           f"private {s['private']['videos']} videos ({res['codec']})", "splits": s}

    # -- 2. tiny encoders
    def encoders(self) -> dict:
        with self.console.status("  writing tiny VideoMAE, HuBERT and RoBERTa"):
            spec = write_tiny_encoders(self.paths.encoders, seed=self.opts.seed)
        return {"summary": f"spec {spec}"}

    # -- 3. extraction
    def extract(self) -> dict:
        opts = ExtractOptions(device=self.opts.device, workers=self.opts.workers, progress=True)
        summary = extract(self.paths.data, self.paths.cache, self.paths.spec, opts)
        if summary.failed:
            first = next(iter(sorted(summary.failed.items())))
            raise DemoError(f"extraction: {len(summary.failed)} video(s) failed, e.g. {first[0]}: {first[1]}")
        return {"summary": f"{summary.extracted} videos extracted ({summary.clips} clips, "
                           f"{summary.clips_per_s:.1f} clips/s), {summary.skipped} already in the cache"}

    # -- 4/5. checkpoints
    def _reader(self):
        return CacheReader(self.paths.cache)

    def _split(self, name: str, layers: tuple[str, ...]):
        key = (name, layers)
        if key not in self._splits:
            with self.console.status(f"  loading the {name} split ({', '.join(layers)})"):
                self._splits[key] = load_split(self._reader(), name, layers=layers, device=self.opts.device)
        return self._splits[key]

    def _train(self, name: str, label_smoothing: float, unfreeze_top: int = 0) -> dict:
        reader = self._reader()
        # A and B share one load: with the fast path available, both layers (B reads only 'last')
        layers = (LAST, PREFIX) if unfreeze_supported(reader.spec)[0] else (LAST,)
        train, val = self._split("train", layers), self._split("val", layers)
        base = self.opts.base()
        mcfg = ModelConfig(input_dims=train.dims(LAST), modalities="vat", dim=base.pop("dim"),
                           head_hidden=base.pop("head_hidden"))
        tcfg = TrainConfig(seed=self.opts.seed, label_smoothing=label_smoothing, unfreeze_top=unfreeze_top, **base)
        with self._progress() as p:
            task = p.add_task(f"{name}: epoch 1/{tcfg.epochs}", total=None)

            def on_step(i: int, n: int) -> None:
                p.update(task, completed=i, total=n)

            def on_epoch(rec, prog) -> None:
                p.update(task, description=f"{name}: epoch {min(rec.epoch + 1, tcfg.epochs)}/{tcfg.epochs}, "
                                           f"val Macro F1 {rec.val_macro_f1:.3f} (best {prog.best_f1:.3f} "
                                           f"at epoch {prog.best_epoch})", completed=0)

            res = train_from_cache(train, val, mcfg, tcfg, self.paths.run(name), spec=reader.spec, resume=True,
                                   on_step=on_step, on_epoch=on_epoch, cache=cache_record(reader))
        m = res.val_metrics
        return {"summary": f"best epoch {res.best_epoch} of {len(res.history)}, val Macro F1 {m['macro_f1']:.3f}, "
                           f"threshold {res.threshold:.2f}", "run": str(self.paths.run(name))}

    def checkpoint_b(self) -> dict:
        return self._train("B", label_smoothing=0.1)

    def checkpoint_a(self) -> dict:
        ok, why = unfreeze_supported(self._reader().spec)
        if ok:
            self.a_note = "checkpoint A: top-2 encoder blocks unfrozen (from the cached prefix states), eps 0"
            info = self._train("A", label_smoothing=0.0, unfreeze_top=2)
        else:
            self.a_note = f"checkpoint A: all encoders frozen, eps 0 ({why}; NOT the top-2 fine-tuned model)"
            self.console.print(f"  [yellow]note[/] {self.a_note}", highlight=False)
            info = self._train("A", label_smoothing=0.0)
        return {**info, "a_note": self.a_note}

    # -- 6. ensemble
    def ensemble(self) -> dict:
        with self._progress() as p:
            task = p.add_task("scoring A and B", total=4)
            rec = run_ensemble([self.paths.run("A"), self.paths.run("B")], self.paths.cache, self.paths.ensemble,
                               windows=5, data_root=self.paths.data, device=self.opts.device,
                               on_split=lambda split: p.update(task, advance=1, description=f"scoring {split}"))
        t = rec.get("test") or {}
        return {"summary": f"threshold {rec['threshold']:.2f}, test Macro F1 {t.get('macro_f1', float('nan')):.3f}"}

    # -- 7. ablation
    def ablation(self) -> dict:
        self._splits.clear()                   # run_ablation loads its own copies: free ours first
        with self._progress() as p:
            task = p.add_task("ablation", total=None)
            epoch = {"n": 0}

            def on_training(name: str, k: int, n: int) -> None:
                epoch["n"] = 0
                p.update(task, description=f"training {k}/{n}: {name}", completed=0, total=self.opts.epochs)

            def on_epoch(rec, prog) -> None:
                p.update(task, completed=rec.epoch)

            res = run_ablation(self.paths.cache, self.paths.ablation, seeds=1, base=self.opts.base(), quick=self.opts.quick,
                               windows=5, device=self.opts.device, resume=True, seed_offset=self.opts.seed,
                               on_load=lambda split: p.update(task, description=f"loading {split}"),
                               on_training=on_training, on_epoch=on_epoch)
        return {"summary": f"{len(res.aggregated)} table cells (val and test), 1 seed"}

    # -- 8. reports
    def report(self) -> dict:
        made = []
        with self.console.status("  drawing the plots"):
            for folder in (self.paths.ensemble, self.paths.ablation):
                # PNG only: the demo is a quick look (`ahcli report` adds PDF and SVG by default)
                res = write_report(folder, device=self.opts.device, preface=[SYNTHETIC_NOTE], figures=PNG_ONLY)
                made.append(str(res.report))
        return {"summary": ", ".join(made), "reports": made}

    # -- the whole thing
    def run(self) -> DemoResult:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, self.opts.threads))
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> DemoResult:
        t0 = time.perf_counter()
        check_options(self.paths, self.opts)
        steps = [("synth", "synthetic BAH tree", self.synth), ("encoders", "tiny encoders", self.encoders),
                 ("extract", "extraction into the cache", self.extract),
                 ("B", "checkpoint B (frozen, label smoothing 0.1)", self.checkpoint_b),
                 ("A", "checkpoint A (top-2 blocks from the cached prefix states, eps 0)", self.checkpoint_a),
                 ("ensemble", "ensemble A + B", self.ensemble),
                 ("ablation", "ablation tables (1 seed)" if not self.opts.quick else
                  "ablation: single modalities vs the full model (1 seed)", self.ablation),
                 ("report", "reports", self.report)]
        infos = {}
        for k, (name, title, fn) in enumerate(steps, start=1):
            infos[name] = self.stage(k, name, title, fn)
        self.a_note = infos["A"].get("a_note", self.a_note)
        rows = result_rows(self.paths, self.a_note)
        full_ahead, margin = full_vs_single(rows)
        result = DemoResult(self.paths.out, rows, self.timings, self.reused, full_ahead, margin, self.a_note,
                            [Path(p) for p in infos["report"].get("reports", [])], time.perf_counter() - t0)
        write_summary(self.paths, result, infos)
        return result


# ---- results ---------------------------------------------------------------------------------------


SINGLE = (("video", "v"), ("audio", "a"), ("text", "t"))


def ablation_test_rows(path: Path) -> dict[str, dict[str, float]]:
    """Test-split means of the ablation's modality rows: {'v': {...}, 'a': ..., 't': ..., 'vat': ...}."""
    return {r.config.removeprefix("modality="): {k: getattr(r, k) for k in METRICS} for r in read_csv(path)
            if r.table == "5" and r.split == "test" and r.seed == "mean"}


def result_rows(paths: DemoPaths, a_note: str) -> list[Row]:
    abl = ablation_test_rows(paths.ablation / "ablation.csv")
    ens = _read_json(paths.ensemble / "metrics.json") or {}

    def row(name: str, m: dict | None, note: str = "") -> Row:
        m = m or {}
        return Row(name, m.get("macro_f1"), m.get("f1_ah"), m.get("f1_noah"), note)

    rows = [row("full model (v+a+t, frozen, eps 0)", abl.get("vat"), "ablation, the demo's seed")]
    rows += [row(f"{name} only", abl.get(key), "ablation, the demo's seed") for name, key in SINGLE]
    members = {Path(r.get("path", "")).name: r for r in ens.get("runs") or []}
    rows.append(row("checkpoint A", (members.get("A") or {}).get("test"), a_note.removeprefix("checkpoint A: ")))
    rows.append(row("checkpoint B", (members.get("B") or {}).get("test"), "frozen, label smoothing 0.1"))
    rows.append(row("ensemble A + B", ens.get("test"), f"threshold {ens.get('threshold', float('nan')):.2f} tuned on val"))
    return rows


def full_vs_single(rows: list[Row]) -> tuple[bool | None, float | None]:
    full = rows[0].macro_f1
    singles = [r.macro_f1 for r in rows[1:4] if r.macro_f1 is not None]
    if full is None or not singles:
        return None, None
    return all(full > s for s in singles), full - max(singles)


def write_summary(paths: DemoPaths, res: DemoResult, infos: dict[str, dict]) -> Path:
    """OUT/README.md: what ran, the results table, the stage timings, links to the reports."""
    lines = ["# Demo results", "", SYNTHETIC_NOTE, "",
             "## Test split", "", "| model | Macro F1 | F1-AH | F1-NoAH | note |", "|---|---:|---:|---:|---|"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for r in res.rows:
        lines.append(f"| {r.name} | {fmt(r.macro_f1)} | {fmt(r.f1_ah)} | {fmt(r.f1_noah)} | {r.note} |")
    if res.margin is not None:
        lines += ["", f"Full model vs the best single modality (test Macro F1): {res.margin:+.3f}."]
    lines += ["", "## Stages", "", "| stage | seconds (when it ran) | summary |", "|---|---:|---|"]
    for name in STAGES:
        info = infos.get(name, {})
        lines.append(f"| {name} | {info.get('seconds', 0):.0f} | {info.get('summary', '')} |")
    lines += ["", "## Reports", ""]
    for rep in res.reports:
        rel = Path(rep).relative_to(paths.out) if Path(rep).is_relative_to(paths.out) else rep
        lines.append(f"- [{rel}]({rel})")
    path = paths.out / "README.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    atomic_write_json(paths.out / "results.json", {"rows": [asdict(r) for r in res.rows], "full_ahead": res.full_ahead,
                                             "margin": res.margin, "timings": res.timings, "a_note": res.a_note})
    return path


def run_demo(out: Path, opts: DemoOptions, console) -> DemoResult:
    return Demo(out, opts, console).run()


__all__ = ["DemoOptions", "DemoResult", "DemoError", "Demo", "run_demo", "result_rows", "full_vs_single",
           "ablation_test_rows", "SYNTHETIC_NOTE", "STAGES"]
