"""Reading a store file's obs, naming the array when it is damaged."""

from __future__ import annotations

import os

import zarr

from ..errors import StoreError
from .location import StoreLocation, store_location

__all__ = ["read_obs"]


def read_obs(store: str | os.PathLike | StoreLocation, name: str, columns: list[str] | None = None, index: bool = True):
    """The obs of file ``name`` of a store as a ``pandas.DataFrame``, read by anndata.

    ``columns`` reads only those columns (and the index), e.g. the loader's
    ``obs_keys``; with ``index=False`` (and ``columns``) the obs_names are
    not read and the frame gets a ``RangeIndex``: the loader needs none of
    them, and they are the largest part of obs (~70 bytes per cell). zarr verifies each chunk's checksum as it decodes, but its
    errors name no file: here a damaged obs raises a :class:`StoreError` that
    names the array. (Missing chunk files are found earlier, by
    :func:`read_manifest`.)
    """
    import anndata as ad  # not at import time: worker processes import this module
    import pandas as pd

    location = store_location(store)
    where = location.child(name)
    group = location.group(name)
    obs = group["obs"]
    try:
        if columns is None:
            return ad.io.read_elem(obs)
        missing = [c for c in columns if c not in obs.attrs.get("column-order", [])]
        if missing:
            raise StoreError(f"{where}/obs: has no column(s) {missing}; it has {list(obs.attrs.get('column-order', []))}")
        names = obs[obs.attrs.get("_index", "_index")]
        rows = ad.io.read_elem(names) if index else pd.RangeIndex(names.shape[0])
        return pd.DataFrame({c: ad.io.read_elem(obs[c]) for c in columns}, index=rows, columns=list(columns))
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - zarr, zarrs and anndata raise many types
        culprit = _damaged_array(obs) or "obs"
        raise StoreError(f"{where}/{culprit}: cannot be read ({type(e).__name__}: {e}); damaged store") from e


def _damaged_array(group: zarr.Group) -> str | None:
    """The path (relative to the file) of the first array of ``group`` that zarr cannot read."""
    for _, node in group.members(max_depth=None):
        if isinstance(node, zarr.Array):
            try:
                node[...]
            except Exception:  # noqa: BLE001
                return node.path
    return None
