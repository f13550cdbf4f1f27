"""A conversion into object storage: built on local disk, put in the bucket, each object checked, the manifest last.

(:func:`prepare_output` chooses, for any output, where a conversion builds its store: here for a URL, a hidden
sibling for a local directory, :mod:`~arrayloaders.convert.output`.)

The store is built as a local one is (in ``tmp_dir``, within the memory
budget), then uploaded with bounded concurrency (obstore uses multipart
uploads for large shards); each object's size and ETag (the MD5 of its bytes,
or of its parts' MD5s, on S3-compatible servers) is compared with the local
file. The manifest is put last: it is the commit point, as on disk.

**Readers of an older store never read the new one's bytes.** A store's files
go under a generation prefix of their own (``g-<store_id>/chunk_0.zarr``, named
so in its manifest), so an upload never writes over an object a reader may be
fetching; a reader of the old store notices the new manifest at its next epoch
(its ETag) and refuses it. The old store's objects are deleted only once the
new manifest is in place.

**Nothing that is not a store's is ever deleted.** An existing prefix is
replaced only with ``overwrite=True`` and only if every object under it
belongs to a store: its manifest, and zarr metadata and chunk keys under the
files the manifest lists or under other generation prefixes (what a failed
upload left). A failed or interrupted upload leaves no manifest and deletes
what it put; if it cannot (the process killed), the next conversion to the
prefix does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import StoreError
from ..interrupts import sigint_deferred
from ..store.format import MANIFEST_NAME
from ..store.location import StoreLocation, store_location
from ..store.remote import is_url, remote_error
from .output import StagedOutput, check_output

__all__ = ["RemoteOutput", "UPLOAD_CONCURRENCY", "prepare_output"]

#: Objects put at once (each large one in parts, up to obstore's own concurrency).
UPLOAD_CONCURRENCY = 8
PART_BYTES = 5 * 2**20  # obstore's multipart part size (its default), for the expected ETag
_GENERATION = re.compile(r"^g-[0-9a-f]{12,32}$")


def prepare_output(output_path, inputs, overwrite: bool, tmp_dir, storage_options) -> StagedOutput | RemoteOutput:
    """Where a conversion builds its store, checked before any work: a hidden sibling of a local ``output_path``
    (:class:`~arrayloaders.convert.output.StagedOutput`), or a local directory uploaded to a URL (:class:`RemoteOutput`).

    Raises
    ------
    StoreError
        An existing store without ``overwrite``, something that is not a store's in the way, an input inside
        the output, ``tmp_dir`` inside a local output.
    """
    if is_url(output_path):
        output = RemoteOutput(store_location(output_path, storage_options), overwrite, tmp_dir)
        output.check()
        return output
    if storage_options:
        raise ValueError(f"{output_path}: storage_options are for URLs of object storage (s3://...), not local paths")
    out = check_output(output_path, inputs, overwrite)
    if tmp_dir is not None:
        scratch_parent = Path(os.path.realpath(tmp_dir))
        if scratch_parent == out or out in scratch_parent.parents:
            raise StoreError(f"tmp_dir={tmp_dir} is inside the output {output_path}; choose a directory outside it")
    return StagedOutput(out)


class RemoteOutput:
    """A local directory to build a store in (``path``); :meth:`commit` uploads it to ``location``.

    Used as a context manager, like :class:`~arrayloaders.convert.output.StagedOutput`:
    leaving without a commit removes the local directory (and anything put in the bucket).
    """

    def __init__(self, location: StoreLocation, overwrite: bool, tmp_dir: str | os.PathLike | None = None):
        self.location, self.overwrite = location, overwrite
        self._tmp_dir = tmp_dir
        self.path: Path | None = None
        self._put: list[str] = []  # keys put so far: deleted if the upload does not finish

    def check(self) -> None:
        """Refuse before any work: an existing store without ``overwrite``, or a prefix holding others' objects."""
        manifest, foreign = self._existing()
        if foreign:
            raise StoreError(f"{self.location}: holds objects that are not an arrayloaders store's (e.g. "
                             f"{self.location.child(foreign[0])}); choose another prefix")  # fmt: skip
        if manifest is not None and not self.overwrite:
            raise StoreError(f"{self.location}: already holds a store; pass overwrite=True to replace it")

    def __enter__(self) -> RemoteOutput:
        self.path = Path(tempfile.mkdtemp(prefix=".arrayloaders-upload-", dir=self._tmp_dir))
        return self

    def __exit__(self, *exc) -> None:
        with sigint_deferred():  # a second Ctrl-C must not leave half an upload (or the local copy) behind
            if self._put:
                try:
                    self._delete(self._put)
                except OSError:
                    pass  # the next conversion to this prefix removes them (they are under no manifest)
            if self.path is not None:
                shutil.rmtree(self.path, ignore_errors=True)

    # ------------------------------------------------------------------ what is there

    def _list(self) -> list[str]:
        import obstore

        try:
            return [meta["path"] for batch in obstore.list(self.location.remote.store()) for meta in batch]
        except Exception as e:  # noqa: BLE001 - obstore's errors: one line naming the prefix
            raise StoreError(str(remote_error(str(self.location), e, "cannot be listed"))) from None

    def _existing(self) -> tuple[dict | None, list[str]]:
        """(the manifest there, or None; the keys under the prefix that are no store's)."""
        text = self.location.read_text(MANIFEST_NAME)
        manifest = json.loads(text) if text is not None else None
        listed = {f["name"] for f in (manifest or {}).get("files", []) if isinstance(f, dict) and "name" in f}
        foreign = [key for key in self._list() if key != MANIFEST_NAME and not _store_key(key, listed)]
        return manifest, foreign

    # ------------------------------------------------------------------ the upload

    def commit(self) -> None:
        """Upload the store built in ``path`` (its manifest written), then remove the store it replaces."""
        local = json.loads((self.path / MANIFEST_NAME).read_text())
        old_manifest, foreign = self._existing()  # again: the prefix may have changed while we converted
        if foreign or (old_manifest is not None and not self.overwrite):
            self.check()
        generation = f"g-{local['store_id'][:16]}"
        files = [p for p in self.path.rglob("*") if p.is_file() and p.name != MANIFEST_NAME]
        keys = [f"{generation}/{p.relative_to(self.path).as_posix()}" for p in files]
        self._put = keys
        with ThreadPoolExecutor(UPLOAD_CONCURRENCY) as pool:
            list(pool.map(self._put_checked, files, keys))
        for entry in local["files"]:
            entry["name"] = f"{generation}/{entry['name']}"
        manifest = json.dumps(local, indent=1).encode()
        with sigint_deferred():  # the commit point: put whole, and then the upload is no longer ours to undo
            self._put_object(MANIFEST_NAME, manifest)
            self._put = []
        old_listed = {f["name"] for f in (old_manifest or {}).get("files", []) if isinstance(f, dict) and "name" in f}
        old = [key for key in self._list()
               if key != MANIFEST_NAME and not key.startswith(generation + "/") and _store_key(key, old_listed)]  # fmt: skip
        if old:
            self._delete(old)

    def _put_checked(self, path: Path, key: str) -> None:
        import obstore

        size = path.stat().st_size
        try:
            result = obstore.put(self.location.remote.store(), key, path, chunk_size=PART_BYTES)
            meta = obstore.head(self.location.remote.store(), key)
        except Exception as e:  # noqa: BLE001
            raise StoreError(str(remote_error(self.location.child(key), e, "could not be uploaded"))) from None
        etag = (result.get("e_tag") or meta.get("e_tag") or "").strip('"')
        if int(meta["size"]) != size:
            raise StoreError(f"{self.location.child(key)}: uploaded {meta['size']} bytes of {size} (try again)")
        if re.fullmatch(r"[0-9a-f]{32}(-\d+)?", etag) and etag not in _expected_etags(path):
            raise StoreError(f"{self.location.child(key)}: the uploaded bytes differ from {path} (ETag {etag}; try again)")

    def _put_object(self, key: str, data: bytes) -> None:
        import obstore

        try:
            obstore.put(self.location.remote.store(), key, data)
        except Exception as e:  # noqa: BLE001
            raise StoreError(str(remote_error(self.location.child(key), e, "could not be uploaded"))) from None

    def _delete(self, keys: list[str]) -> None:
        import obstore

        store = self.location.remote.store()
        for i in range(0, len(keys), 1000):
            try:
                obstore.delete(store, keys[i : i + 1000])
            except Exception as e:  # noqa: BLE001
                raise OSError(str(remote_error(self.location.child(keys[i]), e, "could not be deleted"))) from None


def _store_key(key: str, listed: set[str]) -> bool:
    """Whether ``key`` belongs to a store: under a file its manifest lists, or under a generation prefix, and a
    zarr metadata or chunk key there."""
    parts = key.split("/")
    if _GENERATION.match(parts[0]):
        parts = parts[1:]
    elif parts[0] not in listed:
        return False
    if not parts or not re.fullmatch(r"chunk_\d+\.zarr", parts[0]):
        return False
    name = parts[-1]
    if name == "zarr.json":
        return True
    # chunk keys: .../c/<i>[/<j>...]
    i = len(parts) - 1
    while i > 0 and parts[i].isdigit():
        i -= 1
    return i < len(parts) - 1 and parts[i] == "c"


def _expected_etags(path: Path) -> set[str]:
    """The S3 ETags of ``path`` uploaded whole (its MD5) or in parts of :data:`PART_BYTES` (MD5 of the parts'
    MD5s, ``-`` the number of parts)."""
    whole, parts = hashlib.md5(usedforsecurity=False), []
    with open(path, "rb") as f:
        while block := f.read(PART_BYTES):
            whole.update(block)
            parts.append(hashlib.md5(block, usedforsecurity=False).digest())
    joined = hashlib.md5(b"".join(parts), usedforsecurity=False).hexdigest()
    return {whole.hexdigest(), f"{joined}-{len(parts)}"}
