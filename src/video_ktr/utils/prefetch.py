"""One background thread that prepares the next micro-step's data while the current step computes.

Used by the GRPO trainer (media decoding and the processor) and the SFT trainer (media decoding). The
work must only read the trainer's state: whatever it finds (unreadable rows, say) is returned and
recorded by the caller when it takes the result, so a skip or an error belongs to the step that uses
the data. Only one item is prepared at a time, and the caller always waits for it before preparing
anything itself, so the work never runs twice at once.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from threading import Thread
from typing import Any


class Prefetcher:
    def __init__(self, thread_name: str) -> None:
        self.thread_name = thread_name
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[Hashable, Future] | None = None

    @property
    def pending_key(self) -> Hashable | None:
        """The key of the item being prepared (None: nothing is)."""
        return self._pending[0] if self._pending is not None else None

    @property
    def threads(self) -> list[Thread]:
        return list(self._pool._threads) if self._pool is not None else []

    def start(self, key: Hashable, fn: Callable[..., Any], *args: Any) -> None:
        """Prepare ``fn(*args)`` for ``key`` in the background (after the item in progress, if any)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.thread_name)
        self._pending = (key, self._pool.submit(fn, *args))

    def take(self, key: Hashable, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` for ``key``: the prefetched result when it was started for ``key`` (raising what it
        raised), else made now. A prefetch for another key (the caller's state was moved: resumption, a test)
        is awaited first and dropped unused."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending_key, future = pending
            if pending_key == key:
                return future.result()
            wait([future])
        return fn(*args)

    def close(self) -> None:
        """Wait for the item in progress and stop the thread."""
        if self._pending is not None:
            wait([self._pending[1]])
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
