"""Small helpers every tab uses: user-facing errors and warnings, progress bridging, method labels."""
from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Callable

import gradio as gr

from ..errors import UserError
from ..hashing import sha256
from ..methods import registry
from .render import esc

log = logging.getLogger(__name__)

# Events that use the model share one queue slot: one user's generation never interleaves with another's.
MODEL_QUEUE = {"concurrency_limit": 1, "concurrency_id": "model"}


def error(message: str) -> gr.Error:
    """Gradio renders modal messages as HTML; file names and model text must not become markup."""
    return gr.Error(esc(message))


# Every warning is also said where it belongs (a sentence by the button, or the method's card); the toast is the
# nudge to look there, so it goes after a few seconds instead of covering the top right (where Compare sits on a
# scrolled page) and stacking for Gradio's default 10.
TOAST_SECONDS = 5


def warn(message: str) -> None:
    gr.Warning(esc(message), duration=TOAST_SECONDS)


def info(message: str) -> None:
    gr.Info(esc(message))


def user_errors(fn: Callable) -> Callable:
    """A handler's UserError becomes a readable gr.Error; anything else is logged and reported briefly,
    so no click can take the app down."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except UserError as exc:
            raise error(str(exc)) from None
        except Exception as exc:  # a bug must not kill the server; the log has the traceback
            log.exception("handler %s failed", fn.__name__)
            raise error(f"internal error in {fn.__name__}: {type(exc).__name__}: {exc}") from None

    return wrapper


def progress_bridge(progress: gr.Progress | None):
    """Workbench progress callbacks are (fraction, message); Gradio's are (fraction, desc=...)."""
    if progress is None:
        return None
    return lambda fraction, message: progress(max(0.0, min(1.0, float(fraction))), desc=message)


class Cancelled(BaseException):
    """Raised from a long job's progress callback after Cancel: the job stops at its next step (question, chunk,
    training step). A BaseException, so per-question `except Exception` handlers do not swallow it; the store is
    consistent because every write is a transaction and the benchmark's cleanup runs in `finally`."""


class CancelFlag:
    """One job's Cancel. Pressed in the app's process; the job checks it at every step wherever it runs. With a
    file it also reaches a ZeroGPU worker, a forked process that a threading.Event set here never reaches."""

    def __init__(self, path: Path | None = None):
        self.path, self._event = path, threading.Event()

    def set(self) -> None:
        self._event.set()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()

    def is_set(self) -> bool:
        return self._event.is_set() or (self.path is not None and self.path.exists())

    def clear(self) -> None:
        self._event.clear()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class Jobs:
    """Cancel flags of the long jobs running now, one per (browser session, job kind): one user's Cancel never
    stops another user's job. `folder` (the app's data directory) makes them files, for jobs in other processes."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self._flags: dict[tuple[str, str], CancelFlag] = {}
        self._lock = threading.Lock()

    def _new(self, session: str, kind: str) -> CancelFlag:
        if self.folder is None:
            return CancelFlag()
        name = sha256(f"{session}|{kind}".encode())[:20]  # session ids are not file names
        return CancelFlag(self.folder / f"{name}.cancel")

    def start(self, session: str, kind: str) -> CancelFlag:
        with self._lock:
            flag = self._flags[(session, kind)] = self._new(session, kind)
        flag.clear()
        return flag

    def flag(self, session: str, kind: str) -> CancelFlag:
        """The job's flag, registered when its button was clicked (see `start`): a Cancel pressed while the job
        still waited in the queue is not lost."""
        with self._lock:
            return self._flags.setdefault((session, kind), self._new(session, kind))

    def cancel(self, session: str, kind: str) -> bool:
        with self._lock:
            flag = self._flags.get((session, kind))
        if flag is None:
            return False
        flag.set()
        return True

    def finish(self, session: str, kind: str) -> None:
        with self._lock:
            flag = self._flags.pop((session, kind), None)
        if flag is not None:
            flag.clear()


def session_of(request) -> str:
    return getattr(request, "session_hash", None) or "local"


def cancellable(progress: Callable | None, flag: CancelFlag) -> Callable:
    """A Workbench progress callback that raises Cancelled once `flag` is set (checked at every step)."""

    def step(fraction: float, message: str) -> None:
        if flag.is_set():
            raise Cancelled()
        if progress:
            progress(fraction, message)

    return step


def method_labels() -> dict[str, str]:
    return {name: (cls.label or name) for name, cls in registry().items()}


def method_choices(where: Callable[[type], bool] = lambda cls: True) -> list[tuple[str, str]]:
    return [(cls.label or name, name) for name, cls in registry().items() if where(cls)]
