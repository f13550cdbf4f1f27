"""The manifest of a store: written last, read and checked against the files it lists.

A store is a directory of ``chunk_{i}.zarr`` AnnData (zarr v3) files plus
``arrayloaders.json``. The manifest is written last (atomically), so a
directory without it is never taken for a store.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from ..errors import StoreError
from .disk_layout import COMPLETE_ATTRIBUTE
from .format import FORMAT_VERSION, MANIFEST_NAME, READABLE_VERSIONS
from .location import StoreLocation, store_location
from .zarr_layout import missing_chunk_files

__all__ = ["StoreManifest", "check_files", "foreign_entries", "manifest_stamp", "read_manifest", "write_manifest"]


@dataclass(frozen=True)
class StoreManifest:
    """What ``arrayloaders.json`` records about a store."""

    n_obs: int
    n_vars: int
    x_format: Literal["csr", "dense"]
    dtype: str
    files: list[dict[str, Any]]  # [{"name": "chunk_0.zarr", "n_obs": ...}, ...]
    inputs: list[dict[str, Any]]  # [{"path": ..., "n_obs": ...}, ...]
    var_names: list[str]
    obs_schema: dict[str, dict[str, Any]]
    layout: dict[str, Any]
    shuffle: bool
    seed: int
    var_join: str
    source_key: str | None
    obs_join: str | None = None  # None: written before obs joins (version 1), all inputs had every column
    # Version 3. Each file holds layers/<name> with X's shape and layout: {name: {"format": "csr"|"dense", "dtype": ...}}
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    # ... and obsm/<key>, a dense (n_obs, k) array: {key: {"k": k, "dtype": ...}}
    obsm: dict[str, dict[str, Any]] = field(default_factory=dict)
    # A random id given at conversion: a checkpoint resumes only the store it was taken on, not the same
    # inputs converted again (with another seed, or other data of the same sizes). None: written before it.
    store_id: str | None = None
    format_version: int = FORMAT_VERSION
    format: str = "arrayloaders-store"
    created_by: str = field(default_factory=lambda: f"arrayloaders {_version()}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @property
    def identity(self) -> str:
        """What a checkpoint records of this store: its ``store_id`` (or, written before it, a digest of the manifest)."""
        if self.store_id is not None:
            return f"store {self.store_id}"
        return "store (no store_id) sha1 " + hashlib.sha1(self.to_json().encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, text: str, path: Path) -> StoreManifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise StoreError(f"{path}: the manifest is not valid JSON ({e})") from e
        if not isinstance(raw, dict) or raw.get("format") != "arrayloaders-store":
            raise StoreError(f"{path}: not an arrayloaders manifest")
        if raw.get("format_version") not in READABLE_VERSIONS:
            raise StoreError(
                f"{path}: store format version {raw.get('format_version')} is not supported by this "
                f"arrayloaders (reads versions {', '.join(map(str, READABLE_VERSIONS))}); re-create the store "
                "or upgrade arrayloaders"
            )
        try:
            return cls(**raw)
        except TypeError as e:
            raise StoreError(f"{path}: the manifest is missing or has unknown fields ({e})") from e


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("arrayloaders")
    except PackageNotFoundError:
        return "unknown"


def write_manifest(store: Path, manifest: StoreManifest) -> None:
    """Write the manifest atomically: a reader sees the whole file or none."""
    tmp = store / (MANIFEST_NAME + ".partial")
    tmp.write_text(manifest.to_json())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, store / MANIFEST_NAME)


def manifest_stamp(store: str | os.PathLike | StoreLocation) -> tuple | None:
    """What identifies the manifest of ``store`` now, ``None`` if it has none.

    On disk (inode, mtime in ns, size); remote (ETag, version, size, time).
    A conversion writes the manifest last, into a new file (``write_manifest``):
    a store converted again at the same place has another stamp. The device is
    left out, so that the stamp holds in another machine over a shared file system.
    """
    return store_location(store).stamp()


def read_manifest(
    store: str | os.PathLike | StoreLocation, verify: bool = True, storage_options: dict[str, Any] | None = None
) -> StoreManifest:
    """Read and check the manifest of ``store``.

    Parameters
    ----------
    store
        The store directory, or its URL (``s3://bucket/prefix``, ``gs://``, ``az://``, ``https://``).
    verify
        Also check the manifest against the files it lists.
    storage_options
        For a URL: keyword arguments of ``obstore.store.from_url`` (endpoint,
        region, credentials...); without them credentials come from the
        environment. See :doc:`/remote`.

    Raises
    ------
    StoreError
        If ``store`` is not a directory, has no manifest (not a store, or a
        conversion that did not finish), or its chunk files are missing; for a
        URL also if the bucket cannot be read (naming the URL and what the server said).
    """
    location = store_location(store, storage_options)
    if not location.exists():
        raise StoreError(f"{location}: no such store directory")
    path = location.child(MANIFEST_NAME)
    try:
        text = location.read_text(MANIFEST_NAME)
    except OSError as e:
        raise StoreError(str(e)) from None
    if text is None:
        raise StoreError(
            f"{location}: not an arrayloaders store (no {MANIFEST_NAME}); it was not made by "
            "create_store_from_h5ads or its conversion did not finish"
        )
    manifest = StoreManifest.from_json(text, path)
    if verify:
        check_files(location, manifest)
    return manifest


def check_files(store: Path | StoreLocation, manifest: StoreManifest) -> None:
    """Check the manifest against the files it lists, reading zarr metadata only (no chunk data).

    The totals add up, names are unique, every file exists with the shape and
    dtype of X, obs, var, layers and obsm arrays the manifest says, and every chunk file of an
    array written with all its chunks (:data:`~arrayloaders.store.disk_layout.COMPLETE_ATTRIBUTE`)
    is on disk.

    Raises
    ------
    StoreError
        Naming the store (or file) and the manifest field or array at fault.
    """
    location = store_location(store)
    store = location.local if location.local is not None else location

    def edited(field: str, detail: str) -> StoreError:
        return StoreError(f"{store}: the manifest's {field} {detail} (edited or damaged {MANIFEST_NAME})")

    names = [f.get("name") for f in manifest.files]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise edited("'files'", f"list {', '.join(map(str, twice))} more than once")
    counts = [f.get("n_obs") for f in manifest.files]
    if not all(isinstance(n, int) and n >= 0 for n in counts):
        raise edited("'files'", "hold an n_obs that is not a count")
    if manifest.n_obs != sum(counts):
        raise edited("'n_obs'", f"({manifest.n_obs}) is not the sum of its files' n_obs ({sum(counts)})")
    if manifest.n_vars != len(manifest.var_names):
        raise edited("'n_vars'", f"({manifest.n_vars}) differs from the length of 'var_names' ({len(manifest.var_names)})")
    if not location.is_remote:  # a remote file's absence shows as a group that cannot be opened
        missing = [n for n in names if not (store / n).is_dir()]
        if missing:
            raise StoreError(f"{store}: files listed in the manifest are missing: {', '.join(missing)}")
    for entry in manifest.files:
        where = store / entry["name"] if not location.is_remote else _Where(location.child(entry["name"]))
        try:
            group = location.group(entry["name"])
            arrays = {name: node for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}
        except Exception as e:  # noqa: BLE001 - zarr raises many types for damaged metadata
            raise StoreError(f"{where}: cannot be opened as a zarr group ({type(e).__name__}: {e})") from e
        n_obs = entry["n_obs"]
        x_shape, x_dtype = _x_shape_and_dtype(group, arrays, manifest.x_format, where)
        if x_shape != (n_obs, manifest.n_vars):
            raise edited(
                f"'files' entry of {entry['name']}", f"says {n_obs} x {manifest.n_vars}, but its X is {x_shape[0]} x {x_shape[1]}"
            )
        if x_dtype != np.dtype(manifest.dtype):
            raise edited("'dtype'", f"({manifest.dtype}) differs from X of {entry['name']} ({x_dtype})")
        _check_layers_and_obsm(group, arrays, manifest, n_obs, where)
        # a column is an array, or a group (categorical: codes; nullable: values) of arrays of one length
        lengths = {name.split("/")[1]: a.shape[0] for name, a in arrays.items()
                   if name.startswith("obs/") and name.rsplit("/", 1)[-1] not in ("categories", "mask")}  # fmt: skip
        wrong = {c: n for c, n in lengths.items() if n != n_obs}
        if "_index" not in lengths or wrong:
            got = ", ".join(f"{c}: {n}" for c, n in wrong.items()) or "no _index"
            raise StoreError(f"{where}/obs: holds {got} cells, the manifest says {n_obs} (damaged store)")
        columns = list(group["obs"].attrs.get("column-order", []))
        if columns != list(manifest.obs_schema):
            raise edited("'obs_schema'", f"lists columns {list(manifest.obs_schema)}, {entry['name']} holds {columns}")
        if arrays.get("var/_index") is None or arrays["var/_index"].shape != (manifest.n_vars,):
            raise StoreError(f"{where}/var: does not hold the manifest's {manifest.n_vars} genes (damaged store)")
        for name, array in arrays.items():
            if array.attrs.get(COMPLETE_ATTRIBUTE) is True:
                gone = missing_chunk_files(array)
                if gone:
                    raise StoreError(
                        f"{gone[0]}: chunk file of {entry['name']}/{name} is missing (every chunk of this store "
                        "was written: damaged store)"
                    )


class _Where(str):
    """A remote file's URL where messages use a file's path (``f"{where}/X"``, ``where.parent``)."""

    @property
    def parent(self) -> str:
        return self.rsplit("/", 1)[0]


def _x_shape_and_dtype(
    group, arrays: dict, x_format: str, where: Path, path: str = "X"
) -> tuple[tuple[int, int], np.dtype]:
    """(shape, dtype) of a file's X (or a layer at ``path``) from its metadata, checking the parts of a CSR one agree."""
    try:
        if x_format == "csr":
            shape = tuple(int(s) for s in group[path].attrs["shape"])
            data, indices, indptr = arrays[f"{path}/data"], arrays[f"{path}/indices"], arrays[f"{path}/indptr"]
            if data.shape != indices.shape or indptr.shape != (shape[0] + 1,):
                raise StoreError(
                    f"{where}/{path}: data {data.shape}, indices {indices.shape} and indptr {indptr.shape} do not fit "
                    f"a CSR matrix of {shape[0]} rows (damaged store)"
                )
            return shape, np.dtype(data.dtype)
        x = arrays[path]
        return tuple(x.shape), np.dtype(x.dtype)
    except KeyError as e:
        raise StoreError(f"{where}/{path}: {e} is missing (damaged store, or {path} is not {x_format})") from e


def _check_layers_and_obsm(group, arrays: dict, manifest: StoreManifest, n_obs: int, where: Path) -> None:
    """Every layer and obsm array the manifest records is in the file, with its shape and dtype."""
    for name, spec in manifest.layers.items():
        path = f"layers/{name}"
        if not isinstance(spec, dict) or spec.get("format") not in ("csr", "dense"):
            raise StoreError(f"{where.parent}: the manifest's 'layers' entry {name!r} is not valid ({spec!r})")
        shape, dtype = _x_shape_and_dtype(group, arrays, spec["format"], where, path)
        if shape != (n_obs, manifest.n_vars):
            raise StoreError(
                f"{where}/{path}: is {shape[0]} x {shape[1]}, the manifest says {n_obs} x {manifest.n_vars} (damaged store)"
            )
        if dtype != np.dtype(spec.get("dtype")):
            raise StoreError(f"{where}/{path}: holds {dtype}, the manifest says {spec.get('dtype')} (damaged store)")
    for key, spec in manifest.obsm.items():
        path = f"obsm/{key}"
        if not isinstance(spec, dict) or not isinstance(spec.get("k"), int):
            raise StoreError(f"{where.parent}: the manifest's 'obsm' entry {key!r} is not valid ({spec!r})")
        array = arrays.get(path)
        if array is None:
            raise StoreError(f"{where}/{path}: is missing (damaged store)")
        if array.shape != (n_obs, spec["k"]):
            raise StoreError(
                f"{where}/{path}: has shape {array.shape}, the manifest says ({n_obs}, {spec['k']}) (damaged store)"
            )
        if np.dtype(array.dtype) != np.dtype(spec.get("dtype")):
            raise StoreError(f"{where}/{path}: holds {array.dtype}, the manifest says {spec['dtype']} (damaged store)")


def foreign_entries(store: Path, manifest: StoreManifest) -> list[str]:
    """Paths inside ``store`` (relative to it) that the store did not write: a user's files.

    Ours are the manifest, the listed ``chunk_{i}.zarr`` directories, and
    inside those only ``zarr.json`` metadata and chunk files under a ``c``
    directory (``c/0``, ``c/3/0``). Symbolic links are never ours.
    """
    listed = {f["name"] for f in manifest.files}
    foreign = []
    for entry in sorted(os.scandir(store), key=lambda e: e.name):
        if entry.name == MANIFEST_NAME and entry.is_file(follow_symlinks=False):
            continue
        if entry.name not in listed or not entry.is_dir(follow_symlinks=False):
            foreign.append(entry.name)
            continue
        for root, dirs, files in os.walk(entry.path):
            rel = Path(root).relative_to(store)
            links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
            dirs[:] = [d for d in dirs if d not in links]
            for name in links + files:
                if name in links or os.path.islink(os.path.join(root, name)) or not _metadata_or_chunk(rel.parts, name):
                    foreign.append(str(rel / name))
    return foreign


def _metadata_or_chunk(parts: tuple[str, ...], name: str) -> bool:
    """Whether a file at ``parts/name`` is zarr v3 metadata or a chunk key (``…/c/1/0``)."""
    if name == "zarr.json":
        return True
    if not name.isdigit():
        return False
    i = len(parts) - 1
    while i > 0 and parts[i].isdigit():
        i -= 1
    return i > 0 and parts[i] == "c"


# --------------------------------------------------------------------------- reading
