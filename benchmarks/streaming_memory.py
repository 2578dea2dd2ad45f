"""Peak RSS and seconds of ``SharedSubspace.from_adapters_streaming`` on a 7B-shaped collection.

    python benchmarks/streaming_memory.py [--n 32] [--root DIR] [--budget MB ...] [--method joint] [--hidden H --layers L]

Writes (once, kept under ``--root``) N fp16 adapters shaped like a 7B model (hidden
4096, r16, q_proj/v_proj on 32 layers; the ``7b`` collection of
``_bench_collections.py``), then runs each build in a fresh subprocess and reports
that process's peak RSS (``VmHWM``) and build seconds. ``--budget none`` builds
all modules at once (no chunking); a number is ``memory_budget_mb``; ``default``
leaves the keyword out (whatever the installed engine does by default).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _bench_collections import ensure_7b, task_dirs  # noqa: E402
from _measure import proc_status_bytes as _vm  # noqa: E402


def worker(root: str, n: int, budget: str, method: str, max_error: float | None, mean_error: float | None) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from engine.subspace import SharedSubspace

    torch.set_num_threads(2)
    paths = task_dirs(Path(root))[:n]
    kw: dict = {}
    if budget != "default":
        kw["memory_budget_mb"] = None if budget == "none" else float(budget)
    before = _vm("VmRSS")
    t0 = time.perf_counter()
    if mean_error is not None:
        kw["mean_error"] = mean_error
    sub = SharedSubspace.from_adapters_streaming(paths, max_error=max_error, method=method, **kw)
    secs = time.perf_counter() - t0
    st = sub.compression_stats()
    print("RESULT " + json.dumps({
        "n": len(paths), "method": method, "budget": budget, "seconds": round(secs, 2),
        "peak_rss_mb": round(_vm("VmHWM") / 2**20, 1), "rss_before_build_mb": round(before / 2**20, 1),
        "ratio": round(st["ratio"], 2), "mean_error": round(st["error"]["mean"], 4), "max_error": round(st["error"]["max"], 4),
        "k_max": sub.num_components, "kinds": sorted(set(st["module_kinds"].values())),
    }), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "vlora-streaming-7b")
    ap.add_argument("--budget", nargs="+", default=["none", "default"])
    ap.add_argument("--method", default="joint")
    ap.add_argument("--max-error", type=lambda x: None if x == "none" else float(x), default=0.05,
                    help="max-error target ('none': only --mean-error)")
    ap.add_argument("--mean-error", type=float, default=None, help="also a mean-error target (k meets both)")
    ap.add_argument("--structure", default="families", choices=("families", "shared"),
                    help="the 7B collection's structure (see _bench_collections.make_7b)")
    ap.add_argument("--hidden", type=int, default=None, help="a smaller hidden size than 4096 (a collection of its own)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than 32")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(str(a.root), a.n, a.budget[0], a.method, a.max_error, a.mean_error)
        return
    shape = None
    if a.hidden or a.layers:
        shape = {**SEVEN_B, "hidden": a.hidden or SEVEN_B["hidden"], "layers": a.layers or SEVEN_B["layers"]}
    paths = ensure_7b(a.root, a.n, structure=a.structure, log=lambda m: print(m, flush=True), shape=shape)
    size = sum(f.stat().st_size for p in paths for f in p.iterdir())
    print(f"collection: {a.n} adapters, {size / 2**20:.0f} MiB on disk", flush=True)
    for b in a.budget:
        cmd = [sys.executable, __file__, "--worker", "--root", str(a.root), "--n", str(a.n), "--budget", b,
               "--method", a.method, "--max-error", "none" if a.max_error is None else str(a.max_error)]
        if a.mean_error is not None:
            cmd += ["--mean-error", str(a.mean_error)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln[7:] for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        print(line if line else f"budget {b}: failed (rc {r.returncode})\n{r.stderr[-2000:]}", flush=True)


if __name__ == "__main__":
    main()
