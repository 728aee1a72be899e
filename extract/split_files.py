"""BAH split files (`split/<split>.txt`: `video_id,label,transcript` per line) and the `Problem` records
every reader of the tree reports.

Quirks handled: raw commas in transcripts (split with maxsplit=2), BOM and CRLF (read, and reported as
non-fatal problems of the file), bytes that are not UTF-8.

The private split file comes in two styles: the real one carries a placeholder label column on every line
(`id,0,transcript`), others have none (`id,transcript`). The style is decided ONCE per file, from all its
lines: it has a label column only when every line has a 0/1 (or empty) second field. Deciding per line would
make a transcript that starts with `0,` or `1,` in a label-less file silently lose that field. A file in
which some lines look labelled and others do not is read as label-less (no text is dropped) and reported as
a problem of the file, naming the lines that look labelled.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Problem kinds (for the per-split table of `ahcli data check`).
K_SPLIT_LINE = "split_line"
K_MISSING_VIDEO = "missing_video"
K_MISSING_FACES = "missing_faces"
K_MISSING_TRANSCRIPT = "missing_transcript"
K_NO_AUDIO = "no_audio"
K_FRAME_MISMATCH = "frame_mismatch"
K_UNREADABLE = "unreadable"
K_REFUSED = "refused"
K_OTHER = "other"

LABEL_FIELDS = ("0", "1", "")           # a private file's placeholder label column holds one of these


@dataclass
class Problem:
    video_id: str
    problem: str
    split: str | None = None
    kind: str = K_OTHER
    fatal: bool = True
    line: int | None = None       # the split-file line it concerns, when it is one line's problem


@dataclass
class SplitLine:
    video_id: str
    label: int | None
    transcript: str
    lineno: int


@dataclass
class _Raw:
    """One non-empty line, decoded: what the label/no-label decision and the records are made from."""
    lineno: int
    text: str
    bad_bytes: bool

    def looks_labelled(self) -> bool | None:
        """True: a 0/1/empty second field; False: another second field; None: no second field (either style)."""
        parts = self.text.split(",", 2)
        if len(parts) < 2:
            return None
        return parts[1].strip() in LABEL_FIELDS


def _decode(path: Path, rel: str, split: str, problems: list[Problem]) -> list[_Raw]:
    data = path.read_bytes()
    # Both are read correctly and reported (not fatal): a tool that wrote them may have changed more.
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
        problems.append(Problem(rel, "starts with a UTF-8 byte-order mark (ids read without it)", split,
                                K_SPLIT_LINE, fatal=False))
    if b"\r\n" in data:
        problems.append(Problem(rel, "CRLF line endings (read as LF)", split, K_SPLIT_LINE, fatal=False))
    out = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            out.append(_Raw(lineno, raw.decode("utf-8"), False))
        except UnicodeDecodeError:
            out.append(_Raw(lineno, raw.decode("utf-8", errors="replace"), True))
    return out


def private_style(rows: list[_Raw], rel: str, split: str) -> tuple[bool, list[Problem]]:
    """(the file has a label column, [a problem of the file when its lines mix both styles])."""
    looks = [(r.lineno, r.looks_labelled()) for r in rows]
    labelled = [n for n, v in looks if v is True]
    unlabelled = [n for n, v in looks if v is False]
    if not unlabelled:
        return bool(labelled), []
    if not labelled:
        return False, []

    def some(ns: list[int]) -> str:
        return ", ".join(map(str, ns[:5])) + (f" ... ({len(ns)} in all)" if len(ns) > 5 else "")

    msg = (f"mixes lines with a 0/1 label column (line {some(labelled)}) and lines without (line "
           f"{some(unlabelled)}): read as a file without labels, so those lines keep '0,' / '1,' at the start of "
           "their transcript; write every line in one style")
    return False, [Problem(rel, msg, split, K_SPLIT_LINE, fatal=False)]


def read_split_file(path: Path, private: bool, split: str) -> tuple[list[SplitLine], list[Problem]]:
    """Parse `video_id,label,transcript` lines (BOM, CRLF, non-UTF-8 bytes and the private styles handled)."""
    lines: list[SplitLine] = []
    problems: list[Problem] = []
    rel = f"{path.parent.name}/{path.name}"
    rows = _decode(path, rel, split, problems)
    has_label = False
    if private:
        has_label, style_problems = private_style(rows, rel, split)
        problems += style_problems
    for row in rows:
        parts = row.text.split(",", 2)
        video_id = parts[0].strip()
        lineno = row.lineno
        where = f"{rel} line {lineno}"
        if row.bad_bytes and "\ufffd" in video_id:
            problems.append(Problem(video_id, f"{where}: video_id is not valid UTF-8", split, K_SPLIT_LINE, line=lineno))
            continue
        if private:
            if has_label:
                transcript = parts[2] if len(parts) == 3 else ""
            else:  # no label column: everything after the id is the transcript
                transcript = row.text.split(",", 1)[1] if len(parts) >= 2 else ""
            label = None
        else:
            if len(parts) < 2:
                problems.append(Problem(video_id, f"{where}: expected 'video_id,label,transcript'", split, K_SPLIT_LINE,
                                        line=lineno))
                continue
            label_text = parts[1].strip()
            if label_text not in ("0", "1"):
                problems.append(Problem(video_id, f"{where}: label {label_text!r} is not 0 or 1", split, K_SPLIT_LINE,
                                        line=lineno))
                continue
            label = int(label_text)
            transcript = parts[2] if len(parts) == 3 else ""
        if row.bad_bytes:
            problems.append(
                Problem(video_id, f"{where}: transcript holds bytes that are not UTF-8 (replaced)", split, K_SPLIT_LINE, fatal=False)
            )
        lines.append(SplitLine(video_id, label, transcript.strip(), lineno))
    return lines, problems


__all__ = ["Problem", "SplitLine", "read_split_file", "private_style", "K_SPLIT_LINE", "K_MISSING_VIDEO",
           "K_MISSING_FACES", "K_MISSING_TRANSCRIPT", "K_NO_AUDIO", "K_FRAME_MISMATCH", "K_UNREADABLE", "K_REFUSED",
           "K_OTHER"]
