"""One deadline for one piece of work: a whole Compare (every method it runs), a Prepare on a shared app, a GPU
grant on ZeroGPU. The work checks it between steps and at every decoded token; the limit's name goes into the
message, so a visitor knows which setting stopped what.

Times are `time.perf_counter()` seconds: a system-wide monotonic clock on Linux, so a deadline set in the app's
process still holds in a forked worker (ZeroGPU runs each GPU call in one)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from .errors import UserError

Progress = Callable[[float, str], None]


class DeadlinePassed(UserError):
    """A long job reached its deadline between two steps: what was finished is stored, nothing half-written."""


@dataclass(frozen=True)
class Deadline:
    at: float = math.inf  # perf_counter() seconds; inf = no limit
    limit_s: float = 0.0  # the limit as set, for messages
    reason: str = ""  # what set it, e.g. "RAGDEMO_MAX_COMPARE_S"

    @classmethod
    def after(cls, seconds: float, reason: str, start: float | None = None) -> "Deadline":
        """`seconds` from `start` (default now); 0 or less means no limit, as the settings use it."""
        if seconds <= 0:
            return cls()
        return cls((time.perf_counter() if start is None else start) + seconds, float(seconds), reason)

    @property
    def limited(self) -> bool:
        return math.isfinite(self.at)

    def passed(self) -> bool:
        return time.perf_counter() >= self.at

    def sooner(self, other: "Deadline | None") -> "Deadline":
        """The earlier of the two (either may be unlimited)."""
        return self if other is None or self.at <= other.at else other

    def describe(self) -> str:
        return f"{self.limit_s:g} s limit ({self.reason})"

    def checked(self, progress: Progress | None, what: str) -> Progress:
        """A long job's progress callback that stops the job at the first step boundary past the deadline (every
        step stores whole artifacts, so stopping there loses nothing finished)."""

        def step(fraction: float, message: str) -> None:
            if self.passed():
                raise DeadlinePassed(f"{what} stopped at its {self.describe()}: what was finished is stored; run it "
                                     "again to continue where it stopped")
            if progress:
                progress(fraction, message)

        return step
