"""Tensor wire helpers: exact round trips, chunking, corrupt input, and the raised gRPC limit."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kunserve.rpc.options import control_channel_options, message_limits
from kunserve.rpc.tensors import (
    DTYPES,
    MAX_MESSAGE_BYTES,
    WireError,
    assemble_chunks,
    iter_chunks,
    tensor_from_proto,
    tensor_to_proto,
)
from kunserve.rpc.v1 import tensor_pb2


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).to(torch.bool)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
    return torch.randint(low, high, shape, generator=g, dtype=torch.int64).to(dtype)


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert torch.equal(a, b)


def _roundtrip(t: torch.Tensor) -> torch.Tensor:
    # Serialize to bytes too, so the test covers the real wire encoding.
    wire = tensor_to_proto(t).SerializeToString()
    return tensor_from_proto(tensor_pb2.Tensor.FromString(wire))


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_roundtrip_each_dtype(name: str) -> None:
    t = _sample(DTYPES[name], (3, 5, 7))
    msg = tensor_to_proto(t)
    assert msg.dtype == name
    assert list(msg.shape) == [3, 5, 7]
    assert len(msg.data) == t.numel() * t.element_size()
    _assert_same(_roundtrip(t), t)


def test_supported_dtypes_are_the_documented_list() -> None:
    assert set(DTYPES) == {"float32", "bfloat16", "float16", "int64", "int32", "uint8", "bool"}


def test_bfloat16_bits_are_exact() -> None:
    # Values whose bf16 bit patterns are awkward: negative zero, inf, nan, subnormal, max.
    patterns = [0x8000, 0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x7F7F, 0x3F80]
    bits = torch.tensor([p - 0x10000 if p >= 0x8000 else p for p in patterns], dtype=torch.int16)
    t = bits.view(torch.bfloat16)
    back = _roundtrip(t)
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.view(torch.int16), bits)


def test_little_endian_layout() -> None:
    msg = tensor_to_proto(torch.tensor([1, 256], dtype=torch.int32))
    assert msg.data == b"\x01\x00\x00\x00\x00\x01\x00\x00"


def test_non_contiguous_transposed() -> None:
    base = _sample(torch.float32, (4, 6))
    t = base.t()
    assert not t.is_contiguous()
    back = _roundtrip(t)
    _assert_same(back, t)
    assert back.is_contiguous()


def test_strided_view_of_larger_storage() -> None:
    base = _sample(torch.int64, (10, 10))
    t = base[2:5, 1:8:2]  # offset into storage, non-unit strides
    _assert_same(_roundtrip(t), t)
    _assert_same(assemble_chunks(iter_chunks("v", t, chunk_bytes=7))["v"], t)


def test_scalar_0d() -> None:
    t = torch.tensor(3.25, dtype=torch.float32)
    msg = tensor_to_proto(t)
    assert list(msg.shape) == []
    back = _roundtrip(t)
    assert back.dim() == 0
    _assert_same(back, t)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)])
def test_zero_size(shape: tuple[int, ...]) -> None:
    t = torch.empty(shape, dtype=torch.bfloat16)
    msg = tensor_to_proto(t)
    assert msg.data == b""
    _assert_same(_roundtrip(t), t)
    _assert_same(assemble_chunks(iter_chunks("z", t))["z"], t)


def test_shape_preserved_including_unit_dims() -> None:
    t = _sample(torch.float16, (1, 3, 1, 2, 1))
    back = _roundtrip(t)
    assert tuple(back.shape) == (1, 3, 1, 2, 1)
    _assert_same(back, t)


def test_requires_grad_tensor() -> None:
    t = torch.randn(3, 3, requires_grad=True)
    back = _roundtrip(t)
    assert not back.requires_grad
    assert torch.equal(back, t.detach())


def test_decoded_tensor_is_writable_and_independent() -> None:
    msg = tensor_to_proto(torch.arange(4, dtype=torch.int32))
    back = tensor_from_proto(msg)
    back += 1
    assert torch.equal(tensor_from_proto(msg), torch.arange(4, dtype=torch.int32))


def test_device_argument() -> None:
    back = tensor_from_proto(tensor_to_proto(torch.ones(2)), device=torch.device("cpu"))
    assert back.device.type == "cpu"


# --- chunking -------------------------------------------------------------------------------


def test_chunking_roundtrip_uneven_size() -> None:
    chunk = 1000
    t = _sample(torch.bfloat16, (3, 1234))  # 7404 bytes: 7 full chunks + 404
    chunks = list(iter_chunks("kv", t, chunk_bytes=chunk))
    assert len(chunks) == 8
    assert [c.offset for c in chunks] == [i * chunk for i in range(8)]
    assert [len(c.data) for c in chunks] == [chunk] * 7 + [404]
    assert [c.last for c in chunks] == [False] * 7 + [True]
    assert all(c.total_bytes == t.numel() * 2 for c in chunks)
    assert chunks[0].dtype == "bfloat16" and list(chunks[0].shape) == [3, 1234]
    assert all(c.dtype == "" and len(c.shape) == 0 for c in chunks[1:])
    wire = [tensor_pb2.TensorChunk.FromString(c.SerializeToString()) for c in chunks]
    out = assemble_chunks(wire)
    assert list(out) == ["kv"]
    _assert_same(out["kv"], t)


def test_chunking_exact_multiple() -> None:
    t = _sample(torch.int32, (256,))  # 1024 bytes
    chunks = list(iter_chunks("x", t, chunk_bytes=256))
    assert len(chunks) == 4 and chunks[-1].last
    _assert_same(assemble_chunks(chunks)["x"], t)


def test_chunking_several_named_tensors_sequential() -> None:
    tensors = {
        "layers.0.k": _sample(torch.float16, (5, 33), seed=1),
        "layers.0.v": _sample(torch.float16, (5, 33), seed=2),
        "mask": _sample(torch.bool, (17,), seed=3),
        "scalar": torch.tensor(7, dtype=torch.int64),
    }

    def stream() -> Iterator[tensor_pb2.TensorChunk]:
        for name, t in tensors.items():
            yield from iter_chunks(name, t, chunk_bytes=64)

    out = assemble_chunks(stream())
    assert list(out) == list(tensors)
    for name, t in tensors.items():
        _assert_same(out[name], t)


def test_chunk_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError):
        list(iter_chunks("x", torch.ones(3), chunk_bytes=0))


# --- corrupt input --------------------------------------------------------------------------


def test_wrong_byte_length() -> None:
    msg = tensor_to_proto(torch.ones(4, dtype=torch.float32))
    msg.data = msg.data[:-1]
    with pytest.raises(WireError, match="15 bytes"):
        tensor_from_proto(msg)
    msg.data = msg.data + b"\x00\x00"
    with pytest.raises(WireError):
        tensor_from_proto(msg)


def test_unknown_dtype() -> None:
    msg = tensor_pb2.Tensor(data=b"\x00" * 8, dtype="float64", shape=[1])
    with pytest.raises(WireError, match="unsupported dtype 'float64'"):
        tensor_from_proto(msg)
    with pytest.raises(WireError):
        tensor_from_proto(tensor_pb2.Tensor(data=b"", dtype="", shape=[0]))


def test_unsupported_dtype_on_encode() -> None:
    with pytest.raises(WireError):
        tensor_to_proto(torch.ones(2, dtype=torch.float64))
    with pytest.raises(WireError):
        list(iter_chunks("c", torch.ones(2, dtype=torch.complex64)))


def test_negative_dimension() -> None:
    with pytest.raises(WireError):
        tensor_from_proto(tensor_pb2.Tensor(data=b"", dtype="uint8", shape=[-1]))


def test_invalid_bool_bytes() -> None:
    with pytest.raises(WireError):
        tensor_from_proto(tensor_pb2.Tensor(data=b"\x00\x02", dtype="bool", shape=[2]))


def _chunks(n: int = 5) -> list[tensor_pb2.TensorChunk]:
    return list(iter_chunks("t", _sample(torch.float32, (n * 25,)), chunk_bytes=100))


def test_missing_middle_chunk() -> None:
    chunks = _chunks()
    del chunks[2]
    with pytest.raises(WireError, match="offset"):
        assemble_chunks(chunks)


def test_missing_first_chunk() -> None:
    with pytest.raises(WireError, match="offset"):
        assemble_chunks(_chunks()[1:])


def test_missing_last_chunk() -> None:
    with pytest.raises(WireError, match="stream ended"):
        assemble_chunks(_chunks()[:-1])


def test_out_of_order_chunks() -> None:
    chunks = _chunks()
    chunks[1], chunks[2] = chunks[2], chunks[1]
    with pytest.raises(WireError, match="out-of-order"):
        assemble_chunks(chunks)


def test_duplicated_chunk() -> None:
    chunks = _chunks()
    chunks.insert(2, chunks[1])
    with pytest.raises(WireError):
        assemble_chunks(chunks)


def test_total_bytes_mismatch() -> None:
    chunks = _chunks()
    chunks[0].total_bytes += 4
    with pytest.raises(WireError, match="total_bytes"):
        assemble_chunks(chunks)
    chunks = _chunks()
    chunks[3].total_bytes -= 4
    with pytest.raises(WireError, match="total_bytes"):
        assemble_chunks(chunks)


def test_early_last_flag() -> None:
    chunks = _chunks()
    chunks[2].last = True
    with pytest.raises(WireError):
        assemble_chunks(chunks)


def test_interleaved_names_rejected() -> None:
    a = list(iter_chunks("a", torch.zeros(100), chunk_bytes=100))
    b = list(iter_chunks("b", torch.ones(100), chunk_bytes=100))
    with pytest.raises(WireError, match="before tensor 'a' was complete"):
        assemble_chunks([a[0], b[0], *a[1:], *b[1:]])


def test_repeated_name_rejected() -> None:
    a = list(iter_chunks("a", torch.zeros(3)))
    with pytest.raises(WireError, match="twice"):
        assemble_chunks(a + a)


def test_unknown_dtype_in_chunk() -> None:
    chunks = _chunks()
    chunks[0].dtype = "float8"
    with pytest.raises(WireError, match="unsupported dtype"):
        assemble_chunks(chunks)


# --- property -------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(sorted(DTYPES)),
    shape=st.lists(st.integers(min_value=0, max_value=9), min_size=0, max_size=4).map(tuple),
    chunk_bytes=st.integers(min_value=1, max_value=300),
    seed=st.integers(min_value=0, max_value=2**16),
    transpose=st.booleans(),
)
def test_property_roundtrip(
    name: str, shape: tuple[int, ...], chunk_bytes: int, seed: int, transpose: bool
) -> None:
    t = _sample(DTYPES[name], shape, seed=seed)
    if transpose and t.dim() >= 2:
        t = t.transpose(0, -1)
    _assert_same(_roundtrip(t), t)
    chunks = list(iter_chunks("p", t, chunk_bytes=chunk_bytes))
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    assert sum(c.last for c in chunks) == 1 and chunks[-1].last
    _assert_same(assemble_chunks(chunks)["p"], t)


# --- a real gRPC hop with the raised limit --------------------------------------------------


def test_channel_options() -> None:
    limits = {"grpc.max_send_message_length": MAX_MESSAGE_BYTES, "grpc.max_receive_message_length": MAX_MESSAGE_BYTES}
    assert dict(message_limits()) == limits
    assert MAX_MESSAGE_BYTES == 64 * 1024 * 1024
    control = dict(control_channel_options())
    assert control.items() >= limits.items()
    assert control["grpc.enable_retries"] == 0 and control["grpc.max_reconnect_backoff_ms"] <= 2_000


def test_the_gateway_and_operator_channel_options_do_not_import_torch() -> None:
    code = ("import sys; import kunserve.rpc.options, kunserve.gateway.replicas, kunserve.operator.agent_client; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_5mib_tensor_crosses_real_grpc_server() -> None:
    method = "/kunserve.test.Echo/Echo"

    def echo(request: tensor_pb2.Tensor, context: grpc.ServicerContext) -> tensor_pb2.Tensor:
        return request

    handler = grpc.method_handlers_generic_handler(
        "kunserve.test.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                echo,
                request_deserializer=tensor_pb2.Tensor.FromString,
                response_serializer=tensor_pb2.Tensor.SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=message_limits())
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    server.start()
    try:
        t = _sample(torch.bfloat16, (5, 1024, 512), seed=7)  # 5 MiB, above gRPC's 4 MiB default
        assert t.numel() * t.element_size() == 5 * 1024 * 1024
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=message_limits()) as channel:
            call = channel.unary_unary(
                method,
                request_serializer=tensor_pb2.Tensor.SerializeToString,
                response_deserializer=tensor_pb2.Tensor.FromString,
            )
            reply = call(tensor_to_proto(t), timeout=30)
            _assert_same(tensor_from_proto(reply), t)

        # Without the raised limit the same message is refused, so the options are what made it work.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                method,
                request_serializer=tensor_pb2.Tensor.SerializeToString,
                response_deserializer=tensor_pb2.Tensor.FromString,
            )
            with pytest.raises(grpc.RpcError) as info:
                call(tensor_to_proto(t), timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.stop(grace=None).wait()
