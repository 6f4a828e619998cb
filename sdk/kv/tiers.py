"""Byte-budgeted LRU memory tiers in front of the disk store: host memory, or device memory for a device tier.
They hold what the disk holds: the packed tensors of a block or record (in the KV's numerics) and its meta."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Total bytes of a dict of tensors."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


class MemoryTier:
    """An LRU of decoded records under a byte budget: host memory, or device memory for a device tier."""

    def __init__(self, name: str, capacity_bytes: int, device: str = "cpu"):
        self.name, self.capacity, self.device = name, int(capacity_bytes), torch.device(device)
        self._items: OrderedDict[bytes, tuple[dict, dict, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.used = self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: bytes) -> tuple[dict, dict] | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0], item[1]

    def put(self, key: bytes, tensors: dict, meta: dict) -> None:
        size = nbytes(tensors)
        if size > self.capacity:
            return
        if self.device.type != "cpu":
            tensors = {k: v.to(self.device, non_blocking=True) for k, v in tensors.items()}
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return
            while self.used + size > self.capacity and self._items:
                _, (_, _, s) = self._items.popitem(last=False)
                self.used -= s
                self.evictions += 1
            self._items[key] = (tensors, meta, size)
            self.used += size

    def discard(self, key: bytes) -> None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is not None:
                self.used -= item[2]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.used = 0

    def stats(self) -> dict:
        with self._lock:
            return dict(name=self.name, device=str(self.device), capacity_bytes=self.capacity, used_bytes=self.used,
                        entries=len(self._items), hits=self.hits, misses=self.misses, evictions=self.evictions)
