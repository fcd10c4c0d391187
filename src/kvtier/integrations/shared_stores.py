"""One store per process and configuration, shared by the connectors that use it.

With a single worker, vLLM runs the scheduler-side and the worker-side connector in one
process, and they must share the DRAM tier; the last one to let go closes the store.
"""

from __future__ import annotations

import threading

from kvtier.config import StoreConfig
from kvtier.factory import open_store
from kvtier.store import TieredStore

_stores: dict[StoreConfig, tuple[TieredStore, int]] = {}
_lock = threading.Lock()


def acquire(config: StoreConfig) -> TieredStore:
    """The store for ``config``, opened on first use."""
    with _lock:
        store, users = _stores.get(config, (None, 0))
        if store is None:
            store = open_store(config)
        _stores[config] = (store, users + 1)
        return store


def release(config: StoreConfig) -> None:
    """One user fewer; the last one closes the store."""
    with _lock:
        store, users = _stores.get(config, (None, 0))
        if store is None:
            return
        if users > 1:
            _stores[config] = (store, users - 1)
            return
        del _stores[config]
    store.close()


def open_stores() -> list[TieredStore]:
    with _lock:
        return [store for store, _ in _stores.values()]


def close_all() -> None:
    """Close every store (at interpreter exit)."""
    with _lock:
        stores = [store for store, _ in _stores.values()]
        _stores.clear()
    for store in stores:
        store.close()
