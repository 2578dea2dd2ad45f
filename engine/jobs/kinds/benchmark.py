"""The ``benchmark`` job kind: fidelity and size over k for each compression method (nothing written)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...progress import CancelLike, ProgressFn, StagedProgress, tick
from ...registry import Param
from ..base import JobKind, JobOutput
from ..params import ADAPTERS, EXCLUDE, STORAGE_DTYPES, method_choices
from ..results import Result


@dataclass(frozen=True)
class BenchmarkRow(Result):
    """One method at one k: bytes on disk, ratio, errors, seconds (``None`` where the build failed: ``error``)."""

    method: str = ""
    k: int = 0
    stored_bytes: int | None = None
    ratio: float | None = None
    ratio_vs_fp16: float | None = None
    mean_error: float | None = None
    max_error: float | None = None
    seconds: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class SkippedMethod(Result):
    """A method that does not apply to these adapters, and why."""

    method: str = ""
    reason: str = ""


@dataclass(frozen=True)
class BenchmarkResult(Result):
    """``benchmark``: one row per method and k."""

    tasks: list[str] = field(default_factory=list)
    input_bytes: int | None = None
    input_bytes_fp16: int | None = None
    ks: list[int] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    rows: list[BenchmarkRow] = field(default_factory=list)
    skipped: list[SkippedMethod] = field(default_factory=list)


def run_benchmark(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Fidelity against size over k for each compression method (nothing is kept on disk).

    For each method and k the subspace is built with ``num_components=k``, saved to a
    temporary folder (deleted at once) and measured as ``compress`` measures it: bytes of
    every file on disk and the ratio of :func:`engine.subspace.size.size_on_disk`, and its
    ΔW errors (after rounding to the storage dtype). The ``svd`` method is the honest
    baseline (each task alone, truncated SVD per module). A method that does not apply to
    these adapters (``pca`` on mixed ranks) is skipped with a note; every finished row is kept.

    data: ``{"tasks": [task id…], "input_bytes", "input_bytes_fp16", "ks": [k…], "methods": [name…],
    "rows": [{"method", "k", "stored_bytes" (on disk), "ratio", "ratio_vs_fp16", "mean_error", "max_error",
    "seconds", "error": str|None}], "skipped": [{"method", "reason"}]}`` (a cell that cannot be
    built, e.g. k above what a method allows, has ``error`` set and null figures).
    """
    import shutil
    import tempfile
    import time

    from ...errors import IncompatibleAdaptersError, JobCancelled
    from ...registry import get_method
    from ..common import load_adapters

    stages = StagedProgress(progress, {"load": 1, "bench": 6})
    adapters = load_adapters(params["adapters"], progress=stages.stage("load"), cancel=cancel, exclude=params.get("exclude"))
    max_r = max(a.module_rank(m) for a in adapters for m in a.layer_names)
    if params["k_values"] is not None:
        ks = sorted({int(k) for k in params["k_values"]})
        if any(k < 1 or k != int(k) for k in params["k_values"]):
            raise ValueError(f"k_values: positive integers expected, got {params['k_values']}")
    else:
        ks, k = [], 1
        cap = max_r * len(adapters)
        while k <= cap:
            ks.append(k)
            k *= 2
    meths = list(params["methods"] or method_choices("compress"))
    unknown = [m for m in meths if m not in method_choices("compress")]
    if unknown:
        raise ValueError(f"methods: unknown compression method {unknown[0]!r}")
    bench = stages.stage("bench")
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    total = len(ks) * len(meths)
    disk: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vlora-benchmark-") as tmp:
        for i, (meth, k) in enumerate((m, k) for m in meths for k in ks):
            tick(bench, cancel, i, total, f"{meth} k={k}")
            if any(s["method"] == meth for s in skipped):
                continue
            t0 = time.perf_counter()
            row: dict[str, Any] = {"method": meth, "k": k, "stored_bytes": None, "ratio": None, "ratio_vs_fp16": None,
                                   "mean_error": None, "max_error": None, "seconds": None, "error": None}
            try:
                build = get_method("compress", meth).func
                assert build is not None
                sub = build(adapters, num_components=k, dtype=params["dtype"], cancel=cancel)
                seconds = time.perf_counter() - t0
                folder = sub.save(Path(tmp) / f"{meth}-k{k}")
            except JobCancelled:
                raise
            except IncompatibleAdaptersError as exc:  # the method does not apply to these adapters: no k will do
                skipped.append({"method": meth, "reason": str(exc)})
                continue
            except Exception as exc:  # one cell failed: note it, keep the finished rows
                row["error"] = str(exc) or exc.__class__.__name__
                rows.append(row)
                continue
            st = sub.compression_stats()
            shutil.rmtree(folder)
            disk = st["disk"]
            row.update(stored_bytes=disk["bytes"], ratio=disk["ratio"], ratio_vs_fp16=disk["ratio_vs_fp16"],
                       mean_error=st["error"]["mean"], max_error=st["error"]["max"], seconds=seconds)
            rows.append(row)
    stages.done()
    ok = [r for r in rows if r["error"] is None]
    best = min(ok, key=lambda r: (r["max_error"], -(r["ratio"] or 0.0))) if ok else None
    summary = f"benchmarked {len(meths)} method(s) × {len(ks)} k value(s) on {len(adapters)} adapters"
    if best:
        ratio = f"{best['ratio']:.2f}x" if best["ratio"] is not None else "ratio n/a"
        summary += f"; lowest max error {best['max_error']:.3g} ({best['method']}, k={best['k']}, {ratio} on disk)"
    for sk in skipped:
        summary += f"; {sk['method']} skipped: {sk['reason']}"
    result = BenchmarkResult([a.name for a in adapters], disk.get("input_bytes"), disk.get("input_bytes_fp16"), list(ks),
                             list(meths), [BenchmarkRow(**r) for r in rows], [SkippedMethod(**sk) for sk in skipped])
    return JobOutput(summary=summary, data=result.to_dict())


KIND = JobKind(
    "benchmark", "Benchmark compression", "fidelity and size over k for each compression method (nothing written)",
    (
        ADAPTERS,
        EXCLUDE,
        Param("k_values", "floats", None, "k values to try (default 1, 2, 4, … up to N·r)"),
        Param("methods", "strs", None, "methods to compare (default: all)"),
        Param("dtype", "choice", "float16", "storage precision", STORAGE_DTYPES),
    ),
    func=run_benchmark, result=BenchmarkResult,
    positionals=("adapters",), process=True, min_adapters=1, form_rank=10,
)
