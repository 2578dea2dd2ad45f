"""Benchmark: adapter similarity and merging at 7B shapes, small products vs dense ΔW.

Prints tables (not a test). Synthetic adapters shaped like LoRA on a 7B Llama
(q_proj and v_proj on every layer, hidden 4096, rank 16), in families so that
similarities are not all zero.

1. Similarity of N adapters: ``engine.analysis.similarity_report`` (R×R
   Gram products) against the dense way (form every ΔW, flatten, Gram). The dense
   way is run on ``--dense-n`` adapters and ``--dense-modules`` modules and
   extrapolated (form ∝ N, Gram ∝ N², memory ∝ N per module) when the full
   problem cannot fit; its result is checked against ours on what it ran.
2. Merging ``--merge-n`` adapters with each method: seconds, and the relative ΔW
   error against the output rank. TIES/DARE form dense per-module updates, so
   they run on ``--merge-dense-modules`` modules and their seconds are
   extrapolated to all modules (marked ``*``).

Peak RSS is the process's high-water mark above its resident size before each
step (``/proc/self/clear_refs`` resets it on Linux).

    python benchmarks/analysis.py                      # 7B shapes, N=100
    python benchmarks/analysis.py --n 20 --layers 4 --hidden 1024   # quick
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine.analysis import similarity_report  # noqa: E402
from engine.merge import merge_adapters  # noqa: E402
from engine.types import LoRAWeights  # noqa: E402

MIB = 1 << 20


# -- memory ------------------------------------------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _libc() -> Any:
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


class PeakRSS:
    """High-water RSS above the resident size at entry, in bytes (Linux)."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        if _LIBC is not None:
            # hand freed heap pages back, so this step cannot reuse pages already
            # resident and hide its own peak (a fixed low mmap threshold would do it
            # too, but makes every 256 KiB buffer a page-faulting mmap: 10-60× slower)
            _LIBC.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        self.base = _status("VmRSS")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.peak = max(0, _status("VmHWM") - self.base)


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1024)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_s(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.2f} s"


def table(title: str, headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    out = [title, line, "  ".join(h.ljust(w) for h, w in zip(headers, widths)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    out.append(line)
    return "\n".join(out)


# -- synthetic collection -------------------------------------------------------------


def module_names(layers: int) -> list[str]:
    return sorted(f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in ("q_proj", "v_proj"))


def make_collection(n: int, layers: int, hidden: int, rank: int, dtype: torch.dtype, family: int, seed: int = 0) -> list[LoRAWeights]:
    """``n`` adapters in families of ``family``: a family's factors plus 50% own noise."""
    g = torch.Generator().manual_seed(seed)
    mods = module_names(layers)
    adapters = [
        LoRAWeights(layer_names=list(mods), lora_a={}, lora_b={}, rank=rank, lora_alpha=2.0 * rank,
                    target_modules=["q_proj", "v_proj"], base_model_name_or_path="synthetic-7b", name=f"task_{i:03d}")
        for i in range(n)
    ]
    for m in mods:
        fam_a = fam_b = None
        for i, ad in enumerate(adapters):
            if i % family == 0:
                fam_a = torch.randn(rank, hidden, generator=g) * 0.02
                fam_b = torch.randn(hidden, rank, generator=g) * 0.01
            assert fam_a is not None and fam_b is not None
            ad.lora_a[m] = (fam_a + 0.01 * torch.randn(rank, hidden, generator=g)).to(dtype)
            ad.lora_b[m] = (fam_b + 0.005 * torch.randn(hidden, rank, generator=g)).to(dtype)
    return adapters


def subset(adapters: list[LoRAWeights], modules: list[str]) -> list[LoRAWeights]:
    return [
        LoRAWeights(layer_names=list(modules), lora_a={m: a.lora_a[m] for m in modules},
                    lora_b={m: a.lora_b[m] for m in modules}, rank=a.rank, lora_alpha=a.lora_alpha,
                    target_modules=a.target_modules, base_model_name_or_path=a.base_model_name_or_path, name=a.name)
        for a in adapters
    ]


# -- 1. similarity --------------------------------------------------------------------


def dense_similarity(adapters: list[LoRAWeights], modules: list[str]) -> tuple[float, float, int, torch.Tensor]:
    """The dense way on some modules: (form seconds, Gram seconds, peak bytes, summed Gram)."""
    t_form = t_gram = 0.0
    peak = 0
    total = torch.zeros(len(adapters), len(adapters), dtype=torch.float64)
    for m in modules:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            x = torch.stack([a.delta_weight(m).reshape(-1) for a in adapters])
            t1 = time.perf_counter()
            g = (x @ x.T).double()
            t2 = time.perf_counter()
            del x
        t_form += t1 - t0
        t_gram += t2 - t1
        peak = max(peak, mem.peak)
        total += g
    return t_form, t_gram, peak, total


def bench_similarity(adapters: list[LoRAWeights], args: argparse.Namespace) -> str:
    n = len(adapters)
    mods = adapters[0].layer_names
    out, inn = adapters[0].shapes(mods[0])
    with PeakRSS() as mem:
        sim = similarity_report(adapters)
    ours_s, ours_peak = mem.seconds, mem.peak

    nd = min(n, args.dense_n)
    dmods = mods[: min(len(mods), args.dense_modules)]
    t_form, t_gram, d_peak, d_gram = dense_similarity(adapters[:nd], dmods)
    # check: ours on the same adapters and modules
    check = similarity_report(subset(adapters[:nd], dmods))
    norms = d_gram.diagonal().sqrt()
    d_cos = d_gram / (norms[:, None] * norms[None, :])
    max_dev = float((d_cos - check.matrix).abs().max())

    # float64 dense reference on a few adapters of one module: which of the two fp32 results is off
    n64 = min(nd, 4)
    x64 = torch.stack([adapters[i].delta_weight(mods[0]).double().reshape(-1) for i in range(n64)])
    g64 = x64 @ x64.T
    del x64
    n64s = g64.diagonal().sqrt()
    cos64 = g64 / (n64s[:, None] * n64s[None, :])
    dev_ours = float((cos64 - sim.per_module[mods[0]][:n64, :n64]).abs().max())
    x32 = torch.stack([adapters[i].delta_weight(mods[0]).reshape(-1) for i in range(n64)])
    g32 = (x32 @ x32.T).double()
    del x32
    n32s = g32.diagonal().sqrt()
    dev_dense = float((cos64 - g32 / (n32s[:, None] * n32s[None, :])).abs().max())

    per_mod_form = t_form / len(dmods) / nd  # per adapter
    per_mod_gram = t_gram / len(dmods) / (nd * nd)  # per pair
    dense_total = len(mods) * (per_mod_form * n + per_mod_gram * n * n)
    dense_mem = n * out * inn * 4  # the stacked ΔWs of one module, fp32
    measured = nd == n and len(dmods) == len(mods)
    rows = [
        ["r×r products (ours)", str(n), str(len(mods)), fmt_s(ours_s), fmt_bytes(ours_peak), "measured"],
        [
            "dense ΔW (flatten + Gram)",
            str(nd), str(len(dmods)), fmt_s(t_form + t_gram), fmt_bytes(d_peak), "measured",
        ],
        [
            "dense ΔW (flatten + Gram)",
            str(n), str(len(mods)), fmt_s(dense_total), fmt_bytes(max(dense_mem, d_peak if measured else 0)),
            "measured" if measured else "extrapolated",
        ],
    ]
    fam = sim.matrix[0, 1 : min(n, args.family)].mean().item() if n > 1 else float("nan")
    other = sim.matrix[0, args.family :].mean().item() if n > args.family else float("nan")
    title = (
        f"Similarity of N={n} adapters, {len(mods)} modules of {out}×{inn}, r={adapters[0].rank} "
        f"({str(args.dtype).replace('torch.', '')} factors)"
    )
    notes = (
        f"speed-up vs dense: ×{dense_total / ours_s:,.0f}; dense cos vs ours on the dense run: max |Δ| = {max_dev:.1e}; "
        f"against a float64 dense reference ({n64} adapters, 1 module): ours {dev_ours:.1e}, fp32 dense {dev_dense:.1e}; "
        f"mean cos within a family {fam:.3f}, across {other:.3f}"
    )
    return table(title, ["method", "N", "modules", "seconds", "peak RSS", ""], rows) + "\n" + notes


# -- 2. merging -----------------------------------------------------------------------


def dense_check(adapters: list[LoRAWeights], res: Any, module: str) -> float:
    """Independent relative error of an exact-method result on one module, dense."""
    w = res.params["weights"]
    target = sum(wi * a.delta_weight(module).double() for wi, a in zip(w, adapters))
    got = res.weights.delta_weight(module).double()
    return float((target - got).norm() / target.norm())


def bench_merge(adapters: list[LoRAWeights], args: argparse.Namespace) -> str:
    mods = adapters[0].layer_names
    ranks = [int(r) for r in args.merge_ranks.split(",") if r.strip()]
    rows: list[list[str]] = []
    dense_mods = mods[: min(len(mods), args.merge_dense_modules)]
    dense_adapters = subset(adapters, dense_mods)
    factor = len(mods) / len(dense_mods)
    for method in ("linear", "task_arithmetic", "ties", "dare"):
        exact = method in ("linear", "task_arithmetic")
        for rk in (["exact"] if exact else []) + ranks:
            src = adapters if exact else dense_adapters
            params: dict[str, Any] = {}
            if method == "ties":
                params["density"] = 0.5
            if method == "dare":
                params.update(drop_rate=0.5, seed=0)
            with PeakRSS() as mem:
                res = merge_adapters(src, method, rank=rk, **params)
            secs = mem.seconds * (1.0 if exact else factor)
            check = f"{dense_check(src, res, mods[0]):.4f}" if exact and args.check else "-"
            rows.append([
                method,
                str(rk) if rk != "exact" else f"exact ({res.weights.rank})",
                fmt_s(secs) + ("" if exact else "*"),
                fmt_bytes(mem.peak),
                f"{res.overall_error:.4f}",
                f"{res.max_error:.4f}",
                f"{res.errors[mods[0]]:.4f}",
                check,
            ])
            del res
            gc.collect()
    n = len(adapters)
    out, inn = adapters[0].shapes(mods[0])
    title = f"Merging N={n} adapters, {len(mods)} modules of {out}×{inn}, r={adapters[0].rank}"
    note = (
        f"* TIES/DARE ran on {len(dense_mods)} module(s) (dense per module) and the seconds are scaled ×{factor:g} "
        "to all modules; errors are theirs. error = ‖ΔW − ΔW_k‖_F/‖ΔW‖_F of the method's own merged update; "
        "'m0 dense check' recomputes module m0's error densely (exact methods)."
    )
    return table(title, ["method", "rank", "seconds", "peak RSS", "error (all)", "error (max module)", "error m0", "m0 dense check"], rows) + "\n" + note


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="adapters for the similarity benchmark")
    p.add_argument("--layers", type=int, default=32, help="layers (q_proj and v_proj on each)")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size (modules are hidden×hidden)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the synthetic adapters")
    p.add_argument("--family", type=int, default=10, help="adapters per family")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="stored factor dtype")
    p.add_argument("--dense-n", type=int, default=8, help="adapters the dense similarity actually runs on")
    p.add_argument("--dense-modules", type=int, default=2, help="modules the dense similarity actually runs on")
    p.add_argument("--merge-n", type=int, default=8, help="adapters merged")
    p.add_argument("--merge-ranks", default="16,32,64,128", help="output ranks for the truncated merges")
    p.add_argument("--merge-dense-modules", type=int, default=2, help="modules TIES/DARE run on (then scaled)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the dense error check of merges")
    p.add_argument("--skip-similarity", action="store_true")
    p.add_argument("--skip-merge", action="store_true")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_make = max(args.n if not args.skip_similarity else 0, args.merge_n if not args.skip_merge else 0)
    if not args.skip_merge and args.merge_n * args.family <= max(args.n, args.merge_n):
        n_make = max(n_make, args.merge_n * args.family)
    t0 = time.perf_counter()
    adapters = make_collection(n_make, args.layers, args.hidden, args.rank, args.dtype, args.family)
    size = sum(a.nbytes for a in adapters)
    print(
        f"# {n_make} synthetic adapters, {len(adapters[0].layer_names)} modules, {fmt_bytes(size)} of factors, "
        f"built in {fmt_s(time.perf_counter() - t0)}; torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    if not args.skip_similarity:
        print(bench_similarity(adapters[: args.n], args), "\n", flush=True)
    if not args.skip_merge:
        # one adapter per family where there are enough, so the merged update has real spread
        picks = list(range(0, len(adapters), args.family))[: args.merge_n]
        if len(picks) < args.merge_n:
            picks = list(range(args.merge_n))
        print(bench_merge([adapters[i] for i in picks], args), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
