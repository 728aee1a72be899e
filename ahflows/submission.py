"""The ABAW challenge submission files: line order, missing videos, and probabilities printed so that
p0 + p1 == 1 exactly.

  OUT/submission/with_probabilities/trial-N.txt   video_id,p0,p1,pred   (4 decimals; N = the trial, default 0)
  OUT/submission/no_probabilities/trial-N.txt     video_id,pred
  OUT/submission/info.json                         where the order came from, placeholders, threshold
  OUT/submission.zip                               the two folders above (every trial file in them), to upload
No header, one line per private video. The line order is, first found: the organisers' template (`template`:
their with_probabilities/ or no_probabilities/ trial-0.txt; its ids exactly, in its order; refused, naming
the ids, when it lists a video the cache has no prediction for or lacks one the cache predicts); the private
split file's (`<data_root>/../test-set-30-participants-unlabeled/data/split/test.txt`, or
`private_root/split/test.txt`, read with extract.bah's reader) when a BAH root is given; the order the
extraction recorded in the cache (CACHE/listed.json); else the cache's video_id order (sorted), and
info.json says so.
A private video missing from the cache (failed extraction: the cache's error records, or a split-file line
the cache lacks) is never dropped silently: `check_missing` refuses, naming the ids, unless `allow_missing`;
then each gets a placeholder line (p1 = 0.5000, pred by the threshold) listed in info.json.
p1 is the probability rounded to 4 decimals and p0 = 1 - p1 computed in decimal, so the two printed numbers
sum to exactly 1; pred = (p1 as printed >= threshold).
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import numpy as np

from extract.bah import PRIVATE_DIR, read_split_file, split_file
from extract.errors import AHError
from extract.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from extract.listing import LISTED, read_listed

DECIMALS = 4
PLACEHOLDER_P1 = 0.5
SUBMISSION_DIR = "submission"
FOLDERS = ("with_probabilities", "no_probabilities")
ZIP_FILE = "submission.zip"
MAX_TRIALS = 5                          # the challenge accepts trial-0 .. trial-4


def trial_files(trial: int = 0) -> tuple[Path, Path]:
    """(with probabilities, without) of one trial, relative to OUT."""
    return tuple(Path(SUBMISSION_DIR) / f / f"trial-{trial}.txt" for f in FOLDERS)  # type: ignore[return-value]


WITH_PROBS, NO_PROBS = trial_files(0)


class SubmissionError(AHError):
    """The private split cannot be written as a complete submission (missing videos, no split file)."""


def quantise(probs: np.ndarray) -> np.ndarray:
    """Probabilities rounded to the challenge file's 4 decimals (the number every decision uses)."""
    return np.round(np.asarray(probs, dtype=np.float64), DECIMALS)


def format_pair(p1: float) -> tuple[str, str]:
    """('p0', 'p1') with 4 decimals whose printed values sum to exactly 1: p1 rounded, p0 = 1 - p1 in decimal."""
    d1 = Decimal(f"{float(p1):.{DECIMALS}f}")
    d0 = Decimal(1) - d1
    return f"{d0:.{DECIMALS}f}", f"{d1:.{DECIMALS}f}"


# ---- the private split's order ---------------------------------------------------------------------


@dataclass
class PrivateOrder:
    video_ids: list[str]                    # the submission's lines, in order
    source: str                             # the split file read, or a note that the cache order was used
    missing: list[str] = field(default_factory=list)      # in the order but not in the cache
    extra: list[str] = field(default_factory=list)        # in the cache but not in the split file (ignored)
    problems: list[str] = field(default_factory=list)     # split-file lines that could not be read
    trial: int = 0                          # the files are trial-<trial>.txt


def private_split_file(data_root: Path | None, private_root: Path | None) -> Path | None:
    """The private split file: private_root/split/test.txt, else <data_root>/../test-set-30-participants-
    unlabeled/data/split/test.txt. None when neither root is given."""
    if private_root is not None:
        path = split_file(private_root, "private")
    elif data_root is not None:
        path = split_file(Path(data_root) / PRIVATE_DIR, "private")
    else:
        return None
    if not path.is_file():
        raise SubmissionError(f"{path}: private split file not found (give the BAH root whose "
                            "../test-set-30-participants-unlabeled/data holds it, or --private-root)")
    return path


def private_order(reader, split_file: Path | None, template: Path | None = None, trial: int = 0) -> PrivateOrder | None:
    """The submission's line order and which private videos the cache lacks. None: no private split at all."""
    if not 0 <= trial < MAX_TRIALS:
        raise SubmissionError(f"--trial {trial}: the challenge takes trial-0 .. trial-{MAX_TRIALS - 1}")
    order = _order(reader, split_file)
    if template is not None:
        order = template_order(template, reader.video_ids("private"), order)
    if order is not None:
        order.trial = trial
    return order


def _order(reader, split_file: Path | None) -> PrivateOrder | None:
    in_cache = reader.video_ids("private")
    failed = sorted({str(e.get("video_id")) for e in reader.errors() if e.get("split") == "private"})
    if split_file is not None:
        lines, problems = read_split_file(split_file, private=True, split="private")
        ids = [line.video_id for line in lines]
        have = set(in_cache)
        listed = set(ids)
        return PrivateOrder(ids, str(split_file), [v for v in ids if v not in have],
                            [v for v in in_cache if v not in listed], [p.problem for p in problems if p.fatal])
    listed = read_listed(reader.path).get("private")
    if listed:                                   # the split file's order, recorded by the extraction
        have, known = set(in_cache), set(listed)
        return PrivateOrder(list(listed), f"{LISTED} (the private split file's order, recorded at extraction)",
                            [v for v in listed if v not in have], [v for v in in_cache if v not in known])
    if not in_cache and not failed:
        return None
    ids = sorted(set(in_cache) | set(failed))
    return PrivateOrder(ids, "cache (video_id order; the cache does not record the split file's order: "
                             "pass the BAH root to follow it)", [v for v in ids if v not in set(in_cache)])


def read_template(path: Path) -> list[str]:
    """The video ids of an organisers' template (first field of every line; either variant)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SubmissionError(f"{path}: template unreadable ({exc})") from exc
    ids = [line.split(",")[0].strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise SubmissionError(f"{path}: the template lists no video")
    if ids[0].lower() in ("video_id", "video", "id"):
        raise SubmissionError(f"{path}:1: a header line ({ids[0]!r}); the challenge's files have none")
    seen: set[str] = set()
    dup = [v for v in ids if v in seen or seen.add(v)]
    if dup:
        raise SubmissionError(f"{path}: video(s) listed twice: {_shown(dup)}")
    return ids


def _shown(ids: list[str]) -> str:
    return ", ".join(ids[:10]) + (f" ... ({len(ids)} in all)" if len(ids) > 10 else "")


def template_order(template: Path, in_cache: list[str], base: PrivateOrder | None) -> PrivateOrder:
    """Exactly the template's ids in its order. A cache prediction the template lacks is refused; a template
    id without a prediction is `missing` (refused by check_missing unless placeholders are allowed)."""
    ids = read_template(template)
    listed = set(ids)
    extra = [v for v in in_cache if v not in listed]
    if extra:
        raise SubmissionError(f"{template}: {len(extra)} private video(s) with a prediction are not in the "
                              f"template: {_shown(extra)}; is it the template of this private set?")
    have = set(in_cache)
    return PrivateOrder(ids, f"{template} (the organisers' template)", [v for v in ids if v not in have], [],
                        base.problems if base is not None else [])


def check_missing(order: PrivateOrder, allow_missing: bool) -> None:
    if order.missing and not allow_missing:
        raise SubmissionError(f"{len(order.missing)} private video(s) of {order.source} have no prediction (not in "
                              f"the cache: failed extraction?): {_shown(order.missing)}; re-extract them (ahcli "
                              "extract ... --repair) or pass --allow-missing to write placeholder lines")


def write_submission(out: Path, order: PrivateOrder, probs: dict[str, float], threshold: float) -> dict:
    """The two challenge files of trial `order.trial` in `order` (missing videos get the placeholder
    probability) and OUT/submission.zip. Returns info."""
    with_p, no_p = [], []
    for vid in order.video_ids:
        p1 = probs.get(vid, PLACEHOLDER_P1)
        s0, s1 = format_pair(p1)
        pred = int(Decimal(s1) >= Decimal(repr(float(threshold))))
        with_p.append(f"{vid},{s0},{s1},{pred}\n")
        no_p.append(f"{vid},{pred}\n")
    files = trial_files(order.trial)
    atomic_write_text(out / files[0], "".join(with_p))
    atomic_write_text(out / files[1], "".join(no_p))
    write_zip(out)
    info = {"lines": len(order.video_ids), "order_source": order.source, "threshold": threshold,
            "trial": order.trial, "files": [str(f) for f in files], "zip": ZIP_FILE,
            "placeholders": order.missing, "placeholder_p1": PLACEHOLDER_P1 if order.missing else None,
            "ignored_cache_videos": order.extra, "split_file_problems": order.problems}
    atomic_write_json(out / SUBMISSION_DIR / "info.json", info)
    return info


def write_zip(out: Path) -> Path:
    """OUT/submission.zip: with_probabilities/ and no_probabilities/ with every trial file they hold (fixed
    timestamps: the same files give the same bytes)."""
    root = Path(out) / SUBMISSION_DIR
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for folder in FOLDERS:
            for f in sorted((root / folder).glob("trial-*.txt")):
                info = zipfile.ZipInfo(f"{folder}/{f.name}", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, f.read_bytes())
    atomic_write_bytes(Path(out) / ZIP_FILE, buf.getvalue())
    return Path(out) / ZIP_FILE


__all__ = ["SubmissionError", "PrivateOrder", "private_split_file", "private_order", "check_missing",
           "write_submission", "write_zip", "read_template", "template_order", "trial_files", "format_pair",
           "quantise", "DECIMALS", "PLACEHOLDER_P1", "WITH_PROBS", "NO_PROBS", "ZIP_FILE", "MAX_TRIALS"]
