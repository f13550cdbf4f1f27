"""columns.py: one dtype per obs/var column across inputs, by the documented rule.

Hypothesis draws a schema (one dtype per input file, or the column absent)
and values (with missing values where the dtype allows them). Each result is
checked value by value against the inputs, against the rule's dtype, and by
writing it with anndata to a zarr v3 group and reading it back (the store
must open, with the same values).
"""

from __future__ import annotations

import re
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import zarr
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from arrayloaders import ConversionWarning, InputFileError
from arrayloaders.convert.columns import ColumnSchema, harmonise_column, harmonise_frames, join_columns

PANDAS_3 = int(pd.__version__.split(".")[0]) >= 3

# kind of a column in one input -> (dtype, may hold missing values)
DTYPES = {
    "bool": (np.dtype(bool), False),
    "int8": (np.dtype(np.int8), False),
    "int32": (np.dtype(np.int32), False),
    "int64": (np.dtype(np.int64), False),
    "uint16": (np.dtype(np.uint16), False),
    "float32": (np.dtype(np.float32), True),
    "float64": (np.dtype(np.float64), True),
    "Int64": (pd.Int64Dtype(), True),
    "Int16": (pd.Int16Dtype(), True),
    "UInt8": (pd.UInt8Dtype(), True),
    "boolean": (pd.BooleanDtype(), True),
    "object-str": (np.dtype(object), True),
    "string": (pd.StringDtype(), True),  # pandas' nullable string (the default str of pandas 3)
    "category-str": ("category", True),
    "category-int": ("category", True),
}
TEXT = {"object-str", "string", "category-str", "category-int"}
NULLABLE = {"Int64", "Int16", "UInt8", "boolean"}
FLOATS = {"float32", "float64"}
BOOLS = {"bool", "boolean"}


def _values(draw, kind: str, n: int) -> tuple[pd.Series, list]:
    """A column of ``kind`` with ``n`` values, and the values as Python objects (None where missing)."""
    dtype, nullable = DTYPES[kind]
    missing = draw(st.lists(st.booleans(), min_size=n, max_size=n)) if nullable else [False] * n
    if kind in BOOLS:
        raw = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    elif kind in FLOATS:
        width = 32 if kind == "float32" else 64
        raw = draw(st.lists(st.floats(width=width, allow_nan=False), min_size=n, max_size=n))
    elif kind in TEXT and kind != "category-int":
        # few distinct labels, some that look like numbers (so "3" and 3 meet)
        raw = draw(st.lists(st.sampled_from(["a", "b", "3", "0", "", "é", "1.5", "True"]), min_size=n, max_size=n))
    else:
        info = np.iinfo(dtype.numpy_dtype if hasattr(dtype, "numpy_dtype") else dtype if kind != "category-int" else np.int64)
        lo, hi = max(int(info.min), -5), min(int(info.max), 5)
        raw = draw(st.lists(st.one_of(st.integers(lo, hi), st.sampled_from([int(info.min), int(info.max)])), min_size=n, max_size=n))
    expected = [None if m else v for v, m in zip(raw, missing)]
    if kind.startswith("category"):
        present = [v for v in expected if v is not None]
        extra = draw(st.lists(st.sampled_from([7, 8] if kind == "category-int" else ["unused"]), max_size=1))
        categories = list(dict.fromkeys(present + extra))
        series = pd.Series(pd.Categorical(expected, categories=categories))
    elif kind in NULLABLE or kind == "string":
        series = pd.Series(pd.array(expected, dtype=dtype))
    elif kind == "object-str":
        series = pd.Series(np.array(expected, dtype=object), dtype=object)
    elif kind in FLOATS:
        series = pd.Series(np.array([np.nan if v is None else v for v in expected], dtype=dtype))
        expected = [None if v is None else dtype.type(v) for v in expected]
    else:
        series = pd.Series(np.array(expected, dtype=dtype))
    return series, expected


@st.composite
def column_schemas(draw):
    """(parts, lengths, expected Python values per input, kinds) of one column over 1-3 inputs."""
    n_files = draw(st.integers(1, 3))
    parts, lengths, expected, kinds = [], [], [], []
    for _ in range(n_files):
        n = draw(st.integers(0, 6))
        kind = draw(st.sampled_from([None, *DTYPES]))  # None: this input lacks the column
        lengths.append(n)
        kinds.append(kind)
        if kind is None:
            parts.append(None)
            expected.append([None] * n)
        else:
            series, values = _values(draw, kind, n)
            parts.append(series)
            expected.append(values)
    return parts, lengths, expected, kinds


def rule_dtype(kinds: list[str | None], parts) -> str:
    """The dtype the documented rule gives (written here independently of columns.py)."""
    present = [k for k in kinds if k is not None]
    if not present:
        return "category"  # never happens in a join, but the rule still gives a (categorical) column
    if any(k in TEXT for k in present):
        return "category"
    nullable = len(present) < len(kinds) or any(k in NULLABLE for k in present)
    numpy_dtypes = [np.dtype(DTYPES[k][0].numpy_dtype if k in NULLABLE else DTYPES[k][0]) for k in present]
    if any(k in FLOATS for k in present):
        return str(np.result_type(*numpy_dtypes))
    if all(k in BOOLS for k in present):
        return "boolean" if nullable else "bool"
    widest = np.result_type(*numpy_dtypes)
    return widest.name.capitalize().replace("Uint", "UInt") if nullable else widest.name


def as_text(value) -> str:
    """The rule's text of a value; -0.0 and 0.0 are equal numbers, so one category ("0.0")."""
    if isinstance(value, np.floating) and value == 0:
        value = abs(value)
    return str(value)


def check_values(values, schema: ColumnSchema, expected: list) -> None:
    """Each output cell against the input cell: equal text, bit-identical number, missing where missing."""
    got = pd.Series(values)
    assert len(got) == len(expected)
    if schema.kind == "categorical":
        assert list(got.cat.categories) == list(schema.categories)
        assert all(type(c) is str for c in got.cat.categories)
        assert got.cat.categories.is_unique
        for g, e in zip(got.astype(object), expected):
            if e is None:
                assert pd.isna(g)
            else:
                assert g == as_text(e), (g, e)
        return
    for g, e in zip(got, expected):
        if e is None:
            assert pd.isna(g)
        else:
            assert not pd.isna(g)
            if isinstance(e, np.floating):
                assert np.array([g], dtype=np.dtype(schema.dtype)).view(np.uint8).tobytes() == np.array(
                    [e], dtype=np.dtype(schema.dtype)
                ).view(np.uint8).tobytes()
            else:
                assert g == e and type(g) is not str, (g, e)


def write_and_read(values, name: str = "col") -> pd.Series:
    """The column written by anndata into a zarr v3 group and read back (the store must open)."""
    frame = pd.DataFrame({name: values}, index=pd.Index([f"c{i}" for i in range(len(values))], dtype=object))
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata 0.13 deprecates the setting (v3 becomes its default)
        with ad.settings.override(zarr_write_format=3):
            ad.io.write_elem(group, "obs", frame)
        return ad.io.read_elem(group["obs"])[name]


def ints_column(values: list, kind: str = "int64") -> tuple:
    """The schema of one int column (``values``) beside a float64 column ``[0.5]`` (for ``@example``)."""
    return [pd.Series(np.array(values, dtype=DTYPES[kind][0])), pd.Series([0.5])], [len(values), 1], [values, [0.5]], [kind, "float64"]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(column_schemas())
@example(ints_column([3, 2**63 - 1]))  # refused: float64 cannot hold 2**63 - 1
@example(ints_column([-(2**63), 2**53]))  # kept: float64 holds both exactly
def test_harmonised_column_keeps_every_value_with_the_rules_dtype(schema):
    parts, lengths, expected, kinds = schema
    if all(k is None for k in kinds):
        return  # a join never asks for a column no input has
    labels = [f"file_{i}.h5ad" for i in range(len(parts))]
    try:
        values, result = harmonise_column("col", parts, lengths, labels)
    except InputFileError as e:
        # the only refusal the drawn dtypes can meet: ints too wide for the float of another input. Checked
        # here: the rule's float, and the int inputs holding a value that does not come back from that float.
        floats = np.dtype(rule_dtype(kinds, parts))
        assert floats.kind == "f", (floats, str(e))
        too_wide = [label for label, kind, part in zip(labels, kinds, expected)
                    if kind in DTYPES and kind not in FLOATS | BOOLS | TEXT
                    and any(v is not None and int(floats.type(v)) != v for v in part)]  # fmt: skip
        assert too_wide, f"refused although every int round-trips through {floats}: {e}"
        named = [label for label in labels if label in str(e)]
        assert named and set(named) <= set(too_wide), str(e)  # names the file (one with such ints)...
        assert "'col'" in str(e) and "cannot represent exactly" in str(e)  # ...the column and the problem
        return
    flat = [v for part in expected for v in part]
    assert result.dtype == rule_dtype(kinds, parts)
    assert result.missing == any(v is None for v in flat)
    check_values(values, result, flat)
    if result.kind == "categorical":
        # first-seen order: each input's categories (categoricals) or values, in input order
        seen = []
        for part, kind in zip(parts, kinds):
            if part is None:
                continue
            source = part.cat.categories if kind.startswith("category") else part.dropna().unique()
            seen += [as_text(v) for v in source if as_text(v) not in seen]
        assert list(result.categories) == seen
    back = write_and_read(values)
    check_values(back.array if result.kind != "categorical" else back.values, result, flat)
    if result.kind == "numeric":
        assert str(back.dtype) == result.dtype


def test_int_and_string_become_one_categorical_of_strings():
    """The issue's case: int64 in one file, str in another, was written with categories [0, 3, '0', '3']."""
    a = pd.Series(np.array([0, 3, 2, 1]))
    b = pd.Series(np.array(["0", "1", "2", "3"], dtype=object))
    values, schema = harmonise_column("donor", [a, b], [4, 4], ["a.h5ad", "b.h5ad"])
    assert schema == ColumnSchema("categorical", "category", ("0", "3", "2", "1"), False)
    assert list(values.astype(str)) == ["0", "3", "2", "1", "0", "1", "2", "3"]
    assert list(write_and_read(values).astype(str)) == ["0", "3", "2", "1", "0", "1", "2", "3"]


@pytest.mark.parametrize(
    ("series", "dtype"),
    [
        (pd.Series(pd.to_datetime(["2020-01-01", "2021-01-01"])), "datetime64"),
        (pd.Series(np.array([1 + 2j, 3j])), "complex128"),
        (pd.Series(pd.array([pd.Timedelta(1), pd.Timedelta(2)])), "timedelta64"),
    ],
    ids=["datetime", "complex", "timedelta"],
)
def test_unsupported_dtypes_are_refused_naming_file_and_column(series, dtype):
    ok = pd.Series(np.array([1, 2]))
    with pytest.raises(InputFileError, match=rf"b\.h5ad: obs column 'when' has dtype {dtype}"):
        harmonise_column("when", [ok, series], [2, 2], ["a.h5ad", "b.h5ad"])


def test_big_ints_with_floats_are_refused_not_rounded():
    big = pd.Series(np.array([2**53 + 1], dtype=np.int64))
    with pytest.raises(InputFileError, match=r"a\.h5ad: obs column 'n' holds ints that float64 cannot represent"):
        harmonise_column("n", [big, pd.Series(np.array([0.5]))], [1, 1], ["a.h5ad", "b.h5ad"])
    values, schema = harmonise_column("n", [pd.Series(np.array([2**53], np.int64)), pd.Series([0.5])], [1, 1], "ab")
    assert values[0] == 2**53 and schema.dtype == "float64"


def test_uint64_with_signed_ints():
    small = pd.Series(np.array([5], dtype=np.uint64))
    signed = pd.Series(np.array([-1], dtype=np.int8))
    values, schema = harmonise_column("n", [small, signed], [1, 1], ["a", "b"])
    assert schema.dtype == "int64" and list(values) == [5, -1]
    with pytest.raises(InputFileError, match="uint64 values above 2"):
        harmonise_column("n", [pd.Series(np.array([2**63], np.uint64)), signed], [1, 1], ["a.h5ad", "b"])


FRAMES = [
    pd.DataFrame({"a": [1], "b": ["x"], "c": [True]}),
    pd.DataFrame({"c": [False], "d": [2.5], "a": [3]}),
]


@pytest.mark.parametrize(
    ("join", "selected", "columns"),
    [
        ("outer", None, ["a", "b", "c", "d"]),
        ("inner", None, ["a", "c"]),
        ("outer", ["d", "b"], ["d", "b"]),
        ("inner", ["c", "a"], ["c", "a"]),
    ],
)
def test_join_columns(join, selected, columns):
    assert join_columns(FRAMES, ["x.h5ad", "y.h5ad"], join, selected) == columns


def test_join_columns_errors():
    with pytest.raises(InputFileError, match=r"y\.h5ad: obs has no column 'b'.*obs_join='outer'"):
        join_columns(FRAMES, ["x.h5ad", "y.h5ad"], "inner", ["b"])
    with pytest.raises(InputFileError, match="no input has the obs column 'zzz'"):
        join_columns(FRAMES, ["x.h5ad", "y.h5ad"], "outer", ["zzz"])
    with pytest.raises(ValueError, match="obs_join must be"):
        join_columns(FRAMES, ["x.h5ad", "y.h5ad"], "left")


def test_outer_join_fills_missing_by_kind():
    values, schema = harmonise_frames(FRAMES, ["x.h5ad", "y.h5ad"], ["a", "b", "c", "d"])
    assert {c: s.dtype for c, s in schema.items()} == {"a": "int64", "b": "category", "c": "bool", "d": "float64"}
    assert list(values["b"].codes) == [0, -1] and schema["b"].missing
    assert np.isnan(values["d"][0]) and values["d"][1] == 2.5
    short = [FRAMES[0], pd.DataFrame({"b": ["y"]})]
    values, schema = harmonise_frames(short, ["x.h5ad", "y.h5ad"], ["a", "c"])
    assert schema["a"].dtype == "Int64" and schema["c"].dtype == "boolean"
    assert list(values["a"].isna()) == [False, True] and list(values["c"].isna()) == [False, True]
    assert schema["a"].to_json() == {"kind": "numeric", "dtype": "Int64", "missing": True}


# ------------------------------------------------------------------ ordered categoricals

STAGES = ["early", "mid", "late"]


def stages(values, categories=STAGES, ordered=True) -> pd.Series:
    return pd.Series(pd.Categorical(values, categories=categories, ordered=ordered))


def test_ordered_categorical_stays_ordered_when_every_input_agrees():
    """Inputs without the column do not count; the order survives anndata's zarr round trip."""
    parts = [stages(["late", "early"]), None, stages(["mid", None, "late"])]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        values, schema = harmonise_column("stage", parts, [2, 4, 3], ["a.h5ad", "b.h5ad", "c.h5ad"])
    assert schema == ColumnSchema("categorical", "category", tuple(STAGES), True, ordered=True)
    assert schema.to_json() == {"kind": "categorical", "dtype": "category", "categories": STAGES, "missing": True,
                                "ordered": True}  # fmt: skip
    assert values.ordered and list(values.categories) == STAGES
    assert list(values.codes) == [2, 0, -1, -1, -1, -1, 1, -1, 2]
    back = write_and_read(values)
    assert back.cat.ordered and list(back.cat.categories) == STAGES and list(back.cat.codes) == list(values.codes)


def test_an_unordered_column_has_no_ordered_entry():
    values, schema = harmonise_column("stage", [stages(["mid"], ordered=False)], [1], ["a.h5ad"])
    assert not values.ordered and not schema.ordered and "ordered" not in schema.to_json()


@pytest.mark.parametrize(
    ("other", "how"),
    [
        (stages(["mid"], categories=["mid", "early", "late"]), "has other categories or another order"),
        (stages(["mid"], categories=["early", "mid"]), "has other categories or another order"),
        (stages(["mid"], ordered=False), "is not an ordered categorical"),
        (pd.Series(np.array(["mid", "early"], dtype=object)), "is not an ordered categorical"),
        (pd.Series(np.array([3, 1])), "is not an ordered categorical"),
    ],
    ids=["other-order", "other-categories", "unordered", "strings", "ints"],
)
def test_inputs_that_differ_give_an_unordered_column_and_a_warning_naming_both(other, how):
    parts = [None, stages(["late"]), other, stages(["early"])]
    labels = ["a.h5ad", "b.h5ad", "c.h5ad", "d.h5ad"]
    expected = rf"obs column 'stage' is an ordered categorical in b\.h5ad but {how} in c\.h5ad"
    with pytest.warns(ConversionWarning, match=expected) as w:
        values, schema = harmonise_column("stage", parts, [1, 1, len(other), 1], labels)
    assert len(w) == 1 and "\n" not in str(w[0].message)
    assert not values.ordered and not schema.ordered
    assert values[1] == "late" and values[-1] == "early"


@pytest.mark.parametrize("name", ["a/b", "/", "counts/", ""], ids=["inner-slash", "slash", "trailing-slash", "empty"])
def test_names_zarr_cannot_hold_are_refused_naming_file_and_key(name):
    from arrayloaders.convert.columns import check_name

    problem = "has an empty name" if not name else "has a '/' in its name"
    expected = rf"^a\.h5ad: obs column {re.escape(repr(name))} {problem}.*obs_columns="
    with pytest.raises(InputFileError, match=expected) as info:
        check_name("a.h5ad", "obs column", name, "obs_columns=[...]")
    assert "\n" not in str(info.value)
    check_name("a.h5ad", "obs column", "a.b c-é", "obs_columns=[...]")
