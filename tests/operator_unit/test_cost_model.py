"""CostModel: weight bytes per stage, freed bytes, KV capacity, group capacity and layer splits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kunserve.operator.cost_model import CostModel, even_split
from tests.operator_unit.pools import HAND

# The `kunserve make-model` presets' config.json values (fp32). The expected stage bytes are what the agent's
# loader.weight_bytes reports for LlamaModel(cfg, start, end) on these configs (checked once by hand).
TINY = {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 8, "num_attention_heads": 6,
        "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 2048, "tie_word_embeddings": True,
        "model_type": "llama"}
TINY_UNTIED = {**TINY, "num_key_value_heads": 3, "tie_word_embeddings": False}


def test_from_hf_config_tied_matches_the_agent() -> None:
    cost = CostModel.from_hf_config(TINY, dtype_bytes=4)
    # layer: qkv 192*(192+2*64) + o 192*192 + mlp 3*192*512 + 2 norms 192 = 393600 params
    assert cost.layer_bytes == 393600 * 4
    assert cost.embed_bytes == 2048 * 192 * 4
    assert cost.head_bytes == (2048 * 192 + 192) * 4  # shared matrix + final norm
    assert cost.kv_bytes_per_token_layer == 2 * 2 * 32 * 4
    assert cost.tied_embeddings
    assert cost.full_weight_bytes == 14168832  # the matrix counted once
    assert cost.stage_weight_bytes(0, 3) == 6296064
    assert cost.stage_weight_bytes(3, 5) == 3148800
    assert cost.stage_weight_bytes(5, 8) == 6296832  # the last stage keeps its own copy of the matrix
    assert cost.freed_bytes(3, 5) == 14168832 - 3148800


def test_from_hf_config_untied_matches_the_agent() -> None:
    cost = CostModel.from_hf_config(TINY_UNTIED, dtype_bytes=4, block_size=8)
    assert not cost.tied_embeddings
    assert cost.full_weight_bytes == 16134912
    assert cost.stage_weight_bytes(0, 3) == 6443520
    assert cost.stage_weight_bytes(3, 5) == 3247104
    assert cost.stage_weight_bytes(5, 8) == 6444288
    assert cost.kv_bytes_per_token() == 8 * 2 * 3 * 32 * 4
    assert cost.block_bytes() == 8 * 8 * 2 * 3 * 32 * 4


def test_from_hf_config_defaults_and_qwen2_bias() -> None:
    raw = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "vocab_size": 100, "model_type": "qwen2"}
    cost = CostModel.from_hf_config(raw, dtype_bytes=2)
    # kv_heads defaults to heads, head_dim to hidden/heads = 16; qwen2 has qkv bias (64 + 2*64 = 192)
    attn = 64 * 192 + 192 + 64 * 64
    assert cost.layer_bytes == (attn + 3 * 64 * 128 + 2 * 64) * 2
    assert cost.kv_bytes_per_token_layer == 2 * 64 * 2
    assert cost.block_size == 16 and not cost.tied_embeddings


def test_capacity_is_whole_blocks() -> None:
    assert HAND.block_bytes() == 80 and HAND.block_bytes(1) == 20
    assert HAND.block_capacity(8000) == 100
    assert HAND.token_capacity(8000) == 200
    assert HAND.token_capacity(8079) == 200  # a partial block holds nothing
    assert HAND.token_capacity(11000, 1) == 1100
    assert HAND.token_capacity(-5) == 0


def test_group_capacity_hand_worked() -> None:
    assert HAND.group_capacity([8000, 8000], [(0, 2), (2, 4)]) == 500
    assert HAND.group_gain([8000, 8000], [(0, 2), (2, 4)]) == 100
    assert HAND.group_gain([8000] * 3, [(0, 2), (2, 3), (3, 4)]) == -100
    assert HAND.group_gain([8000] * 4, [(0, 1), (1, 2), (2, 3), (3, 4)]) == 300
    # the stage with the smaller pool is the bottleneck: (4000 + 2000) // 40 = 150 blocks
    assert HAND.group_capacity([8000, 4000], [(0, 2), (2, 4)]) == 300


def test_group_capacity_rejects_bad_splits() -> None:
    with pytest.raises(ValueError):
        HAND.group_capacity([1, 1], [(0, 2), (3, 4)])
    with pytest.raises(ValueError):
        HAND.group_capacity([1, 1], [(0, 2), (2, 3)])
    with pytest.raises(ValueError):
        HAND.group_capacity([1], [(0, 2), (2, 4)])
    with pytest.raises(ValueError):
        HAND.stage_weight_bytes(2, 2)


def test_even_split() -> None:
    assert even_split(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert even_split(4, 3) == [(0, 2), (2, 3), (3, 4)]
    assert even_split(8, 1) == [(0, 8)]
    with pytest.raises(ValueError):
        even_split(3, 4)


def test_balanced_split_equal_pools_without_extras_is_even() -> None:
    cost = CostModel(num_layers=30, layer_bytes=1000, embed_bytes=0, head_bytes=0, kv_bytes_per_token_layer=10)
    assert cost.balanced_split([50_000] * 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]


def test_balanced_split_gives_the_embedding_stage_fewer_layers() -> None:
    # L=4, layer 1000 B, embed 6000 B (untied, head 0), 10 B/token/layer, block 1, pools 6000 B.
    # Even [2,2]: stage 0 keeps 8000 B, frees 2000 -> 8000 // 20 = 400 tokens (stage 1: 700) -> 400.
    # Balanced [1,3]: stage 0 frees 3000 -> 9000 // 10 = 900; stage 1 frees 7000 -> 13000 // 30 = 433 -> 433.
    cost = CostModel(num_layers=4, layer_bytes=1000, embed_bytes=6000, head_bytes=0, kv_bytes_per_token_layer=10,
                     block_size=1)
    assert cost.group_capacity([6000, 6000], cost.even_split(2)) == 400
    assert cost.balanced_split([6000, 6000]) == [(0, 1), (1, 4)]
    assert cost.group_capacity([6000, 6000], [(0, 1), (1, 4)]) == 433


def test_added_latency() -> None:
    cost = CostModel(num_layers=4, layer_bytes=1, embed_bytes=0, head_bytes=0, kv_bytes_per_token_layer=1,
                     stage_latency_s=0.002)
    assert cost.added_latency_s(1) == 0.0
    assert cost.added_latency_s(4) == pytest.approx(0.006)


def test_validation() -> None:
    with pytest.raises(ValueError):
        CostModel(num_layers=0, layer_bytes=1, embed_bytes=0, head_bytes=0, kv_bytes_per_token_layer=1)
    with pytest.raises(ValueError):
        CostModel(num_layers=2, layer_bytes=1, embed_bytes=10, head_bytes=5, kv_bytes_per_token_layer=1,
                  tied_embeddings=True)


@st.composite
def _cost_and_pools(draw: st.DrawFn, max_layers: int = 40, max_stages: int = 8) -> tuple[CostModel, list[int]]:
    layers = draw(st.integers(1, max_layers))
    tied = draw(st.booleans())
    embed = draw(st.integers(0, 50_000))
    cost = CostModel(
        num_layers=layers,
        layer_bytes=draw(st.integers(0, 20_000)),
        embed_bytes=embed,
        head_bytes=embed + draw(st.integers(0, 100)) if tied else draw(st.integers(0, 50_000)),
        kv_bytes_per_token_layer=draw(st.integers(1, 64)),
        block_size=draw(st.sampled_from([1, 2, 16])),
        tied_embeddings=tied,
    )
    g = draw(st.integers(1, min(layers, max_stages)))
    pools = draw(st.lists(st.integers(0, 2_000_000), min_size=g, max_size=g))
    return cost, pools


@settings(max_examples=300, deadline=None)
@given(_cost_and_pools())
def test_balanced_split_is_valid_and_never_worse_than_even(case: tuple[CostModel, list[int]]) -> None:
    cost, pools = case
    split = cost.balanced_split(pools)
    cost.check_split(split)
    assert len(split) == len(pools)
    assert cost.group_capacity(pools, split) >= cost.group_capacity(pools, cost.even_split(len(pools)))


def _all_splits(num_layers: int, stages: int) -> list[list[tuple[int, int]]]:
    if stages == 1:
        return [[(0, num_layers)]]
    out = []
    for first in range(1, num_layers - stages + 2):
        for rest in _all_splits(num_layers - first, stages - 1):
            out.append([(0, first)] + [(a + first, b + first) for a, b in rest])
    return out


@settings(max_examples=200, deadline=None)
@given(_cost_and_pools(max_layers=12, max_stages=4))
def test_balanced_split_is_optimal(case: tuple[CostModel, list[int]]) -> None:
    """Against every contiguous split (small L, up to 4 stages)."""
    cost, pools = case
    best = max(cost.group_capacity(pools, split) for split in _all_splits(cost.num_layers, len(pools)))
    assert cost.group_capacity(pools, cost.balanced_split(pools)) == best
