"""LLMEngine on the tiny random checkpoint: request validation, finishing rules, streaming, aborts,
block accounting, preemption, seeded sampling, pool grow/shrink and pressure."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch

from kunserve.agent.engine.config import EngineConfig
from kunserve.agent.engine.llm_engine import LLMEngine
from kunserve.agent.engine.output import RequestOutput
from kunserve.agent.engine.sequence import FinishReason, SamplingParams
from kunserve.agent.errors import InvalidRequestError, PoolError

torch.set_num_threads(1)

BS = 4  # block size of every engine here
PROMPTS = [
    "The quick brown fox jumps over the lazy dog",
    "Hello world, the model",
    "Once upon a time in a city by the ocean",
    "naïve café 東京 🚀 and more",
]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _engine(model_dir: Path, **kw: object) -> LLMEngine:
    cfg: dict[str, object] = {"num_kv_blocks": 64, "block_size": BS, "max_num_batched_tokens": 64, "seed": 0}
    cfg.update(kw)
    return LLMEngine(EngineConfig(model=str(model_dir), progress=False, **cfg))  # type: ignore[arg-type]


def _run(engine: LLMEngine) -> dict[str, list[RequestOutput]]:
    """Step until every request finished; every output of every request, in order."""
    outs: dict[str, list[RequestOutput]] = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    assert not engine.has_unfinished_requests()
    return outs


def _assert_idle(engine: LLMEngine) -> None:
    bm = engine.block_manager
    bm.check_invariant()
    assert bm.num_used_blocks == 0
    assert bm.num_free_blocks == bm.num_blocks
    assert not engine.scheduler.waiting and not engine.scheduler.running
    assert not engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> LLMEngine:
    """A shared engine for tests that leave it idle (checked by each of them)."""
    return _engine(tiny_model_dir, max_model_len=64)


# ---- validation ------------------------------------------------------------------------------------------

INVALID_PARAMS = [
    pytest.param({"max_tokens": 0}, id="max_tokens=0"),
    pytest.param({"max_tokens": -3}, id="max_tokens<0"),
    pytest.param({"temperature": math.nan}, id="temperature=nan"),
    pytest.param({"temperature": math.inf}, id="temperature=inf"),
    pytest.param({"temperature": -0.5}, id="temperature<0"),
    pytest.param({"top_p": 0.0}, id="top_p=0"),
    pytest.param({"top_p": 1.5}, id="top_p>1"),
    pytest.param({"top_p": math.nan}, id="top_p=nan"),
    pytest.param({"top_k": -1}, id="top_k<0"),
    pytest.param({"seed": -1}, id="seed<0"),
    pytest.param({"seed": 2**64}, id="seed>=2**64"),
    pytest.param({"stop": ("ok", "")}, id="empty-stop"),
]


@pytest.mark.parametrize("bad", INVALID_PARAMS)
def test_invalid_sampling_params_are_refused(engine: LLMEngine, bad: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError):
        engine.add_request("Hello world", SamplingParams(**bad))  # type: ignore[arg-type]
    _assert_idle(engine)


def test_invalid_prompts_are_refused_and_the_engine_keeps_working(engine: LLMEngine) -> None:
    vocab = engine.model_config.vocab_size
    assert engine.max_model_len == 64
    assert engine.context_limit() == 64
    bad_prompts: list[str | list[int]] = [
        "",
        [],
        [5] * 64,  # a prompt must leave room for one output token
        [5] * 100,
        [5, vocab, 6],
        [5, -1],
    ]
    for prompt in bad_prompts:
        with pytest.raises(InvalidRequestError):
            engine.add_request(prompt, GREEDY)
        _assert_idle(engine)
    # Prompt + max_tokens must fit the context (as OpenAI and vLLM require) ...
    with pytest.raises(InvalidRequestError, match=r"prompt \(63 tokens\) \+ max_tokens \(10\) exceeds"):
        engine.add_request([5] * 63, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    # ... so a prompt one token shorter than the context gets exactly one token (LENGTH).
    rid = engine.add_request([5] * 63, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    out = _run(engine)[rid][-1]
    assert out.finish_reason is FinishReason.LENGTH
    assert len(out.token_ids) == 1
    rid = engine.add_request([vocab - 1, 0], GREEDY)  # the highest valid token id
    outs = _run(engine)
    assert list(outs) == [rid]
    assert len(outs[rid][-1].token_ids) == GREEDY.max_tokens
    _assert_idle(engine)


def test_duplicate_request_id(engine: LLMEngine) -> None:
    engine.add_request("Hello", GREEDY, request_id="dup")
    with pytest.raises(InvalidRequestError, match="dup"):
        engine.add_request("Other prompt", GREEDY, request_id="dup")
    assert len(engine.scheduler.waiting) == 1
    outs = _run(engine)
    assert list(outs) == ["dup"]
    assert len(outs["dup"][-1].token_ids) == GREEDY.max_tokens
    assert outs["dup"][-1].prompt_token_ids == engine.tokenizer.encode("Hello")
    # Once finished, the id may be used again.
    engine.add_request("Hello", GREEDY, request_id="dup")
    assert _run(engine)["dup"][-1].token_ids == outs["dup"][-1].token_ids
    _assert_idle(engine)


# ---- finishing rules and streaming -----------------------------------------------------------------------


def test_max_tokens_is_exact_and_streams_add_up(engine: LLMEngine) -> None:
    ids = [
        engine.add_request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        for p, n in zip(PROMPTS, (1, 5, 9, 17), strict=True)
    ]
    outs = _run(engine)
    for rid, n in zip(ids, (1, 5, 9, 17), strict=True):
        stream = outs[rid]
        final = stream[-1]
        assert final.finish_reason is FinishReason.LENGTH
        assert len(final.token_ids) == n
        assert [t for o in stream for t in o.new_token_ids] == final.token_ids
        assert all(len(o.new_token_ids) == 1 for o in stream)
        assert all(o.finish_reason is None and o.token_ids == [] for o in stream[:-1])
        assert "".join(o.new_text for o in stream) == final.text
        assert final.ttft_s is not None and final.ttft_s >= 0
    _assert_idle(engine)


def test_context_limit_ends_with_length(tiny_model_dir: Path) -> None:
    # The model's context allows 60 + 50 tokens, but a 16-block pool holds 64: the request stops there.
    engine = _engine(tiny_model_dir, num_kv_blocks=16)
    assert engine.context_limit() == 16 * BS == 64
    rid = engine.add_request([7] * 60, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    final = _run(engine)[rid][-1]
    assert final.finish_reason is FinishReason.LENGTH
    assert len(final.token_ids) == 4  # 60 + 4 = the pool's 64 tokens
    _assert_idle(engine)


def test_stop_token_ids(engine: LLMEngine) -> None:
    base = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    tokens = base.token_ids
    stop_id = tokens[6]
    k = tokens.index(stop_id)
    out = engine.generate(
        [PROMPTS[0]],
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_id, 999_999)),
    )[0]
    assert out.finish_reason is FinishReason.STOP
    assert out.token_ids == tokens[: k + 1]
    assert out.token_ids[-1] == stop_id
    assert out.text == engine.tokenizer.decode(tokens[:k])  # the stop token's own text is not returned
    _assert_idle(engine)


def test_eos_stops_unless_ignored(engine: LLMEngine) -> None:
    assert engine.tokenizer.eos_token_id in engine.eos_token_ids
    base = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    fake_eos = base.token_ids[3]
    k = base.token_ids.index(fake_eos)
    saved = engine.eos_token_ids
    engine.eos_token_ids = frozenset({fake_eos})  # the random model rarely emits its real eos
    try:
        stopped = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0.0))[0]
        ignored = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    finally:
        engine.eos_token_ids = saved
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.token_ids == base.token_ids[: k + 1]
    assert ignored.finish_reason is FinishReason.LENGTH
    assert ignored.token_ids == base.token_ids
    _assert_idle(engine)


def _stop_string_from(text: str) -> str:
    for i in range(4, len(text) - 3):
        cand = text[i : i + 3]
        if "\ufffd" not in cand and cand.strip() and cand.isprintable():
            return cand
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_string_is_cut_and_never_streamed(engine: LLMEngine) -> None:
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    base = engine.generate([PROMPTS[2]], params)[0]
    assert len(base.text) > 10, base.text
    stop = _stop_string_from(base.text)
    cut = base.text.find(stop)
    assert cut >= 1

    rid = engine.add_request(
        PROMPTS[2],
        SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=("never-in-this-text-\x00", stop)),
    )
    stream = _run(engine)[rid]
    final = stream[-1]
    assert final.finish_reason is FinishReason.STOP
    assert final.text == base.text[:cut]
    assert stop not in final.text
    assert "".join(o.new_text for o in stream) == final.text
    assert all(stop not in o.new_text for o in stream)
    # Same greedy tokens up to the one that completed the stop string, and none after it.
    assert final.token_ids == base.token_ids[: len(final.token_ids)]
    assert len(final.token_ids) < len(base.token_ids)
    prefix_text = engine.tokenizer.decode(final.token_ids[:-1])
    assert stop not in prefix_text
    _assert_idle(engine)


def test_stop_string_completed_by_the_last_allowed_token(engine: LLMEngine) -> None:
    base = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    last = engine.tokenizer.decode(base.token_ids[-1:])
    assert last.strip() and "\ufffd" not in last and last not in base.text[: len(base.text) - len(last)]
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, stop=(last,)))[0]
    assert out.finish_reason is FinishReason.STOP  # the stop string wins over max_tokens
    assert out.token_ids == base.token_ids
    assert out.text == base.text[: len(base.text) - len(last)]
    _assert_idle(engine)


def test_stop_string_is_cut_even_when_a_stop_token_ends_the_request(engine: LLMEngine) -> None:
    base = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    # The first token (after the first one) whose text is whole, not blank and new to the output.
    dec = engine.tokenizer.decode
    k = next(
        i
        for i in range(1, len(base.token_ids))
        if (piece := dec(base.token_ids[i : i + 1])).strip()
        and "\ufffd" not in piece
        and piece not in dec(base.token_ids[:i])
    )
    tok, piece = base.token_ids[k], dec(base.token_ids[k : k + 1])
    cut = base.text.find(piece)
    assert cut == len(dec(base.token_ids[:k]))
    only_string = engine.generate(
        [PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, stop=(piece,))
    )[0]
    assert only_string.text == base.text[:cut]
    rid = engine.add_request(
        PROMPTS[0],
        SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, stop=(piece,), stop_token_ids=(tok,)),
    )
    stream = _run(engine)[rid]
    _assert_idle(engine)
    assert stream[-1].finish_reason is FinishReason.STOP
    assert all(piece not in o.new_text for o in stream)
    assert stream[-1].text == base.text[:cut]


# ---- aborts and accounting -------------------------------------------------------------------------------


def test_abort_frees_blocks_and_reports_abort(engine: LLMEngine) -> None:
    a = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    b = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    bm = engine.block_manager
    seq_a = engine._requests[a].seq
    seq_b = engine._requests[b].seq
    assert bm.num_used_blocks == len(seq_a.block_table) + len(seq_b.block_table) > 0
    held_b = len(seq_b.block_table)
    assert engine.abort_request(a)
    assert seq_a.block_table == []
    assert bm.num_used_blocks == held_b
    assert not engine.abort_request(a)
    assert not engine.abort_request("no-such-request")
    out = engine.step()
    aborted = [o for o in out if o.request_id == a]
    assert len(aborted) == 1
    assert aborted[0].finish_reason is FinishReason.ABORT
    assert aborted[0].new_token_ids == []
    assert aborted[0].new_text == ""
    assert len(aborted[0].token_ids) == 3
    assert engine.abort_request(b)
    assert bm.num_used_blocks == 0
    out = engine.step()
    assert [(o.request_id, o.finish_reason) for o in out] == [(b, FinishReason.ABORT)]
    assert engine.step() == []
    _assert_idle(engine)


def test_abort_a_waiting_request(engine: LLMEngine) -> None:
    rid = engine.add_request(PROMPTS[3], GREEDY)
    assert engine.has_unfinished_requests()
    assert engine.abort_request(rid)
    assert engine.has_unfinished_requests()  # until the abort output is handed back
    out = engine.step()
    assert [(o.request_id, o.finish_reason, o.token_ids) for o in out] == [(rid, FinishReason.ABORT, [])]
    _assert_idle(engine)


def test_every_block_is_free_after_a_mixed_workload(tiny_model_dir: Path) -> None:
    eng = _engine(tiny_model_dir, num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=3)
    params = [
        SamplingParams(max_tokens=n, temperature=t, seed=s, ignore_eos=True)
        for n, t, s in [(6, 0.0, None), (15, 0.9, 1), (3, 1.0, None), (11, 0.0, None), (8, 0.7, 5)]
    ]
    for i, p in enumerate(params):
        eng.add_request(PROMPTS[i % len(PROMPTS)], p)
    steps = 0
    while eng.has_unfinished_requests():
        eng.step()
        eng.block_manager.check_invariant()
        steps += 1
        if steps == 4:
            eng.abort_request("req-4")
    _assert_idle(eng)


# ---- preemption, chunking and seeds give the same tokens -------------------------------------------------


def _solo(model_dir: Path, prompt: str, params: SamplingParams) -> list[int]:
    eng = _engine(model_dir, num_kv_blocks=64)
    return eng.generate([prompt], params)[0].token_ids


def test_preemption_keeps_greedy_tokens(tiny_model_dir: Path) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = [_solo(tiny_model_dir, p, params) for p in PROMPTS]
    eng = _engine(tiny_model_dir, num_kv_blocks=16, max_num_batched_tokens=64)
    outs = eng.generate(PROMPTS, params)
    assert eng.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == alone
    assert all(o.finish_reason is FinishReason.LENGTH for o in outs)
    _assert_idle(eng)


def test_chunked_prefill_keeps_greedy_tokens(tiny_model_dir: Path) -> None:
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    whole = _engine(tiny_model_dir, max_num_batched_tokens=256).generate(PROMPTS, params)
    chunked_eng = _engine(tiny_model_dir, max_num_batched_tokens=5)
    chunked = chunked_eng.generate(PROMPTS, params)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in whole]
    _assert_idle(chunked_eng)


def test_seeded_sampling_alone_equals_batched(tiny_model_dir: Path) -> None:
    mine = SamplingParams(max_tokens=16, temperature=0.8, seed=1234, ignore_eos=True)
    alone = _solo(tiny_model_dir, PROMPTS[1], mine)
    assert len(set(alone)) > 3
    eng = _engine(tiny_model_dir, num_kv_blocks=64, max_num_batched_tokens=24, seed=99)
    others = [
        SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True),
        SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=0.8, seed=4321, ignore_eos=True),
    ]
    outs = eng.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]], [others[0], mine, others[1], others[2]])
    assert outs[1].token_ids == alone
    assert outs[3].token_ids != alone
    # A different seed gives a different stream.
    other_seed = _solo(
        tiny_model_dir, PROMPTS[1], SamplingParams(max_tokens=16, temperature=0.8, seed=1235, ignore_eos=True)
    )
    assert other_seed != alone


def test_seeded_sampling_survives_preemption(tiny_model_dir: Path) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=77, ignore_eos=True)
    alone = [_solo(tiny_model_dir, p, params) for p in PROMPTS]
    eng = _engine(tiny_model_dir, num_kv_blocks=16)
    outs = eng.generate(PROMPTS, params)
    assert eng.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == alone


# ---- the pool --------------------------------------------------------------------------------------------


def test_grow_and_shrink_keep_accounting_exact(tiny_model_dir: Path) -> None:
    eng = _engine(tiny_model_dir, num_kv_blocks=8, max_num_batched_tokens=64)
    bm, kv = eng.block_manager, eng.kv_cache
    assert eng.context_limit() == 32
    assert list(eng.grow_kv_pool(4)) == [8, 9, 10, 11]
    assert (bm.num_blocks, kv.num_blocks, bm.num_free_blocks) == (12, 12, 12)
    assert eng.context_limit() == 48
    rid = eng.add_request([11] * 40, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    eng.step()  # the whole prompt in one step: blocks 0..9
    seq = eng._requests[rid].seq
    assert seq.block_table == list(range(10))
    assert (bm.num_used_blocks, bm.num_free_blocks) == (10, 2)
    with pytest.raises(PoolError):
        eng.shrink_kv_pool(4)
    assert (bm.num_blocks, kv.num_blocks, bm.num_used_blocks, bm.num_free_blocks) == (12, 12, 10, 2)
    bm.check_invariant()
    assert eng.abort_request(rid)
    eng.step()
    eng.shrink_kv_pool(4)
    assert (bm.num_blocks, kv.num_blocks, bm.num_used_blocks, bm.num_free_blocks) == (8, 8, 0, 8)
    assert eng.context_limit() == 32
    # Only whole grown segments can go, and never the initial pool: nothing changes on refusal.
    eng.grow_kv_pool(2)
    eng.grow_kv_pool(3)
    for bad in (2, 4, 13):
        with pytest.raises(PoolError):
            eng.shrink_kv_pool(bad)
        assert (bm.num_blocks, kv.num_blocks, bm.num_free_blocks) == (13, 13, 13)
    eng.shrink_kv_pool(5)
    with pytest.raises(PoolError):
        eng.shrink_kv_pool(8)
    assert (bm.num_blocks, kv.num_blocks) == (8, 8)
    with pytest.raises(PoolError):
        eng.grow_kv_pool(0)
    assert (bm.num_blocks, kv.num_blocks) == (8, 8)
    _assert_idle(eng)


def test_shrink_never_strands_a_live_request(tiny_model_dir: Path) -> None:
    eng = _engine(tiny_model_dir, num_kv_blocks=8, max_num_batched_tokens=64)
    eng.grow_kv_pool(4)
    rid = eng.add_request([11] * 32, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    eng.step()  # 32 prompt tokens in blocks 0..7 and one sampled token: 33 tokens, the top 4 blocks free
    assert eng._requests[rid].seq.block_table == list(range(8))
    with contextlib.suppress(PoolError):
        eng.shrink_kv_pool(4)  # refusing is fine too ...
    finished = []
    for _ in range(50):  # ... but the request must finish either way
        finished += [o for o in eng.step() if o.finished]
        if not eng.has_unfinished_requests():
            break
    assert [o.request_id for o in finished] == [rid]
    _assert_idle(eng)


def test_generated_ids_never_collide_with_caller_ids(tiny_model_dir: Path) -> None:
    eng = _engine(tiny_model_dir)
    for i in range(3):
        eng.add_request("Hello", GREEDY, request_id=f"req-{i}")
    auto = eng.add_request("Hello", GREEDY)
    assert auto not in {"req-0", "req-1", "req-2"}
    assert len(_run(eng)) == 4


def test_grow_mid_generation_keeps_tokens(tiny_model_dir: Path) -> None:
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    expected = [_solo(tiny_model_dir, p, params) for p in PROMPTS[:2]]
    eng = _engine(tiny_model_dir, num_kv_blocks=10)
    ids = [eng.add_request(p, params) for p in PROMPTS[:2]]
    outs: dict[str, list[RequestOutput]] = {}
    for _ in range(3):
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
    eng.grow_kv_pool(12)
    for rid, stream in _run(eng).items():
        outs.setdefault(rid, []).extend(stream)
    got = [outs[i][-1].token_ids for i in ids]
    assert got == expected
    assert eng.block_manager.num_blocks == 22
    eng.shrink_kv_pool(12)
    _assert_idle(eng)


def test_pressure_exact_numbers(tiny_model_dir: Path) -> None:
    eng = _engine(tiny_model_dir, num_kv_blocks=16, max_num_batched_tokens=64)
    p0 = eng.pressure()
    assert (p0.blocks_needed, p0.blocks_total, p0.blocks_free, p0.num_waiting, p0.num_running) == (
        0,
        16,
        16,
        0,
        0,
    )
    assert p0.demand == 0.0
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    a = eng.add_request([9] * 10, params)
    p1 = eng.pressure()
    # ceil((10 + 1) / 4) = 3 blocks for the waiting prompt and its next token.
    assert (p1.blocks_needed, p1.blocks_total, p1.blocks_free, p1.num_waiting, p1.num_running) == (
        3,
        16,
        16,
        1,
        0,
    )
    assert p1.demand == 3 / 16
    eng.step()  # prefill 10 tokens (3 blocks) and sample one: 11 tokens
    p2 = eng.pressure()
    assert (p2.blocks_needed, p2.blocks_free, p2.num_waiting, p2.num_running) == (3, 13, 0, 1)
    eng.add_request([9] * 7, params)
    eng.add_request([9] * 30, params)
    p3 = eng.pressure()
    # running: ceil(12/4) = 3; waiting: ceil(8/4) = 2 and ceil(31/4) = 8
    assert (p3.blocks_needed, p3.blocks_free, p3.num_waiting, p3.num_running) == (13, 13, 2, 1)
    eng.step()  # a decodes (11 -> 12 tokens, still 3 blocks); 7 + 30 prompt tokens admitted: 2 + 8 blocks
    p4 = eng.pressure()
    # a: ceil(13/4) = 4; b: 8 tokens -> ceil(9/4) = 3; c: 31 tokens -> 8
    assert (p4.blocks_needed, p4.blocks_free, p4.num_waiting, p4.num_running) == (15, 3, 0, 3)
    assert p4.demand == 15 / 16
    assert eng.abort_request(a)
    p5 = eng.pressure()
    assert (p5.blocks_needed, p5.blocks_free, p5.num_running) == (11, 6, 2)
    _run(eng)
    p6 = eng.pressure()
    assert (p6.blocks_needed, p6.blocks_free, p6.num_waiting, p6.num_running) == (0, 16, 0, 0)
    _assert_idle(eng)


def test_tiny_temperatures_are_greedy(engine: LLMEngine) -> None:
    greedy = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    tiny = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=1e-308, ignore_eos=True))[0]
    assert tiny.token_ids == greedy.token_ids
    _assert_idle(engine)
