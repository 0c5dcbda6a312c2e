"""Moving a running request's KV between engines: read a request's KV per layer, and adopt a request
whose KV was computed elsewhere so it continues decoding here with no token changed.

This is what the live KV exchange (layer by layer, to a layer's new owner) and the restore path (KV back
to the owning agent) are built from; the bytes travel over the Peer service (peer.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kunserve.agent.engine.kv_cache import KVCache
from kunserve.agent.engine.llm_engine import LLMEngine
from kunserve.agent.engine.output import RequestState
from kunserve.agent.engine.sequence import SamplingParams, Sequence, SequenceStatus
from kunserve.agent.errors import InvalidRequestError, PoolError


@dataclass(slots=True)
class MigratedRequest:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    num_computed_tokens: int  # tokens whose KV is in `kv`
    kv: dict[int, torch.Tensor]  # layer -> [2 (k, v), num_computed_tokens, kv_heads, head_dim]
    arrival_time: float | None = None  # time.monotonic() of its arrival (keeps TTFT honest across moves)


def _slots(engine: LLMEngine, block_table: list[int], num_tokens: int) -> torch.Tensor:
    bs = engine.config.block_size
    positions = torch.arange(num_tokens)
    table = torch.tensor(block_table, dtype=torch.int64)
    return (table[positions // bs] * bs + positions % bs).to(engine.device)


def table_slots(block_table: list[int], num_tokens: int, block_size: int, device: torch.device) -> torch.Tensor:
    """Flat slots [num_tokens] of positions 0..num_tokens-1 in these blocks."""
    if num_tokens > len(block_table) * block_size:
        raise InvalidRequestError(f"{len(block_table)} blocks cannot hold {num_tokens} tokens")
    positions = torch.arange(num_tokens)
    table = torch.tensor(block_table, dtype=torch.int64)
    return (table[positions // block_size] * block_size + positions % block_size).to(device)


def read_kv_blocks(
    cache: KVCache, block_table: list[int], num_tokens: int, layers: list[int]
) -> dict[int, torch.Tensor]:
    """KV of positions [0, num_tokens) in these blocks: {layer: [2 (k, v), tokens, kv_heads, head_dim]}."""
    missing = [layer for layer in layers if not cache.holds(layer, block_table)]
    if missing:
        raise InvalidRequestError(f"no KV pages for layers {missing} in blocks {block_table}")
    slots = table_slots(block_table, num_tokens, cache.block_size, cache.device)
    return {layer: torch.stack(cache.gather(layer, slots)) for layer in layers}


def write_kv_blocks(cache: KVCache, block_table: list[int], kv: dict[int, torch.Tensor]) -> int:
    """Store {layer: [2, tokens, kv_heads, head_dim]} at positions [0, tokens) of these blocks; returns bytes."""
    written = 0
    for layer, t in kv.items():
        t = t.to(device=cache.device, dtype=cache.dtype)
        slots = table_slots(block_table, t.shape[1], cache.block_size, cache.device)
        cache.write(layer, slots, t[0], t[1])
        written += t.nbytes
    return written


def read_kv(engine: LLMEngine, request_id: str, layers: list[int]) -> dict[int, torch.Tensor]:
    """A running request's KV per layer: [2 (k, v), tokens, kv_heads, head_dim] for its computed tokens."""
    seq = engine.sequence(request_id)
    missing = [layer for layer in layers if not engine.kv_cache.holds(layer, seq.block_table)]
    if missing:
        raise InvalidRequestError(f"no KV for layers {missing} of request {request_id!r} here")
    slots = _slots(engine, seq.block_table, seq.num_computed_tokens)
    return {layer: torch.stack(engine.kv_cache.gather(layer, slots)) for layer in layers}


def export_request(engine: LLMEngine, request_id: str) -> MigratedRequest:
    """Everything another engine needs to continue this request (it keeps running here until aborted)."""
    seq = engine.sequence(request_id)
    if seq.num_computed_tokens == 0:
        raise InvalidRequestError(f"request {request_id!r} has no computed KV yet; resubmit it instead")
    kv = read_kv(engine, request_id, engine.model.held_layers())
    return MigratedRequest(request_id, list(seq.prompt_token_ids), seq.output_token_ids, seq.params,
                           seq.num_computed_tokens, kv)


def adopt_request(engine: LLMEngine, moved: MigratedRequest) -> None:
    """Continue a request here: allocate blocks, write its KV, and schedule it as running."""
    if engine.has_request(moved.request_id):
        raise InvalidRequestError(f"request id {moved.request_id!r} is already running")
    if moved.num_computed_tokens and sorted(moved.kv) != engine.model.held_layers():
        raise InvalidRequestError(f"KV covers layers {sorted(moved.kv)}, this engine holds "
                                  f"{engine.model.held_layers()}")
    seq = Sequence(moved.request_id, moved.prompt_token_ids, moved.params,
                   token_ids=moved.prompt_token_ids + moved.output_token_ids)
    if moved.arrival_time is not None:
        seq.arrival_time = moved.arrival_time
    n = moved.num_computed_tokens
    if n == 0:  # nothing computed (it was queued): it waits for admission here
        seq.first_token_time = seq.arrival_time if moved.output_token_ids else None
        state = RequestState(seq, engine.tokenizer, engine.eos_token_ids)
        engine._requests[seq.request_id] = state
        engine.scheduler.add(seq)
        return
    assert 0 < n < seq.num_tokens, "a running request has computed all but its newest token"
    if not engine.block_manager.allocate_slots(seq.block_table, n):
        raise PoolError(f"no room for {engine.block_manager.blocks_for(n)} blocks of {moved.request_id!r}")
    slots = _slots(engine, seq.block_table, n)
    for layer, kv in moved.kv.items():
        kv = kv.to(device=engine.device, dtype=engine.dtype)
        engine.kv_cache.write(layer, slots, kv[0], kv[1])
    seq.num_computed_tokens = n
    seq.first_token_time = seq.arrival_time if moved.output_token_ids else None
    seq.status = SequenceStatus.RUNNING
    engine.adopt(RequestState(seq, engine.tokenizer, engine.eos_token_ids))
