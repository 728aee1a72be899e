"""Split files and transcripts as the real BAH release writes them: the private file's label style decided
once per file (extract/split_files.py), and Whisper's block-style YAML (`chunks:` first, block tuples, the
text single-quoted and folded over lines, accents, zero-width spaces, no comma, ~1,400 characters)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from extract.split_files import read_split_file
from extract.transcripts import parse_transcript

IDS = [f"Videos/7/Visite_1/7_Question_{i}_2023-01-01_10-00-0{i}_Video.mp4" for i in range(1, 5)]


def _private(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "split" / "test.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _read(path: Path):
    lines, problems = read_split_file(path, private=True, split="private")
    return [(x.video_id, x.label, x.transcript) for x in lines], problems


def test_private_file_with_a_placeholder_label_on_every_line(tmp_path):
    got, problems = _read(_private(tmp_path, [f"{IDS[0]},0,yes, sure", f"{IDS[1]},0,1, 2, 3 I counted",
                                              f"{IDS[2]},1,", IDS[3]]))
    assert problems == []
    assert got == [(IDS[0], None, "yes, sure"), (IDS[1], None, "1, 2, 3 I counted"), (IDS[2], None, ""),
                   (IDS[3], None, "")]


def test_label_less_file_keeps_a_transcript_that_starts_with_0_comma(tmp_path):
    got, problems = _read(_private(tmp_path, [f"{IDS[0]},so, well, no", f"{IDS[1]},0, 1, 2 and then I stopped",
                                              f"{IDS[2]},oui je pense", IDS[3]]))
    assert got == [(IDS[0], None, "so, well, no"), (IDS[1], None, "0, 1, 2 and then I stopped"),
                   (IDS[2], None, "oui je pense"), (IDS[3], None, "")]
    # the file cannot say whether line 2's "0," is a label: it is kept as text, and the file says why
    assert len(problems) == 1 and not problems[0].fatal and "line 2)" in problems[0].problem


def test_file_mixing_both_styles_is_a_problem_of_the_file(tmp_path):
    got, problems = _read(_private(tmp_path, [f"{IDS[0]},0,yes, sure", f"{IDS[1]},0,no", f"{IDS[2]},well I",
                                              f"{IDS[3]},1,maybe"]))
    [p] = problems
    assert (p.video_id, p.split, p.kind, p.line) == ("split/test.txt", "private", "split_line", None)
    assert "mixes lines with a 0/1 label column (line 1, 2, 4) and lines without (line 3)" in p.problem
    assert [t for _, _, t in got] == ["0,yes, sure", "0,no", "well I", "1,maybe"], "no text dropped"


def test_public_split_files_are_unchanged_by_the_private_style(tmp_path):
    path = tmp_path / "split" / "val.txt"
    path.parent.mkdir()
    path.write_text(f"{IDS[0]},1,0, zero\n{IDS[1]},0,plain\n", encoding="utf-8")
    lines, problems = read_split_file(path, private=False, split="val")
    assert problems == [] and [(x.label, x.transcript) for x in lines] == [(1, "0, zero"), (0, "plain")]


# ---- real Whisper YAML ------------------------------------------------------------------------------

WORDS = ("je pense que c'est vraiment très difficile à expliquer parce que ça dépend énormément du moment "
         "et\u200b de la personne avec qui je parle mais au fond je crois que j'hésite encore beaucoup").split()


def _sentence(k: int, n: int) -> str:
    return " " + " ".join(WORDS[(k + i) % len(WORDS)] for i in range(n))


def test_whisper_block_style_yaml_is_read_like_the_release_writes_it(tmp_path):
    """The layout Whisper's pipeline output gets from yaml.dump: keys sorted (`chunks:` first), each timestamp
    a block `!!python/tuple`, texts single-quoted (leading space) and folded over lines; one window restart."""
    times = [(0.0, 6.5), (6.5, 14.0), (14.0, 29.0), (0.0, 7.5), (7.5, None)]
    chunks = [{"text": _sentence(7 * k, 48), "timestamp": t} for k, t in enumerate(times)]
    full = "".join(c["text"] for c in chunks)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.dump({"text": full, "chunks": chunks}, allow_unicode=True), encoding="utf-8")
    raw = path.read_text(encoding="utf-8")
    assert raw.startswith("chunks:\n- text: ' ") and "timestamp: !!python/tuple\n  - 0.0\n  - 6.5" in raw
    assert "c''est" in raw and "\u200b" in raw and "\n    " in raw, "single-quoted, folded over lines"
    assert 1300 <= len(full) <= 1600 and "," not in full

    text, got = parse_transcript(path, duration=45.0)
    assert text == full.strip() and "énormément" in text and "\u200b" in text and "c'est" in text
    assert [c.text for c in got] == [c["text"] for c in chunks]
    assert [(c.start, c.end) for c in got] == [(0.0, 6.5), (6.5, 14.0), (14.0, 29.0), (29.0, 36.5), (36.5, 45.0)]
    assert sum(c.end - c.start for c in got) == pytest.approx(45.0), "the chunks cover the media once"

    # the same transcript (no comma) in both split-file styles reads back whole
    pub = tmp_path / "split" / "train.txt"
    pub.parent.mkdir()
    pub.write_text(f"{IDS[0]},1,{text}\n", encoding="utf-8")
    assert read_split_file(pub, private=False, split="train")[0][0].transcript == text
    got_priv, problems = _read(_private(tmp_path / "p", [f"{IDS[0]},{text}", f"{IDS[1]},{text}"]))
    assert problems == [] and [t for _, _, t in got_priv] == [text, text]
