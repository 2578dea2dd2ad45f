"""Every command in the README runs as written, in order, on a fresh folder (issue: README placeholders).

The README's ```bash blocks are read line by line; `pip install …` and the test command itself are
left out (the suite is already running on an installed tree), `vlora-tui` without `--batch` opens the
app (interactive: only those lines may be skipped), and every other command runs in one temp folder
with an empty HOME, in README order, and must exit 0. The ```python block runs there too.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from batchutil import ROOT, _env

README = ROOT / "README.md"


def _commands(block: str) -> list[str]:
    out = []
    for line in block.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()  # a trailing comment (two spaces, '#', space)
        if not line or line.startswith("#"):
            continue
        for part in (p.strip() for p in line.split("&&")):
            if part.startswith("pip install") or part == "python -m pytest -q":
                continue
            out.append(part)
    return out


def readme_commands() -> tuple[list[str], list[str]]:
    """(shell commands to run, python blocks to run), in README order."""
    text = README.read_text(encoding="utf-8")
    shell = [c for block in re.findall(r"```bash\n(.*?)```", text, re.S) for c in _commands(block)]
    python = re.findall(r"```python\n(.*?)```", text, re.S)
    return shell, python


def _is_app_launch(cmd: str) -> bool:
    words = shlex.split(cmd)
    return words[0] == "vlora-tui" and "--batch" not in words


def test_readme_has_the_two_fresh_machine_commands_first() -> None:
    text = README.read_text(encoding="utf-8")
    first, second = re.findall(r"```bash\n(.*?)```", text, re.S)[:2]
    assert "pip install torch==2.13.0 && pip install -e ." in first and "vlora-tui --batch compress demo" in first
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_cmd = second.strip().splitlines()[-1].strip()
    assert test_cmd in ci, "the README's test command and .ci/run differ"


def test_every_readme_command_runs_as_written(tmp_path: Path) -> None:
    shell, python = readme_commands()
    runnable = [c for c in shell if not _is_app_launch(c)]
    assert len(runnable) >= 10, runnable
    home = tmp_path / "home"
    home.mkdir()
    env = _env({"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")})
    work = tmp_path / "work"
    work.mkdir()
    for cmd in runnable:
        words = shlex.split(cmd)
        assert words[0] == "vlora-tui", f"README command the test does not know how to run: {cmd}"
        argv = [sys.executable, "-m", "vlora_tui", *words[1:]]
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"`{cmd}` exited {proc.returncode}:\n{proc.stderr[-2000:]}"
    for i, code in enumerate(python):
        script = work / f"readme_{i}.py"
        script.write_text(code, encoding="utf-8")
        proc = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"README python block {i} failed:\n{proc.stderr[-2000:]}"
