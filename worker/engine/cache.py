"""A per-process pipeline cache with a memory budget and LRU eviction.

Entries are base pipelines (by base model) and ControlNets (by ControlNet model). A model's
img2img ControlNet pipeline is built from them with `from_pipe`, which shares the modules:
two models on the same base (sdxl-openpose, sdxl-openpose-ultra) hold that base once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


def module_bytes(obj: Any) -> int:
    """Parameter and buffer bytes of a torch module or of a pipeline's modules."""
    import torch

    modules: list[torch.nn.Module]
    if isinstance(obj, torch.nn.Module):
        modules = [obj]
    else:
        modules = [
            c for c in getattr(obj, "components", {}).values() if isinstance(c, torch.nn.Module)
        ]
    total = 0
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class CacheStats:
    loads: dict[str, int] = field(default_factory=dict)
    hits: int = 0
    evictions: int = 0
    load_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _Entry:
    value: Any
    nbytes: int


class PipelineCache:
    def __init__(self, *, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._composed: dict[tuple[str, str], Any] = {}
        self._lock = threading.RLock()
        self.stats = CacheStats()

    @property
    def used_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def keys(self) -> list[str]:
        return list(self._entries)

    def get(self, key: str, loader: Callable[[], Any], *, pinned: tuple[str, ...] = ()) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return entry.value
            started = time.perf_counter()
            value = loader()
            self.stats.load_seconds[key] = time.perf_counter() - started
            self.stats.loads[key] = self.stats.loads.get(key, 0) + 1
            self._entries[key] = _Entry(value=value, nbytes=module_bytes(value))
            self._evict(keep=(key, *pinned))
            return value

    def composed(self, base_key: str, controlnet_key: str, build: Callable[[], Any]) -> Any:
        """The pipeline that joins a base and a ControlNet (shares their modules; no bytes)."""
        with self._lock:
            pair = (base_key, controlnet_key)
            if pair not in self._composed:
                self._composed[pair] = build()
            return self._composed[pair]

    def _evict(self, *, keep: tuple[str, ...]) -> None:
        while self.used_bytes > self.budget_bytes:
            victim = next((k for k in self._entries if k not in keep), None)
            if victim is None:
                log.warning(
                    "model cache over budget with only pinned entries",
                    extra={"used": self.used_bytes},
                )
                return
            self._drop(victim)
        self._release_memory()

    def keep_only(self, keys: tuple[str, ...]) -> None:
        """Release every entry but `keys` (the out-of-memory retry's room for its job), and
        hand the freed memory back (gc, then the CUDA allocator's cache)."""
        with self._lock:
            for key in [k for k in self._entries if k not in keys]:
                self._drop(key)
            self._release_memory()

    def _drop(self, key: str) -> None:
        """Remove an entry and every composed pipeline built on it."""
        self._entries.pop(key)
        self._composed = {p: v for p, v in self._composed.items() if key not in p}
        self.stats.evictions += 1
        log.info("evicted %s from the model cache", key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._composed.clear()
            self._release_memory()

    @staticmethod
    def _release_memory() -> None:
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass
