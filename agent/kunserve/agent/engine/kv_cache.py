"""Physical paged KV storage that grows and shrinks in place.

The pool is a list of segments; each segment holds `n` blocks for every layer this process keeps, as one
slab per layer: tensor [2 (k/v), n, block_size, kv_heads, head_dim]. Block ids are global and contiguous
across segments. Growing appends a segment (no live block moves); shrinking removes whole tail segments.
A slab is the unit of KV memory: when layers are dropped, a drained slab of a dropped layer is whole,
reusable memory for the layers still held. The block manager does the accounting; this class only
stores bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kunserve.agent.errors import PoolError


@dataclass(slots=True)
class _Segment:
    first_block: int
    num_blocks: int
    slabs: dict[int, torch.Tensor]  # layer -> [2, num_blocks, block_size, kv_heads, head_dim]


class KVCache:
    def __init__(
        self,
        layer_ids: list[int],
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.layer_ids = list(layer_ids)
        self.num_kv_heads, self.head_dim, self.block_size = num_kv_heads, head_dim, block_size
        self.dtype, self.device = dtype, device
        self.segments: list[_Segment] = []
        self._splits: dict[int, tuple[torch.Tensor, list[_Segment], list[tuple[_Segment, torch.Tensor,
                                                                               torch.Tensor]]]] = {}

    def set_held_layers(self, layer_ids: list[int]) -> None:
        """Layers that segments added from now on hold. Existing segments keep every slab they have, so a
        request's KV for a layer this process no longer holds stays readable until it has been moved."""
        self.layer_ids = sorted(layer_ids)

    @property
    def num_blocks(self) -> int:
        return sum(s.num_blocks for s in self.segments)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across every held layer (k and v)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.block_size * len(self.layer_ids) * 2 * self.num_kv_heads * self.head_dim * elem

    def add_blocks(self, n: int) -> range:
        """Append a segment of n blocks; returns their ids."""
        if n <= 0:
            raise PoolError(f"cannot grow the KV pool by {n} blocks")
        first = self.num_blocks
        shape = (2, n, self.block_size, self.num_kv_heads, self.head_dim)
        # Uninitialised: every slot is written before it is read, except block 0, which padded attention
        # reads point at (masked, but it must hold finite numbers), so only it is zeroed. A pool of
        # gigabytes does not pay for a memset (it showed in drop and restore times).
        slabs = {layer: torch.empty(shape, dtype=self.dtype, device=self.device) for layer in self.layer_ids}
        if first == 0:
            for slab in slabs.values():
                slab[:, 0].zero_()
        # A new list, not an append: threads serving remote attention may be iterating the old one.
        self.segments = [*self.segments, _Segment(first, n, slabs)]
        return range(first, first + n)

    def reclaim_dropped(self) -> int:
        """Reuse the pages of layers no longer held as blocks of the held layers, without copying: every
        `len(layer_ids)` spare slabs of a segment become one new segment of the same size. Call it only
        once no request's KV is left in those slabs. Spare slabs that do not fill a segment are freed and
        their bytes added as fresh blocks. Returns the blocks added (ids follow the current last one)."""
        held = len(self.layer_ids)
        first = self.num_blocks
        new: list[_Segment] = []
        leftover = 0
        for seg in self.segments:
            spare = [layer for layer in seg.slabs if layer not in self.layer_ids]
            if not spare:
                continue
            while len(spare) >= held:
                take, spare = spare[:held], spare[held:]
                slabs = {layer: seg.slabs.pop(old) for layer, old in zip(self.layer_ids, take, strict=True)}
                new.append(_Segment(first, seg.num_blocks, slabs))
                first += seg.num_blocks
            for old in spare:
                leftover += seg.slabs.pop(old).nbytes
        self.segments = [*self.segments, *new]
        added = sum(s.num_blocks for s in new)
        extra = leftover // self.block_bytes if self.block_bytes else 0
        if extra:
            self.add_blocks(extra)
        return added + extra

    def remove_tail_blocks(self, n: int) -> None:
        """Drop the last n blocks; n must cover whole tail segments (the ones added by grows)."""
        remaining = n
        cut = len(self.segments)
        while remaining > 0 and cut > 0:
            remaining -= self.segments[cut - 1].num_blocks
            cut -= 1
        if remaining != 0 or cut == 0:
            sizes = [s.num_blocks for s in self.segments]
            raise PoolError(f"cannot shrink by {n} blocks: tail segments are {sizes} (whole segments only)")
        self.segments = self.segments[:cut]

    def holds(self, layer: int, blocks: list[int]) -> bool:
        """True when every one of these blocks has a slab for this layer."""
        return all(
            layer in seg.slabs
            for seg in self.segments
            if any(seg.first_block <= b < seg.first_block + seg.num_blocks for b in blocks)
        )

    def _flat(self, seg: _Segment, layer: int, kv: int) -> torch.Tensor:
        # [num_blocks * block_size, kv_heads, head_dim] view of one layer's k or v.
        slab = seg.slabs.get(layer)
        assert slab is not None, f"blocks {seg.first_block}+{seg.num_blocks} hold no KV for layer {layer}"
        return slab[kv].view(-1, self.num_kv_heads, self.head_dim)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v [N, kv_heads, head_dim] at flat slots [N] (block_id * block_size + offset)."""
        if len(self.segments) == 1:
            seg = self.segments[0]
            self._flat(seg, layer, 0).index_copy_(0, slots, k)
            self._flat(seg, layer, 1).index_copy_(0, slots, v)
            return
        for seg, sel, local in self._split(slots):
            self._flat(seg, layer, 0).index_copy_(0, local, k[sel])
            self._flat(seg, layer, 1).index_copy_(0, local, v[sel])

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v at flat slots [M] -> two [M, kv_heads, head_dim] tensors."""
        if len(self.segments) == 1:
            seg = self.segments[0]
            return self._flat(seg, layer, 0).index_select(0, slots), self._flat(seg, layer, 1).index_select(0, slots)
        shape = (slots.numel(), self.num_kv_heads, self.head_dim)
        k = torch.empty(shape, dtype=self.dtype, device=self.device)
        v = torch.empty_like(k)
        for seg, sel, local in self._split(slots):
            k[sel] = self._flat(seg, layer, 0).index_select(0, local)
            v[sel] = self._flat(seg, layer, 1).index_select(0, local)
        return k, v

    def _split(self, slots: torch.Tensor) -> list[tuple[_Segment, torch.Tensor, torch.Tensor]]:
        # Every layer of a step reads and writes the same slot tensors: split each one once. Entries keep
        # the tensor itself, so an id cannot be reused while cached; a pool change invalidates them.
        segments = self.segments
        hit = self._splits.get(id(slots))
        if hit is not None and hit[0] is slots and hit[1] is segments:
            return hit[2]
        out = self._split_now(slots, segments)
        if len(self._splits) >= 16:
            self._splits.pop(next(iter(self._splits)))
        self._splits[id(slots)] = (slots, segments, out)
        return out

    def _split_now(self, slots: torch.Tensor, segments: list[_Segment]) -> list[tuple[_Segment, torch.Tensor,
                                                                                     torch.Tensor]]:
        out = []
        for seg in segments:
            lo, hi = seg.first_block * self.block_size, (seg.first_block + seg.num_blocks) * self.block_size
            sel = ((slots >= lo) & (slots < hi)).nonzero().squeeze(1)
            if sel.numel():
                out.append((seg, sel, slots[sel] - lo))
        return out
