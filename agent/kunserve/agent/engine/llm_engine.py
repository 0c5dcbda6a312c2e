"""LLMEngine: requests in, tokens out. Owns the model, the paged KV pool, the scheduler and the sampler.

`step()` runs one scheduling round and one forward pass and returns the new tokens of every request that
produced any. The engine core imports no gRPC; the agent's service wraps it.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence

import torch

from kunserve.agent.engine.block_manager import BlockManager
from kunserve.agent.engine.config import EngineConfig, activation_reserve_bytes, budget_bytes
from kunserve.agent.engine.kv_cache import KVCache
from kunserve.agent.engine.model_runner import ModelRunner
from kunserve.agent.engine.output import Pressure, RequestOutput, RequestState
from kunserve.agent.engine.sampler import Sampler
from kunserve.agent.engine.scheduler import Scheduler
from kunserve.agent.engine.sequence import FinishReason, SamplingParams
from kunserve.agent.engine.sequence import Sequence as Seq
from kunserve.agent.errors import InvalidRequestError, KunServeError, PoolError
from kunserve.agent.model.loader import Checkpoint, load_model, parse_dtype, weight_bytes
from kunserve.agent.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.device = config.resolve_device()
        self.dtype = parse_dtype(config.dtype)
        self.checkpoint = Checkpoint(config.model)
        self.model_config = cfg = self.checkpoint.config
        self.tokenizer = Tokenizer(self.checkpoint.dir)
        self.model = load_model(self.checkpoint, self.dtype, self.device, config.layer_range, config.progress,
                                input_major=config.input_major(self.device))
        self.eos_token_ids = frozenset(cfg.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        )
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.kv_cache = KVCache(
            self.model.held_layers(), cfg.num_key_value_heads, cfg.head_dim, config.block_size, self.dtype, self.device
        )
        self.weight_bytes = weight_bytes(self.model)
        elem = torch.empty((), dtype=self.dtype).element_size()
        self.reserve_bytes = activation_reserve_bytes(cfg, config, elem)
        self.budget_bytes = budget_bytes(config, self.device, self.weight_bytes, self.reserve_bytes)
        num_blocks = config.num_kv_blocks
        if num_blocks is None:
            num_blocks = (self.budget_bytes - self.weight_bytes - self.reserve_bytes) // self.kv_cache.block_bytes
        if num_blocks <= 0:
            raise PoolError(
                f"memory budget {self.budget_bytes} B leaves no KV blocks: weights {self.weight_bytes} B, "
                f"reserve {self.reserve_bytes} B, one block {self.kv_cache.block_bytes} B"
            )
        self.initial_num_blocks = num_blocks  # the pool of a replica holding its configured layers
        self.kv_cache.add_blocks(num_blocks)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(config.scheduler_config(num_blocks), self.block_manager)
        self.runner = ModelRunner(self.model, self.kv_cache)
        self.sampler = Sampler(self.device, config.seed)
        self._requests: dict[str, RequestState] = {}
        self._pending: list[RequestOutput] = []  # outputs of aborts, returned by the next step
        self._ids = itertools.count()
        log.info("engine ready: %s on %s, %d KV blocks of %d tokens", self.checkpoint.dir, self.device,
                 num_blocks, config.block_size)

    # ---- requests -------------------------------------------------------------------------------------------
    def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        """Validate and queue a request; raises InvalidRequestError for bad input."""
        params.validate()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        limit = self.context_limit()
        if len(ids) >= limit:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens; at most {limit - 1} fit this engine's context of {limit} tokens"
            )
        if len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context of "
                f"{self.max_model_len} tokens"
            )
        if request_id is None:
            request_id = next(i for i in (f"req-{n}" for n in self._ids) if i not in self._requests)
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        seq = Seq(request_id, ids, params)
        self._requests[request_id] = RequestState(seq, self.tokenizer, self.eos_token_ids)
        self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> bool:
        state = self._requests.pop(request_id, None)
        if state is None:
            return False
        self.scheduler.finish(state.seq)
        state.seq.finish_reason = FinishReason.ABORT
        self._pending.append(state.output([], ""))
        return True

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    def sequence(self, request_id: str) -> Seq:
        """The engine's sequence for a running or queued request (InvalidRequestError if unknown)."""
        state = self._requests.get(request_id)
        if state is None:
            raise InvalidRequestError(f"request {request_id!r} is not running here")
        return state.seq

    def adopt(self, state: RequestState) -> None:
        """Take over a request whose KV is already in this engine's blocks (see migration.py)."""
        self._requests[state.seq.request_id] = state
        self.scheduler.running.append(state.seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending)

    def context_limit(self) -> int:
        """Tokens one sequence may reach: the model's context, capped by what the pool can hold."""
        return min(self.max_model_len, self.scheduler.allocator.num_blocks * self.config.block_size)

    # ---- the loop -------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if not (self.model.is_first and self.model.is_last):
            raise KunServeError(
                f"this engine holds layers [{self.model.start}, {self.model.end}) of "
                f"{self.model_config.num_hidden_layers}: it cannot serve alone (restore its layers first)"
            )
        outputs, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return outputs
        seqs, logits = self.runner.execute(batch)
        if not seqs:
            return outputs
        tokens = self.sampler(
            logits, [s.params for s in seqs], [s.num_output_tokens + s.params.sample_index_offset for s in seqs]
        )
        limit = self.context_limit()
        for seq, token in zip(seqs, tokens, strict=True):
            state = self._requests[seq.request_id]
            seq.append_token(token)
            out = state.on_token(token, limit)
            if out.finished:
                self.scheduler.finish(seq)
                del self._requests[seq.request_id]
            outputs.append(out)
        return outputs

    def generate(
        self, prompts: Sequence[str | list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[RequestOutput]:
        """Run prompts to completion; returns one cumulative output per prompt, in order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    # ---- pressure and the pool ------------------------------------------------------------------------------
    def pressure(self) -> Pressure:
        bm = self.block_manager
        return Pressure(
            blocks_needed=self.scheduler.blocks_needed(),
            blocks_total=bm.num_blocks,
            blocks_free=bm.num_free_blocks,
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            timestamp=time.time(),
        )

    def reset_pool(self, num_blocks: int) -> None:
        """A new, empty pool of num_blocks blocks for the layers held now (every request is forgotten: the
        caller has moved their KV out first). Used when a group splits back into replicas."""
        cfg = self.model_config
        self._requests.clear()
        self.kv_cache.segments = []  # release the old pages before the new ones are allocated
        self.kv_cache = KVCache(self.model.held_layers(), cfg.num_key_value_heads, cfg.head_dim,
                                self.config.block_size, self.dtype, self.device)
        self.kv_cache.add_blocks(num_blocks)
        self.block_manager = BlockManager(num_blocks, self.config.block_size)
        self.scheduler = Scheduler(self.scheduler.config, self.block_manager)
        self.runner = ModelRunner(self.model, self.kv_cache)

    def grow_kv_pool(self, num_blocks: int) -> range:
        """Add num_blocks blocks in place (live blocks keep their ids and bytes)."""
        self.kv_cache.add_blocks(num_blocks)
        return self.block_manager.grow(num_blocks)

    def shrink_kv_pool(self, num_blocks: int) -> None:
        """Give back the last num_blocks blocks; PoolError (nothing changes) if any is in use."""
        if not self.block_manager.can_shrink(num_blocks):
            self.block_manager.shrink(num_blocks)  # raises the detailed PoolError
        remaining = self.block_manager.num_blocks - num_blocks
        longest = max((s.seq.num_tokens + 1 for s in self._requests.values()), default=0)
        if self.block_manager.blocks_for(longest) > remaining:
            raise PoolError(f"cannot shrink to {remaining} blocks: a live request needs "
                            f"{self.block_manager.blocks_for(longest)}")
        self.kv_cache.remove_tail_blocks(num_blocks)
        self.block_manager.shrink(num_blocks)
