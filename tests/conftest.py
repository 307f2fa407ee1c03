"""Shared test fixtures. Tests never touch the network; the MiniLM model loads offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real London / AlphaEarth files); skips when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real reference data not present at {SHARED_DATA}")
    return SHARED_DATA
