"""A subspace's k rule (the error target it was built with) and how a change measures up to it.

``max_error`` bounds every task's error in every module. ``mean_error`` is met
*per task over its modules* (``mean_over="task"``, builds with precision ``auto``):
task i's overall relative error ``sqrt(Σ_m e²_{i,m}‖ΔW_{i,m}‖² / Σ_m ‖ΔW_{i,m}‖²)``
(:mod:`engine.subspace.budget`); older manifests and fp16/pca builds record
``mean_over="module"``: per module, the mean of the tasks' errors in it;
``num_components`` and the variance rule fix k and set no error target. A change
(absorbing, projecting, quantizing) *breaks* the target where a rule that held
before no longer holds, or where a rule broken before gets worse; a new task
breaks it where it alone does not meet it. Errors are relative ΔW errors; a
tolerance of twice the storage dtype's epsilon absorbs the rounding that every
stored error carries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

#: The keys of the build parameters that make up the k rule.
RULE_KEYS = ("max_error", "mean_error", "num_components", "variance_threshold", "adaptive_k")
#: Defaults of the build parameters absent from an older manifest.
PARAM_DEFAULTS: dict[str, Any] = {"num_components": None, "variance_threshold": 0.6, "adaptive_k": False,
                                  "max_error": None, "mean_error": None, "refine": 1, "hybrid": True, "sketch_rank": 256,
                                  "precision": "fp16", "block_size": 64, "mean_over": "module"}


def k_rule(params: dict[str, Any]) -> dict[str, Any]:
    """The rule in ``params`` as ``{"rule", "max_error", "mean_error", "num_components", "variance_threshold", "inferred"}``.

    ``rule`` is ``max_error``, ``mean_error``, ``max_error+mean_error``, ``num_components`` or ``variance``.
    """
    mx, mn = params.get("max_error"), params.get("mean_error")
    if mx is not None or mn is not None:
        name = "+".join(n for n, v in (("max_error", mx), ("mean_error", mn)) if v is not None)
    elif params.get("num_components") is not None and not params.get("adaptive_k"):
        name = "num_components"
    else:
        name = "variance"
    return {"rule": name, "max_error": mx, "mean_error": mn, "mean_over": params.get("mean_over") or "module",
            "num_components": params.get("num_components"),
            "variance_threshold": params.get("variance_threshold"), "inferred": bool(params.get("k_rule_inferred", False))}


def complete_params(params: dict[str, Any] | None, fidelity: dict[str, dict[str, float]], k_max: int) -> dict[str, Any]:
    """Build parameters with every key present; a manifest that stores no k rule gets one inferred.

    Inferred: ``max_error`` = the worst error stored (every task meets it, and a change
    may not make any task worse than that), or, with no error known, ``num_components``
    = the largest k stored. ``k_rule_inferred`` marks it.
    """
    out = dict(params or {})
    known = any(k in out for k in RULE_KEYS)
    for k, v in PARAM_DEFAULTS.items():
        out.setdefault(k, v)
    if not known:
        errs = [e for f in fidelity.values() for e in f.values() if math.isfinite(e)]
        if errs:
            out["max_error"] = min(0.999, float(f"{max(errs):.7g}"))
        elif k_max > 0:
            out["num_components"] = k_max
        out["k_rule_inferred"] = True
    return out


def tolerance(dtype: torch.dtype) -> float:
    """How far a measured error may pass a target from rounding to ``dtype`` alone."""
    return 2.0 * float(torch.finfo(dtype).eps) + 1e-6


@dataclass
class RuleBreak:
    """One module where a change breaks the target.

    Attributes:
        module: The module.
        rule: ``max_error`` or ``mean_error``.
        limit: The target.
        before: The module's value before (max or mean over tasks; ``None`` if it had no tasks).
        after: The same after the change.
        tasks: The tasks to blame: over ``max_error`` now, or whose error rose (``mean_error``).
    """

    module: str
    rule: str
    limit: float
    before: float | None
    after: float
    tasks: list[str] = field(default_factory=list)


def _finite(vals: list[float]) -> list[float]:
    return [v for v in vals if math.isfinite(v)]


def task_error(f: dict[str, float], norms: dict[str, float] | None) -> float:
    """A task's overall relative error over its modules: ``sqrt(Σ e²‖ΔW‖² / Σ ‖ΔW‖²)`` (unknown errors left out)."""
    num = den = 0.0
    for m, e in f.items():
        if math.isfinite(e):
            w = (norms or {}).get(m, 1.0) ** 2
            num += e * e * w
            den += w
    return math.sqrt(num / den) if den > 0 else 0.0


def _task_mean_breaks(mn: float, before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                      tol: float, norms: dict[str, dict[str, float]] | None) -> list[RuleBreak]:
    out = []
    for t, f in after.items():
        a = task_error(f, (norms or {}).get(t))
        b = task_error(before[t], (norms or {}).get(t)) if t in before else None
        if a > mn + tol and (b is None or b <= mn + tol or a > b + tol):
            out.append(RuleBreak("(all modules)", "mean_error", mn, b, a, [t]))
    return out


def rule_breaks(rule: dict[str, Any], before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                tol: float, norms: dict[str, dict[str, float]] | None = None) -> list[RuleBreak]:
    """Where ``after`` breaks ``rule`` that ``before`` met (or breaks it worse); unknown (NaN) errors are not judged.

    ``norms``: task → module → ‖ΔW‖ (weights of a per-task ``mean_error``; equal weights without).
    """
    out: list[RuleBreak] = []
    mx, mn = rule.get("max_error"), rule.get("mean_error")
    if mn is not None and rule.get("mean_over") == "task":
        out += _task_mean_breaks(mn, before, after, tol, norms)
        mn = None
    if mx is None and mn is None:
        return out
    mods = sorted({m for f in after.values() for m in f})
    for m in mods:
        if mx is not None:
            bad: list[str] = []
            for t, f in after.items():
                e = f.get(m, math.nan)
                if not e > mx + tol:
                    continue
                b = before.get(t, {}).get(m)
                if b is None or b <= mx + tol or e > b + tol:
                    bad.append(t)
            if bad:
                prev = _finite([f[m] for f in before.values() if m in f])
                out.append(RuleBreak(m, "max_error", mx, max(prev) if prev else None,
                                     max(_finite([f[m] for f in after.values() if m in f])), bad))
        if mn is not None:
            now = _finite([f[m] for f in after.values() if m in f])
            prev = _finite([f[m] for f in before.values() if m in f])
            a = sum(now) / len(now) if now else 0.0
            b = sum(prev) / len(prev) if prev else None
            if a > mn + tol and (b is None or b <= mn + tol or a > b + tol):
                rose = [(f[m] - before.get(t, {}).get(m, 0.0), t) for t, f in after.items()
                        if m in f and math.isfinite(f[m]) and (t not in before or f[m] > before[t].get(m, 0.0) + tol)]
                out.append(RuleBreak(m, "mean_error", mn, b, a, [t for _, t in sorted(rose, reverse=True)]))
    return out


def _task_figures(f: dict[str, float] | None) -> dict[str, float] | None:
    if f is None:
        return None
    v = list(f.values())
    return {"mean": float(sum(v) / len(v)) if v else 0.0, "max": float(max(v)) if v else 0.0}


def change_report(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], breaks: list[RuleBreak],
                  bound: dict[str, bool] | None = None) -> list[dict[str, Any]]:
    """Every task's error before → after: ``[{"task_id", "before": {mean, max}|None, "after": {mean, max},
    "error_is_bound", "breaks_target"}]`` (``before`` is ``None`` for a new task)."""
    blamed = {t for b in breaks for t in b.tasks}
    return [{"task_id": t, "before": _task_figures(before.get(t)), "after": _task_figures(f),
             "error_is_bound": bool((bound or {}).get(t, False)), "breaks_target": t in blamed}
            for t, f in after.items()]


def totals(fidelity: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean and max over every task's every module."""
    v = _finite([e for f in fidelity.values() for e in f.values()])
    return {"mean": float(sum(v) / len(v)) if v else 0.0, "max": float(max(v)) if v else 0.0}


def rule_text(rule: dict[str, Any]) -> str:
    """``max_error 0.1``, ``mean_error 0.05``, ``num_components 4``, ``variance 0.6`` (``(inferred)`` when so)."""
    parts = [f"{k} {rule[k]:g}" + (" per task" if k == "mean_error" and rule.get("mean_over") == "task" else "")
             for k in ("max_error", "mean_error") if rule.get(k) is not None]
    if not parts:
        parts = ([f"num_components {rule['num_components']}"] if rule["rule"] == "num_components"
                 else [f"variance {rule.get('variance_threshold') or 0.6:g}"])
    return ", ".join(parts) + (" (inferred)" if rule.get("inferred") else "")


def breaks_message(what: str, rule: dict[str, Any], breaks: list[RuleBreak], before: dict[str, dict[str, float]],
                   after: dict[str, dict[str, float]], limit: int = 6) -> str:
    """One line: ``<what> would break the error target (max_error 0.1) for 2 task(s): a (max 0.09 → 0.13), b (new, max 0.2)``."""
    tasks: list[str] = []
    for b in breaks:
        tasks += [t for t in b.tasks if t not in tasks]
    shown = []
    for t in tasks[:limit]:
        a = _task_figures(after[t])
        p = _task_figures(before.get(t))
        assert a is not None
        shown.append(f"{t} (new, mean {a['mean']:.3g} max {a['max']:.3g})" if p is None else
                     f"{t} (mean {p['mean']:.3g} → {a['mean']:.3g}, max {p['max']:.3g} → {a['max']:.3g})")
    more = f" and {len(tasks) - limit} more" if len(tasks) > limit else ""
    mods = sorted({b.module for b in breaks})
    return (f"{what} would break the subspace's error target ({rule_text(rule)}) in {len(mods)} module(s), e.g. "
            f"'{mods[0]}', for {len(tasks)} task(s): {', '.join(shown)}{more}")
