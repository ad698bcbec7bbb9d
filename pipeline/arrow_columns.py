"""Arrow arrays for the filter output's columns, built from their buffers rather than by `pa.array`.

    strings(["a", "é", None])            # pa.string(), None becomes null
    int64s(np.array([1, 2]))             # pa.int64(), no nulls
    floats(np.array([0.5, np.nan]))      # pa.float64(), NaN (not scored) becomes null

Why not `pa.array`: its first call in a process imports pandas (pyarrow asks whether the input is a
pandas object, even for a list or a numpy array), 0.27 s of CPU, as much as writing a tenth of a
200 MB filter run's Parquet (benchmarks/filter_vs_datatrove.py). The values are the ones `pa.array`
gives (tests/test_pipeline_arrow_columns.py compares them).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

#: the most bytes a pa.string() array holds (32-bit offsets)
MAX_STRING_BYTES = (1 << 31) - 1


def strings(values: Sequence[str | None]) -> pa.Array:
    """A pa.string() array of Python strings (UTF-8, as pa.array encodes them); None becomes null
    (the domain of a malformed line that has none)."""
    data = [b"" if v is None else v.encode("utf-8") for v in values]
    offsets = np.zeros(len(data) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, data), dtype=np.int64, count=len(data)), out=offsets[1:])
    if offsets[-1] > MAX_STRING_BYTES:
        # never reached by the writer: a batch holds at most 32 MiB of text plus one line of 64 MiB
        raise ValueError(f"{offsets[-1]} bytes of strings do not fit in one Arrow string array")
    nulls = sum(v is None for v in values) if None in values else 0
    bitmap = None
    if nulls:
        valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(data))
        bitmap = pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.string(), len(data),
                                 [bitmap, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(data))],
                                 null_count=nulls)


def int64s(values: np.ndarray | Sequence[int]) -> pa.Array:
    """A pa.int64() array without nulls."""
    v = np.ascontiguousarray(values, dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), len(v), [None, pa.py_buffer(v)])


def floats(values: np.ndarray) -> pa.Array:
    """A pa.float64() array in which NaN becomes null (pa.array's from_pandas=True)."""
    v = np.ascontiguousarray(values, dtype=np.float64)
    valid = ~np.isnan(v)
    nulls = len(v) - int(valid.sum())
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    return pa.Array.from_buffers(pa.float64(), len(v), [bitmap, pa.py_buffer(v)], null_count=nulls)
