"""Read ahead in a background thread, so Redis reads overlap PostgreSQL writes.

The aggregation's two halves wait on different servers: while PostgreSQL merges one
chunk (the driver releases the GIL while it waits), a reader thread fetches and
splits the next batches from Redis. A bounded queue keeps memory flat.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterable
from typing import TypeVar

T = TypeVar("T")

_ITEM, _DONE, _ERROR = range(3)


def prefetched(make_items: Callable[[], Iterable[T]], depth: int = 2) -> Generator[T, None, None]:
    """Yield ``make_items()``'s items, produced by a thread at most ``depth`` items ahead.

    An exception in the producer is raised here, in the consumer. When the consumer
    stops early (an exception, ``close()``), the producer stops at its next item and
    is joined, so nothing touches the producer's resources (its Redis client) after.
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(message: tuple) -> bool:
        while not stop.is_set():
            try:
                slots.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in make_items():
                if not put((_ITEM, item)):
                    return
            put((_DONE, None))
        except BaseException as err:  # handed to the consumer, which raises it
            put((_ERROR, err))

    thread = threading.Thread(target=produce, name="usage-agg-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == _ITEM:
                yield value
            elif kind == _DONE:
                return
            else:
                raise value
    finally:
        stop.set()
        thread.join()
