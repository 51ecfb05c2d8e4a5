"""ZeroGPU, Hugging Face's shared GPUs (docs/SPACES.md): every handler that runs the model is decorated with
`spaces.GPU`, asking for as long as the app's own estimate of its work, capped (shorter requests get a better place
in ZeroGPU's queue, and a visitor's daily quota must cover the request). The work sets its own deadline inside the
grant, so it stops itself, keeping what it finished, before ZeroGPU would end it.

On ZeroGPU a decorated call runs in a forked worker process: nothing an answer needs may live only in memory (the
store holds artifacts, adapters and runs), and no lock of the app's process reaches the worker. So the app's
process holds the content lock (store/content_lock.py) around the call: a delete waits for the Compare running in
the worker. Everywhere else `spaces.GPU` returns the function itself and the handler runs here, taking the locks
itself; `on_gpu` then adds nothing but the mark that tests/test_zerogpu.py inspects."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

from ..deadline import Deadline

COMPARE_CAP_S = 60  # ZeroGPU's default duration: a class's Compares keep a good queue priority
# Prepare, an upload's or the demo's preparation, fine-tuning, the benchmark. Under the smallest daily quota
# (a visitor who is not logged in: 2 minutes), so any visitor can be granted it; preparation stops itself inside
# the grant and continues where it stopped when run again
JOB_CAP_S = 110
FLOOR_S = 15
MARGIN_S = 10  # the work's own deadline ends this long before its grant (a last prefill, returning the result)
UNTIMED_ANSWER_S = 20.0  # a method this app has never timed: a slow CPU answer, generous on a GPU


def on_zerogpu() -> bool:
    """True in a ZeroGPU Space (the `spaces` package reads SPACES_ZERO_GPU, which ZeroGPU sets)."""
    from spaces.config import Config

    return bool(Config.zero_gpu)


@dataclass(frozen=True)
class GpuGrant:
    """What a handler asks ZeroGPU for: `estimate(*handler args)` seconds plus the margin, within bounds."""

    estimate: Callable[..., float]
    cap_s: int

    def seconds(self, *args, **kwargs) -> int:
        try:
            wanted = float(self.estimate(*args, **kwargs))
        except Exception:  # noqa: BLE001 - bad input is the handler's to report; ask for the cap
            wanted = self.cap_s
        return int(min(self.cap_s, max(FLOOR_S, wanted + MARGIN_S)))

    def deadline(self, *args, **kwargs) -> Deadline:
        """The work's own deadline on ZeroGPU, counted from now; no limit elsewhere."""
        if not on_zerogpu():
            return Deadline()
        return Deadline.after(self.seconds(*args, **kwargs) - MARGIN_S, "its ZeroGPU grant")


def at_cap(*_args, **_kwargs) -> float:
    """The estimate of work the app cannot size in advance (preparation, training): the cap. It stops itself inside
    the grant and the next run continues where it stopped."""
    return float("inf")


def on_gpu(content_lock, grant: GpuGrant) -> Callable[[Callable], Callable]:
    """Decorate a Gradio handler that runs the model. `content_lock`: the Workbench's, held by this process while
    the call runs in a ZeroGPU worker."""

    def wrap(fn: Callable) -> Callable:
        import spaces

        decorated = spaces.GPU(duration=grant.seconds)(fn)
        if decorated is fn:  # not on ZeroGPU: runs here and takes its own locks
            handler = fn
        elif inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def handler(*args, **kwargs):
                with content_lock.reading():
                    yield from decorated(*args, **kwargs)
        else:
            @functools.wraps(fn)
            def handler(*args, **kwargs):
                with content_lock.reading():
                    return decorated(*args, **kwargs)
        handler.gpu_grant = grant
        return handler

    return wrap


def answer_seconds(workbench, methods: list[str]) -> float:
    """How long these methods took to answer on this machine (the mean of each one's recent runs in History),
    UNTIMED_ANSWER_S for a method never timed here."""
    means = workbench.answer_seconds()
    return sum(means.get(m, UNTIMED_ANSWER_S) for m in methods or [])
