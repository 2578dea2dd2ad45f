"""Fixtures for the TUI tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from tui_helpers import FIXED_ROOT, ensure_demo


@pytest.fixture(scope="session")
def fixed_demo() -> Path:
    """The demo collection at a fixed path."""
    return ensure_demo(FIXED_ROOT / "demo")


