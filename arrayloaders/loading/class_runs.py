"""Class-balanced sampling in runs of consecutive cells of one class: chunked reads, for stores grouped by class.

A sampler of single cells (``WeightedRandomSampler`` over
:meth:`class_weights`) costs one inner-chunk decode per cell, several times
chunked access. Where the cells of each class lie together in the store
(converted with ``shuffle=False`` from inputs sorted by class, or AnnData
files written that way), whole runs of one class can be drawn instead: the
workers then read each run like a chunk, at chunked-access speed. This is
annbatch's ``WeightedClassSampler`` scheme, as a sampler: it works with
workers, DDP ranks and exact resume like any other ``sampler=``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = ["ClassRunSampler"]


class ClassRunSampler(torch.utils.data.Sampler[int]):
    """Runs of up to ``run_size`` consecutive cells of one class, classes drawn by weight, cells mixed per window.

    Each epoch draws runs until ``num_samples`` cells: a class ``c`` with
    probability chosen so that each class gets ``class_weights[c]`` of the
    cells in expectation (equal shares by default), then a cell of ``c``
    uniformly, and the run of ``run_size`` cells of its class-run around it
    (shorter where the class-run is). Runs are drawn with replacement. The
    cells of every ``window`` runs are shuffled together, so each batch
    mixes the classes of a window, and a load reads about ``window`` runs. Randomness comes from torch's global
    generator, which the dataset seeds from ``(seed, epoch)``: the same
    epoch gives the same sequence on every rank and after a resume.

    Parameters
    ----------
    labels
        One class code per cell (numbered as ``return_index`` numbers
        them), ``-1`` for cells never to draw (missing label, outside the
        selection).
    run_size
        Cells per run: the dataset's ``chunk_size`` reads each run as one chunk.
    num_samples
        Cells per epoch (default: the number of drawable cells).
    class_weights
        Share of the cells per class code (default: equal shares for the
        classes that have cells). Classes with weight 0 are never drawn.
    window
        Runs whose cells are shuffled together: the dataset's
        ``preload_nchunks`` makes a window one load.

    Examples
    --------
    >>> sampler = ds.class_run_sampler("cell_type")  # a store grouped by cell type
    >>> balanced = ds.subset(sampler=sampler)
    """

    def __init__(
        self,
        labels: np.ndarray | Sequence[int],
        run_size: int,
        num_samples: int | None = None,
        class_weights: np.ndarray | Sequence[float] | None = None,
        window: int = 256,
    ):
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be one integer class code per cell, got {labels.dtype} of shape {labels.shape}")
        if labels.size == 0:
            raise ValueError("no cells to draw: labels is empty")
        if run_size < 1 or window < 1:
            raise ValueError(f"run_size and window must be at least 1, got {run_size} and {window}")
        # Maximal runs of one class: where the label changes.
        edges = np.flatnonzero(np.diff(labels)) + 1
        starts = np.concatenate([[0], edges]).astype(np.int64)
        stops = np.concatenate([edges, [labels.size]]).astype(np.int64)
        codes = labels[starts]
        keep = codes >= 0
        starts, stops, codes = starts[keep], stops[keep], codes[keep]
        n_classes = int(codes.max(initial=-1)) + 1
        cells = np.bincount(codes, weights=stops - starts, minlength=n_classes)
        if class_weights is None:
            weights = (cells > 0).astype(np.float64)
        else:
            weights = np.asarray(class_weights, dtype=np.float64).ravel()
            if weights.size < n_classes or (weights < 0).any() or not np.isfinite(weights).all():
                raise ValueError(f"class_weights must be {n_classes} or more finite weights >= 0, got {weights.size}")
            has_cells = np.zeros(weights.size, dtype=bool)
            has_cells[:n_classes] = cells > 0
            empty = np.flatnonzero((weights > 0) & ~has_cells)
            if empty.size:
                raise ValueError(f"class_weights gives weight to class code {int(empty[0])}, which has no cells to draw")
            weights = weights[:n_classes]
        if weights.sum() <= 0:
            raise ValueError("no cells to draw: every label is -1 or every class has weight 0")
        # Runs of a class in store order: drawing a cell of the class uniformly picks a run by length.
        order = np.argsort(codes, kind="stable")
        self._starts, self._stops, self._codes = starts[order], stops[order], codes[order]
        lengths = self._stops - self._starts
        self._cum = np.cumsum(lengths)  # cells of the class-runs up to each, all classes back to back
        self._first = np.searchsorted(self._codes, np.arange(n_classes))  # each class's first run
        self._offset = np.concatenate([[0], self._cum])[self._first]  # cells before each class's first
        self._cells = cells.astype(np.int64)
        # A draw of class c yields min(run_size, length of the class-run it lands in) cells on average
        # E_c; drawing c with probability ~ weight_c / E_c gives class c weight_c of the cells.
        taken = np.bincount(self._codes, weights=lengths * np.minimum(lengths, run_size), minlength=n_classes)
        mean_run = np.divide(taken, cells, out=np.ones(n_classes), where=cells > 0)
        self._p = weights / mean_run
        self._p /= self._p.sum()
        self.run_size, self.window = int(run_size), int(window)
        drawable = int(cells[weights > 0].sum())
        self.num_samples = drawable if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        short = float(np.average(mean_run[weights > 0], weights=weights[weights > 0]))
        if short < run_size / 2:
            warnings.warn(
                f"ClassRunSampler: the runs of one class in this store hold {short:.1f} cells on average, far fewer "
                f"than run_size={run_size}: its cells are not grouped by class, and reads will be nearly one cell "
                "at a time (convert with shuffle=False from inputs sorted by class)",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def indices(self) -> np.ndarray:
        """This epoch's sequence of cells (int64), drawn from torch's global generator."""
        rows, sizes = self.draw_runs()
        return self.mix(rows, sizes)

    def draw_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """(cells of the drawn runs back to back, cut at ``num_samples``; each run's size before the cut)."""
        pieces, sizes, total = [], [], 0
        p = torch.from_numpy(self._p)
        while total < self.num_samples:
            n = -(-(self.num_samples - total) // self.run_size)  # enough runs if each is full
            classes = torch.multinomial(p, n, replacement=True).numpy()
            u = (torch.rand(n, dtype=torch.float64).numpy() * self._cells[classes]).astype(np.int64)
            at = self._offset[classes] + u  # the drawn cell among all class-runs back to back
            run = np.searchsorted(self._cum, at, side="right")
            start, stop = self._starts[run], self._stops[run]
            cell = start + (at - (self._cum[run] - (stop - start)))
            size = np.minimum(self.run_size, stop - start)
            first = np.minimum(cell, stop - size)  # the run around the drawn cell, inside its class-run
            pieces.append(np.repeat(first - np.cumsum(size) + size, size) + np.arange(int(size.sum())))
            sizes.append(size)
            total += int(size.sum())
        return np.concatenate(pieces)[: self.num_samples], np.concatenate(sizes)

    def mix(self, rows: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """``rows`` with the cells of every ``window`` runs (of ``sizes``) shuffled together, in place."""
        bounds = np.concatenate([[0], np.cumsum(sizes)])[:: self.window].tolist() + [rows.size]
        for a, b in zip(bounds[:-1], bounds[1:]):
            b = min(b, rows.size)
            if b > a:
                rows[a:b] = rows[a:b][torch.randperm(b - a).numpy()]
        return rows
