"""Where the gateway's topology comes from: a static one (flag or file), or Redis as the operator writes it
(kunserve.gateway.topology describes the contract).

The Redis follower loads the key at start, subscribes to the events channel, re-reads the key on each
event, and applies a document only if its epoch is newer than the one applied (the first one is always
applied). When the subscription breaks it reconnects with backoff and re-reads the key, so an update
published while it was away is not missed.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from pathlib import Path

import yaml
from redis.asyncio import Redis
from redis.exceptions import RedisError

from kunserve.gateway.topology import Topology, TopologyError, events_channel, parse_static, topology_key

log = logging.getLogger(__name__)
Apply = Callable[[Topology], None]


def load_static(spec: str, model: str = "") -> Topology:
    """`id=host:port,...`, or a YAML / JSON file in the document's shape; raises TopologyError."""
    path = Path(spec)
    if ("=" not in spec and path.suffix in (".yaml", ".yml", ".json")) or path.is_file():
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise TopologyError(f"cannot read the topology file {path}: {exc}") from exc
        topo = Topology.from_dict(raw)
        if not topo.model and model:
            topo = Topology(topo.epoch, model, topo.replicas, topo.groups, topo.updated_at)
        return topo
    return parse_static(spec, model)


class RedisTopologyFollower:
    def __init__(self, redis: Redis, events: Redis, pool: str, apply: Apply, backoff_max_s: float = 5.0) -> None:
        self.redis = redis  # reads the key
        self.events = events  # holds the subscription
        self.pool = pool
        self.apply = apply
        self.backoff_max_s = backoff_max_s
        self.epoch: int | None = None  # of the applied document
        self.ready = asyncio.Event()  # set after the first read (found or not)

    async def refresh(self) -> bool:
        """Read the key; apply it if newer. True if applied."""
        raw = await self.redis.get(topology_key(self.pool))
        if raw is None:
            if self.epoch is None:
                log.warning("no topology at %s yet: nothing to route to until the operator writes it",
                            topology_key(self.pool))
            return False
        try:
            topo = Topology.from_json(raw)
        except TopologyError as exc:
            log.error("ignoring a malformed topology at %s: %s", topology_key(self.pool), exc)
            return False
        if self.epoch is not None and topo.epoch <= self.epoch:
            log.debug("ignoring topology epoch %d (have %d)", topo.epoch, self.epoch)
            return False
        self.epoch = topo.epoch
        log.info("topology epoch %d: %d replicas, %d groups", topo.epoch, len(topo.replicas), len(topo.groups))
        self.apply(topo)
        return True

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                async with self.events.pubsub() as pubsub:
                    await pubsub.subscribe(events_channel(self.pool))
                    await self.refresh()  # after subscribing: nothing published in between is lost
                    self.ready.set()
                    backoff = 0.1
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            await self.refresh()
            except (RedisError, OSError) as exc:
                log.warning("topology subscription to Redis failed (%s); retrying in %.1fs", exc, backoff)
            self.ready.set()
            await asyncio.sleep(backoff * (1 + random.random() / 2))
            backoff = min(backoff * 2, self.backoff_max_s)
