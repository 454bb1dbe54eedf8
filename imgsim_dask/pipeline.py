"""Pipeline: a bounded window of Dask futures, the back-pressure every stage runs under.

Submitting everything at once lets the scheduler run far ahead of what the driver can take
in; `bounded` keeps at most `window` items in flight and submits the next item each time
one completes, so memory stays flat whatever the input size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from distributed import Client, Future, as_completed

Item = TypeVar("Item")


class bounded(Generic[Item]):  # noqa: N801  (used like a function: `with bounded(...)`)
    """`(item, future)` for every item in completion order, with `submit(item)` run for at
    most `window` items in flight. Used as a context manager: leaving it early (an error, an
    interrupt) cancels the futures still in flight, so a shared cluster does not go on with
    work that nobody will take."""

    def __init__(
        self, client: Client, items: Iterable[Item], submit: Callable[[Item], Future], window: int
    ):
        self._client = client
        self._queue = iter(items)
        self._submit = submit
        self._window = max(1, window)
        self._pending: dict[object, tuple[Item, Future]] = {}
        self._in_flight = as_completed()

    def __enter__(self) -> Iterator[tuple[Item, Future]]:
        for _ in range(self._window):
            self._submit_next()
        return self._completed()

    def __exit__(self, *exc_info: object) -> None:
        if self._pending:
            self._client.cancel([future for _, future in self._pending.values()])
            self._pending.clear()

    def _submit_next(self) -> None:
        for item in self._queue:
            future = self._submit(item)
            self._pending[future.key] = (item, future)
            self._in_flight.add(future)
            return

    def _completed(self) -> Iterator[tuple[Item, Future]]:
        for future in self._in_flight:
            item, _ = self._pending.pop(future.key)
            yield item, future
            self._submit_next()


def compute_all(client: Client, collections: list[Any]) -> list[Any]:
    """`dask.compute` on `client`, interruptible: a Ctrl-C while it waits cancels the tasks
    and raises at once (waiting inside `client.compute(...).result()` left a gather task
    behind that failed with distributed's "Task exception was never retrieved ... AllExit")."""
    futures = client.compute(collections)
    try:
        for _ in as_completed(futures):
            pass
    except BaseException:
        client.cancel(futures)
        raise
    return [future.result() for future in futures]
