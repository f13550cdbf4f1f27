"""arrayloaders: fast shuffled minibatches for PyTorch from AnnData zarr stores."""

from .convert import create_store_from_h5ads
from .dataset import ZarrDenseDataset, ZarrSparseDataset
from .errors import ArrayloadersError, InputFileError, StoreError, WorkerError
from .store import StoreManifest, XLayout, read_manifest

__all__ = [
    "ArrayloadersError",
    "InputFileError",
    "StoreError",
    "StoreManifest",
    "WorkerError",
    "XLayout",
    "ZarrDenseDataset",
    "ZarrSparseDataset",
    "create_store_from_h5ads",
    "read_manifest",
]
