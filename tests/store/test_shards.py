"""DirectArray (arrayloaders.store.shards) and CsrRows/DenseRows (arrayloaders.store.rows) against zarr's own reads.

The back door everywhere is zarr-python itself: arrays are reopened with zarr's
own (Python) codec pipeline and read whole with ``array[...]``; CSR runs are
checked against slicing a scipy CSR matrix built from the same data.
"""

from __future__ import annotations

import gc
import os
import re
import sys
import threading
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.codecs import (
    BloscCodec,
    BytesCodec,
    Crc32cCodec,
    GzipCodec,
    ShardingCodec,
    TransposeCodec,
    ZstdCodec,
)

from arrayloaders.store import shards
from arrayloaders.store.disk_layout import COMPLETE_ATTRIBUTE, XSource
from arrayloaders.store.open_files import OpenFiles
from arrayloaders.store.rows import CsrRows, DenseRows, open_rows
from arrayloaders.store.shards import DirectArray
from arrayloaders.store.zarr_layout import array_layout, direct_array, missing_chunk_files, unwritten_chunks

PIPELINES = {
    "zarr-python": {"codec_pipeline.path": "zarr.core.codec_pipeline.BatchedCodecPipeline"},
    "zarrs": {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"},  # what this package writes its stores with
}
MISSING = 2**64 - 1
SENTINEL = 0xAB  # bytes of an output buffer before a read: a read that skips elements leaves them
GUARD = 16  # sentinel bytes kept on each side of ``out``: a read must not write outside it

N = 1000  # elements of the 1-d arrays: not a multiple of the chunk (64) or the shard (256)
CHUNK, SHARD = 64, 256
DTYPES = ["float32", "float64", "int32", "uint16"]


DECODERS = ("native", "native-python-loop", "numcodecs")
# read_into never runs the compiled loop (only gather does): for a test that only reads, the Python loop's
# variant runs the same code as "native".
READS = ("native", "numcodecs")


def decoders(*names: str):
    """Run a test with only these of DECODERS (default: all three), where the others would run the same code
    or a test's point does not depend on the decoder (it runs once, with the default one)."""

    def mark(test):
        test.decoders = names
        return test

    return mark


def pytest_generate_tests(metafunc):
    """Each test once per decoder it names (:func:`decoders`), unless its own parametrize names blosc_decoder."""
    for m in metafunc.definition.iter_markers("parametrize"):
        names = m.args[0].split(",") if isinstance(m.args[0], str) else m.args[0]
        if "blosc_decoder" in [n.strip() for n in names]:
            return
    metafunc.parametrize("blosc_decoder", getattr(metafunc.function, "decoders", DECODERS), indirect=True)


@pytest.fixture(autouse=True)
def blosc_decoder(request, monkeypatch):
    """Every test three times unless it says otherwise: blosc and crc32c called in C, a gather's chunks in a
    compiled loop (the default); the same C calls from the Python loop (where the compiled loop hands over at a
    fault); and through numcodecs/google_crc32c. Arrays not compressed with blosc use neither: numcodecs'
    decoders (zstd) and google_crc32c whatever the setting."""
    if request.param == "native-python-loop":
        monkeypatch.setattr(DirectArray, "_compiled", lambda *args: None)
    if request.param == "numcodecs":
        monkeypatch.setattr(shards, "native_codecs", lambda: None)
    return request.param


def lz4(shuffle: str) -> BloscCodec:
    return BloscCodec(cname="lz4", clevel=5, shuffle=shuffle)


# id -> create_array keywords (shape, dtype, data added by write_array)
LAYOUTS: dict[str, dict] = {
    "shard-blosc-lz4-shuffle": dict(chunks=(CHUNK,), shards=(SHARD,), compressors=lz4("shuffle")),
    "shard-blosc-lz4-bitshuffle": dict(chunks=(CHUNK,), shards=(SHARD,), compressors=lz4("bitshuffle")),
    "shard-blosc-lz4-noshuffle": dict(chunks=(CHUNK,), shards=(SHARD,), compressors=lz4("noshuffle")),
    "shard-zstd": dict(chunks=(CHUNK,), shards=(SHARD,), compressors=ZstdCodec(level=3)),
    "shard-zstd-checksum": dict(chunks=(CHUNK,), shards=(SHARD,), compressors=ZstdCodec(level=1, checksum=True)),
    "shard-raw": dict(chunks=(CHUNK,), shards=(SHARD,), compressors=None),
    # what this package writes: the compressor, then a crc32c of the compressed bytes
    "shard-blosc-lz4-crc32c": dict(chunks=(CHUNK,), shards=(SHARD,), compressors=[lz4("bitshuffle"), Crc32cCodec()]),
    "shard-zstd-crc32c": dict(chunks=(CHUNK,), shards=(SHARD,), compressors=[ZstdCodec(level=3), Crc32cCodec()]),
    "shard-raw-crc32c": dict(chunks=(CHUNK,), shards=(SHARD,), compressors=Crc32cCodec()),
    "shard-index-start": dict(
        chunks=(CHUNK,), shards={"shape": (SHARD,), "index_location": "start"}, compressors=lz4("shuffle")
    ),
    # an index without crc32c, at the start: ShardingCodec spelled out as the serializer
    "shard-index-start-no-crc": dict(
        chunks=(SHARD,),
        serializer=ShardingCodec(
            chunk_shape=(CHUNK,),
            codecs=[BytesCodec(), ZstdCodec(level=3)],
            index_codecs=[BytesCodec()],
            index_location="start",
        ),
        compressors=None,
    ),
    "shard-one-chunk-per-shard": dict(chunks=(CHUNK,), shards=(CHUNK,), compressors=lz4("bitshuffle")),
    "shard-v2-key-encoding": dict(
        chunks=(CHUNK,), shards=(SHARD,), compressors=ZstdCodec(level=3), chunk_key_encoding={"name": "v2"}
    ),
    "shard-default-keys-dot": dict(
        chunks=(CHUNK,), shards=(SHARD,), compressors=lz4("shuffle"), chunk_key_encoding={"name": "default", "separator": "."}
    ),
    "unsharded-v2-keys-slash": dict(chunks=(CHUNK,), compressors=None, chunk_key_encoding={"name": "v2", "separator": "/"}),
    "unsharded-blosc": dict(chunks=(CHUNK,), compressors=lz4("shuffle")),
    "unsharded-zstd": dict(chunks=(CHUNK,), compressors=ZstdCodec(level=3)),
    "unsharded-raw": dict(chunks=(CHUNK,), compressors=None),
    "unsharded-blosc-crc32c": dict(chunks=(CHUNK,), compressors=[lz4("shuffle"), Crc32cCodec()]),
    "unsharded-raw-crc32c": dict(chunks=(CHUNK,), compressors=Crc32cCodec()),
    "unsharded-one-chunk-larger-than-array": dict(chunks=(2048,), compressors=lz4("bitshuffle")),
}


def uses_blosc(kwargs: dict) -> bool:
    """Whether arrays made with these create_array keywords are blosc-compressed (the decoder setting matters)."""
    compressors = kwargs.get("compressors")
    codecs = list(compressors) if isinstance(compressors, (list, tuple)) else [compressors]
    codecs += list(getattr(kwargs.get("serializer"), "codecs", ()))
    return any(isinstance(c, BloscCodec) for c in codecs)


# Named ranges of the 1-d arrays (N = 1000, chunks of 64, shards of 256).
RANGES = [
    (0, 0),  # empty at the start
    (500, 500),  # empty inside
    (N, N),  # empty at the end
    (0, 1),
    (37, 38),  # single element inside a chunk
    (N - 1, N),  # last element (in the padded edge chunk)
    (0, CHUNK),  # exactly one chunk
    (CHUNK, 2 * CHUNK),
    (CHUNK - 1, CHUNK + 1),  # crossing a chunk boundary
    (10, 3 * CHUNK + 5),  # several chunks, partial at both ends
    (SHARD - 1, SHARD + 1),  # crossing a shard boundary
    (SHARD, 2 * SHARD),  # exactly one shard
    (SHARD - 3, 3 * SHARD + 7),  # several shards
    (3 * SHARD, N),  # the last, partial shard
    (15 * CHUNK, N),  # the last, partial chunk
    (15 * CHUNK - 1, N - 1),
    (1, N - 1),
    (0, N),  # the whole array
]


# --------------------------------------------------------------------------- helpers


def make_values(dtype: str, n: int, seed: int) -> np.ndarray:
    """Values with some structure (so compressors compress) and, for floats, special bit patterns."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        x = np.round(rng.standard_normal(n) * 10, 1).astype(dtype)
        specials = np.array([np.nan, -0.0, np.inf, -np.inf, np.finfo(dtype).tiny / 4, np.finfo(dtype).max], dtype)
        x[rng.choice(n, len(specials), replace=False)] = specials
        return x
    info = np.iinfo(dtype)
    x = rng.integers(max(info.min, -5000), min(info.max, 5000), size=n, endpoint=True).astype(dtype)
    x[rng.choice(n, 2, replace=False)] = [info.min, info.max]
    return x


def create(root: Path, name: str, shape, dtype, *, writer: str = "zarr-python", **kwargs) -> zarr.Array:
    with zarr.config.set(PIPELINES[writer]):
        return zarr.create_array(zarr.storage.LocalStore(root), name=name, shape=shape, dtype=dtype, **kwargs)


def write_array(root: Path, name: str, data: np.ndarray, *, writer: str = "zarr-python", **kwargs) -> zarr.Array:
    array = create(root, name, data.shape, data.dtype, writer=writer, **kwargs)
    array[...] = data
    return array


def back_door(root: Path, name: str) -> np.ndarray:
    """The whole array, read by zarr-python with its own codec pipeline."""
    with zarr.config.set(PIPELINES["zarr-python"]):
        return zarr.open_array(zarr.storage.LocalStore(root, read_only=True), path=name, mode="r")[...]


def reopen(root: Path, name: str) -> zarr.Array:
    return zarr.open_array(zarr.storage.LocalStore(root, read_only=True), path=name, mode="r")


def read(reader: DirectArray, start: int, stop: int) -> np.ndarray:
    """``reader.read_into`` into a sentinel-filled buffer whose guard bytes must stay untouched."""
    itemsize = reader.dtype.itemsize
    buf = np.full((stop - start) * itemsize + 2 * GUARD, SENTINEL, np.uint8)
    out = buf[GUARD : GUARD + (stop - start) * itemsize].view(reader.dtype)
    assert out.flags.c_contiguous and out.size == stop - start
    reader.read_into(start, stop, out)
    assert (buf[:GUARD] == SENTINEL).all() and (buf[-GUARD:] == SENTINEL).all(), "wrote outside out"
    return out.copy()


def gathered(reader: DirectArray, ranges: list[tuple[int, int]], dtype=None) -> np.ndarray:
    """``reader.gather`` of ``ranges`` (any order) placed back to back, in a guarded buffer of ``dtype``."""
    dtype = np.dtype(dtype or reader.dtype)
    sizes = np.array([b - a for a, b in ranges], dtype=np.int64)
    total = int(sizes.sum())
    buf = np.full(total * dtype.itemsize + 2 * GUARD, SENTINEL, np.uint8)
    out = buf[GUARD : GUARD + total * dtype.itemsize].view(dtype)
    starts = np.array([a for a, _ in ranges], dtype=np.int64)
    reader.gather(starts, starts + sizes, np.cumsum(sizes) - sizes, out)
    assert (buf[:GUARD] == SENTINEL).all() and (buf[-GUARD:] == SENTINEL).all(), "wrote outside out"
    return out.copy()


def wanted(expected: np.ndarray, ranges: list[tuple[int, int]], dtype=None) -> np.ndarray:
    parts = [expected[a:b] for a, b in ranges]
    return (np.concatenate(parts) if parts else expected[:0]).astype(dtype or expected.dtype)


def assert_bits_equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


needs_proc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")


def shard_index(path: Path, n_chunks: int, checksum: int = 4, at_end: bool = True) -> np.ndarray:
    """(offset, nbytes) per inner chunk of one shard file, parsed here (independently of DirectArray)."""
    raw = path.read_bytes()
    nbytes = 16 * n_chunks
    index = raw[len(raw) - nbytes - checksum : len(raw) - checksum] if at_end else raw[:nbytes]
    return np.frombuffer(index, "<u8").reshape(-1, 2)


# --------------------------------------------------------------------------- 1. layouts, bit for bit


@pytest.fixture(scope="module")
def layout_arrays(tmp_path_factory) -> dict[tuple[str, str, str], tuple[zarr.Array, np.ndarray, np.ndarray]]:
    """(layout, dtype, writer) -> (array, the data written, zarr's read of it)."""
    root = tmp_path_factory.mktemp("layouts")
    arrays = {}
    for i, (layout, kwargs) in enumerate(LAYOUTS.items()):
        for j, dtype in enumerate(DTYPES):
            for writer in PIPELINES:
                name = f"{layout}-{dtype}-{writer}"
                data = make_values(dtype, N, seed=100 * i + j)
                write_array(root, name, data, writer=writer, **kwargs)
                arrays[layout, dtype, writer] = (reopen(root, name), data, back_door(root, name))
    return arrays


@pytest.mark.parametrize("writer", list(PIPELINES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("layout", "blosc_decoder"),
    [(layout, d) for layout, kwargs in LAYOUTS.items() for d in (READS if uses_blosc(kwargs) else DECODERS[:1])],
    indirect=["blosc_decoder"],
)  # reads only: the decoders whose code differs for the layout
def test_layout_ranges_bit_identical(layout_arrays, layout, dtype, writer, blosc_decoder):
    array, data, expected = layout_arrays[layout, dtype, writer]
    assert_bits_equal(expected, data)  # the back door itself reads what was written
    reader = direct_array(array)
    assert reader is not None, f"{layout} should be read directly"
    if blosc_decoder == "native":  # the layouts run with one decoder are those no decoder setting changes
        assert (reader._native is not None) == uses_blosc(LAYOUTS[layout]), layout
    try:
        assert reader.dtype == expected.dtype and reader.n_elements == N
        rng = np.random.default_rng(7)
        random_ranges = [tuple(sorted(rng.integers(0, N, 2, endpoint=True))) for _ in range(25)]
        for start, stop in RANGES + random_ranges:
            assert_bits_equal(read(reader, start, stop), expected[start:stop])
        # The same ranges again in reverse order (files cached, scratch buffers reused).
        for start, stop in reversed(RANGES):
            assert_bits_equal(read(reader, start, stop), expected[start:stop])
    finally:
        reader.close()


def test_layout_fresh_reader_per_range(layout_arrays):
    """No state carried between reads: each range through a new reader gives the same bits."""
    array, _, expected = layout_arrays["shard-blosc-lz4-bitshuffle", "float32", "zarr-python"]
    for start, stop in RANGES:
        reader = direct_array(array)
        assert_bits_equal(read(reader, start, stop), expected[start:stop])
        reader.close()


@decoders(*READS)  # reads only
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from([(layout, dtype, writer) for layout in LAYOUTS for dtype in DTYPES for writer in PIPELINES]),
    bounds=st.tuples(st.integers(0, N), st.integers(0, N)),
)
def test_random_ranges_bit_identical(layout_arrays, key, bounds):
    array, _, expected = layout_arrays[key]
    start, stop = sorted(bounds)
    reader = direct_array(array)
    try:
        assert_bits_equal(read(reader, start, stop), expected[start:stop])
    finally:
        reader.close()


@decoders(*DECODERS[:1])  # zstd: no decoder setting changes it
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_range_sequences_one_reader(layout_arrays, data):
    """Many ranges in a row through one reader (its file cache and buffers reused)."""
    array, _, expected = layout_arrays["shard-zstd", "int32", "zarr-python"]
    reader = direct_array(array)
    try:
        for bounds in data.draw(st.lists(st.tuples(st.integers(0, N), st.integers(0, N)), min_size=1, max_size=8)):
            start, stop = sorted(bounds)
            assert_bits_equal(read(reader, start, stop), expected[start:stop])
    finally:
        reader.close()


@decoders(*DECODERS[:1])  # the files a reader opens do not depend on the decoder
@needs_proc
@pytest.mark.parametrize("threads", [1, 2])
def test_readers_share_one_budget_of_open_files(tmp_path, monkeypatch, threads):
    """Three arrays of 75 shard files each (some missing), read in any order, interleaved, from one or two
    threads, while the process may keep 16 shard files open in all: never more are open, and reads stay right."""
    limit = 16
    files = OpenFiles(limit)
    monkeypatch.setattr(shards, "shard_files", lambda: files)
    n, chunk, shard = 75 * 16 - 5, 4, 16
    expected = {}
    for k, name in enumerate("abc"):
        data = make_values("int32", n, seed=13 + k)
        data[10 * shard : 13 * shard] = 0  # three shards of fill value: no files
        write_array(tmp_path, name, data, chunks=(chunk,), shards=(shard,), compressors=lz4("shuffle"))
        assert len(os.listdir(tmp_path / name / "c")) == 72
        expected[name] = back_door(tmp_path, name)
    fds = open_fds()
    readers = {name: direct_array(reopen(tmp_path, name)) for name in "abc"}
    order = np.random.default_rng(14).permutation(75)
    steps = [(name, f) for f in list(order) + list(order[::-1]) for name in "abc"]
    errors = []
    # Other threads may each hold a file just opened (not yet counted) and a listing of /proc/self/fd.
    slack = 0 if threads == 1 else 2 * 3

    def read_some(mine) -> None:
        try:
            for name, f in mine:
                start, stop = f * shard + 3, min((f + 1) * shard + 2, n)
                assert_bits_equal(read(readers[name], start, stop), expected[name][start:stop])
                got = gathered(readers[name], [(stop - 1, stop), (start, start + 1)])
                assert_bits_equal(got, expected[name][[stop - 1, start]])
                assert len(files) <= limit
                assert open_fds() - fds <= limit + slack
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    if threads == 1:
        read_some(steps)
    else:  # one reader per thread at a time (readers are not thread-safe), the budget shared
        workers = [threading.Thread(target=read_some, args=([s for s in steps if s[0] == name],)) for name in "ab"]
        for w in workers:
            w.start()
        read_some([s for s in steps if s[0] == "c"])
        for w in workers:
            w.join()
    assert not errors, errors[0]
    for name in "abc":
        assert_bits_equal(read(readers[name], 0, n), expected[name])
        readers[name].close()
    assert open_fds() == fds  # close() closes every file


@decoders(*DECODERS[:1])  # uncompressed; the point is the files
def test_a_dropped_reader_closes_its_files(tmp_path, monkeypatch):
    write_array(tmp_path, "a", make_values("int32", 200, seed=3), chunks=(4,), shards=(16,), compressors=None)
    files = OpenFiles(100)
    monkeypatch.setattr(shards, "shard_files", lambda: files)
    reader = direct_array(reopen(tmp_path, "a"))
    assert_bits_equal(read(reader, 0, 200), make_values("int32", 200, seed=3))
    assert len(files) == 13
    del reader
    gc.collect()
    assert len(files) == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from([(layout, dtype, writer) for layout in LAYOUTS for dtype in DTYPES for writer in PIPELINES]),
    ranges=st.lists(st.tuples(st.integers(0, N), st.integers(0, N)).map(sorted).map(tuple), max_size=40),
)
def test_gather_bit_identical(layout_arrays, key, ranges):
    """gather: ranges in any order, repeated and overlapping, each inner chunk decoded once."""
    array, _, expected = layout_arrays[key]
    reader = direct_array(array)
    try:
        assert_bits_equal(gathered(reader, ranges), wanted(expected, ranges))
        if key[1] == "uint16":  # stored uint16 column indices are gathered into int32
            assert_bits_equal(gathered(reader, ranges, "int32"), wanted(expected, ranges, "int32"))
        assert_bits_equal(read(reader, 0, N), expected)  # read_into after gather: no stale scratch
    finally:
        reader.close()


def test_gather_of_single_elements_from_every_chunk(layout_arrays):
    """Many one-element ranges, shuffled: the shape of a sampler's load; whole chunks decode in place."""
    array, _, expected = layout_arrays["shard-blosc-lz4-bitshuffle", "float32", "zarrs"]
    rng = np.random.default_rng(3)
    ranges = [(int(i), int(i) + 1) for i in rng.integers(0, N, 500)] + [(CHUNK, 2 * CHUNK), (0, N)]
    ranges = [ranges[i] for i in rng.permutation(len(ranges))]
    reader = direct_array(array)
    assert_bits_equal(gathered(reader, ranges), wanted(expected, ranges))
    reader.close()


# --------------------------------------------------------------------------- 2. missing data


FILL = {"float32": np.float32(-2.5), "float64": np.nan, "int32": -7, "uint16": 65535}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "unsharded"])
def test_unwritten_regions_read_as_fill_value(tmp_path, dtype, sharded):
    fill = FILL[dtype]
    kwargs = dict(chunks=(CHUNK,), compressors=lz4("shuffle"), fill_value=fill)
    if sharded:
        kwargs["shards"] = (SHARD,)
    array = create(tmp_path, "a", (N,), dtype, **kwargs)
    values = make_values(dtype, N, seed=3)
    # Only elements [300, 420) are written: in shard 1 inner chunks 4-6 exist (chunk 4 partly
    # written, the rest of it fill), chunk 7 does not; shards 0, 2 and 3 are never written.
    array[300:420] = values[300:420]
    expected = back_door(tmp_path, "a")
    want = np.full(N, fill, dtype)
    want[300:420] = values[300:420]
    assert_bits_equal(expected, want)  # zarr's own read agrees with the construction

    files = tmp_path / "a" / "c"
    if sharded:
        assert sorted(os.listdir(files)) == ["1"], "shards 0, 2, 3 should be missing files"
        index = shard_index(files / "1", SHARD // CHUNK)
        assert (index[3] == MISSING).all() and (index[:3] != MISSING).all()
    else:
        assert sorted(os.listdir(files), key=int) == ["4", "5", "6"]

    reader = direct_array(reopen(tmp_path, "a"))
    assert reader is not None
    assert_bits_equal(np.array([reader.fill_value], dtype), np.array([fill], dtype))
    ranges = RANGES + [(290, 430), (420, 512), (448, 512), (250, 310), (419, 421)]
    for start, stop in ranges:
        assert_bits_equal(read(reader, start, stop), expected[start:stop])
    assert_bits_equal(gathered(reader, ranges[::-1]), wanted(expected, ranges[::-1]))
    reader.close()


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "unsharded"])
def test_regions_written_with_the_fill_value(tmp_path, sharded):
    """Chunks written entirely with the fill value (zarr omits them by default) read as fill."""
    fill = np.float32(1.5)
    kwargs = dict(chunks=(CHUNK,), compressors=ZstdCodec(level=3), fill_value=fill)
    if sharded:
        kwargs["shards"] = (SHARD,)
    data = make_values("float32", N, seed=4)
    data[2 * SHARD : 3 * SHARD] = fill  # a whole shard of fill
    data[CHUNK : 2 * CHUNK] = fill  # one inner chunk of fill inside a written shard
    data[5 * CHUNK + 3 : 5 * CHUNK + 20] = fill  # part of a chunk: the chunk is stored
    write_array(tmp_path, "a", data, **kwargs)
    expected = back_door(tmp_path, "a")
    assert_bits_equal(expected, data)
    # zarr-python omits chunks (and shards) holding only the fill value (write_empty_chunks=False):
    # checked here so that the test exercises the missing-data paths of the reader.
    files = tmp_path / "a" / "c"
    if sharded:
        assert not (files / "2").exists()
        assert (shard_index(files / "0", SHARD // CHUNK)[1] == MISSING).all()
        assert (shard_index(files / "1", SHARD // CHUNK)[1] != MISSING).all()  # partly fill: stored
    else:
        assert not (files / "1").exists() and not any((files / str(c)).exists() for c in range(8, 12))
        assert (files / "5").exists()
    reader = direct_array(reopen(tmp_path, "a"))
    for start, stop in RANGES + [(CHUNK - 5, 2 * CHUNK + 5), (2 * SHARD - 1, 3 * SHARD + 1), (5 * CHUNK, 6 * CHUNK)]:
        assert_bits_equal(read(reader, start, stop), expected[start:stop])
    reader.close()


# --------------------------------------------------------------------------- 3. 2-d arrays, unsupported arrays


ROWS, COLS = 50, 12
LAYOUTS_2D = {
    "sharded-blosc": dict(chunks=(8, COLS), shards=(24, COLS), compressors=lz4("bitshuffle")),
    "sharded-raw-index-start": dict(
        chunks=(8, COLS), shards={"shape": (16, COLS), "index_location": "start"}, compressors=None
    ),
    "unsharded-zstd": dict(chunks=(7, COLS), compressors=ZstdCodec(level=3)),
    "unsharded-one-row-chunks": dict(chunks=(1, COLS), compressors=lz4("shuffle")),
    # a 2-d chunk key has two coordinates: nested directories with "/", one name with "."
    "sharded-default-keys-dot": dict(
        chunks=(8, COLS), shards=(24, COLS), compressors=lz4("shuffle"), chunk_key_encoding={"name": "default", "separator": "."}
    ),
    "unsharded-v2-keys-slash": dict(chunks=(7, COLS), compressors=None, chunk_key_encoding={"name": "v2", "separator": "/"}),
    "unsharded-v2-keys-dot": dict(chunks=(7, COLS), compressors=None, chunk_key_encoding={"name": "v2"}),
}


@pytest.mark.parametrize("layout", ["sharded-blosc", "sharded-default-keys-dot", "unsharded-v2-keys-slash", "unsharded-v2-keys-dot"])
def test_a_layout_names_every_file_as_zarr_does(tmp_path, layout):
    """Workers find the files from the layout alone (no zarr): its names must be zarr's, for every key encoding."""
    data = make_values("float32", ROWS * COLS, seed=5).reshape(ROWS, COLS)
    array = write_array(tmp_path, "x", data, **LAYOUTS_2D[layout])
    got = array_layout(array)
    assert got is not None
    on_disk = sorted(str(p) for p in (tmp_path / "x").rglob("*") if p.is_file() and p.name != "zarr.json")
    named = sorted(str(got.file_path(f)) for f in range(-(-got.n_elements // got.file_elements)))
    assert named == on_disk and named
    assert [str(got.file_path(f)) for f in (0, 1)] == [str(tmp_path / "x" / array.metadata.encode_chunk_key((f, 0))) for f in (0, 1)]


@pytest.mark.parametrize("dtype", ["float32", "uint16"])
@pytest.mark.parametrize("layout", list(LAYOUTS_2D))
def test_2d_row_spanning_chunks(tmp_path, layout, dtype):
    data = make_values(dtype, ROWS * COLS, seed=5).reshape(ROWS, COLS)
    write_array(tmp_path, "x", data, **LAYOUTS_2D[layout])
    expected = back_door(tmp_path, "x")
    assert_bits_equal(expected, data)
    reader = direct_array(reopen(tmp_path, "x"))
    assert reader is not None and reader.n_elements == ROWS * COLS
    flat = expected.reshape(-1)
    row_runs = [(0, 0), (0, 1), (ROWS - 1, ROWS), (0, ROWS), (7, 9), (8, 16), (5, 30), (23, 25), (49, 50), (20, 20)]
    for a, b in row_runs:
        got = read(reader, a * COLS, b * COLS).reshape(b - a, COLS)
        assert_bits_equal(got, expected[a:b])
    # element ranges need not be whole rows
    element_ranges = [(5, 6), (COLS - 1, COLS + 1), (3, 8 * COLS + 5), (0, ROWS * COLS), (ROWS * COLS - 1, ROWS * COLS)]
    for start, stop in element_ranges:
        assert_bits_equal(read(reader, start, stop), flat[start:stop])
    reader.close()


def test_2d_missing_rows_read_as_fill_value(tmp_path):
    array = create(tmp_path, "x", (ROWS, COLS), "float32", chunks=(8, COLS), shards=(24, COLS), fill_value=4.25)
    values = make_values("float32", ROWS * COLS, seed=6).reshape(ROWS, COLS)
    array[30:40] = values[30:40]
    expected = back_door(tmp_path, "x")
    assert (expected[:30] == np.float32(4.25)).all() and (expected[40:] == np.float32(4.25)).all()
    assert sorted(os.listdir(tmp_path / "x" / "c")) == ["1"]  # only shard row 1 was written
    reader = direct_array(reopen(tmp_path, "x"))
    for a, b in [(0, ROWS), (0, 24), (28, 41), (40, 50), (29, 30)]:
        assert_bits_equal(read(reader, a * COLS, b * COLS).reshape(b - a, COLS), expected[a:b])
    reader.close()


def _gzip_in_shard(root):
    return create(root, "a", (N,), "float32", chunks=(CHUNK,), shards=(SHARD,), compressors=GzipCodec())


UNSUPPORTED = {
    "2d-chunks-split-rows": lambda root: create(root, "a", (ROWS, COLS), "float32", chunks=(8, 6)),
    "2d-inner-chunks-split-rows": lambda root: create(
        root, "a", (ROWS, COLS), "float32", chunks=(8, 6), shards=(24, COLS)
    ),
    "2d-chunks-wider-than-rows": lambda root: create(root, "a", (ROWS, COLS), "float32", chunks=(8, 16)),
    "3d": lambda root: create(root, "a", (4, 5, 6), "float32", chunks=(2, 5, 6)),
    # a big-endian shard index was read as little-endian and reported as a truncated file
    "big-endian-shard-index": lambda root: create(
        root, "a", (N,), "float32", chunks=(SHARD,), compressors=None,
        serializer=ShardingCodec(chunk_shape=(CHUNK,), codecs=[BytesCodec()], index_codecs=[BytesCodec(endian="big"), Crc32cCodec()]),
    ),  # fmt: skip
    "zarr-v2": lambda root: zarr.create_array(
        zarr.storage.LocalStore(root),
        name="a",
        shape=(N,),
        dtype="float32",
        chunks=(CHUNK,),
        zarr_format=2,
        compressors=numcodecs.Blosc(cname="lz4"),
    ),
    "memory-store": lambda root: zarr.create_array(
        zarr.storage.MemoryStore(), name="a", shape=(N,), dtype="float32", chunks=(CHUNK,), shards=(SHARD,)
    ),
    "gzip": lambda root: create(root, "a", (N,), "float32", chunks=(CHUNK,), compressors=GzipCodec()),
    "gzip-inside-shard": _gzip_in_shard,
    "blosc-then-zstd": lambda root: create(
        root, "a", (N,), "float32", chunks=(CHUNK,), compressors=[lz4("shuffle"), ZstdCodec()]
    ),
    "crc32c-before-compressor": lambda root: create(
        root, "a", (N,), "float32", chunks=(CHUNK,), compressors=[Crc32cCodec(), lz4("shuffle")]
    ),
    "crc32c-twice": lambda root: create(root, "a", (N,), "float32", chunks=(CHUNK,), compressors=[Crc32cCodec(), Crc32cCodec()]),
    "big-endian-bytes": lambda root: create(
        root, "a", (N,), "float32", chunks=(CHUNK,), serializer=BytesCodec(endian="big")
    ),
    "transpose-filter": lambda root: create(
        root, "a", (ROWS, COLS), "float32", chunks=(8, COLS), filters=[TransposeCodec(order=(1, 0))]
    ),
    "nested-sharding": lambda root: create(
        root,
        "a",
        (N,),
        "float32",
        chunks=(SHARD,),
        serializer=ShardingCodec(chunk_shape=(128,), codecs=[ShardingCodec(chunk_shape=(CHUNK,))]),
        compressors=None,
    ),
}


@pytest.mark.parametrize("codec", ["blosc", "zstd", "raw"])
def test_a_chunk_holding_fewer_elements_than_the_layout_says_is_an_error(tmp_path, codec):
    """A reader's layout said 32 elements per chunk, and the array was rewritten in place with chunks of 16
    (checksums valid): each codec must notice, or the rest of the buffer keeps stale values (zstd did not)."""
    compressor = {"blosc": lz4("shuffle"), "zstd": ZstdCodec(level=3), "raw": None}[codec]
    codecs = [Crc32cCodec()] if compressor is None else [compressor, Crc32cCodec()]
    array = zarr.create_array(tmp_path / "a", shape=(64,), chunks=(32,), dtype="float32", compressors=codecs)
    array[:] = np.arange(64, dtype="float32")
    layout = array_layout(array)
    again = zarr.create_array(tmp_path / "a", shape=(64,), chunks=(16,), dtype="float32", compressors=codecs, overwrite=True)
    again[:] = np.arange(100, 164, dtype="float32")
    with pytest.raises(OSError, match=re.escape(str(tmp_path / "a" / "c" / "0")) + r".*(holds \d+ bytes|blosc header)"):
        read(DirectArray(layout), 0, 32)


@decoders(*DECODERS[:1])  # whether it opens does not depend on the decoder
@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_open_returns_none_when_unsupported(tmp_path, case):
    array = UNSUPPORTED[case](tmp_path)
    # the array is a working zarr array: written and read back by zarr
    data = make_values("float32", int(np.prod(array.shape)), seed=8).reshape(array.shape)
    array[...] = data
    assert_bits_equal(array[...], data)
    assert direct_array(array) is None


def test_supported_counterparts_open(tmp_path):
    """Controls for the cases above: the nearest supported arrays do open."""
    cases = [
        create(tmp_path, "a", (ROWS, COLS), "float32", chunks=(8, COLS)),
        create(tmp_path, "b", (ROWS, COLS), "float32", chunks=(8, COLS), shards=(24, COLS)),
        create(tmp_path, "c", (N,), "float32", chunks=(CHUNK,), shards=(SHARD,)),
        create(tmp_path, "d", (N,), "float32", chunks=(CHUNK,), serializer=BytesCodec(endian="little")),
    ]
    for array in cases:
        assert direct_array(array) is not None, array.metadata


# --------------------------------------------------------------------------- 4. errors


def test_out_of_range_reads_raise_index_error(layout_arrays):
    array, _, _ = layout_arrays["shard-blosc-lz4-shuffle", "float32", "zarr-python"]
    reader = direct_array(array)
    out = np.empty(N + 2, reader.dtype)
    for start, stop in [(-1, 5), (0, N + 1), (N, N + 1), (N + 1, N + 1), (10, 9), (-3, -1)]:
        with pytest.raises(IndexError):
            reader.read_into(start, stop, out[: max(stop - start, 0)])
    # in range still works after the errors
    reader.read_into(0, N, out[:N])
    reader.close()


INDEX_BYTES = 16 * (SHARD // CHUNK) + 4  # a shard index with its crc32c

# id -> (index_location, bytes the shard file keeps)
TRUNCATIONS = {
    "index-end-shorter-than-index": pytest.param("end", 40),
    "index-end-empty-file": pytest.param("end", 0),
    "index-start-shorter-than-index": pytest.param("start", 40),
    "index-start-empty-file": pytest.param("start", 0),
    # cut inside the chunk data: the whole index (start) or garbage taken for the index (end)
    "index-start-cut-inside-data": pytest.param("start", INDEX_BYTES + 10),
    "index-end-cut-inside-data": pytest.param("end", INDEX_BYTES + 10),
}


@needs_proc
@pytest.mark.parametrize(("location", "keep"), list(TRUNCATIONS.values()), ids=list(TRUNCATIONS))
def test_truncated_shard_raises_oserror_naming_the_file(tmp_path, location, keep):
    data = make_values("float32", N, seed=9)
    shards = {"shape": (SHARD,), "index_location": location}
    write_array(tmp_path, "a", data, chunks=(CHUNK,), shards=shards, compressors=lz4("shuffle"))
    shard = tmp_path / "a" / "c" / "1"
    assert shard.stat().st_size > keep
    os.truncate(shard, keep)
    if keep:  # zarr's own read fails too (index checksum); an empty shard file it reads whole as
        # fill value (zarr 3.1: a partial read of it fails), so there it is no back door
        with pytest.raises((ValueError, RuntimeError)):
            back_door(tmp_path, "a")
    reader = direct_array(reopen(tmp_path, "a"))
    assert_bits_equal(read(reader, 0, SHARD), data[:SHARD])  # shard 0 is intact
    fds = open_fds()
    with pytest.raises(OSError, match=str(shard)):
        read(reader, SHARD, 2 * SHARD)
    assert open_fds() == fds  # the broken file is not left open
    assert_bits_equal(read(reader, 3 * SHARD, N), data[3 * SHARD :])  # and the reader still works
    reader.close()


def test_shard_cut_inside_its_data_raises_oserror(tmp_path):
    """Index at the start intact, chunk data cut short: an OSError naming the shard file."""
    data = make_values("float32", N, seed=10)
    shards = {"shape": (SHARD,), "index_location": "start"}
    write_array(tmp_path, "a", data, chunks=(CHUNK,), shards=shards, compressors=lz4("shuffle"))
    os.truncate(tmp_path / "a" / "c" / "1", INDEX_BYTES + 10)
    reader = direct_array(reopen(tmp_path, "a"))
    assert_bits_equal(read(reader, SHARD - 3, SHARD), data[SHARD - 3 : SHARD])
    with pytest.raises(OSError, match=str(tmp_path / "a" / "c" / "1")):
        read(reader, SHARD + 3 * CHUNK, SHARD + 4 * CHUNK)  # the last chunk of the shard is gone
    reader.close()


def test_corrupt_shard_index_is_not_read_silently(tmp_path):
    # Uncompressed int32 shard whose chunk 3 holds the bytes of a plausible index: every entry
    # (offset 0, 256 bytes), i.e. "each chunk is chunk 0". Cut so the last 68 bytes fall there.
    data = np.full(N, 7, np.int32)
    data[3 * CHUNK : 4 * CHUNK] = np.tile([0, 0, CHUNK * 4, 0], CHUNK // 4)
    write_array(tmp_path, "a", data, chunks=(CHUNK,), shards=(SHARD,), compressors=None)
    shard = tmp_path / "a" / "c" / "0"
    os.truncate(shard, 3 * CHUNK * 4 + 16 * 8 + INDEX_BYTES)
    with pytest.raises(ValueError, match="checksum"):
        back_door(tmp_path, "a")  # zarr notices
    reader = direct_array(reopen(tmp_path, "a"))
    try:
        got = read(reader, 0, SHARD)
    except OSError:
        return  # detected: fine
    finally:
        reader.close()
    assert_bits_equal(got, data[:SHARD])  # otherwise the bits must at least be right


# --------------------------------------------------------------------------- 5. checksums and missing chunks

CHUNKS_PER_SHARD = SHARD // CHUNK


def checked_array(root: Path, complete: bool = True, **kwargs) -> tuple[zarr.Array, np.ndarray]:
    """A float32 array as this package writes X: sharded, blosc then crc32c, every chunk stored and marked so."""
    data = make_values("float32", N, seed=21)
    kwargs = {"chunks": (CHUNK,), "shards": (SHARD,), "compressors": [lz4("bitshuffle"), Crc32cCodec()], **kwargs}
    array = write_array(root, "a", data, **kwargs)
    if complete:
        array.attrs[COMPLETE_ATTRIBUTE] = True
    return reopen(root, "a"), data


def flip(path: Path, offset: int, bit: int = 0x10) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= bit
    path.write_bytes(bytes(raw))


# id -> offset in shard file 1 of a byte to flip, from its chunk index (offset, nbytes per chunk) and size
FLIPS = {
    "blosc-header": lambda index, size: int(index[2, 0]) + 1,
    "blosc-payload-start": lambda index, size: int(index[2, 0]) + 17,
    "blosc-payload-middle": lambda index, size: int(index[2, 0] + index[2, 1] // 2),
    "blosc-payload-end": lambda index, size: int(index[2, 0] + index[2, 1]) - 5,
    "chunk-crc32c": lambda index, size: int(index[2, 0] + index[2, 1]) - 2,
    "shard-index-offset": lambda index, size: size - 4 - 16 * CHUNKS_PER_SHARD + 16 * 2,
    "shard-index-nbytes": lambda index, size: size - 4 - 16 * CHUNKS_PER_SHARD + 16 * 2 + 8,
    "shard-index-crc32c": lambda index, size: size - 1,
}


@pytest.mark.parametrize("where", list(FLIPS))
def test_a_flipped_byte_is_detected_naming_file_and_chunk(tmp_path, where):
    array, data = checked_array(tmp_path)
    shard = tmp_path / "a" / "c" / "1"
    size = shard.stat().st_size
    flip(shard, FLIPS[where](shard_index(shard, CHUNKS_PER_SHARD), size))
    with pytest.raises((ValueError, RuntimeError)):
        back_door(tmp_path, "a")  # zarr notices too: the damage is real
    reader = direct_array(array)
    assert_bits_equal(read(reader, 0, SHARD), data[:SHARD])  # shard 0 is intact
    with pytest.raises(OSError, match=str(shard)) as info:
        read(reader, SHARD, 2 * SHARD)
    message = str(info.value)
    assert ("inner chunk 2" in message and "checksum mismatch" in message) or "shard index" in message, message
    with pytest.raises(OSError, match=str(shard)):
        gathered(reader, [(3 * SHARD, 3 * SHARD + 1), (SHARD + 2 * CHUNK + 1, SHARD + 2 * CHUNK + 2)])
    assert_bits_equal(read(reader, 3 * SHARD, N), data[3 * SHARD :])  # the reader still works elsewhere
    reader.close()


def test_a_flipped_byte_in_an_unsharded_chunk_is_detected(tmp_path):
    array, data = checked_array(tmp_path, shards=None)
    chunk = tmp_path / "a" / "c" / "3"
    for offset in (1, 20, chunk.stat().st_size - 1):
        flip(chunk, offset)
        reader = direct_array(reopen(tmp_path, "a"))
        with pytest.raises(OSError, match=f"{chunk}: the chunk .* checksum mismatch"):
            read(reader, 3 * CHUNK + 5, 3 * CHUNK + 6)
        assert_bits_equal(read(reader, 0, 3 * CHUNK), data[: 3 * CHUNK])
        reader.close()
        flip(chunk, offset)  # repaired: reads again
        assert_bits_equal(read(direct_array(reopen(tmp_path, "a")), 0, N), data)


# A blosc header (bytes 4-8: bytes held; 12-16: bytes stored) that lies, in a store without checksums:
# blosc's C function trusts the header, so a stored size past the chunk would read beyond it.
HEADER_LIES = {"bytes-held": (4, 12345), "bytes-stored-larger": (12, 1 << 20), "bytes-stored-smaller": (12, 20)}


@pytest.mark.parametrize("lie", list(HEADER_LIES))
def test_a_chunk_that_does_not_decode_is_named_without_a_checksum(tmp_path, lie):
    array, data = checked_array(tmp_path, complete=False, compressors=lz4("shuffle"))
    shard = tmp_path / "a" / "c" / "0"
    index = shard_index(shard, CHUNKS_PER_SHARD)
    raw = bytearray(shard.read_bytes())
    at, value = HEADER_LIES[lie]
    raw[int(index[1, 0]) + at : int(index[1, 0]) + at + 4] = value.to_bytes(4, "little")
    shard.write_bytes(bytes(raw))
    reader = direct_array(reopen(tmp_path, "a"))
    with pytest.raises(OSError, match=f"{shard}: inner chunk 1 .*cannot be decoded"):
        read(reader, CHUNK, CHUNK + 1)
    with pytest.raises(OSError, match=f"{shard}: inner chunk 1 .*cannot be decoded"):
        gathered(reader, [(CHUNK + 3, CHUNK + 4)])
    assert_bits_equal(read(reader, 2 * CHUNK, N), data[2 * CHUNK :])  # the reader still works elsewhere
    reader.close()


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "unsharded"])
def test_a_missing_file_of_a_complete_array_is_an_error(tmp_path, sharded):
    array, data = checked_array(tmp_path, **({} if sharded else {"shards": None}))
    gone = tmp_path / "a" / "c" / ("1" if sharded else "5")
    gone.unlink()
    assert unwritten_chunks(reopen(tmp_path, "a")) == [str(gone)]
    assert missing_chunk_files(reopen(tmp_path, "a")) == [str(gone)]
    reader = direct_array(reopen(tmp_path, "a"))
    assert reader.complete
    with pytest.raises(OSError, match=f"{gone}: the file is missing"):
        read(reader, 0, N)
    with pytest.raises(OSError, match=f"{gone}: the file is missing"):
        gathered(reader, [(N - 1, N), (SHARD + 7, SHARD + 9) if sharded else (5 * CHUNK, 5 * CHUNK + 1)])
    reader.close()
    # The same array without the mark (an older store): the missing file reads as fill values.
    del zarr.open_array(zarr.storage.LocalStore(tmp_path), path="a", mode="r+").attrs[COMPLETE_ATTRIBUTE]
    reader = direct_array(reopen(tmp_path, "a"))
    assert not reader.complete
    got = read(reader, 0, N)
    lo, hi = (SHARD, 2 * SHARD) if sharded else (5 * CHUNK, 6 * CHUNK)
    assert (got[lo:hi] == 0).all()
    assert_bits_equal(got[:lo], data[:lo])
    reader.close()


def test_a_missing_inner_chunk_of_a_complete_array_is_an_error(tmp_path):
    data = make_values("float32", N, seed=22)
    data[SHARD + CHUNK : SHARD + 2 * CHUNK] = 0  # zarr-python leaves this chunk out (fill value, by default)
    write_array(tmp_path, "a", data, chunks=(CHUNK,), shards=(SHARD,), compressors=[lz4("shuffle"), Crc32cCodec()])
    shard = tmp_path / "a" / "c" / "1"
    assert (shard_index(shard, CHUNKS_PER_SHARD)[1] == MISSING).all()
    assert unwritten_chunks(reopen(tmp_path, "a")) == [f"{shard} (inner chunk 1)"]
    assert_bits_equal(read(direct_array(reopen(tmp_path, "a")), 0, N), data)  # unmarked: fill values
    zarr.open_array(zarr.storage.LocalStore(tmp_path), path="a", mode="r+").attrs[COMPLETE_ATTRIBUTE] = True
    reader = direct_array(reopen(tmp_path, "a"))
    assert_bits_equal(read(reader, SHARD, SHARD + CHUNK), data[SHARD : SHARD + CHUNK])
    with pytest.raises(OSError, match=f"{shard}: inner chunk 1 .*is missing"):
        read(reader, SHARD + CHUNK + 3, SHARD + CHUNK + 4)
    with pytest.raises(OSError, match=f"{shard}: inner chunk 1 .*is missing"):
        gathered(reader, [(SHARD + 5, SHARD + 6), (SHARD + CHUNK + 3, SHARD + CHUNK + 4)])
    reader.close()


def test_unwritten_chunks_of_a_partly_written_array(tmp_path):
    array = create(tmp_path, "a", (N,), "float32", chunks=(CHUNK,), shards=(SHARD,), compressors=Crc32cCodec())
    array[SHARD + 10 : SHARD + 20] = 1.0  # shard 1, inner chunk 0 only
    shard = tmp_path / "a" / "c" / "1"
    got = unwritten_chunks(reopen(tmp_path, "a"))
    assert got == [
        str(tmp_path / "a" / "c" / "0"),
        *(f"{shard} (inner chunk {k})" for k in (1, 2, 3)),
        str(tmp_path / "a" / "c" / "2"),
        str(tmp_path / "a" / "c" / "3"),
    ]
    assert unwritten_chunks(reopen(tmp_path, "a"), SHARD, SHARD + CHUNK) == []
    assert missing_chunk_files(reopen(tmp_path, "a")) == [str(tmp_path / "a" / "c" / c) for c in ("0", "2", "3")]


# --------------------------------------------------------------------------- 6. CsrRows / DenseRows


N_OBS, N_VARS = 300, 40


def make_csr(seed: int = 11) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = make_values("float32", N_OBS * N_VARS, seed=seed).reshape(N_OBS, N_VARS)
    dense[rng.random((N_OBS, N_VARS)) < 0.8] = 0
    dense[10:30] = 0  # a run of empty rows
    dense[[0, 57, 120, N_OBS - 1]] = 0  # scattered empty rows, first and last included
    dense[150] = 1.0  # a full row
    m = sp.csr_matrix(dense)
    m.sort_indices()
    assert m.indptr[30] == m.indptr[10] and m.nnz > 1000
    return m


def write_csr_group(root: Path, path: str, m: sp.csr_matrix, fmt: int, data_kw: dict, indices_kw: dict) -> None:
    store = zarr.storage.LocalStore(root)
    with zarr.config.set(PIPELINES["zarr-python"]):
        group = zarr.open_group(store, path=path, mode="w", zarr_format=fmt)
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": list(m.shape)})
        for name, values, kw in (
            ("data", m.data, data_kw),
            ("indices", m.indices.astype(np.uint16), indices_kw),
            ("indptr", m.indptr.astype(np.int64), {}),
        ):
            array = group.create_array(name, shape=values.shape, dtype=values.dtype, **kw)
            array[...] = values


# id -> (zarr format, data keywords, indices keywords, read directly)
CSR_GROUPS = {
    "v3-sharded-blosc": (
        3,
        dict(chunks=(64,), shards=(512,), compressors=lz4("bitshuffle")),
        dict(chunks=(64,), shards=(512,), compressors=lz4("shuffle")),
        True,
    ),
    "v3-unsharded-zstd": (
        3,
        dict(chunks=(100,), compressors=ZstdCodec(level=3)),
        dict(chunks=(100,), compressors=ZstdCodec(level=3)),
        True,
    ),
    "v3-gzip": (3, dict(chunks=(64,), compressors=GzipCodec()), dict(chunks=(64,), compressors=GzipCodec()), False),
    "v3-data-blosc-indices-gzip": (
        3,
        dict(chunks=(64,), shards=(512,), compressors=lz4("bitshuffle")),
        dict(chunks=(64,), compressors=GzipCodec()),
        False,
    ),
    "v2-blosc": (
        2,
        dict(chunks=(64,), compressors=numcodecs.Blosc(cname="lz4")),
        dict(chunks=(64,), compressors=numcodecs.Blosc(cname="lz4")),
        False,
    ),
}

RUNS = [
    (0, 1),
    (0, 0),  # no rows
    (10, 30),  # rows without entries
    (12, 13),
    (5, 40),
    (5, 40),  # duplicate
    (30, 60),
    (50, 70),  # overlapping the previous
    (149, 152),  # around the full row
    (N_OBS - 1, N_OBS),
    (0, N_OBS),  # everything
    (100, 101),
    (57, 58),
]


@pytest.fixture(scope="module")
def csr_groups(tmp_path_factory):
    root = tmp_path_factory.mktemp("csr")
    m = make_csr()
    for name, (fmt, data_kw, indices_kw, _) in CSR_GROUPS.items():
        write_csr_group(root, name, m, fmt, data_kw, indices_kw)
    return root, m


def csr_source(root: Path, path: str) -> XSource:
    store = zarr.storage.LocalStore(root, read_only=True)
    return XSource(store, path, "csr", N_OBS, N_VARS, "float32")


def collect_csr(rows: CsrRows, runs: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.array(d, copy=True), np.array(i, copy=True)) for d, i in rows.runs(runs)]


def expected_csr(m: sp.csr_matrix, runs) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (m.data[m.indptr[a] : m.indptr[b]], m.indices[m.indptr[a] : m.indptr[b]].astype(np.uint16)) for a, b in runs
    ]


@pytest.mark.parametrize("group", list(CSR_GROUPS))
def test_csr_rows_match_scipy(csr_groups, group):
    root, m = csr_groups
    direct = CSR_GROUPS[group][3]
    rows = open_rows(csr_source(root, group))
    try:
        assert isinstance(rows, CsrRows)
        assert rows.direct is direct
        np.testing.assert_array_equal(rows.indptr, m.indptr)
        runs = np.array(RUNS, dtype=np.int64)
        got = collect_csr(rows, runs)
        want = expected_csr(m, RUNS)
        assert len(got) == len(want)
        for (a, b), (gd, gi), (wd, wi) in zip(RUNS, got, want):
            assert_bits_equal(gd, wd)
            assert_bits_equal(gi, wi)
        assert [len(d) for d, _ in got][2] == 0 and [len(d) for d, _ in got][1] == 0
        # a second call on the same object (buffers reused), and no runs at all
        again = collect_csr(rows, runs[::-1].copy())
        for (gd, gi), (wd, wi) in zip(again, want[::-1]):
            assert_bits_equal(gd, wd)
            assert_bits_equal(gi, wi)
        assert collect_csr(rows, np.zeros((0, 2), np.int64)) == []
        # read_runs: the same entries at the offsets given, runs placed out of order in one buffer
        sizes = [wd.size for wd, _ in want]
        dests = np.zeros(len(RUNS), np.int64)
        order = np.random.default_rng(0).permutation(len(RUNS))
        dests[order] = np.cumsum([0, *np.array(sizes)[order]])[:-1]
        data, indices = np.full(sum(sizes), np.nan, np.float32), np.zeros(sum(sizes), np.uint16)
        rows.read_runs(runs, dests, data, indices)
        for d, n, (wd, wi) in zip(dests.tolist(), sizes, want):
            assert_bits_equal(data[d : d + n], wd)
            assert_bits_equal(indices[d : d + n], wi)
    finally:
        rows.close()


def test_csr_direct_and_fallback_agree(csr_groups):
    root, m = csr_groups
    runs = np.array(RUNS, dtype=np.int64)
    results = {}
    for group in CSR_GROUPS:
        rows = CsrRows(csr_source(root, group))
        results[group] = (rows.direct, collect_csr(rows, runs))
        rows.close()
    assert {g: d for g, (d, _) in results.items()} == {g: v[3] for g, v in CSR_GROUPS.items()}
    reference = results["v3-sharded-blosc"][1]
    for group, (_, got) in results.items():
        assert len(got) == len(reference)
        for (gd, gi), (rd, ri) in zip(got, reference):
            assert_bits_equal(gd, rd)
            assert_bits_equal(gi, ri)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    group=st.sampled_from(["v3-sharded-blosc", "v3-unsharded-zstd"]),
    runs=st.lists(st.tuples(st.integers(0, N_OBS), st.integers(0, N_OBS)).map(sorted), max_size=10),
)
def test_csr_random_runs(csr_groups, group, runs):
    root, m = csr_groups
    rows = CsrRows(csr_source(root, group))
    try:
        assert rows.direct
        got = collect_csr(rows, np.array(runs, dtype=np.int64).reshape(-1, 2))
        want = expected_csr(m, runs)
        assert len(got) == len(want)
        for (gd, gi), (wd, wi) in zip(got, want):
            assert_bits_equal(gd, wd)
            assert_bits_equal(gi, wi)
    finally:
        rows.close()


# id -> (create keywords, zarr format, read directly)
DENSE_X = {
    "v3-sharded-rows": (dict(chunks=(16, N_VARS), shards=(64, N_VARS), compressors=lz4("bitshuffle")), 3, True),
    "v3-unsharded-rows-zstd": (dict(chunks=(9, N_VARS), compressors=ZstdCodec(level=3)), 3, True),
    "v3-chunks-split-columns": (dict(chunks=(16, 8), compressors=lz4("shuffle")), 3, False),
    "v2-blosc": (dict(chunks=(16, N_VARS), compressors=numcodecs.Blosc(cname="lz4")), 2, False),
}
DENSE_ROWS = 130


@pytest.fixture(scope="module")
def dense_x(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    x = make_values("float32", DENSE_ROWS * N_VARS, seed=12).reshape(DENSE_ROWS, N_VARS)
    for name, (kw, fmt, _) in DENSE_X.items():
        with zarr.config.set(PIPELINES["zarr-python"]):
            a = zarr.create_array(
                zarr.storage.LocalStore(root), name=name, shape=x.shape, dtype=x.dtype, zarr_format=fmt, **kw
            )
            a[...] = x
    return root, x


@pytest.mark.parametrize("layout", list(DENSE_X))
def test_dense_rows_match_numpy(dense_x, layout):
    root, x = dense_x
    runs = [(0, 0), (0, 1), (5, 40), (5, 40), (30, 60), (50, 70), (15, 17), (63, 65), (DENSE_ROWS - 1, DENSE_ROWS)]
    runs.append((0, DENSE_ROWS))
    source = XSource(zarr.storage.LocalStore(root, read_only=True), layout, "dense", DENSE_ROWS, N_VARS, "float32")
    rows = open_rows(source)
    try:
        assert isinstance(rows, DenseRows)
        assert rows.direct is DENSE_X[layout][2]
        got = [np.array(r, copy=True) for r in rows.runs(np.array(runs, dtype=np.int64))]
        assert len(got) == len(runs)
        for (a, b), g in zip(runs, got):
            assert_bits_equal(g, x[a:b])
        assert list(rows.runs(np.zeros((0, 2), np.int64))) == []
    finally:
        rows.close()


# ------------------------------------------------------------------ chunk order inside shards


def _blosc_shards(path: Path, n: int) -> zarr.Array:
    from arrayloaders.store.format import XLayout, use_zarrs

    use_zarrs()
    return zarr.create_array(
        path, shape=(n,), dtype=np.float32, chunks=(2**10,), shards=(2**16,), compressors=XLayout().compressors()
    )


def _offsets(shard: Path, per_shard: int = 64) -> np.ndarray:
    raw = shard.read_bytes()
    return np.frombuffer(raw[len(raw) - 4 - 16 * per_shard : len(raw) - 4], "<u8").reshape(-1, 2)[:, 0]


def test_the_same_values_written_shard_by_shard_give_the_same_bytes(tmp_path):
    """zarrs encodes the inner chunks of a shard written alone in parallel and appends them as they finish:
    without reordering, runs differ (4 of 4 runs did here); the conversion's promise is one store per seed."""
    from arrayloaders.convert.buckets import write_complete

    values = np.random.default_rng(0).poisson(1.0, 2 * 2**16).astype(np.float32) + 1
    files = []
    for run in range(4):
        array = _blosc_shards(tmp_path / f"run{run}", values.size)
        for s in range(2):
            write_complete(array, s * 2**16, (s + 1) * 2**16, values[s * 2**16 : (s + 1) * 2**16])
        np.testing.assert_array_equal(array[:], values)
        files.append([(tmp_path / f"run{run}" / "c" / str(s)).read_bytes() for s in range(2)])
        for s in range(2):
            assert (np.diff(_offsets(tmp_path / f"run{run}" / "c" / str(s)).astype(np.int64)) > 0).all()
    assert all(f == files[0] for f in files)


def test_order_chunks_rewrites_a_shard_laid_out_backwards(tmp_path):
    values = np.arange(2**16, dtype=np.float32)
    array = _blosc_shards(tmp_path / "a", values.size)
    array[:] = values
    shard = tmp_path / "a" / "c" / "0"
    raw = shard.read_bytes()
    index = np.frombuffer(raw[-4 - 16 * 64 : -4], "<u8").reshape(-1, 2).copy()
    pieces = [raw[o : o + n] for o, n in index]
    at, backwards = 0, index.copy()
    for c in reversed(range(64)):
        backwards[c, 0] = at
        at += int(index[c, 1])
    body = b"".join(reversed(pieces))
    table = backwards.astype("<u8").tobytes()
    import google_crc32c

    shard.write_bytes(body + table + google_crc32c.value(table).to_bytes(4, "little"))
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "a", mode="r")[:], values)  # a valid shard
    direct = direct_array(zarr.open_array(tmp_path / "a", mode="r"))
    assert direct.order_chunks(0, values.size) == 1
    assert direct.order_chunks(0, values.size) == 0  # in order now: left alone
    direct.close()
    ordered = shard.read_bytes()
    table = np.frombuffer(ordered[-4 - 16 * 64 : -4], "<u8").reshape(-1, 2)
    assert table[0, 0] == 0 and (table[1:, 0] == np.cumsum(table[:-1, 1])).all()  # chunk after chunk, in order
    assert [ordered[o : o + n] for o, n in table] == pieces  # each chunk's bytes unchanged
    assert len(ordered) == len(raw)
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "a", mode="r")[:], values)
    assert sorted(p.name for p in shard.parent.iterdir()) == ["0"]  # no staged file left
