"""Cleanup that a second Ctrl-C cannot cut short.

A user who presses Ctrl-C twice (the second while the first is being
handled) would otherwise interrupt the cleanup the first one started: the
loader's workers and shared memory, or a conversion's half-written store,
would be left behind.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["sigint_deferred"]


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Ignore Ctrl-C while cleaning up (main thread only), so a second one cannot cut cleanup short."""
    if threading.current_thread() is not threading.main_thread():
        yield  # KeyboardInterrupt is only ever raised in the main thread
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler not installed from Python: leave it alone
        yield
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
