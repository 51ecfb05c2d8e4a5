"""The lock that serialises every use of one shared model, and how a long job gives the model back between steps.

Answers hold the lock for one answer. A long job (preparing BTR/LLoCO on a big collection, training an adapter)
would hold it for minutes, so it holds it per step instead: its progress calls mark the points between steps
where no half-built state is visible (each chunk's artifact is stored whole, an adapter trains on a private copy
of the module tree), and there the job lets a waiting thread in and takes the model back after that thread is done.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from ..forks import renew_in_forked_children

Progress = Callable[[float, str], None]


class ModelLock:
    """A mutex (`with lm.lock:`) that also counts its acquisitions and waiters, so the holder of a long job can
    see that someone waits and hand the model over for real: a plain Lock released and re-acquired at once is
    usually taken back by the releasing thread before the waiting one wakes up."""

    HANDOVER_S = 5.0  # the longest a step waits for a waiting thread to take the model (then it goes on)

    def __init__(self):
        self.renew_after_fork()
        renew_in_forked_children(self)

    def renew_after_fork(self) -> None:
        """Free in a forked child: a thread of the parent that held it does not exist there."""
        self._lock = threading.Lock()
        self._counts = threading.Lock()
        self._waiting = 0
        self._taken = 0  # acquisitions so far: a change after a release means another thread got in

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        with self._counts:
            self._waiting += 1
        try:
            got = self._lock.acquire(blocking, timeout)
        finally:
            with self._counts:
                self._waiting -= 1
                if got:
                    self._taken += 1
        return got

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> "ModelLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def hand_over(self) -> float:
        """Called by the holder between two steps: when another thread waits for the model, let it in and take the
        model back once it is done. Returns the seconds the holder spent away (0.0 when nobody waited)."""
        if not self._waiting:
            return 0.0
        started = time.perf_counter()
        taken = self._taken
        self._lock.release()
        try:
            deadline = started + self.HANDOVER_S
            while self._taken == taken and self._waiting and time.perf_counter() < deadline:
                time.sleep(0.0005)  # the waiter wakes up and takes the lock; we only queue behind it
        finally:
            self.acquire()
        return time.perf_counter() - started

    @contextmanager
    def per_step(self, progress: Progress | None = None) -> Iterator["StepProgress"]:
        """Hold the model for a long job, handing it over at each of the job's progress calls. Yields the progress
        callback to give the job (it forwards to `progress`, when given, before handing over)."""
        step = StepProgress(self, progress)
        with self:
            yield step


class StepProgress:
    """A long job's progress callback that also marks a step boundary: the model may change hands there.
    `handed_s` is the time the job spent waiting for others, so a measured preparation time can leave it out."""

    def __init__(self, lock: ModelLock, progress: Progress | None):
        self.lock, self.progress, self.handed_s = lock, progress, 0.0

    def __call__(self, fraction: float, message: str) -> None:
        if self.progress:
            self.progress(fraction, message)  # may raise (a Cancel): the lock is still held, `per_step` releases it
        self.handed_s += self.lock.hand_over()
