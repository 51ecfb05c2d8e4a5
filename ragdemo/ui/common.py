"""Small helpers every tab uses: user-facing errors and warnings, progress bridging, method labels."""
from __future__ import annotations

import functools
import logging
from typing import Callable

import gradio as gr

from ..errors import UserError
from ..methods import registry
from .render import esc

log = logging.getLogger(__name__)

# Events that use the model share one queue slot: one user's generation never interleaves with another's.
MODEL_QUEUE = {"concurrency_limit": 1, "concurrency_id": "model"}


def error(message: str) -> gr.Error:
    """Gradio renders modal messages as HTML; file names and model text must not become markup."""
    return gr.Error(esc(message))


def warn(message: str) -> None:
    gr.Warning(esc(message))


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


def method_labels() -> dict[str, str]:
    return {name: (cls.label or name) for name, cls in registry().items()}


def method_choices(where: Callable[[type], bool] = lambda cls: True) -> list[tuple[str, str]]:
    return [(cls.label or name, name) for name, cls in registry().items() if where(cls)]
