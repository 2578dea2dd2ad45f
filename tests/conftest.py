"""Shared fixtures: real PEFT-written adapters (cached per session) and the demo collection."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# A fresh machine, whatever this one holds: HOME and every cache derived from it point at a
# temp dir made for this test session (removed at its end), so no test reads a stale demo
# from ~/.cache or leaves anything behind.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="vlora-tui-test-home-"))
os.environ["HOME"] = str(_SESSION_HOME)
os.environ["XDG_CACHE_HOME"] = str(_SESSION_HOME / ".cache")
os.environ["HF_HOME"] = str(_SESSION_HOME / ".cache" / "huggingface")
for _var in ("VLORA_TUI_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "XDG_CONFIG_HOME"):
    os.environ.pop(_var, None)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Small tensor ops spin-wait across OpenMP threads on a busy 2-core machine (10x slower);
# one thread per test process is faster and keeps the UI tests responsive.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from peft_factory import write_peft_adapter  # noqa: E402


@pytest.fixture(scope="session")
def peft_family_dirs(tmp_path_factory) -> list[Path]:
    """Six PEFT-written adapters (r=4, q/v, 2 layers): two families of three."""
    root = tmp_path_factory.mktemp("peft_family")
    return [write_peft_adapter(root / f"task_{i}", seed=i, family=i // 3) for i in range(6)]


@pytest.fixture(scope="session")
def peft_adapter_dir(peft_family_dirs) -> Path:
    """One PEFT-written adapter."""
    return peft_family_dirs[0]


@pytest.fixture(scope="session")
def peft_variant_dirs(tmp_path_factory) -> dict[str, Path]:
    """PEFT adapters of other kinds: rsLoRA, rank/alpha patterns, modules_to_save, bf16, 4 targets."""
    import torch

    root = tmp_path_factory.mktemp("peft_variants")
    return {
        "rslora": write_peft_adapter(root / "rslora", seed=11, use_rslora=True, r=8, alpha=16),
        "patterns": write_peft_adapter(
            root / "patterns", seed=12, r=4, rank_pattern={"model.layers.1.self_attn.q_proj": 8},
            alpha_pattern={"v_proj": 32},
        ),
        "mts": write_peft_adapter(root / "mts", seed=13, modules_to_save=["lm_head"]),
        "bf16": write_peft_adapter(root / "bf16", seed=14, dtype=torch.bfloat16),
        "qkvo": write_peft_adapter(root / "qkvo", seed=15, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
        "trained": write_peft_adapter(root / "trained", seed=16, train_steps=3),
    }


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The built-in demo collection, written once per session."""
    from engine.demo import make_demo_collection

    root = tmp_path_factory.mktemp("demo") / "demo"
    make_demo_collection(root)
    return root


def pytest_configure(config) -> None:
    """A failed snapshot's HTML report goes to the temp dir, not the repository."""
    if hasattr(config.option, "snapshot_report"):
        config.option.snapshot_report = os.path.join(
            tempfile.gettempdir(), f"vlora-tui-snapshot-report-{os.getpid()}.html"
        )


def pytest_sessionfinish(session, exitstatus) -> None:
    """Remove the session's HOME (demo cache, outputs): the suite leaves nothing behind."""
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)
