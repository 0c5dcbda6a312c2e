"""Tensor wire helpers: torch tensors <-> kunserve.rpc.v1 Tensor / TensorChunk messages.

Tensors travel as raw little-endian C-contiguous bytes plus a dtype name and shape. Large
tensors travel as a stream of TensorChunk messages. Only the agent imports this module
(it needs torch).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator, Sequence

import torch

from kunserve.rpc.options import MAX_MESSAGE_BYTES
from kunserve.rpc.v1 import tensor_pb2

__all__ = [
    "DTYPES",
    "MAX_MESSAGE_BYTES",
    "WireError",
    "assemble_chunks",
    "iter_chunks",
    "tensor_from_proto",
    "tensor_to_proto",
]

#: Wire dtype name -> torch dtype. Anything else is rejected.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("kunserve.rpc.tensors assumes a little-endian host")


class WireError(ValueError):
    """A tensor message is malformed or uses an unsupported dtype."""


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise WireError(f"unsupported dtype {dtype} (supported: {', '.join(DTYPES)})") from None


def _parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise WireError(f"unsupported dtype {name!r} (supported: {', '.join(DTYPES)})") from None


def _parse_shape(shape: Sequence[int]) -> list[int]:
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise WireError(f"negative dimension in shape {dims}")
    return dims


def _flat_bytes(t: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(dtype name, 1-D uint8 view of t's bytes on CPU, C-contiguous)."""
    name = _dtype_name(t.dtype)
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    # Reinterpret the bytes as uint8 in torch (numpy has no bfloat16).
    return name, flat.view(torch.uint8)


def _from_bytes(data: bytes | bytearray, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """Build a tensor from exactly numel * itemsize raw bytes (validated here)."""
    numel = math.prod(shape)
    expected = numel * dtype.itemsize
    if len(data) != expected:
        raise WireError(
            f"data is {len(data)} bytes but shape {shape} of {_DTYPE_NAMES[dtype]} needs {expected}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    buf = data if isinstance(data, bytearray) else bytearray(data)  # writable, owned by the tensor
    if dtype == torch.bool and int(torch.frombuffer(buf, dtype=torch.uint8).max()) > 1:
        raise WireError("bool tensor data holds bytes other than 0 and 1")
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def tensor_to_proto(t: torch.Tensor) -> tensor_pb2.Tensor:
    """Encode t (any device, any strides) as a Tensor message."""
    name, raw = _flat_bytes(t)
    return tensor_pb2.Tensor(data=raw.numpy().tobytes(), dtype=name, shape=list(t.shape))


def tensor_from_proto(msg: tensor_pb2.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Decode a Tensor message onto device; raise WireError if it is malformed."""
    dtype = _parse_dtype(msg.dtype)
    shape = _parse_shape(msg.shape)
    return _from_bytes(msg.data, dtype, shape).to(device)


def iter_chunks(name: str, t: torch.Tensor, chunk_bytes: int = 1 << 20) -> Iterator[tensor_pb2.TensorChunk]:
    """Split t into TensorChunk messages of at most chunk_bytes data bytes each (at least one)."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    dtype_name, raw = _flat_bytes(t)
    total = raw.numel()
    offset = 0
    while True:
        end = min(offset + chunk_bytes, total)
        first = offset == 0
        yield tensor_pb2.TensorChunk(
            name=name,
            dtype=dtype_name if first else "",
            shape=list(t.shape) if first else [],
            offset=offset,
            data=raw[offset:end].numpy().tobytes(),
            total_bytes=total,
            last=end == total,
        )
        if end == total:
            return
        offset = end


class _Partial:
    """A tensor being assembled from its chunks."""

    def __init__(self, chunk: tensor_pb2.TensorChunk) -> None:
        self.name = chunk.name
        self.dtype = _parse_dtype(chunk.dtype)
        self.shape = _parse_shape(chunk.shape)
        self.total = chunk.total_bytes
        expected = math.prod(self.shape) * self.dtype.itemsize
        if self.total != expected:
            raise WireError(
                f"tensor {self.name!r}: total_bytes {self.total} but shape {self.shape} "
                f"of {chunk.dtype} needs {expected}"
            )
        self.buf = bytearray()

    def add(self, chunk: tensor_pb2.TensorChunk) -> None:
        if chunk.offset != len(self.buf):
            raise WireError(
                f"tensor {self.name!r}: chunk at offset {chunk.offset}, expected {len(self.buf)} "
                "(missing or out-of-order chunk)"
            )
        if chunk.total_bytes != self.total:
            raise WireError(
                f"tensor {self.name!r}: total_bytes changed from {self.total} to {chunk.total_bytes}"
            )
        if chunk.offset > 0 and (
            (chunk.dtype and chunk.dtype != _DTYPE_NAMES[self.dtype])
            or (len(chunk.shape) > 0 and list(chunk.shape) != self.shape)
        ):
            raise WireError(f"tensor {self.name!r}: dtype/shape changed in a later chunk")
        if len(self.buf) + len(chunk.data) > self.total:
            raise WireError(f"tensor {self.name!r}: chunks exceed total_bytes {self.total}")
        self.buf += chunk.data
        if chunk.last and len(self.buf) != self.total:
            raise WireError(f"tensor {self.name!r}: last chunk at {len(self.buf)} of {self.total} bytes")

    def finish(self) -> torch.Tensor:
        return _from_bytes(self.buf, self.dtype, self.shape)


def assemble_chunks(chunks: Iterable[tensor_pb2.TensorChunk]) -> dict[str, torch.Tensor]:
    """Reassemble a chunk stream (named tensors one after another) into {name: CPU tensor}.

    Raises WireError on a gap, an out-of-order or interleaved chunk, a size mismatch, a
    repeated name, or a stream that ends before a tensor's last chunk.
    """
    out: dict[str, torch.Tensor] = {}
    current: _Partial | None = None
    for chunk in chunks:
        if current is None:
            if not chunk.name:
                raise WireError("chunk without a tensor name")
            if chunk.name in out:
                raise WireError(f"tensor {chunk.name!r} sent twice")
            if chunk.offset != 0:
                raise WireError(
                    f"tensor {chunk.name!r}: first chunk has offset {chunk.offset}, expected 0 "
                    "(missing or out-of-order chunk)"
                )
            current = _Partial(chunk)
        elif chunk.name != current.name:
            raise WireError(
                f"chunk for tensor {chunk.name!r} arrived before tensor {current.name!r} was complete"
            )
        current.add(chunk)
        if chunk.last:
            out[current.name] = current.finish()
            current = None
    if current is not None:
        raise WireError(
            f"stream ended before the last chunk of tensor {current.name!r} "
            f"({len(current.buf)} of {current.total} bytes)"
        )
    return out
