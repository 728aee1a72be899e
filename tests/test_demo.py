"""`ahcli demo`: the whole pipeline end to end on a reduced size (~20 s), its reuse of finished stages, and
the pieces that need no pipeline (option checks, the results table)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ahflows.demo import STAGES, DemoError, DemoOptions, DemoPaths, check_options, full_vs_single, result_rows
from ahflows.ablation_table import Row, write_csv
from ahflows.report import is_png, linked_files


def test_options_recorded_and_other_options_refused(tmp_path):
    paths = DemoPaths(tmp_path / "demo")
    check_options(paths, DemoOptions(videos=40, quick=True))
    stored = json.loads((paths.markers / "options.json").read_text())
    assert stored["videos"] == 40 and stored["epochs"] == 4            # quick caps the epochs
    check_options(paths, DemoOptions(videos=40, quick=True))          # same options: fine
    with pytest.raises(DemoError, match="videos=40"):
        check_options(paths, DemoOptions(videos=60, quick=True))


def test_refuses_a_folder_that_is_not_a_demo(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(DemoError, match="not a demo folder"):
        check_options(DemoPaths(tmp_path), DemoOptions(videos=40))
    with pytest.raises(DemoError, match="at least 12"):
        DemoOptions(videos=5)


def _fake_outputs(paths: DemoPaths, full: float) -> None:
    paths.ablation.mkdir(parents=True)
    rows = []
    for m, f1 in (("v", 0.55), ("a", 0.52), ("t", 0.6), ("vat", full)):
        rows.append(Row("5", f"modality={m}", "test", 0, 0.1, 0.1, 0.1))                # per-seed rows: ignored
        rows.append(Row("5", f"modality={m}", "test", "mean", f1, f1 - 0.05, f1 + 0.05))
        rows.append(Row("5", f"modality={m}", "val", "mean", 0.99, 0.99, 0.99))         # val: ignored
    write_csv(paths.ablation / "ablation.csv", rows)
    paths.ensemble.mkdir(parents=True)
    runs = [{"path": str(paths.run(n)), "test": {"macro_f1": f, "f1_ah": f, "f1_noah": f}} for n, f in (("A", 0.7), ("B", 0.72))]
    (paths.ensemble / "metrics.json").write_text(json.dumps(
        {"threshold": 0.5, "test": {"macro_f1": 0.75, "f1_ah": 0.74, "f1_noah": 0.76}, "runs": runs}))


def test_result_rows_read_the_ablation_and_the_ensemble(tmp_path):
    paths = DemoPaths(tmp_path)
    _fake_outputs(paths, full=0.8)
    rows = result_rows(paths, "checkpoint A: frozen")
    assert [r.name for r in rows] == ["full model (v+a+t, frozen, eps 0)", "video only", "audio only", "text only",
                                      "checkpoint A", "checkpoint B", "ensemble A + B"]
    assert [r.macro_f1 for r in rows] == [0.8, 0.55, 0.52, 0.6, 0.7, 0.72, 0.75]
    assert rows[0].f1_ah == pytest.approx(0.75)
    ahead, margin = full_vs_single(rows)
    assert ahead is True and margin == pytest.approx(0.2)


def test_full_model_behind_a_single_modality_is_reported(tmp_path):
    paths = DemoPaths(tmp_path)
    _fake_outputs(paths, full=0.58)
    ahead, margin = full_vs_single(result_rows(paths, ""))
    assert ahead is False and margin == pytest.approx(-0.02)


def test_demo_end_to_end_and_rerun_reuses_every_stage(tmp_path):
    from ahcli.app import app

    out = tmp_path / "demo"
    args = ["demo", str(out), "--videos", "40", "--quick", "--dim", "16", "--head-hidden", "16", "--workers", "0"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "NOT BAH results" in first.output and "ensemble A + B" in first.output
    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]) == 7
    assert all(r["macro_f1"] is not None and 0 <= r["macro_f1"] <= 1 for r in results["rows"])
    for report in (out / "ensemble" / "report.md", out / "ablation" / "report.md"):
        text = report.read_text()
        assert "Synthetic demo" in text
        links = [report.parent / t for t in linked_files(report)]
        pngs = [p for p in links if p.suffix == ".png"]
        assert pngs and all(is_png(p) for p in pngs)
    readme = (out / "README.md").read_text()
    assert all(f"[{Path(r).relative_to(out)}]" in readme for r in (out / "ensemble" / "report.md",))
    assert (out / "ensemble" / "submission" / "with_probabilities" / "trial-0.txt").is_file()

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("reused (finished earlier") == len(STAGES)
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
