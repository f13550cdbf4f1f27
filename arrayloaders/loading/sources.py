"""What a dataset reads: the X (or a layer, an obsm array) of each added AnnData or store file, and an
identity of what was added.

``add_store`` and ``add_anndatas`` turn what they are given into :class:`~arrayloaders.store.disk_layout.XSource`
descriptions (enough to reopen an array in a worker) here, refusing what the loader cannot serve
with a message naming the file or AnnData.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import zarr

from ..store.disk_layout import XSource
from ..store.format import MANIFEST_NAME
from ..store.location import StoreLocation, store_location

__all__ = [
    "anndatas_id", "data_label", "key_list", "obsm_source", "shuffled_at_conversion", "store_obsm_source",
    "store_source", "x_source",
]  # fmt: skip


def x_source(adata: ad.AnnData, i: int, layer: str | None = None) -> XSource:
    """Describe an AnnData's zarr-backed X (or ``layers[layer]``), or explain why the loader cannot serve it."""
    where = f"AnnData #{i}"
    if layer is None:
        return _element_source(adata.X, where)
    if layer not in adata.layers:
        # anndata 0.13 lists X among the layers, as None
        raise ValueError(f"{where} has no layer {layer!r}; its layers: {[k for k in adata.layers if k is not None]}")
    return _element_source(adata.layers[layer], f"{where} layers[{layer!r}]")


def store_source(path: str | os.PathLike | StoreLocation, file_name: str, layer: str | None) -> XSource:
    """The X (or ``layers[layer]``) of one file of a store, opened without building an AnnData."""
    location = store_location(path)
    group = location.group(file_name)
    where = location.child(file_name)
    if layer is None:
        element = group["X"]
    else:
        layers = group.get("layers")
        if layers is None or layer not in layers:
            names = sorted(layers.keys()) if layers is not None else []
            raise ValueError(f"{where}: has no layer {layer!r}; its layers: {names}")
        element, where = layers[layer], f"{where}/layers/{layer}"
    source = _element_source(ad.io.sparse_dataset(element) if isinstance(element, zarr.Group) else element, where)
    return dataclasses.replace(source, file=group.path)


def key_list(keys: str | Sequence[str] | None) -> list[str]:
    return [] if keys is None else [keys] if isinstance(keys, str) else list(keys)


def obsm_source(adata: ad.AnnData, i: int, key: str) -> XSource:
    """An AnnData's zarr-backed ``obsm[key]``, or why the loader cannot read it."""
    if key not in adata.obsm:
        raise ValueError(f"AnnData #{i} has no obsm {key!r}; its obsm: {list(adata.obsm)}")
    return _array_source(adata.obsm[key], f"AnnData #{i} obsm[{key!r}]")


def store_obsm_source(path: str | os.PathLike | StoreLocation, file_name: str, key: str) -> XSource:
    location = store_location(path)
    group = location.group(file_name)
    obsm = group.get("obsm")
    where = location.child(file_name)
    if obsm is None or key not in obsm:
        names = sorted(obsm.keys()) if obsm is not None else []
        raise ValueError(f"{where}: has no obsm {key!r}; its obsm: {names}")
    return dataclasses.replace(_array_source(obsm[key], f"{where}/obsm/{key}"), file=group.path)


def _array_source(array, where: str) -> XSource:
    if not isinstance(array, zarr.Array) or array.ndim != 2:
        raise ValueError(f"{where}: is {type(array).__name__}, not a 2-d zarr array (n_obs x k)")
    if np.dtype(array.dtype).kind not in "biuf":
        raise ValueError(f"{where}: holds {array.dtype}, not numbers")
    return XSource(array.store, array.path, "dense", array.shape[0], array.shape[1], str(array.dtype))


def _element_source(X, where: str) -> XSource:
    """Describe a zarr-backed matrix (X or a layer), or explain why the loader cannot serve it."""
    if X is None:
        raise ValueError(f"{where} has no X")
    if isinstance(X, ad.abc.CSRDataset | ad.abc.CSCDataset):
        group = X.group
        if not isinstance(group, zarr.Group):
            raise ValueError(
                f"{where}: X is backed by an .h5ad (HDF5) file ({getattr(group, 'file', group)}); the loader "
                "reads zarr stores only. Convert with arrayloaders.create_store_from_h5ads"
            )
        if X.format != "csr":
            raise ValueError(f"{where}: stored as CSC at {group.store}/{group.path}; the loader needs CSR rows")
        return XSource(group.store, group.path, "csr", X.shape[0], X.shape[1], str(X.dtype))
    if isinstance(X, zarr.Array):
        if X.ndim != 2:
            raise ValueError(f"{where}: X is a {X.ndim}-d zarr array; expected 2-d")
        return XSource(X.store, X.path, "dense", X.shape[0], X.shape[1], str(X.dtype))
    raise ValueError(
        f"{where}: X is {type(X).__name__}, not a zarr-backed array. Pass "
        "X=ad.io.sparse_dataset(zarr.open(path)['X']) (CSR) or X=zarr.open(path)['X'] (dense), "
        "or use add_store(path)"
    )


def anndatas_id(adatas: Sequence[ad.AnnData]) -> str:
    """What a checkpoint records of added AnnData objects: a digest of their sizes and obs names, in order."""
    digest = hashlib.sha1()
    for a in adatas:
        digest.update(f"{a.n_obs}x{a.n_vars};".encode())
        digest.update(pd.util.hash_array(np.asarray(a.obs_names, dtype=object)).tobytes())
    return f"{len(adatas)} AnnData objects sha1 {digest.hexdigest()[:16]}"


def data_label(source: XSource) -> str:
    """Where the data of ``source`` is, for messages: its store's directory (or URL)."""
    where = source.location
    return where.rsplit("/", 1)[0] if where is not None else "the added AnnData objects"


def shuffled_at_conversion(source: XSource) -> bool:
    """Whether ``source`` is a file of a store that ``create_store_from_h5ads`` shuffled (its manifest says so)."""
    root = getattr(source.store, "root", None)
    if root is None:
        return False
    if not isinstance(root, (str, os.PathLike)):  # remote: add_store knows it from the manifest it read
        return False
    manifest = Path(root).parent / MANIFEST_NAME
    try:
        return bool(json.loads(manifest.read_text()).get("shuffle", False))
    except (OSError, ValueError, AttributeError):
        return False
