"""KV block accounting: which blocks are free, which belong to a sequence, and pool grow/shrink.

Blocks are handed out lowest id first, so the high ids a grow added are the first to fall free again
when load drops — which is what a later shrink needs. Invariant at all times: free + used = total.
"""

from __future__ import annotations

import heapq

from kunserve.agent.errors import PoolError


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks))  # a heap (sorted is a valid heap)
        self._used: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return len(self._used)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, block_table: list[int], num_tokens: int) -> bool:
        """Extend block_table so it holds num_tokens tokens. All or nothing: False if blocks run out."""
        need = self.blocks_for(num_tokens) - len(block_table)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        for _ in range(need):
            block = heapq.heappop(self._free)
            self._used.add(block)
            block_table.append(block)
        return True

    def free(self, block_table: list[int]) -> None:
        """Return every block of block_table to the pool and empty the table."""
        for block in block_table:
            assert block in self._used, f"block {block} freed twice or never allocated"
            self._used.remove(block)
            heapq.heappush(self._free, block)
        block_table.clear()

    def lowest_free(self, k: int) -> list[int]:
        """The k lowest free ids (what the next allocation of k blocks would get), fewer if fewer are free."""
        if k == 1:  # the common case (a request crossing into its next block): the heap's top
            return self._free[:1]
        return heapq.nsmallest(k, self._free)

    def mark_used(self, blocks: list[int]) -> None:
        """Take these specific free blocks (a group leader mirroring a member's pool as it was handed over)."""
        taken = set(blocks)
        if len(taken) != len(blocks) or any(b in self._used or not 0 <= b < self.num_blocks for b in taken):
            raise PoolError(f"blocks {sorted(blocks)} are not all free, distinct ids of this pool")
        self._free = [b for b in self._free if b not in taken]
        heapq.heapify(self._free)
        self._used |= taken

    def grow(self, n: int) -> range:
        """Add n new blocks with the next ids; live blocks keep their ids."""
        if n <= 0:
            raise PoolError(f"grow needs a positive block count, got {n}")
        new = range(self.num_blocks, self.num_blocks + n)
        for block in new:
            heapq.heappush(self._free, block)
        self.num_blocks += n
        return new

    def can_shrink(self, n: int) -> bool:
        """True when the n highest block ids are all free."""
        top = range(self.num_blocks - n, self.num_blocks)
        return 0 < n <= self.num_blocks and all(b not in self._used for b in top)

    def shrink(self, n: int) -> None:
        """Remove the n highest block ids; they must be free (PoolError otherwise, nothing changes)."""
        if not self.can_shrink(n):
            busy = sum(b in self._used for b in range(max(0, self.num_blocks - n), self.num_blocks))
            raise PoolError(f"cannot shrink by {n} of {self.num_blocks} blocks: {busy} of them are in use")
        cut = self.num_blocks - n
        self._free = [b for b in self._free if b < cut]
        heapq.heapify(self._free)
        self.num_blocks = cut

    def check_invariant(self) -> None:
        """free + used = total, no block both free and used, every id in range."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert not free & self._used, "a block is both free and used"
        assert len(free) + len(self._used) == self.num_blocks, "free + used != total"
        assert all(0 <= b < self.num_blocks for b in free | self._used), "block id out of range"
