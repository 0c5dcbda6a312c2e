"""gRPC options every KunServe server and channel shares (torch-free: the gateway and the operator import it).

- `message_limits()`: the raised send/receive limits (tensors and KV blocks travel in messages up to
  `MAX_MESSAGE_BYTES`); valid for `grpc.server()` / `grpc.aio.server()` and for channels.
- `control_channel_options()`: what a long-lived control channel to an agent adds (the gateway's and the
  operator's): keepalive pings that find a peer which vanished without closing the connection, reconnect
  backoff capped so a restarted agent is usable again within ~2 s, and no transparent retries (the caller
  decides what is safe to retry: the gateway replays tokens, the executor re-runs recorded steps).
"""

from __future__ import annotations

__all__ = ["MAX_MESSAGE_BYTES", "control_channel_options", "message_limits"]

#: Largest gRPC message (send and receive) KunServe servers and channels accept, in bytes.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def message_limits() -> list[tuple[str, int]]:
    """The send/receive message limits, for servers and channels."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


def control_channel_options() -> list[tuple[str, int]]:
    """Message limits plus keepalive, bounded reconnect backoff and no retries, for a control channel."""
    return [
        *message_limits(),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        ("grpc.enable_retries", 0),
    ]
