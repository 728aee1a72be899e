"""The ABAW challenge submission files: line order, missing videos, and probabilities printed so that
p0 + p1 == 1 exactly.

  OUT/submission/with_probabilities/trial-0.txt   video_id,p0,p1,pred   (4 decimals)
  OUT/submission/no_probabilities/trial-0.txt     video_id,pred
  OUT/submission/info.json                         where the order came from, placeholders, threshold
No header, one line per private video. The line order is the private split file's (`<data_root>/../test-set-
30-participants-unlabeled/data/split/test.txt`, or `private_root/split/test.txt`, read with extract.bah's
reader) when a BAH root is given; without one, the order the extraction recorded in the cache (CACHE/listed.json);
a cache without that record gives the cache's video_id order (sorted), and info.json says so.
A private video missing from the cache (failed extraction: the cache's error records, or a split-file line
the cache lacks) is never dropped silently: `check_missing` refuses, naming the ids, unless `allow_missing`;
then each gets a placeholder line (p1 = 0.5000, pred by the threshold) listed in info.json.
p1 is the probability rounded to 4 decimals and p0 = 1 - p1 computed in decimal, so the two printed numbers
sum to exactly 1; pred = (p1 as printed >= threshold).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import numpy as np

from extract.bah import PRIVATE_DIR, read_split_file, split_file
from extract.errors import AHError
from extract.files import atomic_write_json, atomic_write_text
from extract.listing import LISTED, read_listed

DECIMALS = 4
PLACEHOLDER_P1 = 0.5
SUBMISSION_DIR = "submission"
WITH_PROBS = Path(SUBMISSION_DIR) / "with_probabilities" / "trial-0.txt"
NO_PROBS = Path(SUBMISSION_DIR) / "no_probabilities" / "trial-0.txt"


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


def private_order(reader, split_file: Path | None) -> PrivateOrder | None:
    """The submission's line order and which private videos the cache lacks. None: no private split at all."""
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


def check_missing(order: PrivateOrder, allow_missing: bool) -> None:
    if order.missing and not allow_missing:
        shown = ", ".join(order.missing[:10]) + (f" ... ({len(order.missing)} in all)" if len(order.missing) > 10 else "")
        raise SubmissionError(f"{len(order.missing)} private video(s) are not in the cache (failed extraction?): "
                            f"{shown}; re-extract them (ahcli extract ... --repair) or pass --allow-missing to "
                            "write placeholder lines")


def write_submission(out: Path, order: PrivateOrder, probs: dict[str, float], threshold: float) -> dict:
    """The two challenge files in `order`; missing videos get the placeholder probability. Returns info."""
    with_p, no_p = [], []
    for vid in order.video_ids:
        p1 = probs.get(vid, PLACEHOLDER_P1)
        s0, s1 = format_pair(p1)
        pred = int(Decimal(s1) >= Decimal(repr(float(threshold))))
        with_p.append(f"{vid},{s0},{s1},{pred}\n")
        no_p.append(f"{vid},{pred}\n")
    atomic_write_text(out / WITH_PROBS, "".join(with_p))
    atomic_write_text(out / NO_PROBS, "".join(no_p))
    info = {"lines": len(order.video_ids), "order_source": order.source, "threshold": threshold,
            "placeholders": order.missing, "placeholder_p1": PLACEHOLDER_P1 if order.missing else None,
            "ignored_cache_videos": order.extra, "split_file_problems": order.problems}
    atomic_write_json(out / SUBMISSION_DIR / "info.json", info)
    return info



__all__ = ["SubmissionError", "PrivateOrder", "private_split_file", "private_order", "check_missing",
           "write_submission", "format_pair", "quantise", "DECIMALS", "PLACEHOLDER_P1", "WITH_PROBS", "NO_PROBS"]
