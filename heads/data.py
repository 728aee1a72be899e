"""The public names of stage 2's data in one place: the in-memory split (heads/split_data.py) and reading it
from the cache (heads/load.py). A split too large for memory is streamed instead (heads/stream.py)."""
from __future__ import annotations

from heads.load import REPAIR, load_split, placement, read_plan, read_rows
from heads.split_data import DataError, SplitData

__all__ = ["REPAIR", "DataError", "SplitData", "load_split", "placement", "read_plan", "read_rows"]
