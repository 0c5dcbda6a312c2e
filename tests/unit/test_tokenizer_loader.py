"""Checkpoint loading errors name the offending file; the tokenizer, its chat template, and streaming
detokenization."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kunserve.agent.errors import CheckpointError, InvalidRequestError
from kunserve.agent.model.config import ModelConfig
from kunserve.agent.model.loader import Checkpoint, load_model, parse_dtype
from kunserve.agent.model.tokenizer import IncrementalDetokenizer, Tokenizer

torch.set_num_threads(1)

MISSING_TENSOR = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture
def ckpt_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a test may break."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "ckpt"))


def _error(fn, *args) -> CheckpointError:  # type: ignore[no-untyped-def]
    with pytest.raises(CheckpointError) as info:
        fn(*args)
    err = info.value
    assert str(err).startswith(str(err.path) + ": ")  # the message names the file
    return err


def test_the_intact_checkpoint_loads(ckpt_dir: Path) -> None:
    ckpt = Checkpoint(ckpt_dir)
    raw = json.loads((ckpt_dir / "config.json").read_text())
    assert ckpt.config.hidden_size == raw["hidden_size"]
    assert ckpt.config.num_hidden_layers == raw["num_hidden_layers"]
    assert ckpt.config.vocab_size == raw["vocab_size"]
    assert set(ckpt.weight_map.values()) == {ckpt_dir / "model.safetensors"}
    assert MISSING_TENSOR in ckpt.weight_map
    model = load_model(ckpt, progress=False)
    assert model.held_layers() == list(range(raw["num_hidden_layers"]))


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    err = _error(Checkpoint, missing)
    assert err.path == missing
    assert "not found" in str(err)


def test_missing_config(ckpt_dir: Path) -> None:
    (ckpt_dir / "config.json").unlink()
    err = _error(Checkpoint, ckpt_dir)
    assert err.path == ckpt_dir / "config.json"
    assert "not found" in str(err)


def test_malformed_config_json(ckpt_dir: Path) -> None:
    (ckpt_dir / "config.json").write_text('{"hidden_size": 64,,}')
    err = _error(Checkpoint, ckpt_dir)
    assert err.path == ckpt_dir / "config.json"
    assert "not valid JSON" in str(err)


def test_config_that_is_not_an_object(ckpt_dir: Path) -> None:
    (ckpt_dir / "config.json").write_text("[1, 2, 3]")
    err = _error(Checkpoint, ckpt_dir)
    assert err.path == ckpt_dir / "config.json"


def test_config_missing_hidden_size(ckpt_dir: Path) -> None:
    raw = json.loads((ckpt_dir / "config.json").read_text())
    del raw["hidden_size"]
    (ckpt_dir / "config.json").write_text(json.dumps(raw))
    err = _error(Checkpoint, ckpt_dir)
    assert err.path == ckpt_dir / "config.json"
    assert "hidden_size" in str(err)


def test_config_of_another_architecture(ckpt_dir: Path) -> None:
    raw = json.loads((ckpt_dir / "config.json").read_text())
    raw["model_type"] = "gpt2"
    (ckpt_dir / "config.json").write_text(json.dumps(raw))
    err = _error(Checkpoint, ckpt_dir)
    assert err.path == ckpt_dir / "config.json"
    assert "gpt2" in str(err)


def test_missing_safetensors(ckpt_dir: Path) -> None:
    (ckpt_dir / "model.safetensors").unlink()
    err = _error(Checkpoint, ckpt_dir)
    assert err.path == ckpt_dir / "model.safetensors"
    assert "not found" in str(err)


def test_corrupt_safetensors(ckpt_dir: Path) -> None:
    (ckpt_dir / "model.safetensors").write_bytes(b"\x13\x37 this is not a safetensors file" * 10)
    err = _error(Checkpoint, ckpt_dir)
    assert err.path == ckpt_dir / "model.safetensors"
    assert "safetensors" in str(err)


def test_truncated_safetensors(ckpt_dir: Path) -> None:
    data = (ckpt_dir / "model.safetensors").read_bytes()
    (ckpt_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    err = _error(Checkpoint, ckpt_dir)
    assert err.path == ckpt_dir / "model.safetensors"


def _shard(ckpt_dir: Path) -> dict[str, str]:
    """Split model.safetensors into two shards plus an index; returns the weight map."""
    tensors = load_file(str(ckpt_dir / "model.safetensors"))
    (ckpt_dir / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    weight_map = {}
    for fname, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(ckpt_dir / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (ckpt_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_sharded_checkpoint_loads_like_the_single_file(tiny_model_dir: Path, ckpt_dir: Path) -> None:
    weight_map = _shard(ckpt_dir)
    ckpt = Checkpoint(ckpt_dir)
    assert {n: p.name for n, p in ckpt.weight_map.items()} == weight_map
    whole = Checkpoint(tiny_model_dir).read([MISSING_TENSOR, "model.norm.weight"])
    parts = ckpt.read([MISSING_TENSOR, "model.norm.weight"])
    assert torch.equal(whole[MISSING_TENSOR], parts[MISSING_TENSOR])
    assert torch.equal(whole["model.norm.weight"], parts["model.norm.weight"])


def test_index_pointing_at_a_missing_shard(ckpt_dir: Path) -> None:
    _shard(ckpt_dir)
    (ckpt_dir / "model-00002-of-00002.safetensors").unlink()
    err = _error(Checkpoint, ckpt_dir)
    assert err.path == ckpt_dir / "model-00002-of-00002.safetensors"
    assert "model.safetensors.index.json" in str(err)


def test_malformed_index(ckpt_dir: Path) -> None:
    (ckpt_dir / "model.safetensors.index.json").write_text('{"metadata": {}}')  # no weight_map
    err = _error(Checkpoint, ckpt_dir)
    assert err.path == ckpt_dir / "model.safetensors.index.json"


def test_corrupt_shard_is_named_when_read(ckpt_dir: Path) -> None:
    weight_map = _shard(ckpt_dir)
    (ckpt_dir / "model-00001-of-00002.safetensors").write_bytes(b"garbage" * 50)
    ckpt = Checkpoint(ckpt_dir)  # the index alone is fine
    name = next(n for n, f in weight_map.items() if f == "model-00001-of-00002.safetensors")
    err = _error(ckpt.read, [name])
    assert err.path == ckpt_dir / "model-00001-of-00002.safetensors"


def test_tensor_missing_from_the_file(ckpt_dir: Path) -> None:
    tensors = load_file(str(ckpt_dir / "model.safetensors"))
    del tensors[MISSING_TENSOR]
    save_file(tensors, str(ckpt_dir / "model.safetensors"))
    ckpt = Checkpoint(ckpt_dir)
    assert MISSING_TENSOR not in ckpt.weight_map
    err = _error(load_model, ckpt, torch.float32, "cpu", None, False)
    assert err.path == ckpt_dir
    assert MISSING_TENSOR in str(err)
    # A stage without that layer never reads it.
    stage = load_model(ckpt, torch.float32, "cpu", (0, 1), False)
    assert stage.held_layers() == [0]


def test_tensor_of_the_wrong_shape(ckpt_dir: Path) -> None:
    tensors = load_file(str(ckpt_dir / "model.safetensors"))
    tensors[MISSING_TENSOR] = tensors[MISSING_TENSOR][:, :-1].contiguous()
    save_file(tensors, str(ckpt_dir / "model.safetensors"))
    err = _error(load_model, Checkpoint(ckpt_dir), torch.float32, "cpu", None, False)
    assert err.path == ckpt_dir
    assert ": layers.1.down_proj.weight: shape (192, 511), expected (192, 512)" in str(err)
    assert "shape" in str(err)


def test_parse_dtype() -> None:
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="int8"):
        parse_dtype("int8")


def test_model_config_defaults_from_dict() -> None:
    cfg = ModelConfig.from_dict(
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 100,
            "eos_token_id": [5, 6],
        }
    )
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.eos_token_ids) == (4, 16, (5, 6))


# ---- tokenizer -------------------------------------------------------------------------------------------


def test_missing_tokenizer_json(ckpt_dir: Path) -> None:
    (ckpt_dir / "tokenizer.json").unlink()
    err = _error(Tokenizer, ckpt_dir)
    assert err.path == ckpt_dir / "tokenizer.json"
    assert "not found" in str(err)


def test_corrupt_tokenizer_json(ckpt_dir: Path) -> None:
    (ckpt_dir / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    err = _error(Tokenizer, ckpt_dir)
    assert err.path == ckpt_dir / "tokenizer.json"


def test_malformed_tokenizer_config(ckpt_dir: Path) -> None:
    (ckpt_dir / "tokenizer_config.json").write_text("{not json")
    err = _error(Tokenizer, ckpt_dir)
    assert err.path == ckpt_dir / "tokenizer_config.json"


def test_special_tokens_and_round_trip(tiny_model_dir: Path) -> None:
    tok = Tokenizer(tiny_model_dir)
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_id is not None
    assert tok.encode_plain("<|im_end|>") == [tok.eos_token_id]
    assert tok.decode([tok.eos_token_id]) == ""
    assert tok.decode([tok.eos_token_id], skip_special_tokens=False) == "<|im_end|>"
    assert tok.vocab_size == Checkpoint(tiny_model_dir).config.vocab_size
    for text in ("Hello world", "naïve café 東京 🚀", " leading space", "ß漢字😀"):
        assert tok.decode(tok.encode(text)) == text


def test_chat_template_renders(tiny_model_dir: Path) -> None:
    tok = Tokenizer(tiny_model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(messages[1:], add_generation_prompt=False) == (
        "<|im_start|>user\nHi there<|im_end|>\n"
    )
    ids = tok.encode_chat(messages[1:])
    im_start = tok.encode_plain("<|im_start|>")
    assert len(im_start) == 1
    assert ids[0] == im_start[0]
    assert ids.count(im_start[0]) == 2
    assert ids.count(tok.eos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(messages[1:])


def test_chat_template_errors_are_invalid_requests(ckpt_dir: Path) -> None:
    cfg = json.loads((ckpt_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ raise_exception('only user messages') }}"
    (ckpt_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidRequestError, match="only user messages"):
        Tokenizer(ckpt_dir).apply_chat_template([{"role": "user", "content": "x"}])
    del cfg["chat_template"]
    (ckpt_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidRequestError, match="no chat template"):
        Tokenizer(ckpt_dir).apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "text",
    [
        "Hello world, the model serves tokens.",
        "naïve café 東京 🚀",
        "ß漢字😀 mixed ✨ text",
        "€€€ 𝔘𝔫𝔦 ok",
        "x",
    ],
)
@pytest.mark.parametrize("prompt", ["Hello", "東京 🚀", ""])
def test_incremental_detokenizer_deltas_concatenate_to_decode(tiny_model_dir: Path, text: str, prompt: str) -> None:
    tok = Tokenizer(tiny_model_dir)
    out_ids = tok.encode_plain(text)
    detok = IncrementalDetokenizer(tok, tok.encode(prompt))
    deltas = [detok.add(t) for t in out_ids]
    assert "".join(deltas) == tok.decode(out_ids) == text
    assert detok.text == text
    assert all("\ufffd" not in d for d in deltas)  # never a split character


def test_incremental_detokenizer_holds_back_a_split_character(tiny_model_dir: Path) -> None:
    tok = Tokenizer(tiny_model_dir)
    # One character as single bytes: the byte-level alphabet has every byte as a token.
    byte_ids = [tok.encode_plain(ch)[0] for ch in ("a", "b")]
    assert len(byte_ids) == 2
    emoji = "😀"  # 4 UTF-8 bytes
    ids = tok.encode_plain(emoji)
    detok = IncrementalDetokenizer(tok, byte_ids)
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) == emoji
    if len(ids) > 1:  # the tiny vocabulary splits it: only the last piece emits it
        assert deltas[:-1] == [""] * (len(ids) - 1)
        assert deltas[-1] == emoji
