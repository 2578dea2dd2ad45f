"""Independent measurement code for benchmarks/compression.py.

Nothing here uses ``engine.subspace``: the ΔW error of every method (ours, the
honest baseline, the peers) is computed by this file from the original adapter
files and the method's reconstruction, so it is a check on what a library
reports about itself.

Also the subprocess worker: ``python benchmarks/_measure.py <spec.json>`` runs
one build (one method, one collection size, one setting), measures build seconds
and peak RSS of that process alone, saves the result, reloads it, reconstructs
every task and prints one JSON line (prefixed ``RESULT ``) with the numbers.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------------------
# ΔW error, independent of any library
# ---------------------------------------------------------------------------
#: above this many entries per ΔW the error goes through QR of the factors
DENSE_LIMIT = 1 << 18


def _fro_of_product(b: Any, a: Any) -> float:
    """‖B @ A‖_F without forming B @ A: QR of B and of Aᵀ, then the small core."""
    import torch

    if b.shape[0] * a.shape[1] <= DENSE_LIMIT:
        return float(torch.linalg.matrix_norm(b @ a))
    rb = torch.linalg.qr(b, mode="r")[1] if b.shape[0] > b.shape[1] else b
    ra = torch.linalg.qr(a.T, mode="r")[1] if a.shape[1] > a.shape[0] else a.T
    return float(torch.linalg.matrix_norm(rb @ ra.T))


def delta_error(b: Any, a: Any, s: float, b2: Any, a2: Any, s2: float) -> tuple[float, float]:
    """(‖ΔW − ΔŴ‖_F, ‖ΔW‖_F) with ΔW = s·B·A, ΔŴ = s2·B2·A2, in float64.

    ``ΔW − ΔŴ = [s·B, −s2·B2] @ [A; A2]``: the difference is itself a product of
    thin factors, so its norm comes from two QRs and an (r+r2)² core (exact,
    no cancellation as with ‖x‖²+‖y‖²−2⟨x,y⟩). Small shapes go dense.
    """
    import torch

    b, a, b2, a2 = (t.detach().to(torch.float64) for t in (b, a, b2, a2))
    if b.shape[0] != b2.shape[0] or a.shape[1] != a2.shape[1]:
        raise ValueError(f"shape mismatch: ΔW {tuple(b.shape[:1]) + tuple(a.shape[1:])} vs {tuple(b2.shape[:1]) + tuple(a2.shape[1:])}")
    ref = _fro_of_product(s * b, a)
    diff = _fro_of_product(torch.cat([s * b, -s2 * b2], 1), torch.cat([a, a2], 0))
    return diff, ref


def peft_scale(cfg: dict, module: str, r: int) -> float:
    """PEFT's scaling for a module from an adapter_config dict (own copy, for peers)."""
    import re

    def pick(pattern: dict | None, default: float) -> float:
        if not pattern:
            return default
        if module in pattern:
            return float(pattern[module])
        for k, v in pattern.items():
            try:
                if re.match(rf"(.*\.)?({k})$", module):
                    return float(v)
            except re.error:
                continue
        return default

    if r == 0:
        return 0.0
    alpha = pick(cfg.get("alpha_pattern"), float(cfg.get("lora_alpha", 8)))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def read_reference(path: str | Path) -> tuple[dict, dict[str, tuple[Any, Any, float]]]:
    """An adapter folder as {module: (B, A, scale)} read straight from safetensors."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    sd = load_file(str(path / "adapter_model.safetensors"))
    a_s: dict[str, Any] = {}
    b_s: dict[str, Any] = {}
    for k, t in sd.items():
        if ".lora_A." in k:
            m = k.split(".lora_A.")[0]
            a_s[m.removeprefix(PEFT_PREFIX)] = t
        elif ".lora_B." in k:
            m = k.split(".lora_B.")[0]
            b_s[m.removeprefix(PEFT_PREFIX)] = t
    out = {}
    for m in sorted(a_s):
        out[m] = (b_s[m], a_s[m], peft_scale(cfg, m, int(a_s[m].shape[0])))
    return cfg, out


class ErrorTally:
    """Per (task, module) relative ΔW errors."""

    def __init__(self) -> None:
        self.per_task: dict[str, list[float]] = {}
        self.sq: dict[str, list[float]] = {}  # task → [Σ‖ΔW−ΔŴ‖², Σ‖ΔW‖²] over its modules
        self.zero_modules = 0

    def add(self, task: str, ref: dict[str, tuple[Any, Any, float]], rec: dict[str, tuple[Any, Any, float]]) -> None:
        errs = self.per_task.setdefault(task, [])
        missing = sorted(set(ref) - set(rec))
        if missing:
            raise KeyError(f"reconstruction of {task} lacks module {missing[0]} ({len(missing)} missing)")
        for m, (b, a, s) in ref.items():
            b2, a2, s2 = rec[m]
            diff, norm = delta_error(b, a, s, b2, a2, s2)
            if norm < 1e-12:
                self.zero_modules += 1
                continue
            errs.append(diff / norm)
            sq = self.sq.setdefault(task, [0.0, 0.0])
            sq[0] += diff * diff
            sq[1] += norm * norm

    def summary(self) -> dict[str, Any]:
        allv = [e for v in self.per_task.values() for e in v]
        return {
            "err_mean": sum(allv) / len(allv) if allv else float("nan"),
            "err_max": max(allv) if allv else float("nan"),
            "err_per_task": {t: (sum(v) / len(v) if v else float("nan")) for t, v in self.per_task.items()},
            "err_max_per_task": {t: (max(v) if v else float("nan")) for t, v in self.per_task.items()},
            "zero_modules": self.zero_modules,
            # each task's whole-update error (modules weighted by ‖ΔW‖², the rule of --mean-error)
            "err_w_per_task": {t: math.sqrt(d / n) for t, (d, n) in self.sq.items() if n > 0},
        }


def dir_bytes(path: str | Path) -> int:
    """Bytes of every file under ``path`` (or of the file)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def proc_status_bytes(key: str, pid: int | str = "self") -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmHWM``, ``VmRSS``) in bytes; 0 where there is none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    """Peak RSS of this process so far.

    Linux: VmHWM of /proc/self/status, the high-water mark of this process's own
    address space. Not ru_maxrss: across fork+exec Linux carries the parent's peak
    into the child's ru_maxrss, so a fat parent would contaminate every run.
    """
    hwm = proc_status_bytes("VmHWM")
    if hwm:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) * (1 if sys.platform == "darwin" else 1024)


# ---------------------------------------------------------------------------
# The honest baseline: each task alone, per-module truncated SVD of ΔW
# ---------------------------------------------------------------------------
def truncated_factors(b: Any, a: Any, s: float, target: float) -> tuple[Any, Any, int]:
    """Smallest-rank (B', A') with ‖ΔW − B'A'‖/‖ΔW‖ ≤ target, via QR of the factors (never out×in)."""
    import torch

    b64, a64 = b.to(torch.float64) * s, a.to(torch.float64)
    qb, rb = torch.linalg.qr(b64)
    qa, ra = torch.linalg.qr(a64.T)
    u, sv, vh = torch.linalg.svd(rb @ ra.T)
    tot = float((sv**2).sum())
    k = len(sv)
    if tot > 0:
        tail = torch.flip(torch.cumsum(torch.flip(sv**2, [0]), 0), [0])  # tail[i] = Σ_{j≥i} σ_j²
        for i in range(1, len(sv) + 1):
            rest = float(tail[i]) if i < len(sv) else 0.0
            if math.sqrt(rest / tot) <= target:
                k = i
                break
    k = max(1, k)
    root = sv[:k].sqrt()
    bk = (qb @ u[:, :k]) * root
    ak = (root[:, None] * vh[:k]) @ qa.T
    return bk, ak, k


# ---------------------------------------------------------------------------
# Workers (one per subprocess)
# ---------------------------------------------------------------------------
def _evaluate(spec: dict, rec_fn: Any, tasks: list[str], paths: list[str]) -> dict[str, Any]:
    tally = ErrorTally()
    for tid, p in zip(tasks, paths):
        _, ref = read_reference(p)
        tally.add(tid, ref, rec_fn(tid, ref))
        del ref
        gc.collect()
    return tally.summary()


def _lib_stats_summary(stats: Any) -> dict[str, Any]:
    """Pick the ratio and error numbers out of the library's compression_stats()."""
    out: dict[str, Any] = {}
    if not isinstance(stats, dict):
        try:
            stats = dict(stats.__dict__)
        except Exception:
            return {"lib_stats_raw": repr(stats)[:500]}

    def find(d: dict, names: tuple[str, ...]) -> Any:
        for n in names:
            if n in d and isinstance(d[n], (int, float)):
                return float(d[n])
        return None

    out["lib_ratio"] = find(stats, ("compression_ratio", "ratio", "bytes_ratio", "disk_ratio"))
    if isinstance(stats.get("error"), dict):  # engine.subspace: {"error": {"mean", "max", "per_task": {t: {mean, max}}}}
        e = stats["error"]
        stats = {**stats, "error_mean": e.get("mean"), "error_max": e.get("max"), "per_task_error": e.get("per_task"),
                 "error_is_bound": e.get("is_bound")}
    out["lib_err_mean"] = find(stats, ("delta_error_mean", "dw_error_mean", "error_mean", "mean_error", "mean_delta_error", "err_mean"))
    out["lib_err_max"] = find(stats, ("delta_error_max", "dw_error_max", "error_max", "max_error", "max_delta_error", "err_max"))
    per_task = None
    for n in ("delta_error_per_task", "per_task_error", "error_per_task", "per_task", "task_errors"):
        if isinstance(stats.get(n), dict):
            per_task = stats[n]
            break
    if per_task is not None:
        clean = {}
        for t, v in per_task.items():
            if isinstance(v, (int, float)):
                clean[t] = float(v)
            elif isinstance(v, dict):
                x = find(v, ("mean", "error_mean", "delta_error_mean", "err_mean"))
                if x is not None:
                    clean[t] = x
        out["lib_err_per_task"] = clean
    # keep the raw keys (scalars only) for the report
    out["lib_stats_keys"] = {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool))}
    return out


def run_ours(spec: dict) -> dict[str, Any]:
    """A SharedSubspace method of this project."""
    import torch

    from engine.io import load_adapter
    from engine.subspace import SharedSubspace

    torch.set_num_threads(spec.get("threads", 2))
    paths, tasks = spec["paths"], spec["tasks"]
    kw = dict(spec.get("kwargs", {}))
    out = Path(spec["out"])
    res: dict[str, Any] = {}
    t0 = time.perf_counter()
    if spec.get("streaming"):
        sub = SharedSubspace.from_adapters_streaming(paths, task_ids=tasks, **kw)
    else:
        adapters = [load_adapter(p, name=t) for p, t in zip(paths, tasks)]
        sub = SharedSubspace.from_adapters(adapters, task_ids=tasks, **kw)
    if spec.get("quantize"):  # the library's own block quantisation of the bases, after the build
        sub.quantize(**spec["quantize"])
    res["build_s"] = time.perf_counter() - t0
    res["peak_rss"] = peak_rss_bytes()
    try:
        res.update(_lib_stats_summary(sub.compression_stats()))
    except Exception as exc:  # report, don't die
        res["lib_stats_error"] = f"{type(exc).__name__}: {exc}"
    sub.save(str(out / "subspace"))
    res["bytes"] = dir_bytes(out / "subspace")
    del sub
    adapters = None
    gc.collect()
    sub = SharedSubspace.load(str(out / "subspace"))
    res["k_info"] = _describe_k(sub)

    def rec(tid: str, ref: dict) -> dict:
        w = sub.reconstruct(tid)
        return {m: (w.lora_b[m], w.lora_a[m], w.scale(m)) for m in w.layer_names}

    res.update(_evaluate(spec, rec, tasks, paths))
    if spec.get("accuracy"):  # the real collection: export → PEFT load → held-out accuracy
        import _real_bench as rb

        res.update(rb.accuracy_of_subspace(spec, out / "subspace", out))
    if spec.get("heldout"):
        res.update(_heldout_ours(spec, kw))
    return res


def _describe_k(sub: Any) -> str:
    """k per module as "k lo-hi", plus how many modules are stored per task ("sep i/n")."""
    mods = getattr(sub, "modules", None)
    if isinstance(mods, dict) and mods:
        ks = [int(getattr(b, "k", 0)) for b in mods.values() if getattr(b, "kind", "") != "separate"]
        sep = sum(1 for b in mods.values() if getattr(b, "kind", "") == "separate")
        parts = []
        if ks:
            parts.append(f"k {min(ks)}-{max(ks)}" if min(ks) != max(ks) else f"k {ks[0]}")
        if sep:
            parts.append(f"sep {sep}/{len(mods)}")
        return ", ".join(parts) or "?"
    v = getattr(sub, "num_components", None)
    return str(v) if v is not None else "?"


def _heldout_ours(spec: dict, kw: dict) -> dict[str, Any]:
    from engine.io import load_adapter
    from engine.subspace import SharedSubspace

    paths, tasks = spec["paths"], spec["tasks"]
    if len(paths) < 3:
        return {"heldout": None}
    if spec.get("heldout_k") is not None and kw.get("num_components") is not None:
        kw = {**kw, "num_components": min(int(kw["num_components"]), int(spec["heldout_k"]))}
    if spec.get("streaming"):
        sub = SharedSubspace.from_adapters_streaming(paths[:-1], task_ids=tasks[:-1], **kw)
    else:
        adapters = [load_adapter(p, name=t) for p, t in zip(paths[:-1], tasks[:-1])]
        sub = SharedSubspace.from_adapters(adapters, task_ids=tasks[:-1], **kw)
        del adapters
    last = load_adapter(paths[-1], name=tasks[-1])
    proj = sub.project(last, tasks[-1])
    sub.add_task(proj)
    w = sub.reconstruct(tasks[-1])
    tally = ErrorTally()
    _, ref = read_reference(paths[-1])
    tally.add(tasks[-1], ref, {m: (w.lora_b[m], w.lora_a[m], w.scale(m)) for m in w.layer_names})
    s = tally.summary()
    return {"heldout": s["err_mean"], "heldout_max": s["err_max"]}


def run_baseline(spec: dict) -> dict[str, Any]:
    """Each task alone: per-module truncated SVD of ΔW at the error target, saved as fp16 PEFT folders."""
    import torch

    from engine.io import load_adapter, save_adapter

    torch.set_num_threads(spec.get("threads", 2))
    paths, tasks = spec["paths"], spec["tasks"]
    target = float(spec["target"])
    out = Path(spec["out"]) / "baseline"
    out.mkdir(parents=True)
    ranks: list[int] = []
    t0 = time.perf_counter()
    for p, t in zip(paths, tasks):
        w = load_adapter(p, name=t)
        fac = {}
        for m in w.layer_names:
            bk, ak, k = truncated_factors(w.lora_b[m], w.lora_a[m], w.scale(m), target)
            fac[m] = (bk.float(), ak.float())
            ranks.append(k)
        save_adapter(w.replace_factors(fac), out / t, dtype=torch.float16)
        del w, fac
    res: dict[str, Any] = {"build_s": time.perf_counter() - t0, "peak_rss": peak_rss_bytes()}
    res["bytes"] = dir_bytes(out)
    res["k_info"] = f"r {min(ranks)}-{max(ranks)} (avg {sum(ranks) / len(ranks):.1f})"

    def rec(tid: str, ref: dict) -> dict:
        _, r = read_reference(out / tid)
        return r

    res.update(_evaluate(spec, rec, tasks, paths))
    if spec.get("accuracy"):
        import _real_bench as rb

        res.update(rb.accuracy_of_factors(spec, rec, Path(spec["out"])))
    res["heldout"] = res["err_per_task"][tasks[-1]]  # each task is alone: held-out = in-sample
    return res


def _upcast_vlora_loader() -> str | None:
    """vlora-dev runs SVD on the loaded dtype; torch has no CPU SVD for fp16. Upcast, and say so."""
    import torch
    import vlora.io as vio

    orig = vio.load_adapter

    def load32(path: Any) -> Any:
        w = orig(path)
        w.lora_a = {k: v.float() for k, v in w.lora_a.items()}
        w.lora_b = {k: v.float() for k, v in w.lora_b.items()}
        return w

    vio.load_adapter = load32
    try:
        x = torch.randn(3, 8).half()
        torch.linalg.svd(x, full_matrices=False)
        return None
    except Exception as exc:
        return "fp16 inputs upcast (¹)"


def run_vlora_dev(spec: dict) -> dict[str, Any]:
    """The seed (PyPI vlora-dev), through its own API; saved at fp16 via its .to()."""
    import torch
    import vlora
    import vlora.io as vio
    from vlora import SharedSubspace as VSub

    torch.set_num_threads(spec.get("threads", 2))
    note = _upcast_vlora_loader()
    paths, tasks = spec["paths"], spec["tasks"]
    k = int(spec["k"])
    out = Path(spec["out"])
    res: dict[str, Any] = {"notes": [note] if note else []}

    def build(ps: list[str], ts: list[str]) -> Any:
        if spec.get("streaming"):
            return VSub.from_adapters_streaming(ps, task_ids=ts, num_components=k)
        ads = [vio.load_adapter(p) for p in ps]
        return VSub.from_adapters(ads, task_ids=ts, num_components=k)

    t0 = time.perf_counter()
    sub = build(paths, tasks)
    res["build_s"] = time.perf_counter() - t0
    res["peak_rss"] = peak_rss_bytes()
    try:
        res["lib_ratio"] = float(sub.compression_stats()["compression_ratio"])
    except Exception:
        pass
    dtype = torch.float16 if spec.get("fp16", True) else None
    if dtype is not None:
        sub.to(dtype=dtype)
    sub.save(str(out / "sub"))
    res["bytes"] = dir_bytes(out / "sub")
    del sub
    gc.collect()
    sub = VSub.load(str(out / "sub")).to(dtype=torch.float32)
    res["k_info"] = str(k)

    def rec(tid: str, ref: dict) -> dict:
        w = sub.reconstruct(tid)
        return {m: (w.lora_b[m], w.lora_a[m], ref[m][2]) for m in ref}  # same rank and config: same scale

    res.update(_evaluate(spec, rec, tasks, paths))
    if spec.get("accuracy"):
        import _real_bench as rb

        res.update(rb.accuracy_of_factors(spec, rec, out))
    if spec.get("heldout") and len(paths) >= 3:
        del sub
        gc.collect()
        sub = build(paths[:-1], tasks[:-1])
        last = vio.load_adapter(paths[-1])
        sub.add_task(sub.project(last, tasks[-1]))
        if dtype is not None:
            sub.to(dtype=dtype).to(dtype=torch.float32)
        w = sub.reconstruct(tasks[-1])
        _, ref = read_reference(paths[-1])
        tally = ErrorTally()
        tally.add(tasks[-1], ref, {m: (w.lora_b[m], w.lora_a[m], ref[m][2]) for m in ref})
        res["heldout"] = tally.summary()["err_mean"]
    return res


def run_lorashare(spec: dict) -> dict[str, Any]:
    """The Share paper's method (PyPI lorashare), through its own API; saved at fp16."""
    import torch
    import lorashare
    from lorashare import SHAREModel

    torch.set_num_threads(spec.get("threads", 2))
    paths, tasks = spec["paths"], spec["tasks"]
    k = int(spec["k"])
    out = Path(spec["out"])
    res: dict[str, Any] = {"notes": []}
    kw: dict[str, Any] = {"num_components": k, "device": "cpu"}
    if spec.get("streaming"):
        kw["layer_by_layer"] = True
    t0 = time.perf_counter()
    share = SHAREModel.from_adapters(dict(zip(tasks, paths)), **kw)
    res["build_s"] = time.perf_counter() - t0
    res["peak_rss"] = peak_rss_bytes()
    try:
        res["lib_ratio"] = float(share.config.compression_stats["compression_ratio"])
    except Exception:
        pass
    fp16 = spec.get("fp16", True)

    def to16(m: Any) -> None:
        if fp16:
            m.components = {g: c.half().contiguous() for g, c in m.components.items()}
            m.all_loadings = {n: {g: t.half().contiguous() for g, t in d.items()} for n, d in m.all_loadings.items()}

    def to32(m: Any) -> None:
        m.components = {g: c.float() for g, c in m.components.items()}
        m.all_loadings = {n: {g: t.float() for g, t in d.items()} for n, d in m.all_loadings.items()}

    to16(share)
    share.save_pretrained(str(out / "share"))
    res["bytes"] = dir_bytes(out / "share")
    del share
    gc.collect()
    share = SHAREModel.from_pretrained(str(out / "share"))
    to32(share)
    res["k_info"] = str(share.config.num_components)

    def rec(tid: str, ref: dict) -> dict:
        sd = share.reconstruct(tid)
        outm = {}
        for m in ref:
            outm[m] = (sd[f"{PEFT_PREFIX}{m}.lora_B.weight"], sd[f"{PEFT_PREFIX}{m}.lora_A.weight"], ref[m][2])
        return outm

    res.update(_evaluate(spec, rec, tasks, paths))
    if spec.get("accuracy"):
        import _real_bench as rb

        res.update(rb.accuracy_of_factors(spec, rec, out))
    if spec.get("heldout") and len(paths) >= 3:
        del share
        gc.collect()
        share = SHAREModel.from_adapters(dict(zip(tasks[:-1], paths[:-1])), **kw)
        # variance_threshold=0: always the fast path (projection onto the existing components)
        info = share.add_adapter(paths[-1], name=tasks[-1], variance_threshold=0.0)
        to16(share)
        to32(share)
        _, ref = read_reference(paths[-1])
        tally = ErrorTally()
        tally.add(tasks[-1], ref, rec(tasks[-1], ref))
        res["heldout"] = tally.summary()["err_mean"]
        if info.get("method") != "projection":
            res["notes"].append(f"held-out add_adapter took the {info.get('method')} path")
    return res


def run_scale(spec: dict) -> dict[str, Any]:
    """One build of benchmarks/scale.py (in-process or Dask executor)."""
    sys.path.insert(0, str(HERE))
    from scale import run_build

    return run_build(spec)


def run_real_ref(spec: dict) -> dict[str, Any]:
    import _real_bench as rb

    return rb.reference_accuracy(spec)


def run_fixed(spec: dict) -> dict[str, Any]:
    import _real_bench as rb

    return rb.run_fixed(spec)


RUNNERS = {"ours": run_ours, "baseline": run_baseline, "vlora-dev": run_vlora_dev, "lorashare": run_lorashare,
           "scale": run_scale, "real-ref": run_real_ref, "fixed": run_fixed}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    sys.path.insert(0, str(ROOT))
    sys.path.insert(1, str(HERE))
    try:
        res = RUNNERS[spec["kind"]](spec)
        res["ok"] = True
    except BaseException as exc:  # the parent turns this into a table row
        tb = traceback.format_exc(limit=6)
        res = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": tb, "peak_rss": peak_rss_bytes()}
    res["peak_rss_final"] = peak_rss_bytes()
    print("RESULT " + json.dumps(res, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
