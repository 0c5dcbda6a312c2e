"""Every gRPC channel an agent opens to another agent: one per target, kept open and shared (a channel per
call would pay a connection per micro-batch), plaintext or TLS from the agent's --tls-* files.

Sync channels are shared by every thread; grpc.aio channels belong to the event loop that made them.
"""

from __future__ import annotations

import asyncio
import threading

import grpc

from kunserve.rpc.options import message_limits
from kunserve.rpc.tls import TlsFiles, aio_channel, channel

_tls: TlsFiles | None = None
_lock = threading.Lock()
_sync: dict[str, grpc.Channel] = {}
_aio: dict[tuple[int, str], grpc.aio.Channel] = {}


def configure(files: TlsFiles | None) -> None:
    """TLS files for every channel opened from now on (None: plaintext)."""
    global _tls
    _tls = files


def sync(target: str) -> grpc.Channel:
    with _lock:
        ch = _sync.get(target)
        if ch is None:
            ch = _sync[target] = channel(target, _tls, message_limits())
        return ch


def aio(target: str) -> grpc.aio.Channel:
    """The calling event loop's channel to target."""
    key = (id(asyncio.get_running_loop()), target)
    ch = _aio.get(key)
    if ch is None:
        ch = _aio[key] = aio_channel(target, _tls, message_limits())
    return ch


def close_sync() -> None:
    with _lock:
        for ch in _sync.values():
            ch.close()
        _sync.clear()
