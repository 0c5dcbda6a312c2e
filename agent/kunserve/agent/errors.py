"""Typed errors raised at the agent's edges (checkpoint files, requests, the KV pool)."""

from __future__ import annotations

from pathlib import Path


class KunServeError(Exception):
    """Base class of every error the agent raises on purpose."""


class CheckpointError(KunServeError):
    """A checkpoint file is missing or malformed; the message names the file."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {problem}")


class InvalidRequestError(KunServeError, ValueError):
    """A request the engine refuses (bad prompt or sampling parameters). Maps to HTTP 400."""


class PoolError(KunServeError):
    """The KV block pool cannot do what was asked (for example shrink while the blocks are in use)."""
