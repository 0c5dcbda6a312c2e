"""Fixtures of the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_dir: Path) -> Path:
    """The seeded `tiny` preset (made once per session by tests/conftest.py)."""
    return tiny_dir
