"""An engine's feed for the router: what its store holds, and every change, in order.

Runs in the process that owns the store (vLLM's worker), on a loopback port; ``kvtier serve``
exposes it on the engine's own HTTP port under ``/kvtier/``
(:mod:`kvtier.integrations.engine_routes`).

- ``GET /kvtier/info``: epoch, last sequence number, the namespace fields, chunk and block
  sizes, KV bytes per token, the tiers (name, kind) and their read counters, and where vLLM
  publishes its own KV events (``kv_events``: port and topic; see :mod:`kvtier.router.blocks`),
  and the engine's dtype with the reason for it (``engine_dtype``: dtype, source, reason, CPU,
  measured GFLOP/s; see :mod:`kvtier.integrations.engine_dtype`).
- ``GET /kvtier/snapshot``: the keys each local tier holds, as of a sequence number.
- ``GET /kvtier/events?epoch=E&after=S&wait=W``: the events after S (long-polled up to W
  seconds), or ``{"resync": true}`` when S is gone from the ring or E is not this feed's epoch
  (the engine restarted): the reader then takes a snapshot.

The epoch is random per process, so a restarted engine is noticed even when its sequence
numbers happen to line up. The shared tier (Redis) is not listed: the router asks it directly.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from kvtier.config import RedisTierConfig, StoreConfig
from kvtier.keys import Namespace, tail_granule
from kvtier.stats import ChunkEvent
from kvtier.store import TieredStore
from kvtier.tiers.base import Tier

log = logging.getLogger("kvtier")

RING_EVENTS = 65536  # events kept for readers that fall behind; older ones mean a resync
MAX_WAIT_S = 10.0


@dataclass(frozen=True)
class FeedEvent:
    seq: int
    time: float  # wall clock at the engine, for the router's staleness figure
    kind: str
    tier: str
    keys: tuple[str, ...]  # hex

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "t": self.time,
            "kind": self.kind,
            "tier": self.tier,
            "keys": list(self.keys),
        }


class EventFeed:
    """Sequence-numbered events of one store, and snapshots consistent with them.

    ``info()`` gives the static part of ``/kvtier/info``; ``local_tiers`` the tiers whose keys
    a snapshot lists (name -> a function returning their keys); ``counters()`` the per-tier
    read counters.
    """

    def __init__(
        self,
        info: Callable[[], dict[str, Any]],
        local_tiers: dict[str, Callable[[], list[bytes]]],
        counters: Callable[[], dict[str, Any]] | None = None,
        ring: int = RING_EVENTS,
        states: Callable[[], dict[str, Any]] | None = None,
    ):
        self.epoch = os.urandom(8).hex()
        self._info = info
        self._local = local_tiers
        self._counters = counters or (lambda: {})
        self.states = states or (lambda: {})
        self._ring: deque[FeedEvent] = deque(maxlen=ring)
        self._seq = 0
        self._cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None

    @property
    def seq(self) -> int:
        with self._cond:
            return self._seq

    def on_event(self, event: ChunkEvent) -> None:
        """A store listener: record ``event`` if it concerns a local tier."""
        if event.tier not in self._local:
            return
        keys = tuple(k.hex() for k in event.keys)
        with self._cond:
            self._seq += 1
            self._ring.append(FeedEvent(self._seq, time.time(), event.kind, event.tier, keys))
            self._cond.notify_all()

    def info(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seq": self.seq, **self._info(), "reads": self._counters()}

    def snapshot(self) -> dict[str, Any]:
        # The sequence number is taken first: an event after it may already show in the
        # listing, and replaying it after the snapshot is harmless (stored adds, others remove).
        seq = self.seq
        entries = {name: [k.hex() for k in keys()] for name, keys in self._local.items()}
        return {"epoch": self.epoch, "seq": seq, "entries": entries}

    def events(self, epoch: str, after: int, wait_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + min(max(wait_s, 0.0), MAX_WAIT_S)
        with self._cond:
            if epoch != self.epoch or after > self._seq:
                return {"epoch": self.epoch, "seq": self._seq, "resync": True}
            while self._seq == after:
                left = deadline - time.monotonic()
                if left <= 0:
                    return {"epoch": self.epoch, "seq": self._seq, "events": []}
                self._cond.wait(left)
            oldest = self._ring[0].seq if self._ring else self._seq + 1
            if after + 1 < oldest:  # the ring lost what this reader has not seen
                return {"epoch": self.epoch, "seq": self._seq, "resync": True}
            fresh = [e.as_dict() for e in self._ring if e.seq > after]
            return {"epoch": self.epoch, "seq": self._seq, "events": fresh}

    # -- HTTP ------------------------------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Serve the feed on ``host:port`` from a daemon thread; returns the bound port."""
        feed = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                try:
                    if url.path == "/kvtier/info":
                        body = feed.info()
                    elif url.path == "/kvtier/snapshot":
                        body = feed.snapshot()
                    elif url.path == "/kvtier/states":
                        body = feed.states()
                    elif url.path == "/kvtier/events":
                        after = int(query.get("after", "0"))
                        wait = float(query.get("wait", "0"))
                        body = feed.events(query.get("epoch", ""), after, wait)
                    else:
                        self._reply(404, {"error": f"no such path: {url.path}"})
                        return
                except ValueError as exc:
                    self._reply(400, {"error": f"bad query: {exc}"})
                    return
                self._reply(200, body)

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, format: str, *args: Any) -> None:  # quiet: a poll a second
                pass

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, name="kvtier-feed", daemon=True).start()
        return int(server.server_address[1])

    def start(self, host: str, port: int) -> bool:
        """:meth:`serve`, or False (logged) when the port cannot be had: routing gets worse
        without the feed, but serving goes on."""
        try:
            bound = self.serve(host, port)
        except OSError as exc:
            log.error("kvtier: cannot serve the router feed on port %d: %s", port, exc)
            return False
        log.info("kvtier: router feed on %s:%d", host, bound)
        return True

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# config kind -> router's; an S3 tier is listed by each engine that uses it (its feed's
# snapshot lists the bucket, its events what it stored and evicted)
TIER_KIND = {"memory": "dram", "disk": "disk", "redis": "shared", "s3": "object"}


def store_feed(
    store: TieredStore,
    config: StoreConfig,
    namespace: Namespace,
    block_size: int,
    bytes_per_token: int,
    kv_events: dict[str, Any] | None = None,
    engine_dtype: dict[str, Any] | None = None,
    scheduling: dict[str, Any] | None = None,
    tail_tokens: int | None = None,
) -> EventFeed:
    """The feed of an engine's ``store``, subscribed to its events (not yet served).

    ``namespace``: the engine's, without a salt (the router adds each request's);
    ``kv_events``: where vLLM publishes its own KV events (``{"port", "topic"}``), if it does;
    ``engine_dtype``: the engine's dtype, who chose it and why (``kvtier serve``'s choice);
    ``scheduling``: the hits-first scheduler's options, when the engine runs it (the router
    prices a request's wait by what would go before it); ``tail_tokens``: what a stored tail
    is a multiple of (:func:`kvtier.keys.tail_granule` of the block size unless told).
    """
    tiers = [(t.name, TIER_KIND.get(t.kind, t.kind), t) for t in config.tiers]
    info = {
        "namespace": {
            "model": namespace.model,
            "model_revision": namespace.model_revision,
            "kv_dtype": namespace.kv_dtype,
            "kv_layout": namespace.kv_layout,
            "adapter": namespace.adapter,
        },
        "chunk_tokens": config.chunk_tokens,
        "block_size": block_size,
        "tail_tokens": tail_tokens or tail_granule(block_size),
        "bytes_per_token": bytes_per_token,
        "tiers": [{"name": name, "kind": kind} for name, kind, _ in tiers],
        "shared": [
            {
                "name": name,
                "url": t.url,
                "prefix": t.prefix,
                "cluster": t.cluster,
                # where the password is, on this host (a router beside the engines reads it)
                "username": t.username,
                "password_file": t.password_file,
            }
            for name, _, t in tiers
            if isinstance(t, RedisTierConfig)
        ],
        "kv_events": kv_events,
        "engine_dtype": engine_dtype,
        "scheduling": scheduling,
    }
    by_name = {t.name: t for t in store.tiers}

    def lister(tier: Tier) -> Callable[[], list[bytes]]:
        return lambda: list(tier.scan())

    local = {
        name: lister(by_name[name])
        for name, kind, _ in tiers
        if kind != "shared" and name in by_name
    }

    def counters() -> dict[str, Any]:
        return {
            name: {"bytes": s.bytes_read, "seconds": s.read_seconds, "hits": s.hits}
            for name, s in store.stats().tiers.items()
        }

    def states() -> dict[str, Any]:
        """Each tier's occupancy and health, and each tenant's part of it, now."""
        return {"tiers": store.tier_states(), "tenant_tiers": store.owner_states()}

    feed = EventFeed(lambda: info, local, counters, states=states)
    store.subscribe(feed.on_event)
    return feed
