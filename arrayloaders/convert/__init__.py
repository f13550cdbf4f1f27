"""The conversion: many ``.h5ad`` files in, one store out (``create.create_store_from_h5ads``).

Imported by the conversion's task processes (``jobs``): this package imports nothing itself.
"""
