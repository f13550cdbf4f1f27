#!/usr/bin/env python
"""Train a small classifier on an arrayloaders store: one process, or DDP under torchrun.

Logistic regression (``torch.nn.Linear(n_vars, n_classes)`` on log1p counts of
the sparse CSR batches) predicting an obs column (default ``cell_type``) with
cross-entropy.

    python scripts/train.py --make-example /tmp/al-train            # make a small store, then train
    python scripts/train.py --store path/to/store --epochs 3
    torchrun --nproc_per_node=2 scripts/train.py --store path/to/store --epochs 3

Under torchrun (``WORLD_SIZE`` > 1) every rank joins a gloo process group and
the model is wrapped in ``DistributedDataParallel``; the dataset takes rank and
world size from the group and gives every rank its own, disjoint share of each
epoch, with the same number of batches on every rank. Each rank prints one line
per epoch; at the end rank 0 (or the only process) prints one JSON line with the
final loss and the cells and batches seen by every rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from arrayloaders import ZarrSparseDataset, create_store_from_h5ads, read_manifest
from arrayloaders.example_data import write_example_h5ads


class LogisticRegression(torch.nn.Module):
    """``Linear(n_vars, n_classes)`` on log1p of sparse CSR counts."""

    def __init__(self, n_vars: int, n_classes: int):
        super().__init__()
        self.linear = torch.nn.Linear(n_vars, n_classes)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        # log1p(0) == 0, so transforming the stored values keeps X sparse.
        X = torch.sparse_csr_tensor(
            X.crow_indices(), X.col_indices(), torch.log1p(X.values()), X.shape, check_invariants=False
        )
        return torch.sparse.mm(X, self.linear.weight.T) + self.linear.bias


def say(line: str) -> None:
    """Print one line in one write, so that the lines of concurrent ranks do not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def make_example(directory: Path) -> Path:
    """A small example store (4 x 2,500 cells, 2,000 genes) under ``directory``; reused if there."""
    store = directory / "store"
    if (store / "arrayloaders.json").exists():
        return store
    paths = write_example_h5ads(directory / "h5ad", (2_500,) * 4, 2_000, nnz_per_cell=200)
    return create_store_from_h5ads(paths, store, n_obs_per_file=4_096, overwrite=True, progress=False)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", type=Path, help="store made by arrayloaders.create_store_from_h5ads")
    src.add_argument("--make-example", type=Path, metavar="DIR", help="generate a small example store in DIR and use it")
    p.add_argument("--epochs", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4096, help="cells per batch and rank (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=None, help="loader worker processes (default: the package's)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--max-batches", type=int, default=0, help="batches per epoch at most; 0 = all (default: %(default)s)")
    p.add_argument("--obs-key", default="cell_type", help="categorical obs column to predict (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and the model init (default: %(default)s)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo", init_method="env://", timeout=timedelta(minutes=5))
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    store = args.store
    if store is None:
        if rank == 0:
            store = make_example(args.make_example)
        if distributed:
            dist.barrier()  # the others wait until rank 0 has written the store
        store = args.make_example / "store"

    # rank / world_size come from the process group (nothing to pass).
    ds = ZarrSparseDataset(batch_size=args.batch_size, seed=args.seed, num_workers=args.num_workers)
    ds.add_store(store, obs_keys=args.obs_key)
    categories = ds.categories.get(args.obs_key)
    if categories is None:
        raise SystemExit(f"obs column {args.obs_key!r} is not categorical: nothing to classify")
    n_vars, n_classes = read_manifest(store).n_vars, len(categories)

    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model: torch.nn.Module = LogisticRegression(n_vars, n_classes)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    epoch_losses, cells_seen, batches_seen = [], 0, 0
    try:
        for epoch in range(args.epochs):
            ds.set_epoch(epoch)
            model.train()
            t = time.perf_counter()
            loss_sum, n_batches, n_cells = 0.0, 0, 0
            for X, y in ds:
                loss = torch.nn.functional.cross_entropy(model(X), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item()
                n_batches += 1
                n_cells += X.shape[0]
                if n_batches == args.max_batches:
                    break  # every rank has the same number of batches, so all stop together
            took = time.perf_counter() - t
            mean_loss = loss_sum / n_batches if n_batches else math.nan
            epoch_losses.append(mean_loss)
            cells_seen += n_cells
            batches_seen += n_batches
            say(
                f"rank {rank} epoch {epoch}: {n_batches} batches, {n_cells / took:,.0f} cells/s, "
                f"mean loss {mean_loss:.4f}"
            )

        mine = {"rank": rank, "cells": cells_seen, "batches": batches_seen, "epoch_losses": epoch_losses,
                "num_workers": ds.num_workers}  # fmt: skip
        if distributed:
            everyone: list[dict | None] = [None] * world_size
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        if rank == 0:
            # The loss of the last epoch, averaged over ranks (each rank saw its own cells).
            last = [r["epoch_losses"][-1] for r in everyone if r["epoch_losses"]]
            summary = {
                "world_size": world_size,
                "n_obs": ds.n_obs,
                "n_vars": n_vars,
                "n_classes": n_classes,
                "epochs": args.epochs,
                "final_loss": sum(last) / len(last) if last else None,
                "epoch_losses": [
                    sum(r["epoch_losses"][e] for r in everyone) / world_size for e in range(len(epoch_losses))
                ],
                "cells_per_rank": [r["cells"] for r in everyone],
                "batches_per_rank": [r["batches"] for r in everyone],
                "num_workers_per_rank": [r["num_workers"] for r in everyone],
            }
            say(json.dumps(summary))
    finally:
        ds.close()
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
