"""The public API: cheap to import (no torch, Textual or rich) and every exported name resolves."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import engine
import engine.io

REPO = Path(__file__).resolve().parents[2]


def _modules_after(code: str) -> set[str]:
    """Top-level module names loaded after running ``code`` in a fresh interpreter."""
    probe = code + "\nimport sys\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_import_engine_is_torch_free():
    loaded = _modules_after("import engine")
    assert "engine" in loaded  # the probe does see what was imported
    assert not loaded & {"torch", "textual", "rich", "safetensors", "numpy", "huggingface_hub"}


@pytest.mark.parametrize(
    "module", ["engine.io", "engine.io.header", "engine.io.scan", "engine.io.hub", "engine.io.local", "engine.types", "engine.errors", "engine.demo"]
)
def test_engine_modules_import_without_torch(module):
    loaded = _modules_after(f"import {module}")
    assert not loaded & {"torch", "textual", "rich"}, module


def test_header_reading_stays_torch_free(demo_dir):
    code = (
        "from engine.io.header import read_adapter_summary\n"
        "from engine.io.scan import scan_local_adapters, expand_adapter_specs\n"
        f"found = scan_local_adapters({str(demo_dir)!r})\n"
        "assert len(found) >= 12, found\n"
        "assert read_adapter_summary(found[0]).num_params > 0\n"
        f"assert len(expand_adapter_specs([{str(demo_dir)!r}])) == len(found)\n"
    )
    assert "torch" not in _modules_after(code)


def test_all_lists_every_export():
    assert engine.__all__ == sorted([*engine._EXPORTS, "__version__"])
    assert set(dir(engine)) == set(engine.__all__)
    assert engine.io.__all__ == sorted(engine.io._EXPORTS)


@pytest.mark.parametrize("name", sorted(engine._EXPORTS))
def test_every_engine_export_resolves(name):
    module = importlib.import_module(engine._EXPORTS[name], "engine")
    value = getattr(module, name)  # the map points at a module that defines the name
    assert getattr(engine, name) is value
    assert name in engine.__all__


@pytest.mark.parametrize("name", sorted(engine.io._EXPORTS))
def test_every_io_export_resolves(name):
    module = importlib.import_module(engine.io._EXPORTS[name], "engine.io")
    assert getattr(engine.io, name) is getattr(module, name)


def test_unknown_name_is_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_a_thing'"):
        engine.not_a_thing  # noqa: B018
    with pytest.raises(AttributeError):
        engine.io.not_a_thing  # noqa: B018


def test_errors_have_titles_and_one_line_messages():
    from engine import errors

    classes = [getattr(errors, n) for n in errors.__all__]
    assert all(issubclass(c, errors.VloraError) for c in classes)
    titles = {c.title for c in classes}
    assert len(titles) == len(classes)  # each kind of failure has its own heading
    err = errors.UnknownTaskError("task 'x' is not in the subspace")
    assert str(err) == "task 'x' is not in the subspace" and isinstance(err, KeyError)
    assert errors.HubError("m", title="Custom").title == "Custom"
    assert issubclass(errors.UnsupportedAdapterError, errors.AdapterFormatError)
