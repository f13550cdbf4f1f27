"""The on-disk store and its readers: the format, the manifest, array layouts, shard reading, codecs.

Imported by worker processes (``shards``, ``rows``, ``disk_layout``), so this package imports nothing
itself: its modules are imported by name.
"""
