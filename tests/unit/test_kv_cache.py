"""KVCache: exact write/gather round trips over one and several segments, tail removal, block bytes."""

from __future__ import annotations

import pytest
import torch

from kunserve.agent.engine.kv_cache import KVCache
from kunserve.agent.errors import PoolError

torch.set_num_threads(1)

LAYERS = [3, 5]  # global layer ids this process holds (not 0-based on purpose)
HEADS, HEAD_DIM, BS = 2, 3, 4


def _cache(dtype: torch.dtype = torch.float32) -> KVCache:
    return KVCache(LAYERS, HEADS, HEAD_DIM, BS, dtype, torch.device("cpu"))


def _kv(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, HEADS, HEAD_DIM, generator=g), torch.randn(n, HEADS, HEAD_DIM, generator=g)


def test_add_blocks_returns_contiguous_global_ids() -> None:
    c = _cache()
    assert c.num_blocks == 0
    assert list(c.add_blocks(3)) == [0, 1, 2]
    assert list(c.add_blocks(2)) == [3, 4]
    assert c.num_blocks == 5
    assert [(s.first_block, s.num_blocks) for s in c.segments] == [(0, 3), (3, 2)]
    assert sorted(c.segments[1].slabs) == LAYERS
    assert all(tuple(t.shape) == (2, 2, BS, HEADS, HEAD_DIM) for t in c.segments[1].slabs.values())


@pytest.mark.parametrize("n", [0, -1])
def test_add_non_positive_blocks_is_refused(n: int) -> None:
    c = _cache()
    with pytest.raises(PoolError):
        c.add_blocks(n)
    assert c.segments == []


def test_round_trip_single_segment() -> None:
    c = _cache()
    c.add_blocks(3)
    slots = torch.tensor([0, 5, 11, 6, 3])
    before3 = [t.clone() for t in c.gather(3, torch.arange(12))]
    before5 = c.gather(5, torch.tensor([1, 2, 4]))[0].clone()
    k, v = _kv(5, 0)
    c.write(5, slots, k, v)
    gk, gv = c.gather(5, slots)
    assert torch.equal(gk, k) and torch.equal(gv, v)
    # Another order, a subset, and a repeated slot.
    gk, gv = c.gather(5, torch.tensor([3, 0, 3]))
    assert torch.equal(gk, k[[4, 0, 4]]) and torch.equal(gv, v[[4, 0, 4]])
    # The other layer and unwritten slots are untouched; block 0 (what padded reads point at) is zeros.
    after3 = c.gather(3, torch.arange(12))

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:  # bitwise: unwritten slots may hold NaN patterns
        return torch.equal(a.view(torch.int32), b.view(torch.int32))

    assert all(same(a, b) for a, b in zip(before3, after3, strict=True))
    assert same(c.gather(5, torch.tensor([1, 2, 4]))[0], before5)
    assert torch.count_nonzero(c.gather(3, torch.arange(4))[0]) == 0
    assert torch.count_nonzero(c.gather(5, torch.tensor([1, 2]))[1]) == 0
    # Physical placement: slot 5 is block 1, offset 1 in layer 5's slab.
    assert torch.equal(c.segments[0].slabs[5][0, 1, 1], k[1])
    assert torch.equal(c.segments[0].slabs[5][1, 2, 3], v[2])


def test_round_trip_across_segments() -> None:
    c = _cache()
    c.add_blocks(3)  # slots 0..11
    c.add_blocks(2)  # slots 12..19
    slots = torch.tensor([19, 1, 12, 11, 7, 16, 0])
    other = c.gather(5, slots)[0].clone()
    k, v = _kv(len(slots), 1)
    c.write(3, slots, k, v)
    gk, gv = c.gather(3, slots)
    assert torch.equal(gk, k) and torch.equal(gv, v)
    perm = torch.tensor([2, 0, 6, 5])
    gk, gv = c.gather(3, slots[perm])
    assert torch.equal(gk, k[perm]) and torch.equal(gv, v[perm])
    # Slots in the second segment live there, at local offsets.
    seg = c.segments[1]
    assert torch.equal(seg.slabs[3][0, 1, 3], k[0])  # slot 19 = block 4 -> local block 1, offset 3
    assert torch.equal(seg.slabs[3][1, 0, 0], v[2])  # slot 12 = block 3 -> local block 0, offset 0
    assert torch.equal(c.segments[0].slabs[3][0, 2, 3], k[3])  # slot 11 in the first segment
    assert torch.equal(c.gather(5, slots)[0].view(torch.int32), other.view(torch.int32))  # the other layer


def test_write_only_into_one_segment_of_several_and_three_segments() -> None:
    c = _cache()
    c.add_blocks(1)  # 0..3
    c.add_blocks(1)  # 4..7
    c.add_blocks(2)  # 8..15
    k, v = _kv(3, 2)
    c.write(5, torch.tensor([5, 6, 4]), k, v)  # only the middle segment
    gk, gv = c.gather(5, torch.tensor([4, 5, 6]))
    assert torch.equal(gk, k[[2, 0, 1]]) and torch.equal(gv, v[[2, 0, 1]])
    k2, v2 = _kv(4, 3)
    slots = torch.tensor([15, 3, 8, 7])
    c.write(5, slots, k2, v2)
    gk, gv = c.gather(5, torch.tensor([3, 4, 5, 6, 7, 8, 15]))
    assert torch.equal(gk, torch.stack([k2[1], k[2], k[0], k[1], k2[3], k2[2], k2[0]]))
    assert torch.equal(gv, torch.stack([v2[1], v[2], v[0], v[1], v2[3], v2[2], v2[0]]))


def test_grow_keeps_existing_bytes_in_place() -> None:
    c = _cache()
    c.add_blocks(2)
    slots = torch.tensor([0, 7, 3])
    k, v = _kv(3, 4)
    c.write(3, slots, k, v)
    before = c.segments[0].slabs[3]
    c.add_blocks(3)
    assert c.segments[0].slabs[3] is before  # no copy of live blocks
    gk, gv = c.gather(3, slots)
    assert torch.equal(gk, k) and torch.equal(gv, v)
    k2, v2 = _kv(2, 5)
    c.write(3, torch.tensor([8, 19]), k2, v2)
    gk, gv = c.gather(3, torch.tensor([19, 0, 8, 7, 3]))
    assert torch.equal(gk, torch.stack([k2[1], k[0], k2[0], k[1], k[2]]))
    assert torch.equal(gv, torch.stack([v2[1], v[0], v2[0], v[1], v[2]]))


def test_remove_tail_blocks_whole_segments_only() -> None:
    c = _cache()
    c.add_blocks(4)
    c.add_blocks(2)
    c.add_blocks(3)
    assert c.num_blocks == 9
    k, v = _kv(1, 6)
    c.write(5, torch.tensor([13]), k, v)  # block 3, in the first segment
    for bad in (1, 2, 4, 6, 9, 10, -1):
        with pytest.raises(PoolError):
            c.remove_tail_blocks(bad)
        assert [s.num_blocks for s in c.segments] == [4, 2, 3]
    c.remove_tail_blocks(3)
    assert [s.num_blocks for s in c.segments] == [4, 2]
    assert c.num_blocks == 6
    assert list(c.add_blocks(1)) == [6]  # ids continue after what is left
    c.remove_tail_blocks(3)  # the last two segments together
    assert [s.num_blocks for s in c.segments] == [4]
    with pytest.raises(PoolError):
        c.remove_tail_blocks(4)  # never the initial segment
    assert c.num_blocks == 4
    gk, gv = c.gather(5, torch.tensor([13]))
    assert torch.equal(gk, k) and torch.equal(gv, v)


@pytest.mark.parametrize(("dtype", "elem"), [(torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)])
def test_block_bytes(dtype: torch.dtype, elem: int) -> None:
    c = _cache(dtype)
    # block_size x layers x (k, v) x kv_heads x head_dim x element size
    assert c.block_bytes == BS * 2 * 2 * HEADS * HEAD_DIM * elem
    assert c.block_bytes == {4: 384, 2: 192}[elem]
    c.add_blocks(5)
    slabs = c.segments[0].slabs.values()
    assert sum(t.numel() * t.element_size() for t in slabs) == 5 * c.block_bytes
    one_layer = KVCache([0], 8, 64, 16, dtype, torch.device("cpu"))
    assert one_layer.block_bytes == 16 * 1 * 2 * 8 * 64 * elem
