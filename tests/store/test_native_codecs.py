"""blosc and crc32c called in C (arrayloaders.store.native_codecs) against numcodecs and google_crc32c.

The readers' own results on both paths are compared in test_shards.py (every test runs twice).
"""

from __future__ import annotations

import google_crc32c
import numcodecs.blosc
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from arrayloaders.store.native_codecs import native_codecs
from arrayloaders.store.zarr_layout import direct_array


@pytest.fixture(scope="module")
def native():
    # Found on every install the suite runs on (Python 3.11 and 3.12, wheels from PyPI): if a
    # release of numcodecs or google-crc32c stops exporting them, this fails and says so.
    found = native_codecs()
    assert found is not None, "blosc_decompress_ctx / crc32c_value not found in numcodecs / google_crc32c"
    return found


def address(a: np.ndarray | bytes) -> int:
    return np.frombuffer(a, dtype=np.uint8).ctypes.data if isinstance(a, bytes) else a.ctypes.data


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40_000),
    dtype=st.sampled_from(["float32", "float64", "int32", "uint16", "uint8"]),
    cname=st.sampled_from(["lz4", "zstd", "blosclz", "zlib"]),
    shuffle=st.sampled_from([numcodecs.blosc.NOSHUFFLE, numcodecs.blosc.SHUFFLE, numcodecs.blosc.BITSHUFFLE]),
    seed=st.integers(0, 2**32 - 1),
)
def test_blosc_decompress_equals_numcodecs(native, n, dtype, cname, shuffle, seed):
    rng = np.random.default_rng(seed)
    values = (rng.poisson(0.7, n) * rng.integers(0, 2, n)).astype(dtype)  # counts, mostly zero
    stored = numcodecs.blosc.compress(values, cname.encode(), 5, shuffle)
    out = np.full(n, 77, dtype)
    assert native.blosc_decompress(address(stored), address(out), values.nbytes) == values.nbytes
    assert out.tobytes() == values.tobytes()


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=0, max_size=5000), start=st.integers(0, 64))
def test_crc32c_equals_google_crc32c(native, data, start):
    buf = np.frombuffer(bytes(start) + data, dtype=np.uint8)
    assert native.crc32c(buf.ctypes.data + start, len(data)) == google_crc32c.value(data)


def test_too_small_a_destination_is_an_error_not_an_overrun(native):
    values = np.arange(1000, dtype=np.float32)
    stored = numcodecs.blosc.compress(values, b"lz4", 5, numcodecs.blosc.SHUFFLE)
    guarded = np.full(values.nbytes, 0xAB, np.uint8)
    assert native.blosc_decompress(address(stored), guarded.ctypes.data, values.nbytes - 4) < 0
    assert (guarded[values.nbytes - 4 :] == 0xAB).all()


@pytest.mark.parametrize(
    ("compressors", "uses_native"),
    [
        ([BloscCodec(cname="lz4", shuffle="bitshuffle"), Crc32cCodec()], True),  # what stores are written with
        (BloscCodec(cname="zstd", shuffle="shuffle"), True),
        ([ZstdCodec(level=3), Crc32cCodec()], False),  # numcodecs' zstd (and google_crc32c)
        (None, False),
    ],
    ids=["blosc-lz4-crc32c", "blosc-zstd", "zstd-crc32c", "raw"],
)
def test_readers_of_blosc_arrays_decode_natively(native, tmp_path, compressors, uses_native):
    # Otherwise every "native" case of test_shards.py would test numcodecs twice.
    array = zarr.create_array(tmp_path, name="a", shape=(1000,), chunks=(64,), shards=(256,), dtype="float32",
                              compressors=compressors)  # fmt: skip
    array[:] = np.arange(1000, dtype=np.float32)
    reader = direct_array(array)
    assert (reader._native is not None) == uses_native
    out = np.empty(900, np.float32)
    reader.read_into(50, 950, out)
    assert np.array_equal(out, np.arange(50, 950, dtype=np.float32))
    reader.close()
