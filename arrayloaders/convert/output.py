"""The output directory of a conversion: what may be replaced, and replacing it safely.

A new store is built in a hidden sibling of the output directory (same
parent, so renames stay on one filesystem and are atomic) and moved into
place only once its manifest is written. An existing store is swapped with
the new one in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``) and
then deleted, so ``output_path`` is at every instant either the complete old
store or the complete new one; where the kernel or filesystem cannot swap,
two renames leave a short window in which ``output_path`` does not exist,
never one in which it holds a partial store.

The sibling's name carries the host and process id, so a later conversion
removes what a killed one left (:func:`remove_dead_siblings`). Nothing that
is not an arrayloaders store, or that holds a file the store's manifest does
not account for, is ever replaced or deleted.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from ..errors import ArrayloadersError, ConversionWarning, StoreError
from ..interrupts import sigint_deferred
from ..store.manifest import foreign_entries, read_manifest

__all__ = ["StagedOutput", "check_output", "exchange_paths", "remove_dead_siblings", "scratch_directory"]

# A file inside every directory we create and may have to delete after a
# crash: cleanup removes only directories that carry it (or that are
# complete stores).
MARKER = ".arrayloaders-in-progress"


def check_output(output: str | os.PathLike, inputs: Sequence[Path], overwrite: bool) -> Path:
    """Check that a store may be written at ``output``; return its resolved path.

    Raises
    ------
    StoreError
        ``output`` is an input file, an input's directory or one of its
        parents (also through symlinks or ``..``); it is a file; or it is a
        non-empty directory and either ``overwrite`` is false or it is not
        an arrayloaders store holding only the store's own files.
    """
    given = Path(output)
    out = Path(os.path.realpath(given))
    for path in inputs:
        # Both where the input's directory entry is and what it points to.
        for where in {Path(os.path.realpath(path)), Path(os.path.realpath(path.parent)) / path.name}:
            if where == out:
                raise StoreError(f"{given}: is the input file {path}; choose another output directory")
            if out in where.parents:
                raise StoreError(
                    f"{given}: contains the input file {path}; a store there would replace it. "
                    "Choose an output directory that holds no input"
                )
    if out.exists() and not out.is_dir():
        raise StoreError(f"{given}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise StoreError(f"{given}: already exists and is not empty; pass overwrite=True to replace it")
        check_replaceable(out, given)
    return out


def check_replaceable(out: Path, given: Path | None = None) -> None:
    """Raise unless ``out`` is an arrayloaders store that holds nothing but its own files."""
    given = given or out
    try:
        manifest = read_manifest(out, verify=False)
    except ArrayloadersError as e:
        held = sorted(p.name for p in out.iterdir())
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        raise StoreError(
            f"{given}: is not an arrayloaders store (it holds {shown}); refusing to replace it. "
            f"Choose another output directory ({e})"
        ) from e
    foreign = foreign_entries(out, manifest)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise StoreError(
            f"{given}: the store holds files that are not part of it ({shown}); refusing to replace it. "
            "Move them out first"
        )


# --------------------------------------------------------------------------- staging


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:32] or "host"


def _sibling_name(prefix: str) -> str:
    return f"{prefix}.arrayloaders-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _sibling_pattern(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix) + r"\.arrayloaders-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _make_marked_dir(path: Path) -> Path:
    path.mkdir()
    (path / MARKER).touch()
    return path


def remove_tree(path: Path) -> None:
    """Delete a directory we created, its marker last: if we are killed half-way, it still carries it."""
    marker = path / MARKER
    if not marker.exists():
        marker.touch()
    for entry in os.scandir(path):
        if entry.name == MARKER:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    marker.unlink()
    path.rmdir()


def _ours_to_remove(path: Path) -> bool:
    """Whether a dead conversion's directory holds only what we put there."""
    if (path / MARKER).exists() or not any(path.iterdir()):
        return True
    try:
        return not foreign_entries(path, read_manifest(path, verify=False))
    except ArrayloadersError:
        return False


def remove_dead_siblings(directory: Path, prefix: str) -> list[Path]:
    """Remove directories ``{prefix}.arrayloaders-{host}-{pid}-…`` in ``directory`` left by dead conversions.

    Only those of this host whose process is gone, and that carry our
    marker (or are complete stores with nothing foreign inside), are removed.
    """
    removed = []
    if not directory.is_dir():
        return removed
    pattern, host = _sibling_pattern(prefix), _host()
    for entry in directory.iterdir():
        m = pattern.fullmatch(entry.name)
        if not m or m["host"] != host or _alive(int(m["pid"])) or not entry.is_dir() or entry.is_symlink():
            continue
        if _ours_to_remove(entry):
            remove_tree(entry)
            removed.append(entry)
    return removed


def scratch_directory(parent: Path) -> Path:
    """A fresh marked directory for temporary buckets in ``parent`` (cleaned after a crash by the next run)."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_dead_siblings(parent, "")
    return _make_marked_dir(parent / _sibling_name(""))


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing directory entries in one atomic step; ``False`` where the system cannot.

    Linux ``renameat2(…, RENAME_EXCHANGE)`` (kernel 3.15, glibc 2.28), called
    through ctypes; other systems, older libraries and filesystems that do
    not support the flag get ``False`` and the caller renames twice.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


class StagedOutput:
    """A hidden sibling of ``output`` to build the store in; :meth:`commit` moves it into place.

    Used as a context manager: leaving it without a commit (an error,
    Ctrl-C) removes the sibling and any parent directory it created, so a
    failed conversion leaves nothing behind.
    """

    def __init__(self, output: Path):
        self.output = output  # resolved (check_output)
        self.path: Path | None = None
        self._created_parents: list[Path] = []
        self._committed = False

    def __enter__(self) -> StagedOutput:
        parent = self.output.parent
        missing = [p for p in [parent, *parent.parents] if not p.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        self._created_parents = missing  # deepest first
        try:
            remove_dead_siblings(parent, "." + self.output.name)
            self.path = _make_marked_dir(parent / _sibling_name("." + self.output.name))
        except BaseException:
            self.__exit__(None, None, None)  # __exit__ does not run when __enter__ raises
            raise
        return self

    def commit(self) -> None:
        """Put the finished store (manifest written) at ``output``; an existing store there is replaced."""
        staged, out = self.path, self.output
        (staged / MARKER).unlink()
        if out.is_dir() and any(out.iterdir()):
            check_replaceable(out)  # again: it may have changed while we converted
            if exchange_paths(staged, out):
                old = staged
            else:
                old = out.parent / _sibling_name("." + out.name)
                os.rename(out, old)
                try:
                    os.rename(staged, out)
                except BaseException:
                    os.rename(old, out)
                    raise
            self._committed = True
            try:
                remove_tree(old)
            except OSError as e:  # the new store is in place: say what is left, do not fail
                warnings.warn(
                    f"{out}: replaced, but the old store could not be deleted from {old} ({e})", ConversionWarning, stacklevel=3
                )
        else:
            try:
                os.rename(staged, out)  # atomic; replaces an empty directory
            except OSError as e:
                (staged / MARKER).touch()
                raise StoreError(f"{out}: could not move the new store into place ({e})") from e
            self._committed = True

    def __exit__(self, *exc) -> None:
        if self._committed:
            return
        with sigint_deferred():  # a second Ctrl-C must not leave half the staged store behind
            if self.path is not None and self.path.exists():
                remove_tree(self.path)
            for p in self._created_parents:
                try:
                    p.rmdir()
                except OSError:
                    break
