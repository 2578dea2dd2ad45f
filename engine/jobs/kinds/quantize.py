"""The ``quantize`` job kind: quantize a subspace per block at a fixed precision (int8, int4, NF4), or at the
cheapest rank and precision per module that meets an error target (``--max-error``/``--mean-error``), and save it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...progress import CancelLike, ProgressFn, StagedProgress, tick
from ...registry import Param
from ..base import JobKind, JobOutput
from ..params import FORCE, method_choices, method_kwargs, method_params, output_param
from ..reports import SubspaceStats
from ..results import Result, optional


@dataclass(frozen=True)
class QuantizeFigures(Result):
    """A subspace's size and errors before or after quantizing (``ratio``: on disk; ``stored_bytes``: in memory)."""

    stored_bytes: int | None = None
    disk_bytes: int | None = None
    ratio: float | None = None
    mean_error: float | None = None
    max_error: float | None = None


@dataclass(frozen=True)
class QuantizeResult(Result):
    """``quantize``: the subspace written, before → after, the k rule (``target``) and the stats after.

    ``quantization``: ``{bits, method, double_quant, quantize_loadings, block_size}``, or with an error
    target ``{method: "auto", bits: None, block_size, max_error, mean_error, errors}``; then also
    ``errors`` (exact/bound/mixed), ``tasks`` (per task before/after, bytes, held) and ``held``.
    """

    path: str = ""
    quantization: dict[str, Any] | None = None
    before: QuantizeFigures = field(default_factory=QuantizeFigures)
    after: QuantizeFigures = field(default_factory=QuantizeFigures)
    target: dict[str, Any] | None = None
    errors: str | None = optional()
    tasks: list[dict[str, Any]] | None = optional()
    held: list[str] | None = optional()
    warnings: list[str] = field(default_factory=list)
    stats: SubspaceStats = field(default_factory=SubspaceStats)


_QUANT_FIXED = ("subspace", "output", "method", "bits", "force", "max_error", "mean_error", "adapters")


def run_quantize(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Quantize a saved subspace's bases (and optionally its coefficients) per block and save it.

    Errors are re-measured after rounding (upper bounds, since the original adapters are
    not read). ``nf4`` is 4-bit by definition (and double-quantizes its scales unless told not to).

    data: ``{"path", "quantization": {"bits", "method", "double_quant", "quantize_loadings",
    "block_size"}, "before": {"stored_bytes", "disk_bytes", "ratio", "mean_error", "max_error"},
    "after": {same}, "target": the subspace's k rule (see ``add``), "warnings": [str] (one
    line when the rounding breaks the error target), "stats": compression_stats() after}``
    (``ratio``: the ratio on disk, of the input folder before and of the written one after;
    ``stored_bytes``: tensors in memory)
    """
    from ...registry import get_method
    from ...subspace import SharedSubspace

    if params.get("max_error") is not None or params.get("mean_error") is not None:
        return _run_target(params, progress=progress, cancel=cancel)
    if params.get("adapters"):
        raise ValueError("adapters: only with --max-error/--mean-error (a fixed --bits measures against the stored errors)")
    if params.get("bits") is None:
        raise ValueError("bits: required: --bits 8 or 4 for a fixed precision, or --max-error/--mean-error for the cheapest one meeting a target")
    bits, method = int(params["bits"]), params["method"]
    if method == "nf4" and bits != 4:
        raise ValueError(f"bits: nf4 is a 4-bit format, got --bits {bits}")
    info = get_method("quantize", method)
    kwargs = method_kwargs("quantize", method, params, _QUANT_FIXED)
    if any(p.name == "bits" for p in info.params):
        kwargs["bits"] = bits
    stages = StagedProgress(progress, {"load": 1, "quantize": 3, "save": 1})
    tick(stages.stage("load"), cancel, 0, 1, f"loading {params['subspace']}")
    sub = SharedSubspace.load(params["subspace"])

    def figures() -> dict[str, Any]:
        st = sub.compression_stats()
        disk = st["disk"] or {}
        return {"stored_bytes": st["stored_bytes"], "disk_bytes": disk.get("bytes"), "ratio": disk.get("ratio"),
                "mean_error": st["error"]["mean"], "max_error": st["error"]["max"]}

    before = figures()
    fid_before = sub.fidelity()
    assert info.func is not None
    info.func(sub, progress=stages.stage("quantize"), cancel=cancel, **kwargs)
    from ...subspace.rule import rule_text

    breaks = sub.target_breaks(fid_before)
    warnings = []
    if breaks:
        blamed = {t for b in breaks for t in b.tasks}
        now = figures()
        warnings.append(f"{bits}-bit {method} breaks the subspace's error target ({rule_text(sub.k_rule)}) in "
                        f"{len({b.module for b in breaks})} module(s) for {len(blamed)} task(s): ΔW error mean "
                        f"{before['mean_error']:.3g} → {now['mean_error']:.3g}, max "
                        f"{before['max_error']:.3g} → {now['max_error']:.3g}")
    tick(stages.stage("save"), cancel, 0, 1, f"writing {params['output']}")
    out = sub.save(params["output"], force=params["force"])
    stages.done()
    after = figures()
    return JobOutput(
        summary=(f"quantized {params['subspace']} to {bits}-bit {method} in {out}: {before['stored_bytes']} → "
                 f"{after['stored_bytes']} bytes, max ΔW error {before['max_error']:.3g} → {after['max_error']:.3g}"),
        outputs=[str(out)],
        data=QuantizeResult(path=str(out), quantization=sub.quantization, before=QuantizeFigures.from_dict(before),
                            after=QuantizeFigures.from_dict(after), target=sub.k_rule, warnings=warnings,
                            stats=SubspaceStats.from_dict(sub.compression_stats())).to_dict(),
    )


def _run_target(params: dict[str, Any], *, progress: ProgressFn | None, cancel: CancelLike | None) -> JobOutput:
    """Each module at the cheapest rank and precision meeting ``max_error``/``mean_error`` (see
    :mod:`engine.subspace.requantize`).

    data: as the fixed-precision form, with ``quantization`` ``{"method": "auto", "bits": None, "block_size",
    "max_error", "mean_error", "errors"}``, ``errors``: ``exact`` (measured against the original adapters
    given), ``bound`` (stored error + the change, never below the truth) or ``mixed``; ``tasks``: per task
    ``{"task_id", "before"/"after": {"mean", "max", "overall"}, "bytes_before", "bytes_after", "held",
    "error_is_bound"}`` (``overall``: over all its modules, weighted by ‖ΔW‖²; ``bytes``: its own
    coefficients as stored); ``held``: tasks over the target before, kept at their storage.
    """
    from ...subspace import SharedSubspace
    from ...subspace.requantize import check_targets

    if params.get("bits") is not None:
        raise ValueError("bits: give either --bits (a fixed precision) or --max-error/--mean-error (a target), not both")
    if params.get("method") not in (None, "symmetric"):
        raise ValueError(f"method: with an error target the precision is chosen (symmetric per block), not {params['method']!r}")
    check_targets(params.get("max_error"), params.get("mean_error"))
    unused = [k for k in ("double_quant", "quantize_loadings") if params.get(k)]
    if unused:
        raise ValueError(f"{unused[0]}: does not apply with an error target (every tensor's precision is chosen)")
    stages = StagedProgress(progress, {"load": 1, "quantize": 3, "save": 1})
    tick(stages.stage("load"), cancel, 0, 1, f"loading {params['subspace']}")
    sub = SharedSubspace.load(params["subspace"])
    adapters = None
    if params.get("adapters"):
        from ..common import load_adapters

        adapters = {a.name: a for a in load_adapters(params["adapters"], cancel=cancel)}
    before = _figures(sub)
    sub.quantize(max_error=params.get("max_error"), mean_error=params.get("mean_error"), adapters=adapters,
                 block_size=int(params.get("block_size") or 64), progress=stages.stage("quantize"), cancel=cancel)
    report = sub.last_quantize
    tick(stages.stage("save"), cancel, 0, 1, f"writing {params['output']}")
    out = sub.save(params["output"], force=params["force"])
    stages.done()
    after = _figures(sub)
    warnings = []
    if report["held"]:
        warnings.append(f"{len(report['held'])} task(s) over the target before quantizing kept their storage: "
                        + ", ".join(report["held"][:6]) + (" …" if len(report["held"]) > 6 else ""))
    how = {"exact": "measured against the original adapters", "bound": "upper bounds: stored error + change",
           "mixed": "exact where the original adapter was given, else upper bounds"}[report["errors"]]
    return JobOutput(
        summary=(f"quantized {params['subspace']} to the cheapest precision per module meeting "
                 f"{_target_words(params)} in {out}: {before['disk_bytes']} → {after['disk_bytes']} bytes on disk, "
                 f"max ΔW error {before['max_error']:.3g} → {after['max_error']:.3g} ({how})"),
        outputs=[str(out)],
        data=QuantizeResult(path=str(out), quantization=sub.quantization, before=QuantizeFigures.from_dict(before),
                            after=QuantizeFigures.from_dict(after), target=sub.k_rule, errors=report["errors"],
                            tasks=report["tasks"], held=report["held"], warnings=warnings,
                            stats=SubspaceStats.from_dict(sub.compression_stats())).to_dict(),
    )


def _target_words(params: dict[str, Any]) -> str:
    return " and ".join(f"{k} {params[k]:g}" + (" per task" if k == "mean_error" else "")
                        for k in ("max_error", "mean_error") if params.get(k) is not None)


def _figures(sub: Any) -> dict[str, Any]:
    st = sub.compression_stats()
    disk = st["disk"] or {}
    return {"stored_bytes": st["stored_bytes"], "disk_bytes": disk.get("bytes"), "ratio": disk.get("ratio"),
            "mean_error": st["error"]["mean"], "max_error": st["error"]["max"]}


KIND = JobKind(
    "quantize", "Quantize subspace", "quantize a subspace per block (int8, int4, NF4), or at the cheapest precision "
    "per module meeting --max-error/--mean-error, and save it",
    (
        Param("subspace", "path", required=True, help="saved subspace folder"),
        output_param("folder to write the quantized subspace into"),
        Param("bits", "choice", None, "bits per value (a fixed precision; or give --max-error/--mean-error)", (8, 4)),
        Param("max_error", "float", None, "instead of --bits: per module the cheapest rank and precision (fp16, "
              "int8…int3, nf4) with every task's ‖ΔW−ΔŴ‖/‖ΔW‖ ≤ this", minimum=0.0, maximum=0.999, exclusive_minimum=True),
        Param("mean_error", "float", None, "instead of --bits: the cheapest storage with each task's error over its "
              "modules (weighted by ‖ΔW‖²) ≤ this", minimum=0.0, maximum=0.999, exclusive_minimum=True),
        Param("adapters", "paths", None, "with a target: the original adapters, to measure errors exactly "
              "(else: stored error + change, an upper bound)"),
        Param("method", "choice", "symmetric", "quantization method", method_choices("quantize")),
        *method_params("quantize", _QUANT_FIXED),
        FORCE,
    ),
    writes=("output",), func=run_quantize,
    positionals=("subspace",), process=True, needs="subspace", form_rank=3, view="subspace_written", stderr_warnings=True,
    result=QuantizeResult,
)
