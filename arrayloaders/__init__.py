"""arrayloaders: fast shuffled minibatches for PyTorch from AnnData zarr stores.

The public names (and ``__version__``) are imported on first use (PEP 562),
so that worker processes, which import ``arrayloaders.loading.worker``, never import
torch, anndata or pandas.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "ArrayloadersError": ".errors",
    "InputFileError": ".errors",
    "StoreError": ".errors",
    "ConversionWarning": ".errors",
    "WorkerError": ".errors",
    "StoreManifest": ".store.manifest",
    "XLayout": ".store.format",
    "read_manifest": ".store.manifest",
    "create_store_from_h5ads": ".convert.create",
    "Categories": ".loading.batches",
    "ClassRunSampler": ".loading.class_runs",
    "EpochIterator": ".loading.epoch_iterator",
    "LoaderStats": ".loading.stats",
    "WorkerStats": ".loading.stats",
    "ZarrDenseDataset": ".loading.dataset",
    "ZarrSparseDataset": ".loading.dataset",
}

__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:
    from .convert.create import create_store_from_h5ads
    from .errors import ArrayloadersError, ConversionWarning, InputFileError, StoreError, WorkerError
    from .loading.batches import Categories
    from .loading.class_runs import ClassRunSampler
    from .loading.dataset import ZarrDenseDataset, ZarrSparseDataset
    from .loading.epoch_iterator import EpochIterator
    from .loading.stats import LoaderStats, WorkerStats
    from .store.format import XLayout
    from .store.manifest import StoreManifest, read_manifest


def __getattr__(name: str) -> Any:
    if name == "__version__":  # read on first use: importlib.metadata would slow every worker's start
        globals()[name] = _version()
        return globals()[name]
    if name not in _PUBLIC:
        raise AttributeError(f"module 'arrayloaders' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC) | {"__version__"})


def _version() -> str:
    """The installed distribution's version; ``"0+unknown"`` for a checkout on ``sys.path`` that is not installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version("arrayloaders")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
