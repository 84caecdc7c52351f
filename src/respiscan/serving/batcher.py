"""Cross-request batching for `respiscan serve`: one engine call for the requests that arrive together.

Single-case inference runs at about half the rate of a batch (per-call overhead in the engine), so the server
hands each request's prepared case to a `Batcher`: one thread takes whatever is queued (waiting `window_s`
after the first item for more, at most `max_batch` items), calls `fn` once on the list and resolves each
item's `concurrent.futures.Future`. While `fn` runs, new items queue up and form the next batch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

from respiscan.errors import RespiscanError

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int = 32  # items in one call of `fn`
    window_s: float = 0.002  # how long the first item of a batch waits for others when the queue is empty

    def __post_init__(self) -> None:
        if self.max_batch < 1 or not self.window_s >= 0:
            raise RespiscanError(f"--max-batch ({self.max_batch}) must be at least 1 and --batch-window-ms "
                                 f"({self.window_s * 1000:g}) at least 0")


class Batcher(Generic[Item, Result]):
    """`submit(item)` from any thread; `fn(items)` must return one result per item, in order. When `fn` raises
    for a batch of several, each item is retried alone, so one bad item fails only its own future."""

    def __init__(self, fn: Callable[[list[Item]], list[Result]], config: BatchConfig = BatchConfig(),
                 name: str = "respiscan-batcher"):
        self.fn, self.config = fn, config
        self.sizes: deque[int] = deque(maxlen=1000)  # the sizes of the latest batches scored
        self._queue: queue.Queue[tuple[Item, Future] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Item) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.put((item, future))
        return future

    def close(self) -> None:
        """Score everything submitted so far, then stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (first := self._queue.get()) is not None:
            batch, closing = [first], False
            deadline = time.monotonic() + self.config.window_s
            while len(batch) < self.config.max_batch:
                try:
                    entry = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if entry is None:
                    closing = True
                    break
                batch.append(entry)
            # a future cancelled while queued (its request timed out) is dropped here
            live = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
            if live:
                self.sizes.append(len(live))
                self._score(live)
            if closing:
                return

    def _score(self, batch: list[tuple[Item, Future]]) -> None:
        try:
            results = self.fn([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the batch function gave {len(results)} results for {len(batch)} items")
        except Exception as e:
            if len(batch) == 1:
                batch[0][1].set_exception(e)
            else:
                for entry in batch:
                    self._score([entry])
            return
        for (_, future), result in zip(batch, results):
            future.set_result(result)
