"""What the engine keeps on the LM object between answers (prefix KV, adapters, lower-layer states, captured
passage caches), so it lives and dies with the model it was computed for. The cache itself is
`ragdemo.caching.BoundedCache`."""
from __future__ import annotations

from typing import Callable

from ..caching import BoundedCache

__all__ = ["BoundedCache", "lm_memo", "lm_owned"]


def lm_owned(lm, attribute: str, make: Callable[[], object]):
    """`lm.<attribute>`, made by `make()` on first use: it lives and dies with the LM object."""
    if getattr(lm, attribute, None) is None:
        setattr(lm, attribute, make())
    return getattr(lm, attribute)


def lm_memo(lm, name: str, max_size: float, size: Callable[[object], float] = lambda value: 1) -> BoundedCache:
    """The LM's cache called `name`, made on first use."""
    memos = lm.__dict__.setdefault("memos", {})
    if name not in memos:
        memos[name] = BoundedCache(max_size, size)
    return memos[name]
