"""No silent subsets: every video each split file lists, recorded in the cache at extraction
(CACHE/listed.json: split -> video ids in split-file order), and how much of a split the cache holds.

A split scored with any listed video missing (failed at extraction, or never extracted) is refused in one
line naming how many and the first ids, unless the caller allows a partial split; every metrics file then
states videos scored / videos listed. A cache written without the record (older caches, caches written
through the Python API) counts as listed what it knows of: its complete videos plus those whose extraction
failed (CACHE/errors).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from extract.errors import AHError
from extract.files import atomic_write_json, read_json_object

LISTED = "listed.json"
SHOWN = 5                     # ids named in a refusal


class PartialSplit(AHError):
    """A split the cache holds only part of, scored without --allow-partial."""


def read_listed(cache: str | Path) -> dict[str, list[str]]:
    """split -> listed video ids ({} for a cache without the record)."""
    path = Path(cache) / LISTED
    try:
        obj = read_json_object(path, AHError, "listed videos")
    except FileNotFoundError:
        return {}
    splits = obj.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(ids, list) and all(isinstance(v, str) for v in ids)
                                               for ids in splits.values()):
        raise AHError(f"{path}: 'splits' must map each split to a list of video ids (edited by hand?); "
                      "the next `ahcli extract` of this cache rewrites it")
    return {str(s): list(ids) for s, ids in splits.items()}


def write_listed(cache: str | Path, listed: Mapping[str, Sequence[str]], sources: Mapping[str, str]) -> None:
    """Record the split files' ids; splits not extracted this time keep their earlier record."""
    path = Path(cache) / LISTED
    try:
        old = read_listed(cache)
        old_sources = dict(read_json_object(path, AHError, "listed videos").get("sources") or {})
    except FileNotFoundError:
        old, old_sources = {}, {}
    except (AHError, TypeError, ValueError):   # a damaged record: this run's split files replace it
        old, old_sources = {}, {}
    merged = {**old, **{s: list(ids) for s, ids in listed.items()}}
    atomic_write_json(path, {"splits": dict(sorted(merged.items())),
                             "sources": dict(sorted({**old_sources, **sources}.items()))}, indent=1)


@dataclass
class Coverage:
    """How much of one split a cache (or a tree) holds."""

    split: str
    listed: list[str]                      # split-file order (or sorted, without a record)
    present: list[str]                     # complete videos of the split
    recorded: bool = True                  # listed.json holds this split's record
    missing: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        have = set(self.present)
        self.missing = [v for v in self.listed if v not in have]

    @property
    def partial(self) -> bool:
        return bool(self.missing)

    def counts(self) -> dict[str, Any]:
        """What a metrics file states: videos scored / videos listed (and the missing ones)."""
        return {"scored": len(self.present), "listed": len(self.listed), "missing": list(self.missing)}

    def fraction(self) -> str:
        return f"{len(self.present)}/{len(self.listed)}"


def split_coverage(reader, split: str) -> Coverage:
    """The listed and present videos of `split` in a CacheReader."""
    present = reader.video_ids(split)
    listed = read_listed(reader.path).get(split)
    if listed is not None:
        extra = sorted(set(present) - set(listed))      # a video of this split the record lacks: still count it
        return Coverage(split, list(listed) + extra, present)
    failed = {str(e.get("video_id")) for e in reader.errors() if e.get("split") == split}
    return Coverage(split, sorted(set(present) | failed), present, recorded=False)


def require_complete(cov: Coverage, where: str, allow_partial: bool) -> Coverage:
    """Refuse (one line) to score a split that lacks listed videos, unless `allow_partial`."""
    if cov.partial and not allow_partial:
        shown = ", ".join(cov.missing[:SHOWN]) + (" ..." if len(cov.missing) > SHOWN else "")
        raise PartialSplit(f"{where}: the {cov.split} split lacks {len(cov.missing)} of its {len(cov.listed)} listed "
                           f"videos ({shown}); re-extract them (see the cache's errors/, `ahcli extract ... "
                           f"--repair`) or pass --allow-partial to score the {len(cov.present)} present")
    return cov
