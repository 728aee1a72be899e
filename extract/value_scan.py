"""The two passes every cached array gets: its CRC32C checksum and a test for NaN/Inf values.

A cache writer feeds a `ValueScan` each block of an array's bytes just before the block is written, so the
block is read from memory once for the checksum, the value test and the kernel's copy (it is still in the CPU
cache); scanning the arrays in a thread beside the writes read them three times and cost a 2-core machine
about a fifth of its write rate. Arrays written by a library (compressed ones) are scanned from memory with
`scan_arrays`.
"""
from __future__ import annotations

import google_crc32c
import numpy as np

# Per item size: the unsigned and signed integer views, and the magnitude bits at or above which a float is
# Inf or NaN (exponent all ones). Positive Inf/NaN are the signed view's largest values, negative ones the
# unsigned view's: two max reductions (SIMD, no temporary) test a block.
_NONFINITE_BITS = {2: (np.uint16, np.int16, 0x7C00), 4: (np.uint32, np.int32, 0x7F800000),
                   8: (np.uint64, np.int64, 0x7FF0000000000000)}
SCAN_BLOCK = 1 << 18  # bytes: small enough to stay in the CPU's L2 cache between the passes


class ValueScan:
    """CRC32C and finiteness of one array's bytes, fed in order with `update` (block by block)."""

    def __init__(self, dtype: np.dtype, crc: bool = True):
        self.dtype = np.dtype(dtype)
        self.crc = crc
        self.value = 0  # the running CRC32C
        self.finite = True
        native = self.dtype.byteorder in "=|" + ("<" if np.little_endian else ">")
        bits = _NONFINITE_BITS.get(self.dtype.itemsize) if self.dtype.kind == "f" and native else None
        if bits is not None:  # (unsigned view, signed view, the least positive Inf/NaN, the least negative one)
            bits = (*bits, 1 << (8 * self.dtype.itemsize - 1) | bits[2])
        self._bits = bits

    @property
    def crc32c(self) -> str:
        return f"{self.value:08x}"

    def update(self, block) -> None:
        """The next bytes of the array (any buffer; a whole number of items)."""
        data = np.frombuffer(block, np.uint8)
        if self.crc:
            self.value = google_crc32c.extend(self.value, data)
        if not self.finite or self.dtype.kind != "f":
            return
        if self._bits is None:  # an unusual float type: numpy's own test
            self.finite = bool(np.isfinite(data.view(self.dtype)).all())
            return
        unsigned, signed, positive, negative = self._bits
        self.finite = bool(data.size == 0 or (data.view(signed).max() < positive
                                              and data.view(unsigned).max() < negative))

    def scan(self, arr: np.ndarray) -> ValueScan:
        """Feed a whole array (C order) from memory; stops early at a NaN/Inf when no checksum is wanted."""
        flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        for lo in range(0, flat.size, SCAN_BLOCK):
            self.update(flat[lo:lo + SCAN_BLOCK])
            if not self.crc and not self.finite:
                break
        return self


def scan_arrays(arrays: dict[str, np.ndarray]) -> dict[str, ValueScan]:
    return {name: ValueScan(arr.dtype).scan(arr) for name, arr in arrays.items()}


def all_finite(arr: np.ndarray) -> bool:
    """No NaN or Inf (~10x np.isfinite(arr).all() for native floats, no big temporary)."""
    return arr.dtype.kind != "f" or ValueScan(arr.dtype, crc=False).scan(arr).finite
