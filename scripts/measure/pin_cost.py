"""What a pinned batch costs the main process: a view of a registered ring slot against a copy into pinned memory.

Needs a CUDA device. Registers two slot-sized shared-memory segments (one
written first, one fresh) with ``cudaHostRegister``, checks that torch sees
views of them as pinned and that ``arrayloaders.loading.batches.pinned`` keeps them
as they are, and times enqueueing a 4,096-cell batch's copy to the GPU both
ways. Prints one JSON object.

    python scripts/measure/pin_cost.py
"""

from __future__ import annotations

import json
import os
import time

import torch

from arrayloaders.loading.batches import pinned
from arrayloaders.loading.pinned_slots import CudaHost, PinnedSlots
from arrayloaders.loading.ring import Segment, SlotLayout


def main() -> None:
    out = {}
    layout = SlotLayout("csr", "float32", max_rows=8192, max_nnz=int(8192 * 2500 * 1.1))
    pins = PinnedSlots(CudaHost())
    torch.zeros(1, device="cuda")  # the CUDA context, outside the timings
    segments = [Segment(f"al_{os.getpid()}_pincost_{k}", layout) for k in range(2)]
    try:
        a = segments[0].arrays
        t = time.perf_counter()
        a.data[:], a.indices[:], a.indptr[:] = 1.0, 7, 0
        out["first_write_s"] = time.perf_counter() - t
        t = time.perf_counter()
        pins.lent(segments[0])
        out["register_written_s"] = time.perf_counter() - t
        t = time.perf_counter()
        pins.lent(segments[1])
        out["register_fresh_s"] = time.perf_counter() - t
        nnz = 4096 * 2500
        values = torch.from_numpy(segments[0].lend(a.data[123 : 123 + nnz]))
        cols = torch.from_numpy(segments[0].lend(a.indices[123 : 123 + nnz]))
        crow = torch.arange(0, nnz + 1, 2500, dtype=torch.int32)
        X = torch.sparse_csr_tensor(crow, cols, values, size=(4096, 33538), check_invariants=False)
        P = pinned(X)
        out["views_kept"] = P.values().data_ptr() == values.data_ptr() and P.col_indices().data_ptr() == cols.data_ptr()
        out["pinned"] = P.is_pinned()
        pageable = X.clone()  # the same batch in ordinary memory: what the previous version copied from
        for name, make in [("registered_view", lambda: pinned(X)), ("copy_into_pinned", lambda: pinned(pageable))]:
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                make().to("cuda", non_blocking=True)
            enqueued = time.perf_counter() - t
            torch.cuda.synchronize()
            out[name] = {
                "main_ms_per_batch": 1e3 * enqueued / 20,
                "landed_ms_per_batch": 1e3 * (time.perf_counter() - t) / 20,
            }
    finally:
        for s in segments:
            pins.retire(s)
            s.unlink()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
