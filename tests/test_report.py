"""`ahcli report`: real PNGs and a report.md whose links resolve, for a run, an ensemble and an ablation."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ahflows.ablation_table import Row, write_csv
from ahflows.plots import plot_ablation_bars
from ahflows.plots import Figures
from ahflows.report import PNG_SIGNATURE, ReportError, is_png, linked_files, read_ablation, write_report


pytestmark = pytest.mark.usefixtures("one_thread")
PNG = Figures(("png",))          # what these tests check; PDF and SVG (the default) are checked once below


@pytest.fixture(scope="session")
def case(report_run_case):
    return report_run_case


def _copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run folder (reports write into the folder; the shared one stays untouched)."""
    import shutil

    shutil.copytree(src, dst)
    return dst


def _check_report(folder: Path, expected_pngs: set[str]) -> str:
    report = folder / "report.md"
    assert report.is_file()
    links = linked_files(report)
    for name in expected_pngs:
        assert name in links, f"{name} not referenced in report.md"
    for target in links:
        path = folder / target
        assert path.is_file(), f"report.md links to a missing file {target}"
        if target.endswith(".png"):
            assert is_png(path), f"{target} is not a valid PNG"
            with open(path, "rb") as fh:
                assert fh.read(8) == PNG_SIGNATURE
    return report.read_text(encoding="utf-8")


def test_run_report_writes_valid_pngs_and_scores(case, tmp_path):
    run = _copy_run(case.run_b, tmp_path / "B")
    res = write_report(run, cache=case.cache, device="cpu", figures=PNG)
    assert res.kind == "run"
    text = _check_report(run, {"curves.png", "threshold.png", "confusion_val.png", "confusion_test.png", "pr.png"})
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"{metrics['threshold']:.2f}" in text
    # the test row of the table is what `evaluate` computes for this run
    from extract.store import CacheReader
    from heads.runs import load_run
    from heads.data import load_split
    from heads.infer import evaluate_split

    reader = CacheReader(case.cache)
    ev = evaluate_split(load_run(run, cache=reader), load_split(reader, "test", device="cpu"), windows=5)
    row = next(line for line in text.splitlines() if line.startswith("| test |"))
    assert f"{ev['metrics']['macro_f1']:.4f}" in row


def test_run_report_without_cache_says_so(case, tmp_path):
    run = _copy_run(case.run_b, tmp_path / "B")
    cfg = json.loads((run / "config.json").read_text())
    cfg["cache"]["path"] = str(tmp_path / "gone")
    (run / "config.json").write_text(json.dumps(cfg))
    res = write_report(run, device="cpu", figures=PNG)
    assert [p.name for p in res.images] == ["curves.png"]
    assert any("--cache" in n for n in res.notes)
    _check_report(run, {"curves.png"})


def test_ensemble_report_reads_predictions_and_members(case, tmp_path):
    import shutil

    ens = tmp_path / "ens"
    shutil.copytree(case.ensemble, ens)
    res = write_report(ens, preface=["SYNTHETIC NOTE"], figures=PNG)
    assert res.kind == "ensemble"
    text = _check_report(ens, {"threshold.png", "confusion_val.png", "confusion_test.png", "pr.png"})
    assert text.splitlines()[2] == "SYNTHETIC NOTE"
    curves = [p for p in res.images if p.name.startswith("curves_")]
    assert len(curves) == 2 and all(is_png(p) for p in curves)         # both members' training curves
    metrics = json.loads((ens / "metrics.json").read_text())
    assert f"{metrics['test']['macro_f1']:.4f}" in text
    # the confusion matrix counts of the test split match predictions.csv at the threshold
    rows = list(csv.DictReader(open(ens / "predictions.csv")))
    test = [r for r in rows if r["split"] == "test"]
    assert len(test) == metrics["test"]["videos"]


def _ablation_csv(path: Path) -> None:
    """An ablation.csv in `ahcli ablate`'s format: per-seed rows and the aggregated 'mean' rows."""
    rows = []
    for k, m in enumerate(["v", "a", "t", "vat"]):
        for split in ("val", "test"):
            rows.append(Row("5", f"modality={m}", split, 0, 0.5 + 0.1 * k, 0.5, 0.5))
            rows.append(Row("5", f"modality={m}", split, "mean", 0.5 + 0.1 * k, 0.4 + 0.1 * k, 0.6, n_seeds=2,
                            std={"macro_f1": 0.02 * (k + 1), "f1_ah": 0.01, "f1_noah": 0.03}))
    rows.append(Row("6", "windows=1", "test", "mean", 0.7, 0.7, 0.7, n_seeds=2,
                    std={"macro_f1": 0.05, "f1_ah": 0.05, "f1_noah": 0.05}))
    write_csv(path, rows)


def test_read_ablation_keeps_aggregated_test_rows(tmp_path):
    _ablation_csv(tmp_path / "ablation.csv")
    rows = read_ablation(tmp_path / "ablation.csv")
    modal = [r for r in rows if "by modality subset" in r.table]
    assert [r.setting for r in modal] == ["v", "a", "t", "vat"]
    assert all("test split" in r.table for r in rows)
    vat = modal[-1]
    assert vat.mean["macro_f1"] == pytest.approx(0.8) and vat.std["macro_f1"] == pytest.approx(0.08)
    assert vat.seeds == 2


def test_ablation_report_bar_charts(tmp_path):
    _ablation_csv(tmp_path / "ablation.csv")
    res = write_report(tmp_path)
    assert res.kind == "ablation"
    assert len(res.images) == 2                              # table 5 (modality subsets) first, then table 6
    assert "modality-subset" in res.images[0].name
    text = _check_report(tmp_path, {p.name for p in res.images})
    assert "| vat | 0.8000 ± 0.0800 |" in text and "| n = 2 |" in text and "the paper's Table 5" in text
    for img in res.images:                                   # PNG plus vector PDF and SVG by default
        assert img.with_suffix(".pdf").read_bytes().startswith(b"%PDF")
        assert b"<svg" in img.with_suffix(".svg").read_bytes()[:2000]


def test_ablation_report_from_run_ablation(case, tmp_path):
    from ahflows.ablate import run_ablation

    out = tmp_path / "abl"
    run_ablation(case.cache, out, seeds=1, quick=True, windows=5, device="cpu",
                 base={"dim": 16, "head_hidden": 16, "epochs": 2, "patience": 2, "lr": 3e-3, "batch_size": 8,
                       "accum": 1})
    res = write_report(out, figures=PNG)
    text = _check_report(out, {p.name for p in res.images})
    for setting in ("| v |", "| a |", "| t |", "| vat |"):
        assert setting in text
    # one seed: the std of one value is undefined, so no "± 0.000" anywhere, and n = 1 said instead
    for name in ("report.md", "ablation.md", "ablation.tex"):
        body = (out / name).read_text(encoding="utf-8")
        assert "± 0.000" not in body and "pm$ 0.000" not in body, name
        assert "n = 1" in body or "& 1 \\\\" in body, name
    assert "\\toprule" in (out / "ablation.tex").read_text() and "\\bottomrule" in (out / "ablation.tex").read_text()


def test_bar_chart_is_a_png(tmp_path):
    from ahflows.plots import AblationRow

    rows = [AblationRow("t", s, {"macro_f1": 0.6, "f1_ah": 0.5, "f1_noah": 0.7}, {"macro_f1": 0.05}) for s in "vat"]
    path = plot_ablation_bars(rows, tmp_path / "bars.png", "title")
    assert is_png(path) and path.stat().st_size > 1000


def test_is_png_rejects_other_files(tmp_path):
    (tmp_path / "x.png").write_bytes(b"GIF89a" + b"\0" * 100)
    (tmp_path / "empty.png").write_bytes(b"")
    assert not is_png(tmp_path / "x.png")
    assert not is_png(tmp_path / "empty.png")
    assert not is_png(tmp_path / "missing.png")


def test_not_a_report_folder(tmp_path):
    with pytest.raises(ReportError, match="not a run folder"):
        write_report(tmp_path)


def test_cli_report(case, tmp_path):
    from ahcli.app import app

    run = _copy_run(case.run_b, tmp_path / "B")
    res = CliRunner().invoke(app, ["report", str(run), "--cache", str(case.cache), "--device", "cpu", "--format", "png"])
    assert res.exit_code == 0, res.output
    assert re.search(r"run report: .*report\.md \(5 figures as PNG\)", res.output.replace("\n", ""))
    (tmp_path / "abl").mkdir()
    _ablation_csv(tmp_path / "abl" / "ablation.csv")
    only = CliRunner().invoke(app, ["report", str(tmp_path / "abl"), "--format", "svg", "--dpi", "50", "--json"])
    assert only.exit_code == 0, only.output
    files = json.loads(only.stdout)["files"]
    assert len(files) == 2 and all(f.endswith(".svg") for f in files)
    assert ".svg)" in (tmp_path / "abl" / "report.md").read_text()
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert bad.exit_code != 0
    assert "folder not found" in str(bad.exception)


# ---- figures for a paper ------------------------------------------------------------------------------


def _preds(seed: int = 0, n: int = 40):
    import numpy as np

    from ahflows.plots import SplitPredictions

    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(float)
    p = np.clip(0.5 * y + 0.5 * rng.random(n), 0, 1)
    return SplitPredictions("test", p, y)


def test_pr_curve_drawn_is_the_one_whose_area_is_the_legend_ap():
    from sklearn.metrics import auc

    from ahflows.plots import organisers_pr_curve
    from heads.metrics import average_precision

    pred = _preds()
    recall, precision = organisers_pr_curve(pred.probs, pred.labels)
    assert len(recall) == 1000
    assert auc(recall, precision) == pytest.approx(average_precision(pred.probs, pred.labels), abs=1e-12)


def test_confusion_plot_uses_the_normalisation_of_metrics_json():
    import numpy as np

    from ahflows.plots import confusion
    from heads.metrics import bah_metrics

    pred = _preds(1)
    share, counts = confusion(pred, 0.6)
    assert np.allclose(share, bah_metrics(pred.labels, probs=pred.probs, threshold=0.6)["confusion"], atol=1e-6)
    assert counts.sum() == len(pred.labels) and np.allclose(share.sum(axis=1), 1)


def test_one_seed_bars_have_no_error_bars_and_formats_are_checked(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from ahflows.plots import AblationRow, FigureError, Figures

    seen = []
    real = Axes.bar

    def bar(self, *a, **k):
        seen.append(k.get("yerr"))
        return real(self, *a, **k)

    monkeypatch.setattr(Axes, "bar", bar)
    one = [AblationRow("t", s, {"macro_f1": 0.6, "f1_ah": 0.5, "f1_noah": 0.7}, {"macro_f1": 0.0}, 1) for s in "vat"]
    png = plot_ablation_bars(one, tmp_path / "one.png", "title", Figures(("png",), dpi=40))
    assert seen and all(y is None for y in seen) and is_png(png) and not png.with_suffix(".pdf").exists()
    seen.clear()
    three = [AblationRow("t", s, {"macro_f1": 0.6}, {"macro_f1": 0.05}, 3) for s in "vat"]
    plot_ablation_bars(three, tmp_path / "three.png", "title", Figures(("png",), dpi=40))
    assert seen and all(y == [0.05, 0.05, 0.05] for y in seen)
    assert Figures.parse("PNG, svg,png").formats == ("png", "svg")
    for bad in ("png,gif", ""):
        with pytest.raises(FigureError, match="--format"):
            Figures.parse(bad)
    with pytest.raises(FigureError, match="--dpi"):
        Figures.parse("png", 0)
