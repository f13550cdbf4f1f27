"""One error hierarchy, so callers can catch everything we raise on bad input.

Every message names the file (or argument) at fault and the problem.
"""

from __future__ import annotations


class ArrayloadersError(ValueError):
    """Base class of the errors this package raises on bad input."""


class InputFileError(ArrayloadersError):
    """An input ``.h5ad`` file is missing, unreadable or of an unsupported layout."""


class StoreError(ArrayloadersError):
    """A store directory is missing, incomplete, or does not match its manifest."""


class WorkerError(RuntimeError):
    """A loader worker process failed or died."""


class ConversionWarning(UserWarning):
    """Something of the inputs is not carried into the store (raw, obsp, layers or obsm not every input has, the order
    of a categorical the inputs disagree on), or cleanup was incomplete."""
