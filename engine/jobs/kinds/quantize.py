"""The ``quantize`` job kind: quantize a subspace's bases per block (int8, int4, NF4) and save it."""

from __future__ import annotations

from typing import Any

from ...progress import CancelLike, ProgressFn, StagedProgress, tick
from ...registry import Param
from ..base import JobKind, JobOutput
from ..params import FORCE, method_choices, method_kwargs, method_params, output_param


_QUANT_FIXED = ("subspace", "output", "method", "bits", "force")


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
        data={"path": str(out), "quantization": sub.quantization, "before": before, "after": after,
              "target": sub.k_rule, "warnings": warnings, "stats": sub.compression_stats()},
    )


KIND = JobKind(
    "quantize", "Quantize subspace", "quantize a subspace's bases per block (int8, int4, NF4) and save it",
    (
        Param("subspace", "path", required=True, help="saved subspace folder"),
        output_param("folder to write the quantized subspace into"),
        Param("bits", "choice", None, "bits per value", (8, 4), required=True),
        Param("method", "choice", "symmetric", "quantization method", method_choices("quantize")),
        *method_params("quantize", _QUANT_FIXED),
        FORCE,
    ),
    writes=("output",), func=run_quantize,
    positionals=("subspace",), process=True, needs="subspace", form_rank=3, view="subspace_written", stderr_warnings=True,
)
