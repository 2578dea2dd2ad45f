"""Run the seed's own test suite (vlora-dev 1.0.0) against `engine` through an import-only alias.

    python scripts/seed_parity.py            # download the sdist, run its tests/, print a table
    python scripts/seed_parity.py -k merge   # pytest -k passthrough
    python scripts/seed_parity.py --keep     # keep the temp dir (prints its path)

The alias maps `vlora` to `engine`, and `vlora.X` to `engine.X` where that module exists, else
to a module whose names are looked up on `engine`'s top level. Nothing else: no shims, no
patched behaviour. `tests/test_cli.py` is left out (it drives the seed's own click CLI).

Not part of the CI run: it needs the package index (`pip download`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SEED = "vlora-dev==1.0.0"
REPO = Path(__file__).resolve().parent.parent

ALIAS = '''
"""Import-only alias: vlora -> engine (written by scripts/seed_parity.py)."""
import importlib
import importlib.abc
import importlib.util
import sys
import types


class _Proxy(types.ModuleType):
    """`vlora.X` where `engine.X` is no module: names come from engine's top level."""

    def __getattr__(self, name):
        engine = importlib.import_module("engine")
        try:
            return getattr(engine, name)
        except AttributeError:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}") from None


class _Loader(importlib.abc.Loader):
    def __init__(self, target):
        self.target = target

    def create_module(self, spec):
        if self.target is None:
            mod = _Proxy(spec.name)
            mod.__path__ = []
            return mod
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass


SEED_MODULES = set(__SEED_MODULES__)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "vlora" and not fullname.startswith("vlora."):
            return None
        real = "engine" + fullname[len("vlora"):]
        try:
            found = importlib.util.find_spec(real)
        except (ImportError, ValueError):
            found = None
        if found is None and fullname not in SEED_MODULES:
            return None  # not a module of the seed either (e.g. `from vlora.model import Name`)
        spec = importlib.util.spec_from_loader(
            fullname, _Loader(real if found is not None else None), is_package=True)
        return spec


sys.meta_path.insert(0, _Finder())
'''


def _download(tmp: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "--quiet", SEED, "-d", str(tmp / "dist")],
        check=True,
    )
    archive = next((tmp / "dist").glob("*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(tmp / "src", filter="data")
    return next((tmp / "src").iterdir())


def _table(report: str, seed_ids: list[str]) -> tuple[dict[str, dict[str, int]], list[str]]:
    rows: dict[str, dict[str, int]] = {}
    failing: list[str] = []
    seen: set[str] = set()
    for line in report.splitlines():
        m = re.match(r"^(tests/\S+?\.py)::(\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", line)
        if m is None:
            m2 = re.match(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (tests/\S+?\.py)::(\S+)", line)
            if m2 is None:
                continue
            outcome, file, test = m2.groups()
        else:
            file, test, outcome = m.groups()
        if f"{file}::{test}" in seen:
            continue
        seen.add(f"{file}::{test}")
        row = rows.setdefault(file, {"passed": 0, "failed": 0, "skipped": 0})
        if outcome in ("PASSED", "XPASS"):
            row["passed"] += 1
        elif outcome in ("SKIPPED", "XFAIL"):
            row["skipped"] += 1
        else:
            row["failed"] += 1
            failing.append(f"{file}::{test}")
    for tid in seed_ids:
        if tid not in seen:  # not collected under the alias (its file failed to import)
            file = tid.split("::")[0]
            rows.setdefault(file, {"passed": 0, "failed": 0, "skipped": 0})["failed"] += 1
            failing.append(tid + "  (not collected)")
    return rows, failing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", dest="keyword", help="pytest -k expression")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--failing", action="store_true", help="list the failing tests")
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout whose engine is tested (default: this one)")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="seed-parity-"))
    try:
        sdist = _download(tmp)
        alias = tmp / "alias"
        alias.mkdir()
        seed_modules = sorted(
            "vlora" + "".join("." + part for part in p.relative_to(sdist / "src" / "vlora").with_suffix("").parts
                              if part != "__init__")
            for p in (sdist / "src" / "vlora").rglob("*.py"))
        (alias / "sitecustomize.py").write_text(ALIAS.replace("__SEED_MODULES__", repr(seed_modules)))
        (sdist / "tests" / "test_cli.py").unlink(missing_ok=True)
        for cfg in ("pyproject.toml", "setup.cfg", "pytest.ini", "tox.ini"):
            # the seed's own pytest config (rootdir, pythonpath=src) must not load the real seed
            p = sdist / cfg
            if p.exists():
                p.rename(p.with_suffix(p.suffix + ".seed"))
        # the seed's own test ids (collected against the seed itself), so that a file that does
        # not even import under the alias still counts its tests as failing
        seed_env = dict(os.environ, PYTHONPATH=str(sdist / "src"), HOME=str(tmp / "home"))
        collected = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
             "-o", "addopts=", "tests"] + (["-k", args.keyword] if args.keyword else []),
            cwd=sdist, env=seed_env, capture_output=True, text=True).stdout
        seed_ids = [ln.strip() for ln in collected.splitlines() if "::" in ln]
        shutil.rmtree(sdist / "src", ignore_errors=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(alias), str(args.repo.resolve())])
        env["HOME"] = str(tmp / "home")
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-v",
               "--tb=no", "-o", "addopts=", "--continue-on-collection-errors", "tests"]
        if args.keyword:
            cmd += ["-k", args.keyword]
        proc = subprocess.run(cmd, cwd=sdist, env=env, capture_output=True, text=True)
        (tmp / "pytest.log").write_text(proc.stdout + proc.stderr)
        rows, failing = _table(proc.stdout, seed_ids)
        if not rows:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            return 1
        width = max(len(f) for f in rows)
        print(f"{'file':<{width}}  passed  failed  skipped")
        tot = {"passed": 0, "failed": 0, "skipped": 0}
        for f in sorted(rows):
            r = rows[f]
            print(f"{f:<{width}}  {r['passed']:>6}  {r['failed']:>6}  {r['skipped']:>7}")
            for key in tot:
                tot[key] += r[key]
        n = tot["passed"] + tot["failed"]
        print(f"{'total':<{width}}  {tot['passed']:>6}  {tot['failed']:>6}  {tot['skipped']:>7}"
              f"   ({tot['passed']} of {n} pass)")
        if args.failing:
            print("\nfailing:")
            for t in failing:
                print("  " + t)
        if args.keep:
            print(f"\nkept: {tmp} (pytest.log: the run's output)")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
