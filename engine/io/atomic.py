"""Write a folder atomically: a temporary sibling renamed into place, never half-written.

Torch-free. :func:`atomic_dir` is what every writer uses; :func:`sweep_siblings`
cleans up after writers that were killed.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

from ..errors import OutputExistsError


def atomic_dir(path: str | Path, *, force: bool = False) -> AtomicDir:
    """Context manager: write into a temporary sibling folder, rename into place on success."""
    return AtomicDir(Path(path), force=force)


_SIBLING_RE = re.compile(r"^(?P<kind>tmp|old)-(?P<pid>[0-9]+)-[0-9a-f]{8}$")


def _sibling_prefix(path: Path) -> str:
    return f".{path.name}."


def _make_sibling_dir(path: Path, tag: str) -> Path:
    """Create a fresh hidden sibling ``.NAME.<tag>-<pid>-<hex>`` of ``path``.

    The pid in the name tells a later writer whether this one is still running
    (see :func:`sweep_siblings`). Unlike ``tempfile.mkdtemp`` (always 0o700)
    the folder gets the usual ``0o777 & ~umask`` mode.
    """
    for _ in range(100):
        cand = path.parent / f"{_sibling_prefix(path)}{tag}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            cand.mkdir()
        except FileExistsError:
            continue
        return cand
    raise FileExistsError(f"{path.parent}: cannot create a temporary folder")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or an odd number): never touch its folder
    except OSError:
        return True
    return True


def _stale_siblings(path: Path) -> list[tuple[str, Path]]:
    """``(kind, folder)`` of the temporary siblings of ``path`` whose writer is gone."""
    prefix = _sibling_prefix(path)
    found: list[tuple[str, Path]] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return found
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        m = _SIBLING_RE.match(entry.name[len(prefix):])
        if m is None or _pid_alive(int(m.group("pid"))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                found.append((m.group("kind"), Path(entry.path)))
        except OSError:
            continue
    return found


def sweep_siblings(path: str | Path) -> None:
    """Clean up after writers of ``path`` that were killed.

    If ``path`` is missing and a dead writer left the previous output in a
    ``.NAME.old-*`` folder (killed between the two renames of the fallback
    swap), that folder is put back. Every other ``.NAME.tmp-*``/``.NAME.old-*``
    folder of a dead pid is removed; a live writer's are never touched.
    Best effort: errors are ignored.
    """
    path = Path(path)
    stale = _stale_siblings(path)
    if not stale:
        return
    if not os.path.lexists(path):
        olds = [p for kind, p in stale if kind == "old"]
        if olds:
            def _changed(p: Path) -> float:
                try:
                    return p.stat().st_ctime  # the rename that hid it sets ctime
                except OSError:
                    return 0.0
            newest = max(olds, key=_changed)
            try:
                os.rename(newest, path)
                stale = [(k, p) for k, p in stale if p != newest]
            except OSError:
                pass
    for _, p in stale:
        shutil.rmtree(p, ignore_errors=True)


def _normalize_modes(root: Path) -> None:
    """Give everything under ``root`` the mode a plain ``open``/``mkdir`` would.

    Some writers (``safetensors.save_file``, ``tempfile.mkstemp``) create 0o600
    files; a server running as another user could not read them. ``root`` was
    made by ``mkdir`` and so already carries ``0o777 & ~umask``; files get
    ``0o666 & ~umask`` (executable bits kept), folders ``0o777 & ~umask``.
    """
    allowed = stat.S_IMODE(root.stat().st_mode) & 0o777
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                continue
            full = 0o777 if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111 else 0o666
            want = full & allowed
            if stat.S_IMODE(st.st_mode) != want:
                os.chmod(p, want)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` (and ``root``) to disk before it is renamed into place."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder
    finally:
        os.close(fd)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2_fn: Any = None


def _renameat2() -> Any:
    """libc's ``renameat2`` (glibc 2.28+), or False where there is none."""
    global _renameat2_fn
    if _renameat2_fn is None:
        _renameat2_fn = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2_fn = fn
            except (OSError, AttributeError):
                pass
    return _renameat2_fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``RENAME_EXCHANGE``).

    Returns False where the OS or filesystem cannot (no ``renameat2``, ENOSYS,
    EINVAL, EOPNOTSUPP); the caller then falls back to two renames.
    """
    import ctypes

    fn = _renameat2()
    if not fn:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


class AtomicDir:
    """Write a folder atomically: temp sibling, then rename; never half-written.

    ``with AtomicDir(out, force=False) as tmp: ...write into tmp...``
    On error (or ``KeyboardInterrupt``) the temporary folder is removed and
    ``out`` is left as it was. On success every file and folder inside gets
    the usual ``umask`` mode and is fsynced before the rename. An existing
    ``out`` (``force``) is replaced by an atomic exchange where Linux allows,
    so ``out`` exists at every instant; elsewhere by two renames, and a writer
    killed between them has its hidden ``.out.old-*`` put back by the next one.
    Folders that killed writers left beside ``out`` are removed on entry
    (:func:`sweep_siblings`).
    """

    def __init__(self, path: Path, *, force: bool = False) -> None:
        self.path = path
        self.force = force
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        sweep_siblings(self.path)
        # an existing empty folder (mkdtemp) holds nothing to overwrite
        if self.path.exists() and not self.force and not (self.path.is_dir() and not any(self.path.iterdir())):
            raise OutputExistsError(f"{self.path}: already exists (use --force / force=True to overwrite)")
        if self.path.exists() and not self.path.is_dir():
            raise OutputExistsError(f"{self.path}: exists and is not a folder")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _make_sibling_dir(self.path, "tmp")
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            _normalize_modes(self.tmp)
            _fsync_tree(self.tmp)
            if self.path.exists():
                self._replace()
            else:
                os.replace(self.tmp, self.path)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        _fsync_dir(self.path.parent)

    def _replace(self) -> None:
        assert self.tmp is not None
        if _exchange(self.tmp, self.path):
            # self.tmp now holds the previous output; if this process dies here
            # the next writer removes it (its pid is gone)
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = self.path.parent / f"{_sibling_prefix(self.path)}old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(self.path, old)
        try:
            os.replace(self.tmp, self.path)
        except BaseException:
            os.replace(old, self.path)  # put the original back
            raise
        shutil.rmtree(old, ignore_errors=True)


