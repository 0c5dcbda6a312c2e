"""Shared fixtures: checkpoints made once per session through the `kunserve make-model` command."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kunserve.cli import main as kunserve_main

REPO = Path(__file__).resolve().parents[1]


def _make(dest: Path, preset: str) -> Path:
    if not (dest / "kunserve-preset.json").is_file():
        assert kunserve_main(["make-model", str(dest), "--preset", preset]) == 0
    return dest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded tiny checkpoint: GQA 6/2 heads, tied embeddings."""
    return _make(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny")


@pytest.fixture(scope="session")
def tiny_untied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded tiny checkpoint: GQA 6/3 heads, untied LM head, Llama-3 rope scaling."""
    return _make(tmp_path_factory.mktemp("ckpt") / "tiny-untied", "tiny-untied")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted once and cached (KUNSERVE_MODELS, default .models/)."""
    root = Path(os.environ.get("KUNSERVE_MODELS", REPO / ".models"))
    return _make(root / "smollm2-135m", "smollm2-135m")
