"""atomic_dir: readable modes, no debris after killed writers, the output present during a swap."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import engine.io.atomic as atomic
from engine.io.atomic import atomic_dir, sweep_siblings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def umask():
    """Set a umask for the test and restore the old one."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(saved)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write(out: Path, marker: str, *, force: bool = True) -> None:
    with atomic_dir(out, force=force) as tmp:
        (tmp / "marker.txt").write_text(marker)


def _siblings(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_modes_follow_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        save_file({"a": torch.zeros(2)}, str(tmp / "adapter_model.safetensors"))  # safetensors writes 0o600
        fd = os.open(tmp / "private.json", os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
        (tmp / "tasks").mkdir(mode=0o700)
        (tmp / "tasks" / "t.txt").write_text("x")
        (tmp / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(tmp / "run.sh", 0o700)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert modes == {
        ".": dir_mode, "adapter_model.safetensors": file_mode, "private.json": file_mode,
        "tasks": dir_mode, "tasks/t.txt": file_mode, "run.sh": dir_mode,  # executable bits kept
    }


def test_save_adapter_and_subspace_files_readable_by_others(tmp_path, umask, peft_family_dirs):
    from engine.io import load_adapter, save_adapter
    from engine.subspace import SharedSubspace

    umask(0o022)
    adapters = [load_adapter(d) for d in peft_family_dirs[:3]]
    out = save_adapter(adapters[0], tmp_path / "adapter")
    coll = SharedSubspace.from_adapters(adapters, num_components=2, method="joint").save(tmp_path / "coll")
    for p in [*out.rglob("*"), *coll.rglob("*")]:
        assert p.stat().st_mode & 0o777 == (0o755 if p.is_dir() else 0o644), p


def test_stale_siblings_of_dead_writers_removed_live_kept(tmp_path):
    out = tmp_path / "out"
    _write(out, "old")
    dead, live = _dead_pid(), os.getppid()
    for name in (f".out.tmp-{dead}-0123abcd", f".out.old-{dead}-89abcdef", f".out.tmp-{live}-00000000",
                 ".out.tmp-legacy", f".other.tmp-{dead}-0123abcd"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    _write(out, "new")
    assert (out / "marker.txt").read_text() == "new"
    # the live writer's, a name without a pid and another output's siblings stay
    assert _siblings(tmp_path) == sorted([f".other.tmp-{dead}-0123abcd", ".out.tmp-legacy", f".out.tmp-{live}-00000000"])


def test_recovers_output_hidden_by_a_killed_swap(tmp_path):
    out = tmp_path / "out"
    hidden = tmp_path / f".out.old-{_dead_pid()}-0123abcd"
    hidden.mkdir()
    (hidden / "marker.txt").write_text("previous")
    sweep_siblings(out)
    assert (out / "marker.txt").read_text() == "previous" and _siblings(tmp_path) == []
    # the next write without force sees the output again
    hidden.mkdir()
    (hidden / "marker.txt").write_text("older")
    with pytest.raises(Exception, match="already exists"):
        _write(out, "new", force=False)
    assert (out / "marker.txt").read_text() == "previous" and _siblings(tmp_path) == []


def test_live_writers_hidden_output_is_not_taken(tmp_path):
    out = tmp_path / "out"
    hidden = tmp_path / f".out.old-{os.getppid()}-0123abcd"
    hidden.mkdir()
    sweep_siblings(out)
    assert not out.exists() and hidden.is_dir()


@pytest.mark.parametrize("exchange", [True, False])
def test_output_present_at_every_step_of_a_replace(tmp_path, monkeypatch, exchange):
    if exchange and not atomic._renameat2():
        pytest.skip("no renameat2 here")
    out = tmp_path / "out"
    _write(out, "old")
    seen: list[tuple[str, str | None]] = []

    def state(step: str) -> None:
        marker = out / "marker.txt"
        seen.append((step, marker.read_text() if marker.exists() else None))

    real_exchange, real_rename, real_replace, real_rmtree = atomic._exchange, os.rename, os.replace, atomic.shutil.rmtree

    def exchange_(a, b):
        state("before exchange")
        ok = real_exchange(a, b) if exchange else False
        state("after exchange")
        return ok

    def rename(a, b):
        state("before rename")
        real_rename(a, b)
        state("after rename")

    def replace(a, b):
        state("before replace")
        real_replace(a, b)
        state("after replace")

    def rmtree(p, *args, **kwargs):
        state("before rmtree")
        real_rmtree(p, *args, **kwargs)

    monkeypatch.setattr(atomic, "_exchange", exchange_)
    monkeypatch.setattr(atomic.os, "rename", rename)
    monkeypatch.setattr(atomic.os, "replace", replace)
    monkeypatch.setattr(atomic.shutil, "rmtree", rmtree)
    _write(out, "new")
    monkeypatch.undo()
    assert (out / "marker.txt").read_text() == "new" and _siblings(tmp_path) == []
    if exchange:  # one step from old to new, never nothing
        assert all(m is not None for _, m in seen), seen
    else:  # the fallback has one gap between its two renames; the kill tests below cover it
        assert [m for _, m in seen].count(None) == 2, seen


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import engine.io.atomic as atomic
    out, point, exchange = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    real_exchange, real_rename = atomic._exchange, os.rename
    if not exchange:
        atomic._exchange = lambda a, b: False
    if point == "writing":
        atomic._normalize_modes = die
    elif point == "after_exchange":
        atomic.shutil.rmtree = die
    elif point == "between_renames":
        atomic.os.replace = die
    with atomic.atomic_dir(out, force=True) as tmp:
        (tmp / "marker.txt").write_text("new")
""")


@pytest.mark.parametrize(("point", "exchange"), [("writing", True), ("after_exchange", True),
                                                 ("writing", False), ("between_renames", False)])
def test_killed_writer_leaves_output_or_a_recoverable_one(tmp_path, point, exchange):
    if exchange and not atomic._renameat2():
        pytest.skip("no renameat2 here")
    out = tmp_path / "out"
    _write(out, "old")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(out), point, "1" if exchange else "0"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _siblings(tmp_path)  # the killed writer left something behind
    if point == "between_renames":
        assert not out.exists()  # the gap the fallback cannot close: recovered below
    else:
        assert (out / "marker.txt").read_text() == ("new" if point == "after_exchange" else "old")
    expected = "new" if point == "after_exchange" else "old"
    sweep_siblings(out)
    assert (out / "marker.txt").read_text() == expected and _siblings(tmp_path) == []
    _write(out, "newer")
    assert (out / "marker.txt").read_text() == "newer" and _siblings(tmp_path) == []


def test_exchange_falls_back_when_unsupported(tmp_path, monkeypatch):
    import ctypes
    import errno

    out = tmp_path / "out"
    _write(out, "old")

    def refuse(*args):
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(atomic, "_renameat2_fn", refuse)
    assert atomic._exchange(tmp_path / "x", out) is False
    _write(out, "new")
    assert (out / "marker.txt").read_text() == "new" and _siblings(tmp_path) == []
