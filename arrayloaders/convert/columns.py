"""One dtype per obs (or var) column across input files, by one documented rule.

Pure functions of the inputs' pandas columns: no I/O. The rule (also in the
docstring of ``create_store_from_h5ads`` and in the README):

- **Text wins.** If the column holds text in any input (a categorical, with
  any categories; strings, as ``object`` or a pandas string dtype), it
  becomes a categorical of strings. Every value is rendered with ``str``, so
  the int ``3`` and the string ``"3"`` are one category; categories come in
  first-seen order (an input's categorical in its category order, other
  inputs in order of appearance); missing values stay missing (code -1).
- **Order is kept when every input agrees.** The categorical is ordered
  iff every input that holds the column holds it as an ordered categorical
  with the same categories in the same order (inputs without the column do
  not count). If one input has it ordered and another differs (unordered,
  text, numbers, other categories or another order), it is stored unordered
  with a :class:`~arrayloaders.errors.ConversionWarning` naming the column,
  the first ordered input and the first input that differs.
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

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..errors import ConversionWarning, InputFileError

__all__ = [
    "ColumnPlan", "ColumnSchema", "PartSummary", "assemble", "check_name", "decide", "encode", "harmonise_column",
    "harmonise_frames", "join_columns", "mixes_text", "summarise", "value_kind",
]  # fmt: skip

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
    ordered
        Whether a categorical's categories are ordered (``pandas.Categorical(..., ordered=True)``).
    """

    kind: Literal["categorical", "numeric"]
    dtype: str
    categories: tuple[str, ...] | None = None
    missing: bool = False
    ordered: bool = False

    def to_json(self) -> dict[str, Any]:
        """The manifest's entry: ``categories`` only for a categorical, ``ordered`` only when true
        (so entries of unordered columns are as manifests written before ``ordered`` existed)."""
        out = asdict(self)
        if self.categories is None:
            del out["categories"]
        else:
            out["categories"] = list(self.categories)
        if not self.ordered:
            del out["ordered"]
        return out


def check_name(label: str, what: str, name: str, leave_out: str | None = None) -> None:
    """Refuse a name the store cannot hold as a key of its zarr hierarchy: one with a ``/``, or an empty one.

    zarr (as HDF5) takes ``/`` for the separator of its hierarchy, so
    ``obs/a/b`` would be a group ``a`` holding ``b``, and anndata refuses to
    write it; escaping the ``/`` would rename the user's column. The empty
    name is the group itself.

    Parameters
    ----------
    label
        The input's name (its path), for the message.
    what
        What the name is, for the message: ``"obs column"``, ``"layers key"``...
    name
        The name to check.
    leave_out
        How the caller may leave the element out (``"obs_columns=[...]"``), if it can.

    Raises
    ------
    InputFileError
        Naming the file and the key.
    """
    if name and "/" not in name:
        return
    problem = "has an empty name" if not name else "has a '/' in its name, which zarr takes for a path separator"
    fix = f"rename it, or leave it out with {leave_out}" if leave_out else "rename it"
    raise InputFileError(f"{label}: {what} {name!r} {problem}, so a store cannot hold it; {fix}")


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


# Floats an int column may be promoted to; for each, whether every value is exact is noted when
# the column is summarised, since the float is only known once every input has been seen.
_FLOATS = tuple(np.dtype(t) for t in (np.float16, np.float32, np.float64, np.longdouble))


@dataclass(frozen=True)
class PartSummary:
    """What the rule needs to know of one input's column (or of rows of it), without its values.

    Summaries of consecutive rows of a column merge (:meth:`merge`) into the
    summary of the whole, so a column can be summarised in blocks.
    """

    kind: Kind
    dtype: np.dtype
    labels: tuple[str, ...] | None  # text: its categories as text, in first-seen order
    missing: bool
    exact_in: frozenset[str] = frozenset()  # ints: the floats that hold every value exactly
    above_int64: bool = False  # uint64 values above 2**63 - 1
    ordered: bool = False  # text: an ordered categorical whose categories are ``labels``, in that order

    def merge(self, other: PartSummary) -> PartSummary:
        labels = None
        if self.labels is not None:
            labels = self.labels + tuple(c for c in other.labels if c not in set(self.labels))
        return PartSummary(
            self.kind, self.dtype, labels, self.missing or other.missing,
            self.exact_in & other.exact_in, self.above_int64 or other.above_int64,
            self.ordered and other.ordered and labels == self.labels == other.labels,
        )  # fmt: skip


def _keeps_order(part: pd.Series, labels: list[str]) -> bool:
    """Whether ``part`` is an ordered categorical whose order its text ``labels`` keep: one label per category.

    Categories that render to one text (``1`` and ``"1"``) would merge into
    one label, which has no place in their order.
    """
    dtype = part.dtype
    return isinstance(dtype, pd.CategoricalDtype) and bool(dtype.ordered) and len(labels) == len(dtype.categories)


def mixes_text(summaries: Sequence[PartSummary | None]) -> bool:
    """Whether text meets numbers in a column: its number parts must then be summarised again ``as_text``."""
    kinds = {s.kind == "text" for s in summaries if s is not None}
    return len(kinds) == 2


def summarise(name: str, part: pd.Series, label: str, what: str = "obs", as_text: bool = False) -> PartSummary:
    """One input's column (or consecutive rows of it), summarised for :func:`decide`.

    ``as_text``: numbers summarised as the text they become when another
    input holds text in the column (:func:`mixes_text`).

    Raises
    ------
    InputFileError
        A dtype the rule cannot store; the message names the file and the column.
    """
    kind = value_kind(part)
    if kind is None:
        raise InputFileError(
            f"{label}: {what} column {name!r} has dtype {part.dtype}, which a store cannot hold; "
            "convert it to strings, numbers or a categorical first"
        )
    if kind == "text" or as_text:
        codes, labels = _text_codes(part)
        missing = bool((codes < 0).any())
        return PartSummary("text", np.dtype(object), tuple(labels), missing, ordered=_keeps_order(part, labels))
    dtype = _numpy_dtype(part)
    missing = bool(_missing(part).any())
    if dtype.kind not in "iu":
        return PartSummary(kind, dtype, None, missing)
    ints = part.dropna().to_numpy(dtype=dtype)
    exact = set()
    for f in _FLOATS:
        if dtype.itemsize * 8 <= np.finfo(f).nmant + 1:
            exact.add(str(f))
            continue
        with np.errstate(invalid="ignore", over="ignore"):  # values past the float's range are what we look for
            if not (ints.astype(f).astype(dtype) != ints).any():
                exact.add(str(f))
    above = dtype == np.uint64 and bool((ints > np.iinfo(np.int64).max).any())
    return PartSummary(kind, dtype, None, missing, frozenset(exact), above)


@dataclass(frozen=True)
class ColumnPlan:
    """How every input's values of one column are stored: the schema, and the dtype of its values.

    ``values`` is the dtype :func:`encode` gives: ``int32`` codes of a
    categorical, else the numbers' dtype; ``nullable`` columns also get a
    mask of missing values.
    """

    name: str
    schema: ColumnSchema
    values: np.dtype
    nullable: bool = False

    @property
    def categories(self) -> pd.Index:
        return pd.Index(list(self.schema.categories), dtype=object)


def decide(
    name: str, summaries: Sequence[PartSummary | None], lengths: Sequence[int], labels: Sequence[str], what: str = "obs"
) -> ColumnPlan:
    """The rule (see the module): one column's storage, from each input's summary (``None``: the input lacks it)
    and each input's number of rows.

    Raises
    ------
    InputFileError
        Int values a float column cannot hold exactly, or uint64 values no int
        holds with signed ints; the message names the file and the column.
    """
    present = [(s, label) for s, label in zip(summaries, labels) if s is not None]
    absent = len(present) < len(summaries)
    # an input without the column gives its cells missing values, if it has any cells
    missing = any(s.missing for s, _ in present) or any(s is None and n for s, n in zip(summaries, lengths))
    kinds = [s.kind for s, _ in present]
    if "text" in kinds:
        categories: list[str] = []
        seen: set[str] = set()
        for s, _ in present:
            if s.kind != "text":
                raise ValueError(f"column {name!r} mixes text and numbers: summarise every part as_text (mixes_text)")
            new = [c for c in s.labels if c not in seen]
            categories += new
            seen.update(new)
        ordered = _is_ordered(name, present, what)
        schema = ColumnSchema("categorical", "category", tuple(categories), missing, ordered)
        return ColumnPlan(name, schema, np.dtype(np.int32))
    dtypes = [s.dtype for s, _ in present]
    if any(k in ("float", "nullable-float") for k in kinds):
        dtype = np.result_type(*dtypes)
        if dtype.kind != "f":  # bools only with floats: numpy keeps the float
            dtype = np.dtype(np.float64)
        for s, label in present:
            if s.dtype.kind in "iu" and str(dtype) not in s.exact_in:
                raise InputFileError(
                    f"{label}: {what} column {name!r} holds ints that {dtype} cannot represent exactly, and "
                    "other inputs hold floats; convert the column to one type first"
                )
        return ColumnPlan(name, ColumnSchema("numeric", str(dtype), missing=missing), dtype)
    nullable = absent or any(k.startswith("nullable") for k in kinds)
    if all(k in ("bool", "nullable-bool") for k in kinds):
        dtype = np.dtype(np.bool_)
    else:
        dtype = np.result_type(*dtypes)
        if dtype.kind == "f":  # uint64 with a signed int: numpy would pick float64
            dtype = np.dtype(np.int64)
            for s, label in present:
                if s.above_int64:
                    raise InputFileError(
                        f"{label}: {what} column {name!r} holds uint64 values above 2**63 - 1, and other inputs "
                        "hold signed ints: no int dtype holds both"
                    )
    if not nullable:
        return ColumnPlan(name, ColumnSchema("numeric", str(dtype)), dtype)
    shown = str(assemble(ColumnPlan(name, None, dtype, True), np.zeros(0, dtype), np.zeros(0, bool)).dtype)
    return ColumnPlan(name, ColumnSchema("numeric", shown, missing=missing), dtype, nullable=True)


def _is_ordered(name: str, present: Sequence[tuple[PartSummary, str]], what: str) -> bool:
    """The rule's order of a text column, from the (summary, file) of each input holding it: ordered iff every
    one is an ordered categorical with the same categories in the same order.

    When some input has it ordered and another differs, the column is
    stored unordered and a :class:`ConversionWarning` names both files.
    """
    first = next(((s, label) for s, label in present if s.ordered), None)
    if first is None:
        return False
    differs = next(((s, label) for s, label in present if not s.ordered or s.labels != first[0].labels), None)
    if differs is None:
        return True
    s, label = differs
    how = "has other categories or another order" if s.ordered else "is not an ordered categorical"
    warnings.warn(
        f"{what} column {name!r} is an ordered categorical in {first[1]} but {how} in {label}: "
        "the store holds it unordered; make the inputs agree to keep the order",
        ConversionWarning,
        stacklevel=2,
    )
    return False


def encode(plan: ColumnPlan, part: pd.Series | None, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """One input's column (or rows of it; ``None``: the input lacks it, ``n`` rows) as ``(values, mask)``.

    ``values`` has ``plan.values``' dtype (categorical codes, -1 where
    missing); ``mask`` marks missing values of a nullable column, else is None.
    """
    if plan.schema.kind == "categorical":
        if part is None:
            return np.full(n, -1, dtype=np.int32), None
        codes, labels = _text_codes(part)
        remap = plan.categories.get_indexer(np.array(labels, dtype=object))
        return np.where(codes >= 0, remap[codes] if remap.size else codes, -1).astype(np.int32), None
    dtype = plan.values
    if dtype.kind == "f":
        if part is None:
            return np.full(n, np.nan, dtype=dtype), None
        return part.to_numpy(dtype=dtype, na_value=np.nan), None
    if part is None:
        return np.zeros(n, dtype=dtype), np.ones(n, dtype=bool)
    miss = _missing(part)
    values = part.to_numpy(dtype=dtype, na_value=0) if miss.any() else part.to_numpy(dtype=dtype)
    return values, (miss if plan.nullable else None)


def assemble(plan: ColumnPlan, values: np.ndarray, mask: np.ndarray | None):
    """The column pandas holds, from :func:`encode`'s values (concatenated or gathered): a ``Categorical``,
    a numpy array, or a nullable ``BooleanArray``/``IntegerArray``."""
    if plan.schema is not None and plan.schema.kind == "categorical":
        return pd.Categorical.from_codes(values, categories=plan.categories, ordered=plan.schema.ordered)
    if not plan.nullable:
        return values
    return pd.arrays.BooleanArray(values, mask) if values.dtype == np.bool_ else pd.arrays.IntegerArray(values, mask)


def harmonise_column(
    name: str,
    parts: Sequence[pd.Series | None],
    lengths: Sequence[int],
    labels: Sequence[str],
    what: str = "obs",
) -> tuple[pd.Categorical | np.ndarray | pd.api.extensions.ExtensionArray, ColumnSchema]:
    """One column of all inputs, concatenated in input order, with one dtype (see the module's rule).

    The conversion applies the same steps to obs in row blocks
    (:func:`summarise`, :func:`decide`, :func:`encode`, :func:`assemble`);
    this is them in one call, on whole columns.

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
    def summarised(as_text: bool = False) -> list[PartSummary | None]:
        return [None if p is None else summarise(name, p, label, what, as_text) for p, label in zip(parts, labels)]

    plan = decide(name, summarised(mixes_text(summarised())), lengths, labels, what)
    encoded = [encode(plan, part, n) for part, n in zip(parts, lengths)]
    values = np.concatenate([v for v, _ in encoded]) if encoded else np.empty(0, plan.values)
    mask = np.concatenate([m for _, m in encoded]) if plan.nullable else None
    return assemble(plan, values, mask), plan.schema


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
