"""`kunserve generate` end to end, sharded checkpoints, and reduced-precision loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kunserve.agent.engine.config import EngineConfig
from kunserve.agent.engine.llm_engine import LLMEngine
from kunserve.agent.engine.sequence import SamplingParams
from kunserve.agent.model.loader import Checkpoint, load_model
from kunserve.agent.model.make_model import build_checkpoint

REPO = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _kunserve(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from kunserve.cli import main; sys.exit(main(sys.argv[1:]))"
    env_path = ":".join(str(REPO / root) for root in ("operator", "agent", "gateway", "proto"))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})


def test_generate_json_matches_the_engine(tiny_dir: Path) -> None:
    proc = _kunserve("generate", "--model", str(tiny_dir), "--prompt-token-ids", "5,6,7,8,9",
                     "--max-tokens", "12", "--ignore-eos", "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) == {"prompt_token_ids", "token_ids", "text", "finish_reason", "ttft_s", "tokens_per_s"}
    engine = LLMEngine(EngineConfig(model=str(tiny_dir), progress=False, num_kv_blocks=32))
    expected = engine.generate([[5, 6, 7, 8, 9]], GREEDY)[0]
    assert result["prompt_token_ids"] == [5, 6, 7, 8, 9]
    assert result["token_ids"] == expected.token_ids
    assert result["text"] == expected.text
    assert result["finish_reason"] == "length"
    assert result["ttft_s"] > 0 and result["tokens_per_s"] > 0


def test_generate_reports_bad_input_and_missing_model(tiny_dir: Path, tmp_path: Path) -> None:
    bad = _kunserve("generate", "--model", str(tiny_dir), "--prompt", "hi", "--top-p", "0", "--json")
    assert bad.returncode == 1 and "top_p" in bad.stderr
    missing = _kunserve("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert missing.returncode == 1 and str(tmp_path / "nope") in missing.stderr


def test_sharded_checkpoint_loads_the_same_weights(tiny_dir: Path, tmp_path: Path) -> None:
    sharded = build_checkpoint(tmp_path / "sharded", "tiny", shards=3).path
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3
    a = load_model(Checkpoint(tiny_dir), progress=False).state_dict()
    b = load_model(Checkpoint(sharded), progress=False).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage_model_holds_only_its_layers(tiny_dir: Path) -> None:
    ckpt = Checkpoint(tiny_dir)
    first = load_model(ckpt, layer_range=(0, 3), progress=False)
    last = load_model(ckpt, layer_range=(3, ckpt.config.num_hidden_layers), progress=False)
    assert first.held_layers() == [0, 1, 2] and first.embed_tokens is not None and first.lm_head is None
    assert last.held_layers() == list(range(3, ckpt.config.num_hidden_layers))
    assert last.embed_tokens is None and last.lm_head is not None
    # Tied embeddings: the last stage's LM head is loaded from the embedding tensor.
    assert torch.equal(last.lm_head.weight, first.embed_tokens.weight)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_tracks_fp32(tiny_dir: Path, dtype: str) -> None:
    ref = LLMEngine(EngineConfig(model=str(tiny_dir), progress=False, num_kv_blocks=32))
    low = LLMEngine(EngineConfig(model=str(tiny_dir), dtype=dtype, progress=False, num_kv_blocks=32))
    assert low.kv_cache.segments[0].slabs[0].dtype == getattr(torch, dtype)
    assert low.weight_bytes * 2 == ref.weight_bytes
    prompt = list(range(10, 40))
    logits = []
    for engine in (ref, low):
        engine.add_request(prompt, GREEDY, request_id="r")
        captured = []
        execute = engine.runner.execute

        def capture(batch, execute=execute, captured=captured):  # type: ignore[no-untyped-def]
            seqs, out = execute(batch)
            captured.append(out.clone())
            return seqs, out

        engine.runner.execute = capture  # type: ignore[method-assign]
        engine.step()
        logits.append(captured[0][0])
    diff = (logits[0] - logits[1]).abs().max().item()
    assert 0 < diff < 0.05 * logits[0].abs().max().item(), diff


def test_seeded_replay_with_sample_index_offset_continues_the_same_stream(tiny_dir: Path) -> None:
    """A request replayed after k tokens (prompt + those k tokens, offset k) samples what the original would."""
    engine = LLMEngine(EngineConfig(model=str(tiny_dir), progress=False, num_kv_blocks=64))
    prompt = list(range(50, 70))
    seeded = SamplingParams(max_tokens=20, temperature=1.0, seed=77, ignore_eos=True)
    full = engine.generate([prompt], seeded)[0].token_ids
    k = 7
    replay = SamplingParams(max_tokens=20 - k, temperature=1.0, seed=77, ignore_eos=True, sample_index_offset=k)
    resumed = engine.generate([prompt + full[:k]], replay)[0].token_ids
    assert resumed == full[k:]
    unshifted = SamplingParams(max_tokens=20 - k, temperature=1.0, seed=77, ignore_eos=True)
    assert engine.generate([prompt + full[:k]], unshifted)[0].token_ids != full[k:]
