"""obs through the conversion, out of core: each cell's obs as one fixed-width record.

The conversion never holds all cells' obs. It reads each input's obs in
row blocks twice:

1. :func:`plan_obs` summarises every kept column of every input
   (``columns.summarise``: kinds, dtypes, categories; no values kept) and
   decides one dtype per column by the documented rule (``columns.decide``);
2. the passes (``buckets.py``) move each cell's obs as a record of fixed
   width (:meth:`ObsPlan.records`: its name as UTF-8 bytes, a categorical's
   code, a number, a missing-value flag), scattered with X into the bucket
   of its output file; each output file's obs is rebuilt from its records
   (:meth:`ObsPlan.frame`).

Reading obs in row blocks: anndata has no public partial read of a
dataframe column, so :class:`InputObs` reads the AnnData on-disk format (its
published specification) with h5py for the encodings anndata writes for obs
columns (``array``, ``string-array``, ``categorical``, ``nullable-integer``,
``nullable-boolean``, ``nullable-string-array``), and reads any other
encoding whole with ``anndata.io.read_elem``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from ..errors import InputFileError
from .columns import (
    ColumnPlan,
    ColumnSchema,
    PartSummary,
    assemble,
    check_name,
    decide,
    encode,
    join_columns,
    mixes_text,
    summarise,
)

__all__ = ["InputObs", "ObsPlan", "column_order", "plan_obs"]

#: rows of obs read at once (names and every kept column): a few MiB
BLOCK_ROWS = 2**17


def column_order(group: h5py.Group) -> list[str]:
    """The column names of a dataframe stored by anndata (its ``column-order``), without reading a column."""
    order = group.attrs.get("column-order", [])
    return [str(c) for c in (order.tolist() if isinstance(order, np.ndarray) else order)]


class InputObs:
    """The obs of one open ``.h5ad``, read in row blocks."""

    def __init__(self, path: Path, f: h5py.File):
        self.path = path
        group = f.get("obs")
        if not isinstance(group, h5py.Group):
            raise InputFileError(f"{path}: not an AnnData file (no obs group)")
        self._group = group
        self.columns = column_order(group)
        index = group.attrs.get("_index")
        if index is None or index not in group:
            raise InputFileError(f"{path}: obs has no index (obs_names); not an AnnData file")
        self._index = str(index)
        self._whole: dict[str, pd.Series] = {}  # columns of an encoding read whole
        self._categories: dict[str, pd.CategoricalDtype] = {}  # read once per column, not once per block
        self.n_obs = self._length(self._index)

    def _length(self, key: str) -> int:
        node = self._group[key]
        if isinstance(node, h5py.Dataset):
            return int(node.shape[0])
        for part in ("codes", "values"):
            if part in node:
                return int(node[part].shape[0])
        return len(self._read_whole(key))

    def _read_whole(self, key: str) -> pd.Series:
        if key not in self._whole:
            try:
                self._whole[key] = pd.Series(ad.io.read_elem(self._group[key]))
            except Exception as e:  # anndata raises many types for malformed elements
                raise InputFileError(f"{self.path}: cannot read obs column {key!r} ({type(e).__name__}: {e})") from e
        return self._whole[key]

    def column(self, key: str, r0: int, r1: int) -> pd.Series:
        """Rows ``r0:r1`` of obs column ``key``, as ``anndata.io.read_elem`` would give them."""
        node = self._group[key]
        encoding = node.attrs.get("encoding-type")
        try:
            if encoding == "array" and isinstance(node, h5py.Dataset) and node.ndim == 1:
                return pd.Series(node[r0:r1])
            if encoding == "string-array" and isinstance(node, h5py.Dataset):
                return pd.Series(node.asstr()[r0:r1], dtype=object)
            if encoding == "categorical":
                if key not in self._categories:
                    categories = pd.Index(ad.io.read_elem(node["categories"]))
                    ordered = bool(node.attrs.get("ordered", False))
                    self._categories[key] = pd.CategoricalDtype(categories, ordered=ordered)
                codes = node["codes"][r0:r1]
                return pd.Series(pd.Categorical.from_codes(codes, dtype=self._categories[key]))
            if encoding in ("nullable-integer", "nullable-boolean"):
                values, mask = node["values"][r0:r1], node["mask"][r0:r1].astype(bool)
                array = pd.arrays.BooleanArray if encoding == "nullable-boolean" else pd.arrays.IntegerArray
                return pd.Series(array(values, mask))
            if encoding == "nullable-string-array":
                values = node["values"].asstr()[r0:r1].astype(object)
                values[node["mask"][r0:r1].astype(bool)] = None
                return pd.Series(values, dtype=object)
        except (KeyError, OSError, ValueError, TypeError) as e:
            raise InputFileError(f"{self.path}: cannot read obs column {key!r} ({type(e).__name__}: {e})") from e
        return self._read_whole(key).iloc[r0:r1].reset_index(drop=True)

    def names(self, r0: int, r1: int) -> np.ndarray:
        """obs_names of rows ``r0:r1`` as UTF-8 bytes (an object array of ``bytes``)."""
        node = self._group[self._index]
        if isinstance(node, h5py.Dataset) and h5py.check_string_dtype(node.dtype) is not None:
            raw = node[r0:r1]
            return np.array([b if isinstance(b, bytes) else str(b).encode() for b in raw], dtype=object)
        values = self.column(self._index, r0, r1).astype(str)
        return np.array([v.encode() for v in values], dtype=object)

    def blocks(self) -> Iterator[tuple[int, int]]:
        for r0 in range(0, self.n_obs, BLOCK_ROWS):
            yield r0, min(r0 + BLOCK_ROWS, self.n_obs)


@dataclass(frozen=True)
class ObsPlan:
    """How obs travels through the conversion: the kept columns' plans and the record of a cell."""

    columns: tuple[ColumnPlan, ...]
    names_width: int
    source_key: str | None
    sources: tuple[str, ...]  # each input's label (the source column's categories)

    @property
    def dtype(self) -> np.dtype:
        """A cell's record: ``name`` (UTF-8, zero-padded), then per column its values (``v<i>``) and mask (``m<i>``)."""
        fields = [("name", f"S{self.names_width}")]
        for i, c in enumerate(self.columns):
            fields.append((f"v{i}", c.values))
            if c.nullable:
                fields.append((f"m{i}", np.bool_))
        if self.source_key is not None:
            fields.append(("source", np.min_scalar_type(max(len(self.sources) - 1, 0))))
        return np.dtype(fields)

    @property
    def schema(self) -> dict[str, dict]:
        """Each column's :class:`ColumnSchema` as the manifest records it."""
        out = {c.name: c.schema.to_json() for c in self.columns}
        if self.source_key is not None:
            out[self.source_key] = ColumnSchema("categorical", "category", self.sources).to_json()
        return out

    def records(self, obs: InputObs, source: int, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` of input ``source``'s obs as records."""
        out = np.empty(r1 - r0, dtype=self.dtype)
        names = obs.names(r0, r1)
        out["name"] = names
        lengths = np.fromiter(map(len, names), dtype=np.int64, count=names.size)
        if (lengths > self.names_width).any() or (np.char.str_len(out["name"]) != lengths).any():
            # HDF5 strings cannot end in NUL (which the fixed-width record would drop): the file changed
            raise InputFileError(f"{obs.path}: obs_names changed while the conversion read them")
        for i, c in enumerate(self.columns):
            part = obs.column(c.name, r0, r1) if c.name in obs.columns else None
            values, mask = encode(c, part, r1 - r0)
            out[f"v{i}"] = values
            if c.nullable:
                out[f"m{i}"] = mask
        if self.source_key is not None:
            out["source"] = source
        return out

    def frame(self, records: np.ndarray) -> pd.DataFrame:
        """The obs DataFrame of these records (in their order), dtypes as the plan says."""
        values = {}
        for i, c in enumerate(self.columns):
            values[c.name] = assemble(c, records[f"v{i}"], records[f"m{i}"] if c.nullable else None)
        if self.source_key is not None:
            values[self.source_key] = pd.Categorical.from_codes(
                records["source"].astype(np.int32), categories=pd.Index(list(self.sources), dtype=object)
            )
        names = np.char.decode(records["name"], "utf-8").astype(object)
        return pd.DataFrame(values, index=pd.Index(names, dtype=object), columns=list(values))


def plan_obs(
    paths: Sequence[Path],
    labels: Sequence[str],
    obs_join: str,
    obs_columns: Sequence[str] | None,
    source_key: str | None,
) -> ObsPlan:
    """Read every input's obs in row blocks once and decide how each kept column is stored.

    Raises
    ------
    InputFileError
        An obs column the rule cannot store, or that cannot be read, or whose
        name has a ``/`` or is empty (:func:`~arrayloaders.convert.columns.check_name`);
        a ``source_key`` that is also an obs column. The message names the file.
    """
    columns_of, n_obs, width = [], [], 1
    for path in paths:
        with h5py.File(path, "r") as f:
            obs = InputObs(path, f)
            columns_of.append(obs.columns)
            n_obs.append(obs.n_obs)
            for r0, r1 in obs.blocks():
                names = obs.names(r0, r1)
                if names.size:
                    width = max(width, max(map(len, names)))
    frames = [pd.DataFrame(columns=pd.Index(c, dtype=object)) for c in columns_of]
    kept = join_columns(frames, labels, obs_join, obs_columns)
    for c in kept:  # before any value is read: the first input holding a name the store cannot hold is named
        first = next(label for label, names in zip(labels, columns_of) if c in names)
        check_name(first, "obs column", c, "obs_columns=[...]")
    if source_key is not None and source_key in kept:
        raise InputFileError(
            f"obs column {source_key!r} exists in the inputs and would be overwritten by the source "
            "file column; pass another source_key= (or source_key=None)"
        )
    summaries = {c: [None] * len(paths) for c in kept}

    def summarise_inputs(names: list[str], as_text: bool) -> None:
        for i, path in enumerate(paths):
            with h5py.File(path, "r") as f:
                obs = InputObs(path, f)
                for c in names:
                    if c not in obs.columns:
                        continue
                    whole: PartSummary | None = None
                    for r0, r1 in obs.blocks():
                        s = summarise(c, obs.column(c, r0, r1), labels[i], "obs", as_text)
                        whole = s if whole is None else whole.merge(s)
                    if whole is None:  # an input without cells: its column's dtype still counts
                        whole = summarise(c, obs.column(c, 0, 0), labels[i], "obs", as_text)
                    summaries[c][i] = whole

    summarise_inputs(kept, as_text=False)
    mixed = [c for c in kept if mixes_text(summaries[c])]
    if mixed:  # numbers meet text: the numbers become text, so read those columns again as text
        summarise_inputs(mixed, as_text=True)
    plans = tuple(decide(c, summaries[c], n_obs, labels) for c in kept)
    return ObsPlan(plans, width, source_key, tuple(labels))
