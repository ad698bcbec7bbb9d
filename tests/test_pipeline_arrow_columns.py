"""pipeline.arrow_columns builds the same arrays as pa.array, without importing pandas."""
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from pipeline import arrow_columns


def test_strings_as_pa_array():
    values = ["", "ascii", "é accent", "日本語", "emoji \U0001f600", "a\x00b", "x" * 5000]
    got = arrow_columns.strings(values)
    assert got.equals(pa.array(values, pa.string()))
    got.validate(full=True)
    assert arrow_columns.strings([]).equals(pa.array([], pa.string()))
    with_nulls = [None, "a", None, "é"] + ["b"] * 9
    got = arrow_columns.strings(with_nulls)
    assert got.equals(pa.array(with_nulls, pa.string())) and got.null_count == 2
    got.validate(full=True)


def test_numbers_as_pa_array():
    lines = [1, 2, 70000000000]
    assert arrow_columns.int64s(lines).equals(pa.array(lines, pa.int64()))
    v = np.array([0.25, np.nan, 1.0, -0.0, np.nan, 1e-300, 3.0, 4.0, 5.0])    # more than a bitmap byte
    got = arrow_columns.floats(v)
    want = pa.array(v, from_pandas=True)
    assert got.equals(want) and got.null_count == 2
    got.validate(full=True)
    # the non-null values are the same bits (-0.0 stays -0.0)
    assert np.array_equal(got.fill_null(7.0).to_numpy().view(np.int64), want.fill_null(7.0).to_numpy().view(np.int64))
    assert arrow_columns.floats(np.array([0.5, 1.5])).null_count == 0


def test_unencodable_string_raises():
    with pytest.raises(UnicodeEncodeError):
        arrow_columns.strings(["lone \ud800"])


def test_no_pandas_import():
    code = ("import sys, numpy as np; from pipeline import arrow_columns as a; "
            "a.strings(['x']); a.int64s([1]); a.floats(np.array([np.nan])); print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
