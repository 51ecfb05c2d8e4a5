"""A forked child process (ZeroGPU runs every GPU call in one) inherits the parent's locks in whatever state they
were, held by threads that do not exist in the child, and the parent's SQLite connections, which SQLite forbids
using across a fork. Objects that own such things renew them in the child, here, before the child runs anything."""
from __future__ import annotations

import os
import weakref
from typing import Callable

_objects: "weakref.WeakSet" = weakref.WeakSet()  # objects with a renew_after_fork() method
_hooks: list[Callable[[], None]] = []  # module-level state


def renew_in_forked_children(target) -> None:
    """`target`: an object with `renew_after_fork()` (held weakly), or a function for module-level state."""
    if callable(target) and not hasattr(target, "renew_after_fork"):
        _hooks.append(target)
    else:
        _objects.add(target)


def _one_cpu_thread() -> None:
    """PyTorch's CPU kernels run on an OpenMP thread pool (GNU libgomp in its Linux wheels) that does not survive a
    fork: in the child, the first parallel kernel waits forever for the parent's pool threads (seen here in a
    packed linear). One thread runs no parallel region. ZeroGPU's workers do their heavy work on the GPU; the CPU
    work left there (tokens, the question's embedding, numpy) is small."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _renew() -> None:
    _one_cpu_thread()
    for hook in _hooks:
        hook()
    for obj in list(_objects):
        obj.renew_after_fork()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_renew)
