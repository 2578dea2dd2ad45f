"""Scale benchmark (issue #20): the streaming build of N = 100, 300, 1000 7B-shaped adapters, in-process and on Dask.

    python benchmarks/scale.py --root DIR [--n 100 300 1000] [--structure shared families]
                               [--engines inprocess dask] [--workers 2] [--vlora-dev-n 100]

A script that prints a table, not a test. The adapters are the ``7b-shared`` and ``7b``
(``families``) collections of ``_bench_collections.py`` (hidden 4096, r16, q_proj/v_proj
on 32 layers, fp16: 16 MiB each, N = 1000 is 15.6 GiB per structure), written once
under ``--root DIR/<structure>`` and reused by later runs (a longer run extends them).
``--gen-only`` writes them and stops.

Each build runs in its own process (``_measure.py``'s worker, through
``compression.run_worker``: a wall-clock limit and a resident-memory cap):
``SharedSubspace.from_adapters_streaming(paths, max_error=...)`` with
``executor="inprocess"`` or ``executor="dask", scheduler=<a fresh LocalCluster of
--workers one-thread worker processes>, n_workers=--workers``. The cluster is started
before the clock and closed after, so each worker's peak RSS is that build's. Columns:

* wall s, s/adapter: seconds of the build call, reading and writing the folder included
  (``output=``: each chunk's coefficients written as it is built; a library without
  ``output`` is timed without its save).
* driver / worker peak RSS: ``VmHWM`` of the build process and of each Dask worker
  process (``client.run``), Python and torch included.
* read: tensor bytes the build pulled from the adapter files (``safetensors.safe_open``'s
  ``get_tensor``/``get_slice`` counted in the driver and in every worker), and that as
  passes over the input; the kernel's storage ``read_bytes`` is in the JSON (0 when the
  files are in the page cache).
* ratio (disk): bytes of the N input folders ÷ bytes of the saved subspace folder;
  lib ratio: ``compression_stats()``.
* ΔW err: ‖ΔW−ΔŴ‖_F/‖ΔW‖_F of ``--check`` tasks spread over the collection, every
  module, from the original files and the reconstruction after load (``lazy``: those
  tasks' files only), by
  ``_measure.py`` (independent of ``engine.subspace``); lib: the library's mean/max over
  all tasks.

After the table: whether the engines agree (same bytes, ratio, errors) at each N.
``vlora-dev`` (the seed, PyPI) runs its streaming build at ``--vlora-dev-n`` with
k = N/4, installed as ``compression.py`` installs peers (``pip --no-deps`` into a cache
folder); a row says why when it can't.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _bench_collections import SEVEN_B, ensure_7b  # noqa: E402
from _measure import (  # noqa: E402
    ErrorTally,
    _lib_stats_summary,
    dir_bytes,
    peak_rss_bytes,
    proc_status_bytes,
    read_reference,
)

ENGINES = ("inprocess", "dask")
STRUCTURES = ("shared", "families")
GIB = 1 << 30
NOT_AVAILABLE = "executor not available"


# ---------------------------------------------------------------------------
# counters, in the build process and (through client.run) in every Dask worker
# ---------------------------------------------------------------------------
def proc_io() -> dict[str, int]:
    """``/proc/self/io`` (rchar: bytes through read(); read_bytes: bytes fetched from storage)."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            k, v = line.split(":")
            out[k.strip()] = int(v)
    except OSError:
        pass
    return out


def install_read_counter() -> None:
    """Count the tensor bytes read through ``safetensors.safe_open`` in this process (idempotent).

    The build reads adapter tensors with ``safe_open(...).get_tensor``/``get_slice``
    (memory-mapped: ``/proc/self/io`` does not see them), so the count is made there.
    """
    import safetensors
    import safetensors.torch as st

    if getattr(safetensors, "_scale_counter", None) is not None:
        return
    counter = {"bytes": 0, "opens": 0}
    orig = safetensors.safe_open

    def nbytes(t: Any) -> int:
        return int(t.numel()) * int(t.element_size())

    class CountedSlice:
        def __init__(self, sl: Any) -> None:
            self._sl = sl

        def __getitem__(self, idx: Any) -> Any:
            t = self._sl[idx]
            counter["bytes"] += nbytes(t)
            return t

        def __getattr__(self, name: str) -> Any:
            return getattr(self._sl, name)

    class CountedOpen:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._h = orig(*args, **kwargs)
            counter["opens"] += 1

        def __enter__(self) -> CountedOpen:
            self._h.__enter__()
            return self

        def __exit__(self, *exc: Any) -> Any:
            return self._h.__exit__(*exc)

        def get_tensor(self, name: str) -> Any:
            t = self._h.get_tensor(name)
            counter["bytes"] += nbytes(t)
            return t

        def get_slice(self, name: str) -> CountedSlice:
            return CountedSlice(self._h.get_slice(name))

        def __getattr__(self, name: str) -> Any:
            return getattr(self._h, name)

    safetensors.safe_open = CountedOpen
    st.safe_open = CountedOpen
    safetensors._scale_counter = counter


def process_stats() -> dict[str, int]:
    """Peak RSS, /proc/self/io and the tensor-byte counter of this process."""
    import safetensors

    c = getattr(safetensors, "_scale_counter", None) or {}
    io = proc_io()
    return {"peak_rss": peak_rss_bytes(), "tensor_bytes": int(c.get("bytes", 0)), "opens": int(c.get("opens", 0)),
            "rchar": io.get("rchar", 0), "read_bytes": io.get("read_bytes", 0), "pid": os.getpid()}


# ---------------------------------------------------------------------------
# one build (runs inside _measure.py's worker process: kind "scale")
# ---------------------------------------------------------------------------
def _accepts_executor() -> bool:
    from engine.subspace import SharedSubspace

    params = inspect.signature(SharedSubspace.from_adapters_streaming).parameters
    return "executor" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _accepts(name: str, fn: Any) -> bool:
    return name in inspect.signature(fn).parameters


def run_build(spec: dict) -> dict[str, Any]:
    """Build, measure, save, reload and check a sample of tasks; one result dict."""
    import torch

    from engine.subspace import SharedSubspace

    torch.set_num_threads(spec.get("threads", 2))
    paths, tasks, engine = spec["paths"], spec["tasks"], spec["engine"]
    out = Path(spec["out"])
    kw: dict[str, Any] = {"max_error": spec["max_error"], "precision": spec.get("precision", "fp16")}
    res: dict[str, Any] = {"engine": engine, "notes": []}
    install_read_counter()
    client = cluster = None
    if engine == "dask":
        if not _accepts_executor():
            raise RuntimeError(NOT_AVAILABLE)
        from dask.distributed import Client, LocalCluster

        t0 = time.perf_counter()
        cluster = LocalCluster(n_workers=spec["workers"], threads_per_worker=1, processes=True,
                               dashboard_address=":0")
        client = Client(cluster)
        client.run(install_read_counter)
        res["notes"].append(f"LocalCluster of {spec['workers']} started in {time.perf_counter() - t0:.1f} s (not timed)")
        kw.update(executor="dask", scheduler=cluster.scheduler_address, n_workers=spec["workers"])
    elif _accepts_executor():
        kw["executor"] = "inprocess"
    streamed_out = _accepts("output", SharedSubspace.from_adapters_streaming)
    if streamed_out:  # written as built: the build holds one chunk's coefficients, not the collection's
        kw.update(output=str(out / "subspace"), force=True)
    io0 = process_stats()
    try:
        t0 = time.perf_counter()
        try:
            sub = SharedSubspace.from_adapters_streaming(paths, task_ids=tasks, **kw)
        except TypeError as exc:
            if engine == "dask" and any(w in str(exc) for w in ("executor", "scheduler", "n_workers")):
                raise RuntimeError(f"{NOT_AVAILABLE} ({exc})") from exc
            raise
        res["build_s"] = time.perf_counter() - t0
        drv = process_stats()
        res["peak_rss"] = drv["peak_rss"]
        res["driver"] = {k: drv[k] - io0.get(k, 0) if k in ("tensor_bytes", "rchar", "read_bytes", "opens") else drv[k]
                         for k in drv}
        if client is not None:
            res["workers"] = list(client.run(process_stats).values())
    finally:
        if client is not None:
            client.close()
            cluster.close()
    parts = [res["driver"]] + res.get("workers", [])
    res["tensor_bytes_read"] = sum(p["tensor_bytes"] for p in parts)
    res["storage_read_bytes"] = sum(p["read_bytes"] for p in parts)
    try:
        res.update(_lib_stats_summary(sub.compression_stats()))
    except Exception as exc:  # report, don't die
        res["lib_stats_error"] = f"{type(exc).__name__}: {exc}"
    if not streamed_out:
        sub.save(str(out / "subspace"))
    res["bytes"] = dir_bytes(out / "subspace")
    res["k_max"] = sub.num_components
    del sub
    lazy = {"lazy": True} if _accepts("lazy", SharedSubspace.load) else {}
    sub = SharedSubspace.load(str(out / "subspace"), **lazy)  # lazy: reads only the checked tasks' files
    tally = ErrorTally()
    for i in spec["check"]:
        _, ref = read_reference(paths[i])
        w = sub.reconstruct(tasks[i])
        tally.add(tasks[i], ref, {m: (w.lora_b[m], w.lora_a[m], w.scale(m)) for m in w.layer_names})
    res.update(tally.summary())
    return res


# ---------------------------------------------------------------------------
# the driver of the benchmark
# ---------------------------------------------------------------------------
def check_indices(n: int, count: int) -> list[int]:
    """``count`` task indices spread evenly over 0..n-1, first and last included."""
    if count >= n:
        return list(range(n))
    if count <= 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (count - 1)) for i in range(count)})


def fmt_bytes(x: Any) -> str:
    if not x:
        return "–"
    return f"{x / GIB:.2f} GiB" if x >= 0.1 * GIB else f"{x / 2**20:.0f} MiB"


def fmt_pct(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def row_cells(r: dict) -> list[str]:
    res, n = r["res"], r["n"]
    head = [str(n), r["structure"], r["engine"], fmt_bytes(r["input_bytes"])]
    if not res.get("ok"):
        why = res.get("error", "?")
        if NOT_AVAILABLE in why:
            why = NOT_AVAILABLE
        return head + ["–"] * 9 + [why[:160]]
    wall = res["build_s"]
    workers = res.get("workers") or []
    wrss = ", ".join(fmt_bytes(w["peak_rss"]) for w in workers) if workers else "–"
    read = res.get("tensor_bytes_read")
    read_s = f"{fmt_bytes(read)} ({read / r['input_bytes']:.1f}×)" if read else "–"
    ratio = r["input_bytes"] / res["bytes"] if res.get("bytes") else None
    lib = (f"{fmt_pct(res.get('lib_err_mean'))} / {fmt_pct(res.get('lib_err_max'))}"
           if res.get("lib_err_mean") is not None else "–")
    checked = len(res.get("err_per_task", {}))
    notes = list(res.get("notes", []))
    return head + [
        f"{wall:.1f}", f"{wall / n:.3f}", fmt_bytes(res.get("peak_rss")), wrss, read_s,
        f"{ratio:.2f}×" if ratio else "–", f"{res['lib_ratio']:.2f}×" if res.get("lib_ratio") else "–",
        f"{fmt_pct(res.get('err_mean'))} / {fmt_pct(res.get('err_max'))} ({checked} tasks)", lib, "; ".join(notes),
    ]


HEADER = ["N", "structure", "engine", "input", "wall s", "s/adapter", "driver peak RSS", "worker peak RSS",
          "read (× input)", "ratio (disk)", "lib ratio", "ΔW err mean / max (checked)", "lib err mean / max", "note"]


def print_table(rows: list[dict]) -> None:
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for r in rows:
        print("| " + " | ".join(row_cells(r)) + " |", flush=True)


def compare_engines(rows: list[dict], tol: float = 1e-3) -> list[str]:
    """One line per (N, structure) with more than one engine: do the results agree?"""
    lines = []
    by: dict[tuple[int, str], dict[str, dict]] = {}
    for r in rows:
        if r["engine"] in ENGINES and r["res"].get("ok"):
            by.setdefault((r["n"], r["structure"]), {})[r["engine"]] = r["res"]
    for (n, s), d in sorted(by.items()):
        if len(d) < 2:
            continue
        a, b = d["inprocess"], d["dask"]
        diffs = []
        for key in ("lib_ratio", "lib_err_mean", "lib_err_max", "err_mean", "err_max"):
            x, y = a.get(key), b.get(key)
            if x is not None and y is not None and abs(x - y) > tol * max(1.0, abs(x)):
                diffs.append(f"{key} {x:.5g} vs {y:.5g}")
        per = [abs(a["err_per_task"][t] - b["err_per_task"].get(t, math.inf)) for t in a.get("err_per_task", {})]
        if per and max(per) > tol:
            diffs.append(f"checked task errors differ by up to {max(per):.2e}")
        if a.get("bytes") != b.get("bytes"):
            diffs.append(f"saved bytes {a.get('bytes')} vs {b.get('bytes')}")
        lines.append(f"N={n} {s}: inprocess vs dask " + ("agree (ratio, bytes, errors within 1e-3)" if not diffs
                                                         else "DIFFER: " + "; ".join(diffs)))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "vlora-scale-7b",
                    help="where the collections are kept (DIR/shared, DIR/families), reused across runs")
    ap.add_argument("--n", type=int, nargs="+", default=[100, 300, 1000])
    ap.add_argument("--structure", nargs="+", default=list(STRUCTURES), choices=STRUCTURES)
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--workers", type=int, default=2, help="Dask LocalCluster worker processes (one thread each)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the build process")
    ap.add_argument("--max-error", type=float, default=0.05)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp16"),
                    help="storage precision (auto: rank and precision chosen together, the CLI's default)")
    ap.add_argument("--check", type=int, default=8, help="tasks whose ΔW error is checked independently")
    ap.add_argument("--vlora-dev-n", type=int, nargs="*", default=[100],
                    help="N at which the seed's streaming build runs (none: skip)")
    ap.add_argument("--peer-dir", default=os.environ.get("VLORA_BENCH_PEERS",
                                                         os.path.expanduser("~/.cache/vlora-tui/bench-peers")))
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per build")
    ap.add_argument("--max-rss-gb", type=float, default=8.0, help="kill a build whose driver passes this")
    ap.add_argument("--gen-only", action="store_true", help="write the collections and stop")
    ap.add_argument("--json", type=Path, default=None, help="also write every row's raw numbers here")
    a = ap.parse_args(argv)

    import compression  # peers and the subprocess runner

    t_start = time.perf_counter()
    n_max = max(a.n + (a.vlora_dev_n or []))
    colls = {s: ensure_7b(a.root / s, n_max, structure=s, log=lambda m: print(m, file=sys.stderr, flush=True))
             for s in a.structure}
    if a.gen_only:
        for s, ps in colls.items():
            print(f"{s}: {len(ps)} adapters, {sum(dir_bytes(p) for p in ps) / GIB:.2f} GiB under {a.root / s}")
        return 0
    peer = None
    if a.vlora_dev_n:
        peer = compression.ensure_peer("vlora-dev", Path(a.peer_dir))
    work = Path(tempfile.mkdtemp(prefix="vlora-scale-"))
    rows: list[dict] = []
    for n in sorted(set(a.n + (a.vlora_dev_n or []))):
        for s in a.structure:
            paths = colls[s][:n]
            base = {"paths": [str(p) for p in paths], "tasks": [p.name for p in paths]}
            inb = sum(dir_bytes(p) for p in paths)
            runs: list[tuple[str, dict, Path | None]] = []
            if n in a.n:
                runs += [(e, {**base, "kind": "scale", "engine": e, "workers": a.workers, "max_error": a.max_error,
                                  "precision": a.precision,
                              "check": check_indices(n, a.check)}, None) for e in a.engines]
            if a.vlora_dev_n and n in a.vlora_dev_n:
                k = max(1, n // 4)
                runs.append((f"vlora-dev k={k}", {**base, "kind": "vlora-dev", "k": k, "streaming": True,
                                                  "heldout": False}, peer.path if peer and not peer.error else None))
            for name, spec, extra in runs:
                print(f"N={n} {s} {name} ...", file=sys.stderr, flush=True)
                if spec["kind"] == "vlora-dev" and (peer is None or peer.error):
                    res = {"ok": False, "error": f"not installed: {peer.error if peer else '?'}"}
                else:
                    res = compression.run_worker(spec, work, a.timeout, extra, a.threads,
                                                 max_rss=a.max_rss_gb * GIB)
                    if spec["kind"] == "vlora-dev" and res.get("ok"):  # its errors cover every task
                        res["notes"] = res.get("notes", []) + [f"k={spec['k']}; ΔW err over all {n} tasks"]
                row = {"n": n, "structure": s, "engine": name, "input_bytes": inb, "res": res}
                rows.append(row)
                print("  " + " | ".join(row_cells(row)), file=sys.stderr, flush=True)
    print(f"\n7B-shaped synthetic adapters (hidden {SEVEN_B['hidden']}, r{SEVEN_B['rank']}, "
          f"{'/'.join(SEVEN_B['modules'])} on {SEVEN_B['layers']} layers, fp16), max_error={a.max_error}, precision={a.precision}, "
          f"{os.cpu_count()} CPUs; collections under {a.root}\n")
    print_table(rows)
    print()
    for line in compare_engines(rows):
        print(line)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
