"""Helpers for ``--batch`` tests (imported by the test modules): run ``python -m vlora_tui --batch …`` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

#: Runs the batch entry point in-process, then writes which heavy modules got imported
#: to the file named by the first argument (stdout stays the command's own).
_PROBE = (
    "import json, sys\n"
    "from vlora_tui.__main__ import main\n"
    "out = sys.argv[1]\n"
    "try:\n"
    "    rc = main(sys.argv[2:])\n"
    "finally:\n"
    "    mods = sorted({m.split('.')[0] for m in sys.modules} & {'textual', 'torch', 'rich', 'peft', 'transformers'})\n"
    "    open(out, 'w').write(json.dumps(mods))\n"
    "sys.exit(rc)\n"
)


@dataclass
class Run:
    """A finished batch command."""

    rc: int
    stdout: str
    stderr: str
    modules: list[str] | None = None

    def json(self) -> dict[str, Any]:
        return json.loads(self.stdout)


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop("VLORA_TUI_TEST_CRASH_CHILD", None)
    env.update(extra or {})
    return env


def run_batch(*args: Any, env: dict[str, str] | None = None, timeout: float = 240) -> Run:
    """``python -m vlora_tui --batch ARGS…``; stdout is not a TTY, so output is plain or JSON."""
    proc = subprocess.run(
        [sys.executable, "-m", "vlora_tui", "--batch", *map(str, args)],
        cwd=ROOT, env=_env(env), capture_output=True, text=True, timeout=timeout,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def probe_batch(tmp_path: Path, *args: Any, timeout: float = 240) -> Run:
    """Like :func:`run_batch`, also reporting which of textual/torch/rich/peft/transformers were imported."""
    out = tmp_path / "modules.json"
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(out), "--batch", *map(str, args)],
        cwd=ROOT, env=_env(None), capture_output=True, text=True, timeout=timeout,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr, json.loads(out.read_text()))


def popen_batch(*args: Any, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a batch command without waiting (for SIGINT tests)."""
    return subprocess.Popen(
        [sys.executable, "-m", "vlora_tui", "--batch", *map(str, args)],
        cwd=ROOT, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def leftovers(folder: Path) -> list[str]:
    """Temporary or partial entries a job may have left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)

