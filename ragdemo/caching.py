"""The two shapes of in-memory cache the app uses, each written once.

- `BoundedCache`: least recently used first out, bounded by a size summed over the entries; owned by the object
  its entries were computed for (prefix KV, adapters, lower-layer states, captured passage caches: engine/).
- `kept_while`: one value per key, kept with the stamp of what it was computed from (a tensor's version, a
  collection's uid and version, a tokenizer) and made again as soon as that stamp moves.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable


def kept_while(table: dict, key: Hashable, stamp, compute: Callable[[], object]):
    """`table[key]`'s value while it was computed at `stamp`, else `compute()`, kept as `(stamp, value)`."""
    kept = table.get(key)
    if kept is not None and kept[0] == stamp:
        return kept[1]
    value = compute()
    table[key] = (stamp, value)
    return value


class BoundedCache:
    """Least recently used first out, bounded by `size(value)` summed over the entries (1 each by default).
    The newest entry always stays, even when it alone is over the bound."""

    def __init__(self, max_size: float, size: Callable[[object], float] = lambda value: 1):
        self.max_size, self.size = max_size, size
        self.items: "OrderedDict[Hashable, object]" = OrderedDict()
        self.total = 0.0
        self.owner: Hashable | None = None  # what the entries were computed for (`keep_for`)

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

    def keep_for(self, owner: Hashable) -> bool:
        """Empty the cache when `owner` (e.g. `id(lm.model)`: nothing computed for another model object applies)
        is not the one its entries were computed for; True when it was emptied."""
        if owner == self.owner:
            return False
        self.clear()
        self.owner = owner
        return True
