"""A bounded set of recently seen ids: how handlers recognise a redelivery."""

from __future__ import annotations

from collections import OrderedDict


class RecentIds:
    """Remembers the last ``size`` ids added; the oldest is forgotten first."""

    def __init__(self, size: int = 20_000) -> None:
        self._items: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def add(self, key: str) -> None:
        self._items[key] = None
        self._items.move_to_end(key)
        if len(self._items) > self._size:
            self._items.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
