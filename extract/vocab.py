"""The project's shared words: modalities and their letters, splits, cached layers, array keys.

Stage 1 writes these names into the cache and stage 2 reads them back; both take them from here.
"""
from __future__ import annotations

from typing import Sequence

from extract.errors import AHError

MODALITIES = ("video", "audio", "text")
LETTERS = {"v": "video", "a": "audio", "t": "text"}
ALL_LETTERS = "vat"

SPLITS = ("train", "val", "test", "private")
PUBLIC_SPLITS = ("train", "val", "test")          # the labelled ones
TRAIN_SPLITS = ("train", "val")                   # what training reads (val selects the epoch)

LAST = "last"                                     # an encoder's output tokens
PREFIX = "prefix"                                 # the hidden state entering its top `unfreeze_top` blocks
LAYERS = (LAST, PREFIX)
TEXT_SOURCES = ("full", "window")                 # full transcript, or the words spoken in each window

# Array keys of a cached video (see extract/record.py for the whole layout).
TOKEN_GROUPS = ("video", "audio", "text", "text_window")
WINDOW_LENGTHS = "text_window_lengths"            # rows of each window in text_window/<layer>
SEGMENTS = {"audio": "audio_segments", "text": "text_segments"}   # tokens per encoder segment (with 'prefix')


class VocabError(AHError):
    """A modality, split or layer name that does not exist."""


def token_key(group: str, layer: str) -> str:
    """'video/last', 'text_window/prefix', ...: where a group's tokens of one layer are cached."""
    return f"{group}/{layer}"


def parse_modalities(letters: str) -> tuple[str, ...]:
    """'vat' -> ('video', 'audio', 'text') in canonical order; any non-empty subset of v, a, t."""
    letters = letters.strip().lower()
    bad = sorted(set(letters) - set(LETTERS))
    if not letters or bad or len(set(letters)) != len(letters):
        raise VocabError(f"modalities: {letters!r} must be a non-empty subset of the letters v, a, t")
    return tuple(m for m in MODALITIES if m[0] in letters)


def modality_letters(modalities: Sequence[str]) -> str:
    """('video', 'text') -> 'vt'."""
    return "".join(m[0] for m in MODALITIES if m in modalities)


def is_letters(s: str) -> bool:
    """Whether `s` is a modality subset written in letters ('va', 'vat', ...)."""
    return bool(s) and set(s) <= set(ALL_LETTERS) and len(set(s)) == len(s)


def canonical_letters(s: str) -> str:
    """Letters in the canonical order v, a, t ('tv' -> 'vt')."""
    return "".join(c for c in ALL_LETTERS if c in s)


def check_split(split: str, allowed: Sequence[str] = SPLITS) -> str:
    """The split name, or one line naming the allowed ones."""
    if split not in allowed:
        raise VocabError(f"unknown split {split!r}: use one of {', '.join(allowed)}")
    return split
