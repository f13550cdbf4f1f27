"""One dtype per obs (or var) column across input files, by one documented rule.

Pure functions of the inputs' pandas columns: no I/O. The rule (also in the
docstring of ``create_store_from_h5ads`` and in the README):

- **Text wins.** If the column holds text in any input (a categorical, with
  any categories; strings, as ``object`` or a pandas string dtype), it
  becomes a categorical of strings. Every value is rendered with ``str``, so
  the int ``3`` and the string ``"3"`` are one category; categories come in
  first-seen order (an input's categorical in its category order, other
  inputs in order of appearance); missing values stay missing (code -1).
- **Otherwise numbers.** All bool: bool. Bools and ints: the narrowest int
  holding every input's int dtype (bool counts as 0/1). Any float: the float
  dtype numpy promotes to (``float64`` as soon as an int or a float64 is
  involved), missing values as NaN; ints are checked to be exactly
  representable.
- **Missing values stay exact.** A bool or int column that has a missing
  value in some input (pandas' nullable ``Int64``/``boolean``…), or that
  some input lacks (an outer join), becomes nullable (``boolean``, ``Int64``
  of the promoted width), never a float.
- Anything else (dates, complex numbers, mixed objects that anndata cannot
  write) is refused with an :class:`~arrayloaders.errors.InputFileError`
  naming the file and the column.

The result is written as anndata writes these dtypes on 0.12 and 0.13 alike:
categories are a plain ``object`` index of ``str`` (anndata 0.12 refuses
pandas' nullable string arrays unless a setting is flipped), nullable ints
and bools as anndata's ``nullable-integer``/``nullable-boolean``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from .errors import InputFileError

__all__ = ["ColumnSchema", "harmonise_column", "harmonise_frames", "join_columns", "value_kind"]

Kind = Literal["bool", "int", "float", "nullable-bool", "nullable-int", "nullable-float", "text"]


@dataclass(frozen=True)
class ColumnSchema:
    """What the store holds in one column (recorded in the manifest's ``obs_schema``).

    Attributes
    ----------
    kind
        ``"categorical"`` (codes into ``categories``) or ``"numeric"``.
    dtype
        The pandas/numpy dtype name: ``"category"``, ``"bool"``, ``"int64"``,
        ``"float32"``, or a nullable ``"Int64"``, ``"boolean"``…
    categories
        The labels of a categorical column (strings), else ``None``.
    missing
        Whether some cells have no value (categorical code -1, NaN, or NA).
    """

    kind: Literal["categorical", "numeric"]
    dtype: str
    categories: tuple[str, ...] | None = None
    missing: bool = False

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.categories is None:
            del out["categories"]
        else:
            out["categories"] = list(self.categories)
        return out


def value_kind(s: pd.Series) -> Kind | None:
    """The rule's name for a column's dtype; ``None`` if the rule cannot store it."""
    dtype = s.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        return "text"
    if isinstance(dtype, pd.BooleanDtype):
        return "nullable-bool"
    if isinstance(dtype, pd.api.extensions.ExtensionDtype) and not isinstance(dtype, pd.StringDtype):
        if pd.api.types.is_integer_dtype(dtype):
            return "nullable-int"
        if pd.api.types.is_float_dtype(dtype):
            return "nullable-float"
        return None
    if isinstance(dtype, pd.StringDtype) or dtype == object:
        return "text"
    if dtype == np.bool_:
        return "bool"
    if dtype.kind in "iu":
        return "int"
    if dtype.kind == "f":
        return "float"
    return None


def _numpy_dtype(s: pd.Series) -> np.dtype:
    dtype = s.dtype
    return np.dtype(dtype.numpy_dtype) if hasattr(dtype, "numpy_dtype") else np.dtype(dtype)


def _render(value) -> str:
    """A value as category text: ``str`` of it in its own dtype (``3`` -> ``"3"``, ``True`` -> ``"True"``,
    ``np.float32(0.1)`` -> ``"0.1"``, ``1e6`` -> ``"1000000.0"`` as float64, ``"1e+06"`` as float32).

    -0.0 equals 0.0, so both are ``"0.0"`` (whichever comes first).
    """
    if type(value) is str:
        return value
    if isinstance(value, (float, np.floating)) and value == 0:
        value = abs(value)
    return str(value)


def _text_codes(s: pd.Series) -> tuple[np.ndarray, list[str]]:
    """(codes, categories as strings) of one input's text column; code -1 where missing.

    Categories of a categorical keep their order (unused ones included);
    other columns' values come in order of appearance. Values whose text
    is the same (``3`` and ``"3"``) share a code.
    """
    if isinstance(s.dtype, pd.CategoricalDtype):
        codes, uniques = np.asarray(s.cat.codes, dtype=np.int64), s.cat.categories
    else:
        codes, uniques = pd.factorize(s, use_na_sentinel=True)
        codes = codes.astype(np.int64)
    # numpy scalars, not the Python floats an Index yields: str(np.float32(0.1)) is "0.1"
    rendered = [_render(v) for v in np.asarray(uniques)]
    labels = pd.Index(pd.unique(np.array(rendered, dtype=object)), dtype=object)
    remap = labels.get_indexer(np.array(rendered, dtype=object))
    return np.where(codes >= 0, remap[codes] if remap.size else codes, -1), list(labels)


def _missing(s: pd.Series) -> np.ndarray:
    return np.asarray(s.isna(), dtype=bool)


def harmonise_column(
    name: str,
    parts: Sequence[pd.Series | None],
    lengths: Sequence[int],
    labels: Sequence[str],
    what: str = "obs",
) -> tuple[pd.Categorical | np.ndarray | pd.api.extensions.ExtensionArray, ColumnSchema]:
    """One column of all inputs, concatenated in input order, with one dtype (see the module's rule).

    Parameters
    ----------
    name
        The column's name (for error messages).
    parts
        Each input's column, or ``None`` where an input does not have it.
    lengths
        Rows of each input (the length of an absent part).
    labels
        Each input's name (its path) for error messages.
    what
        ``"obs"`` or ``"var"``, for error messages.

    Returns
    -------
    The concatenated values (a ``pandas.Categorical``, a numpy array, or a
    pandas nullable array) and their :class:`ColumnSchema`.

    Raises
    ------
    InputFileError
        A column's dtype the rule cannot store, or int values a float column
        cannot hold exactly; the message names the file and the column.
    """
    kinds: list[Kind | None] = []
    for part, label in zip(parts, labels):
        if part is None:
            kinds.append(None)
            continue
        kind = value_kind(part)
        if kind is None:
            raise InputFileError(
                f"{label}: {what} column {name!r} has dtype {part.dtype}, which a store cannot hold; "
                "convert it to strings, numbers or a categorical first"
            )
        kinds.append(kind)
    present = [k for k in kinds if k is not None]
    absent = len(present) < len(parts)
    if "text" in present:
        return _as_categorical(parts, kinds, lengths)
    dtypes = [_numpy_dtype(p) for p in parts if p is not None]
    if any(k in ("float", "nullable-float") for k in present):
        return _as_float(name, parts, lengths, labels, dtypes, what)
    nullable = absent or any(k.startswith("nullable") for k in present)
    if all(k in ("bool", "nullable-bool") for k in present):
        dtype = np.dtype(np.bool_)
    else:
        dtype = np.result_type(*dtypes)
        if dtype.kind == "f":  # uint64 with a signed int: numpy would pick float64
            dtype = np.dtype(np.int64)
            for part, label in zip(parts, labels):
                if part is not None and _numpy_dtype(part) == np.uint64 and (part.dropna() > np.iinfo(np.int64).max).any():
                    raise InputFileError(
                        f"{label}: {what} column {name!r} holds uint64 values above 2**63 - 1, and other inputs "
                        "hold signed ints: no int dtype holds both"
                    )
    values = np.zeros(sum(lengths), dtype=dtype)
    mask = np.zeros(sum(lengths), dtype=bool)
    at = 0
    for part, n in zip(parts, lengths):
        if part is None:
            mask[at : at + n] = True
        else:
            miss = _missing(part)
            mask[at : at + n] = miss
            values[at : at + n] = part.to_numpy(dtype=dtype, na_value=0) if miss.any() else part.to_numpy(dtype=dtype)
        at += n
    if not nullable:
        return values, ColumnSchema("numeric", str(dtype))
    array = pd.arrays.BooleanArray(values, mask) if dtype == np.bool_ else pd.arrays.IntegerArray(values, mask)
    return array, ColumnSchema("numeric", str(array.dtype), missing=bool(mask.any()))


def _as_categorical(parts, kinds, lengths) -> tuple[pd.Categorical, ColumnSchema]:
    categories: list[str] = []
    seen: set[str] = set()
    index = pd.Index([], dtype=object)
    codes = np.full(sum(lengths), -1, dtype=np.int64)
    at = 0
    for part, n in zip(parts, lengths):
        if part is not None:
            part_codes, part_labels = _text_codes(part)
            new = [c for c in part_labels if c not in seen]
            if new:
                categories += new
                seen.update(new)
                index = pd.Index(categories, dtype=object)
            remap = index.get_indexer(np.array(part_labels, dtype=object))
            codes[at : at + n] = np.where(part_codes >= 0, remap[part_codes] if remap.size else part_codes, -1)
        at += n
    values = pd.Categorical.from_codes(codes, categories=pd.Index(categories, dtype=object))
    return values, ColumnSchema("categorical", "category", tuple(categories), bool((codes < 0).any()))


def _as_float(name, parts, lengths, labels, dtypes, what) -> tuple[np.ndarray, ColumnSchema]:
    dtype = np.result_type(*dtypes)
    if dtype.kind != "f":  # bools only with floats: numpy keeps the float
        dtype = np.dtype(np.float64)
    values = np.full(sum(lengths), np.nan, dtype=dtype)
    at = 0
    for part, n, label in zip(parts, lengths, labels):
        if part is not None:
            got = part.to_numpy(dtype=dtype, na_value=np.nan)
            source = _numpy_dtype(part)
            if source.kind in "iu" and source.itemsize * 8 > np.finfo(dtype).nmant + 1:
                ints = part.dropna().to_numpy(dtype=source)
                with np.errstate(invalid="ignore"):  # values past the float's range are what we look for
                    inexact = (ints.astype(dtype).astype(source) != ints).any()
                if inexact:
                    raise InputFileError(
                        f"{label}: {what} column {name!r} holds ints that {dtype} cannot represent exactly, and "
                        "other inputs hold floats; convert the column to one type first"
                    )
            values[at : at + n] = got
        at += n
    return values, ColumnSchema("numeric", str(dtype), missing=bool(np.isnan(values).any()))


def join_columns(
    frames: Sequence[pd.DataFrame],
    labels: Sequence[str],
    join: Literal["outer", "inner"],
    selected: Sequence[str] | None = None,
    what: str = "obs",
) -> list[str]:
    """The columns a join keeps: all (first-seen order) for ``"outer"``, those every input has for ``"inner"``.

    ``selected`` picks columns instead: under ``"inner"`` every input must
    have them, under ``"outer"`` at least one input must.
    """
    if join not in ("outer", "inner"):
        raise ValueError(f"{what}_join must be 'outer' or 'inner', got {join!r}")
    if selected is not None:
        columns = list(selected)
        for c in columns:
            lacking = [label for frame, label in zip(frames, labels) if c not in frame.columns]
            if join == "inner" and lacking:
                raise InputFileError(
                    f"{lacking[0]}: {what} has no column {c!r}, and {what}_join='inner' needs every input to have "
                    f"it; pass {what}_join='outer' to fill it with missing values"
                )
            if len(lacking) == len(frames):
                raise InputFileError(f"no input has the {what} column {c!r} ({', '.join(labels)})")
        return columns
    columns = []
    for frame in frames:
        columns += [c for c in frame.columns if c not in columns]
    if join == "inner":
        columns = [c for c in columns if all(c in frame.columns for frame in frames)]
    return columns


def harmonise_frames(
    frames: Sequence[pd.DataFrame], labels: Sequence[str], columns: Sequence[str], what: str = "obs"
) -> tuple[dict[str, Any], dict[str, ColumnSchema]]:
    """``harmonise_column`` for each of ``columns``: (values by column, schema by column)."""
    lengths = [len(f) for f in frames]
    values, schema = {}, {}
    for c in columns:
        parts = [f[c] if c in f.columns else None for f in frames]
        values[c], schema[c] = harmonise_column(str(c), parts, lengths, labels, what)
    return values, schema
