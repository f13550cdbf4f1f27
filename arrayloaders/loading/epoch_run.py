"""One loop's use of the workers (:class:`EpochRun`), and how a load is split among idle workers.

The engine (``engine.py``) hands a run's loads to workers and keeps the
ones decoded until the loop asks for them; a run made ahead holds the next
epoch's first loads until the next loop adopts or drops them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .load import LoadedRows
from .plan import EpochPlan
from .ring import SlotLayout
from .worker import Filled

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["EpochRun", "split_points"]


def split_points(runs: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """``runs`` cut into at most ``parts`` consecutive ranges of about equal rows, none empty."""
    rows = np.cumsum(runs[:, 2] - runs[:, 1])
    if rows.size == 0:
        return [(0, 0)]
    cuts = np.searchsorted(rows, rows[-1] * np.arange(1, parts) / parts, side="right")
    bounds = np.unique(np.concatenate([[0], cuts, [rows.size]]))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


class EpochRun:
    """One loop's use of the workers: loads of one epoch, in increasing order.

    Made by :meth:`Engine.start`. :meth:`get` the loads in the order given;
    :meth:`release` when done (idempotent, safe from a finalizer).
    """

    def __init__(self, engine: Engine, plan: EpochPlan, loads: list[int], seq: int):
        self.engine, self.plan, self.loads, self.seq = engine, plan, loads, seq
        self.submitted = 0  # loads[:submitted] were handed to workers
        self.ready: dict[int, Filled] = {}
        self.delivered = 0  # batches the loop has handed out: a loop with at most one is a peek
        self.released = False  # the loop is done with the run
        self.ended = False  # the engine forgot the run
        #: gives (plan, slot layout) of the epoch the next loop will run, or None: its first loads are decoded
        #: once this run has handed out all of its own (asked once)
        self.ahead: Callable[[], tuple[EpochPlan, SlotLayout] | None] | None = None
        self.speculative = False  # the next epoch's loads, decoded before any loop asked for them

    def get(self, load: int) -> tuple[LoadedRows, Callable[[np.ndarray], np.ndarray]] | None:
        """Load ``load`` decoded, with the function that lends views of it; ``None`` if the run lost the workers.

        The returned arrays are lent views: the slot is refilled only once
        they, and every batch made from them, are garbage collected.
        """
        engine = self.engine
        if os.getpid() != engine.owner:
            return None  # a forked child: the parent's workers are not ours to drive
        with engine.lock:
            if self.ended or self.released or engine.run is not self:
                return None
            try:
                return engine._next(self, load)
            except BaseException:
                engine.close()
                raise

    def release(self) -> None:
        self.released = True
