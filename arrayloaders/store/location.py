"""Where a store is: a local directory or a URL of object storage, and its files opened through zarr.

The main process reads a store's metadata, obs and row pointers through zarr;
:class:`StoreLocation` gives it the same zarr groups whether the store is on a
local file system (``zarr.storage.LocalStore``) or remote (zarr's
``ObjectStore`` over obstore, :class:`RemoteZarrStore`, which pickles without
credentials). Workers never import this module: they get array layouts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import zarr
import zarr.storage

from ..errors import StoreError
from .format import MANIFEST_NAME
from .remote import RemoteRoot, is_url, missing_bucket, remote_error

__all__ = ["RemoteZarrStore", "StoreLocation", "store_location"]


#: zarr's metadata documents (v3, and the v2 names zarr looks for when opening a group of unknown format)
_METADATA = frozenset({"zarr.json", ".zgroup", ".zattrs", ".zarray", ".zmetadata"})


class RemoteZarrStore(zarr.storage.ObjectStore):
    """zarr's read-only ``ObjectStore`` on a :class:`~arrayloaders.store.remote.RemoteRoot`.

    It remembers the root (array layouts name it, so that workers fetch from
    it), names its URL in messages, and pickles as the root does: no
    credentials (zarr's own store pickles its obstore store whole).

    Metadata documents are read once per root and process: zarr opens the
    same groups and arrays again (the manifest's check, obs, X, its row
    pointers), and each open of a remote group is a round trip. A store
    changed since is caught by its manifest's version, which is never kept.
    """

    def __init__(self, root: RemoteRoot):
        super().__init__(root.store(), read_only=True)
        self.root = root

    async def get(self, key: str, prototype, byte_range=None):
        if byte_range is not None or key.rsplit("/", 1)[-1] not in _METADATA:
            return await super().get(key, prototype, byte_range)
        known = self.root.metadata
        if key not in known:
            known[key] = await super().get(key, prototype, byte_range)
        return known[key]

    def with_read_only(self, read_only: bool = False) -> RemoteZarrStore:
        if not read_only:
            raise ValueError(f"{self.root.url}: opened read-only")
        return self

    def __reduce__(self):
        return (RemoteZarrStore, (self.root,))

    def __str__(self) -> str:
        return self.root.url

    def __repr__(self) -> str:
        return f"RemoteZarrStore({self.root.url!r})"


class StoreLocation:
    """A store's directory or URL: its files as zarr groups, its manifest, and a label for messages.

    Parameters
    ----------
    path
        A local directory, or a URL (``s3://bucket/prefix``, ``gs://``, ``az://``, ``https://``).
    storage_options
        For a URL: keyword arguments of ``obstore.store.from_url``. Refused for a local path.
    cache
        For a URL: (directory, bytes) of a local cache of the bytes fetched
        (:mod:`~arrayloaders.store.remote_cache`). Refused for a local path.
    """

    def __init__(self, path: str | os.PathLike, storage_options: dict[str, Any] | None = None,
                 cache: tuple[str, int] | None = None):  # fmt: skip
        if is_url(path):
            self.local, self.remote = None, RemoteRoot(str(path), storage_options, cache=cache)
        else:
            for name, given in (("storage_options", storage_options), ("cache_dir", cache)):
                if given:
                    raise ValueError(f"{path}: {name} is for URLs of object storage (s3://...), not local paths")
            self.local, self.remote = Path(path), None

    def __str__(self) -> str:
        return str(self.local) if self.remote is None else self.remote.url

    def __repr__(self) -> str:
        return f"StoreLocation({str(self)!r})"

    def __fspath__(self) -> str:
        if self.local is None:
            raise TypeError(f"{self}: a remote store has no local path")
        return str(self.local)

    @property
    def is_remote(self) -> bool:
        return self.remote is not None

    def child(self, name: str) -> str:
        """The path or URL of ``name`` inside the store, for messages."""
        return str(self.local / name) if self.remote is None else self.remote.child(name)

    def zarr_store(self):
        """The zarr store of the whole store directory (files are groups inside it)."""
        if self.remote is None:
            return zarr.storage.LocalStore(self.local, read_only=True)
        return RemoteZarrStore(self.remote)

    def group(self, name: str) -> zarr.Group:
        """File ``name`` of the store (``chunk_0.zarr``) as a read-only zarr group."""
        if self.remote is None:
            return zarr.open_group(self.local / name, mode="r")
        return zarr.open_group(RemoteZarrStore(self.remote), path=name, mode="r")

    def read_text(self, name: str) -> str | None:
        """The text of file ``name`` at the top of the store; ``None`` if there is none."""
        if self.remote is None:
            path = self.local / name
            return path.read_text() if path.is_file() else None
        import obstore

        try:
            return bytes(obstore.get(self.remote.store(), name).bytes()).decode()
        except FileNotFoundError as e:
            if missing_bucket(e):
                raise remote_error(self.child(name), e, "cannot be read: no such bucket") from None
            return None
        except Exception as e:  # noqa: BLE001 - obstore's errors: one line naming the object
            raise remote_error(self.child(name), e) from None

    def exists(self) -> bool:
        """Whether the store's directory exists (remote: always, a prefix needs no directory)."""
        return self.remote is not None or self.local.is_dir()

    def stamp(self) -> tuple | None:
        """What identifies this version of the manifest: (inode, mtime, size) on disk, (ETag, version, size) remote.

        ``None`` where there is no manifest. A conversion writes a new manifest
        last, so a store converted again at the same place has another stamp.
        """
        if self.remote is None:
            try:
                st = os.stat(self.local / MANIFEST_NAME)
            except FileNotFoundError:
                return None
            return st.st_ino, st.st_mtime_ns, st.st_size
        import obstore

        try:
            meta = obstore.head(self.remote.store(), MANIFEST_NAME)
        except FileNotFoundError as e:
            if missing_bucket(e):
                raise remote_error(self.child(MANIFEST_NAME), e, "cannot be read: no such bucket") from None
            return None
        except Exception as e:  # noqa: BLE001
            raise remote_error(self.child(MANIFEST_NAME), e) from None
        return meta.get("e_tag"), meta.get("version"), int(meta["size"]), str(meta.get("last_modified"))


def store_location(path: str | os.PathLike | StoreLocation, storage_options: dict[str, Any] | None = None,
                   cache: tuple[str, int] | None = None) -> StoreLocation:  # fmt: skip
    """``path`` (a directory, a URL, or a location already) as a :class:`StoreLocation`."""
    if isinstance(path, StoreLocation):
        if storage_options or cache:
            raise ValueError(f"{path}: storage_options or a cache given twice (the location has its own)")
        return path
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a store is a path or a URL, not {type(path).__name__}")
    return StoreLocation(path, storage_options, cache)


def unreachable(location: StoreLocation, error: BaseException) -> StoreError:
    """A :class:`StoreError` for a remote store that cannot be read at all (bucket, credentials, server)."""
    return StoreError(str(error) if str(error).startswith(str(location)) else f"{location}: {error}")
