"""``--batch info`` on the demo collection: JSON summary, torch-free, exit code on a bad adapter (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engine.demo import DEMO_BASE_MODEL, DemoShape

REPO = Path(__file__).resolve().parents[2]


def _info_payload(doc: dict) -> dict:
    """The adapter summary in ``--batch info --json`` output (bare, or as a job result's ``data``)."""
    return doc["data"] if isinstance(doc.get("data"), dict) else doc


def test_batch_info_json_on_demo_adapter(demo_dir):
    path = demo_dir / "math-proofs"
    proc = subprocess.run(
        [sys.executable, "-m", "vlora_tui", "--batch", "info", str(path), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = _info_payload(json.loads(proc.stdout))
    shape = DemoShape()
    assert data["rank"] == shape.rank
    assert len(data["modules"]) == shape.layers * 4
    assert data["num_params"] == sum(shape.rank * (o + i) for o, i in shape.modules().values())
    assert data["base_model"] == DEMO_BASE_MODEL


def test_batch_info_does_not_import_torch(demo_dir):
    code = (
        "import sys\n"
        "from vlora_tui.__main__ import main\n"
        f"rc = main(['--batch', 'info', {str(demo_dir / 'sql-postgres')!r}, '--json'])\n"
        "assert rc == 0, rc\n"
        "bad = sorted(m for m in ('torch', 'safetensors', 'textual', 'numpy') if m in sys.modules)\n"
        "assert not bad, bad\n"
        "print('CLEAN', file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "CLEAN" in proc.stderr
    assert _info_payload(json.loads(proc.stdout))["rank"] == DemoShape().rank


def test_batch_info_bad_adapter_exit_code(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "vlora_tui", "--batch", "info", str(tmp_path / "empty"), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode not in (0, None)
    assert str(tmp_path / "empty") in proc.stdout + proc.stderr
