"""Newest: the newest items of an append-only sequence, and how many were appended in all.

A recording's finalized files (``rec.paths``) and a run's (``RunController.files()``) grew
with every segment for as long as a run lasted (60 s segments: 43,200 paths a month, held in
the writer process and again in the daemon). What uses them needs only the newest (a stop
reply lists at most :data:`FILES_KEPT`, a log line fewer) and how many there are (``total``),
or, for the file events, the ones appended since a position::

    files = Newest[str]()
    files.append("a.h5"); files.extend(["b.h5", "c.h5"])
    files.total, list(files), files.newest(2)   # 3, the held ones oldest first, the last 2
    files.since(1)                              # those from position 1 (0 is the first)
    files.hold(3)                               # a reader at 3: keep all from there

Positions are absolute: the first item ever appended is at 0 and the next one goes to
``total``; ``first`` is the position of the oldest one still held. Items older than the newest
``keep`` are dropped, except from the position a reader holds on (:meth:`hold`): a writer
that finalizes thousands of tiny segments between two of its reader's looks loses none of
them to that reader. ``len()`` is deliberately not defined (held or total? say which).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")

FILES_KEPT = 1_000
"""Finalized files a recording and a run hold (the newest; ``total`` counts them all): more
than a stop reply lists (REPLY_FILES_CHARS of paths) or a log line (LOGGED_FILES) for paths
of 200 characters, ~0.5 MB per recording at most."""


class Newest(Generic[T]):
    """The newest ``keep`` items appended (and any a reader holds on to), and ``total``.
    ``keep``: :data:`FILES_KEPT` unless given."""

    __slots__ = ("_held", "_items", "keep", "total")

    def __init__(self, items: Iterable[T] = (), *, keep: int | None = None) -> None:
        keep = FILES_KEPT if keep is None else keep
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        self.keep = keep
        self.total = 0
        self._items: deque[T] = deque()
        self._held: int | None = None  # a reader's position: nothing from it on is dropped
        self.extend(items)

    @property
    def first(self) -> int:
        """The position of the oldest item held (``total`` when none is)."""
        return self.total - len(self._items)

    @property
    def held(self) -> int:
        """How many items are held (at most ``keep``, plus those a reader holds on to)."""
        return len(self._items)

    def append(self, item: T) -> None:
        self._items.append(item)
        self.total += 1
        self._trim()

    def extend(self, items: Iterable[T]) -> None:
        """Append ``items``; of another :class:`Newest`, also count those it counted but no
        longer holds (as appended and dropped: what this one held is older, and dropped too,
        so that positions stay right)."""
        if isinstance(items, Newest) and items.first:
            self._items.clear()
            self.total += items.first
        for item in items:
            self.append(item)

    def replace_from(self, position: int, items: Iterable[T]) -> None:
        """The items from ``position`` on are ``items`` (those held from there are replaced):
        what a writer process says it finalized since the position it last reported."""
        while self._items and self.total > position:
            self._items.pop()
            self.total -= 1
        if self.total != position:  # dropped already, or a gap: positions must stay right
            self._items.clear()
            self.total = position
        self.extend(items)

    def hold(self, position: int) -> None:
        """A reader is at ``position``: keep every item from there on until it moves on
        (a later :meth:`hold`). Older ones are dropped down to ``keep``."""
        self._held = position
        self._trim()

    def since(self, position: int) -> list[T]:
        """The items from ``position`` on (oldest first), of those held."""
        if position >= self.total:
            return []
        return list(islice(self._items, max(0, position - self.first), None))

    def newest(self, n: int) -> list[T]:
        """The newest ``n`` items held, oldest first."""
        if n <= 0:
            return []
        return list(islice(reversed(self._items), n))[::-1]

    def copy(self) -> Newest[T]:
        """A copy (of what is held and the count; no reader holds it)."""
        return self.mapped(lambda item: item)

    def mapped(self, fn: Callable[[T], U]) -> Newest[U]:
        """A copy with ``fn`` applied to each item held (and the same count)."""
        other: Newest[U] = Newest(keep=self.keep)
        other._items = deque(map(fn, self._items))
        other.total = self.total
        return other

    def _trim(self) -> None:
        drop = len(self._items) - self.keep
        if self._held is not None:
            drop = min(drop, self._held - self.first)
        for _ in range(drop):
            self._items.popleft()

    def __iter__(self) -> Iterator[T]:
        """The items held, oldest first."""
        return iter(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __bool__(self) -> bool:
        return self.total > 0

    def __repr__(self) -> str:
        return f"Newest(total={self.total}, held={len(self._items)}, newest={self.newest(3)!r})"
