"""Wall time of ``vlora-tui --batch info`` on a demo adapter (target: median ≤ 0.3 s).

``info`` on an adapter reads the safetensors header and the config only; it must not
import torch, so its cost is the interpreter's start-up plus a few tens of milliseconds.
The table also shows a bare ``python -c pass`` (the floor on this machine) and what
``info`` costs above it.

Usage::

    python benchmarks/batch_info.py [--runs 11]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 0.3


def _time(cmd: list[str], runs: int, env: dict[str, str]) -> list[float]:
    subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, check=True)  # warm the OS file cache and .pyc files
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True)
        out.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=11, help="timed runs per case (median reported)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from engine.demo import make_demo_collection

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_demo_collection(Path(tmp) / "demo")[0]
        py = sys.executable
        probe = ("import sys, io, contextlib; from vlora_tui.__main__ import main; f = io.StringIO()\n"
                 "with contextlib.redirect_stdout(f): rc = main(['--batch', 'info', sys.argv[1]])\n"
                 "print(int('torch' in sys.modules), int('textual' in sys.modules), rc)")
        flags = subprocess.run([py, "-c", probe, str(adapter)], cwd=ROOT, env=env, capture_output=True, text=True,
                               check=True).stdout.split()
        cases = [
            ("python -c pass (interpreter floor)", [py, "-c", "pass"]),
            ("vlora-tui --batch info ADAPTER", [py, "-m", "vlora_tui", "--batch", "info", str(adapter)]),
            ("vlora-tui --batch info ADAPTER --json", [py, "-m", "vlora_tui", "--batch", "info", str(adapter), "--json"]),
        ]
        rows = [(name, _time(cmd, args.runs, env)) for name, cmd in cases]
    floor = statistics.median(rows[0][1])
    print(f"vlora-tui --batch info: wall time over {args.runs} runs (after one warm-up), demo adapter "
          f"(16 modules, r=8); target median <= {TARGET_S:.2f} s")
    print(f"torch imported: {'yes' if flags[0] == '1' else 'no'}; textual imported: {'yes' if flags[1] == '1' else 'no'}")
    print()
    head = f"{'case':<40} {'median s':>9} {'min s':>7} {'max s':>7} {'above floor s':>14} {'target':>7}"
    print(head)
    print("-" * len(head))
    ok = True
    for i, (name, ts) in enumerate(rows):
        med = statistics.median(ts)
        verdict = "-" if i == 0 else ("ok" if med <= TARGET_S else "MISSED")
        ok = ok and (i == 0 or med <= TARGET_S)
        above = "-" if i == 0 else f"{med - floor:.3f}"
        print(f"{name:<40} {med:>9.3f} {min(ts):>7.3f} {max(ts):>7.3f} {above:>14} {verdict:>7}")
    print()
    print(f"cpu count: {os.cpu_count()}; load average: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
          "(a shared machine inflates every row, the floor included)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
