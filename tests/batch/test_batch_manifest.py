"""``--batch`` on crafted subspace folders: exit 2, one line on stderr, nothing written (issue #14, item 3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
from batchutil import run_batch

MANIFEST = "subspace.json"


@pytest.fixture(scope="module")
def subspace(tmp_path_factory, peft_family_dirs) -> Path:
    out = tmp_path_factory.mktemp("crafted") / "sub"
    r = run_batch("compress", *peft_family_dirs[:3], "-o", out, "-k", "2", "-q")
    assert r.rc == 0, r.stderr
    return out


def _swap_files(m: dict[str, Any]) -> None:
    a, b = m["tasks"][0], m["tasks"][1]
    a["file"], b["file"] = b["file"], a["file"]


CASES: dict[str, tuple[Callable[[dict[str, Any]], Any], str, list[str]]] = {
    # name: (edit of the manifest, command, words the error line must hold)
    "missing modules": (lambda m: m.pop("modules"), "info", [MANIFEST, "'modules' is missing"]),
    "missing id": (lambda m: m["tasks"][0].pop("id"), "export", [MANIFEST, "'tasks[0].id' is missing"]),
    "tasks not a list": (lambda m: m.__setitem__("tasks", "task_0"), "quantize", [MANIFEST, "'tasks' must be a list"]),
    "task not a dict": (lambda m: m["tasks"].__setitem__(0, "task_0"), "info", [MANIFEST, "'tasks[0]' must be an object"]),
    "traversal id": (lambda m: m["tasks"][0].__setitem__("id", "../../EVIL"), "quantize", [MANIFEST, "invalid task id '../../EVIL'"]),
    "swapped files": (_swap_files, "export", ["task_1.safetensors", "'task_1'", "'task_0'"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_crafted_manifest_exits_2_with_one_line(tmp_path, subspace, case):
    edit, command, words = CASES[case]
    sub = tmp_path / "work" / "in"
    shutil.copytree(subspace, sub)
    man = json.loads((sub / MANIFEST).read_text())
    edit(man)
    (sub / MANIFEST).write_text(json.dumps(man))
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    out = tmp_path / "work" / "out"
    args = {"info": (sub,), "export": (sub, "task_0", "-o", out), "quantize": (sub, "-o", out, "--bits", "8")}[command]
    r = run_batch(command, *args, "-q")
    assert r.rc == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
