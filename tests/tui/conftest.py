"""Fixtures for the TUI tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from tui_helpers import FIXED_ROOT, ensure_demo


@pytest.fixture(scope="session")
def fixed_demo() -> Path:
    """The demo collection at a fixed path."""
    return ensure_demo(FIXED_ROOT / "demo")




@pytest.fixture(scope="session")
def fixed_subspace(fixed_demo: Path) -> Path:
    """A subspace compressed from the demo (k=24) at a fixed path, built once."""
    from engine.io.scan import is_subspace_dir
    from engine.jobs import InlineRunner, JobRequest

    out = FIXED_ROOT / "subspace"
    if not is_subspace_dir(out):
        r = InlineRunner().run(JobRequest("compress", {"adapters": [str(fixed_demo)], "output": str(out), "num_components": 24, "force": True}))
        assert r.ok, r.error
    return out
