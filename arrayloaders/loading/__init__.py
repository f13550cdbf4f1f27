"""The loading: plan, engine, workers, ring, batches, datasets.

Imported by worker processes (``worker``), which never import torch or zarr: this package imports
nothing itself.
"""
