"""Who may change a store's content while others read it.

A Compare reads one state of its collection from its first method to its last, and a Prepare builds artifacts for
one state; deleting a document or a collection, renaming one, changing its retriever or adding documents change
that state. Readers share the lock, a change waits until they are done and holds new readers off meanwhile, so
the methods of one Compare never see different content, a search never meets a chunk deleted under it, and no
artifact is built for content that is gone by the time it is stored."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from ..forks import renew_in_forked_children


class ContentLock:
    """A readers-writer lock. Reading is reentrant per thread (a Prepare inside an upload's preparation, the app
    holding it around a GPU call that reads again); a waiting change goes before new readers, so deletes are not
    starved by a class asking questions."""

    def __init__(self):
        self.renew_after_fork()
        renew_in_forked_children(self)

    def renew_after_fork(self) -> None:
        self._state = threading.Condition()
        self._readers = 0
        self._writing = False
        self._waiting_writers = 0
        self._mine = threading.local()  # this thread's read depth

    @contextmanager
    def reading(self) -> Iterator[None]:
        depth = getattr(self._mine, "depth", 0)
        if depth == 0:
            with self._state:
                while self._writing or self._waiting_writers:
                    self._state.wait()
                self._readers += 1
        self._mine.depth = depth + 1
        try:
            yield
        finally:
            self._mine.depth -= 1
            if self._mine.depth == 0:
                with self._state:
                    self._readers -= 1
                    self._state.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        if getattr(self._mine, "depth", 0):
            raise RuntimeError("a content change inside this thread's own read would wait for itself")
        with self._state:
            self._waiting_writers += 1
            try:
                while self._writing or self._readers:
                    self._state.wait()
            finally:
                self._waiting_writers -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._state:
                self._writing = False
                self._state.notify_all()
