"""One bounded cache for everything kept in memory between answers (prefix KV, adapters, lower-layer states,
captured passage caches), owned by the LM object so it lives and dies with the model it was computed for."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable


class BoundedCache:
    """Least recently used first out, bounded by `size(value)` summed over the entries (1 each by default).
    The newest entry always stays, even when it alone is over the bound."""

    def __init__(self, max_size: float, size: Callable[[object], float] = lambda value: 1):
        self.max_size, self.size = max_size, size
        self.items: "OrderedDict[Hashable, object]" = OrderedDict()
        self.total = 0.0

    def __contains__(self, key: Hashable) -> bool:
        return key in self.items

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(list(self.items))

    def values(self) -> list:
        return list(self.items.values())

    def get(self, key: Hashable, compute: Callable[[], object]):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = compute()
        self.items[key] = value
        self.total += self.size(value)
        while len(self.items) > 1 and self.total > self.max_size:
            _, old = self.items.popitem(last=False)
            self.total -= self.size(old)
        return value

    def clear(self) -> None:
        self.items.clear()
        self.total = 0.0


def lm_memo(lm, name: str, max_size: float, size: Callable[[object], float] = lambda value: 1) -> BoundedCache:
    """The LM's cache called `name`, made on first use."""
    memos = lm.__dict__.setdefault("memos", {})
    if name not in memos:
        memos[name] = BoundedCache(max_size, size)
    return memos[name]
