"""Which adapters of a collection cannot share a basis with the rest (header only, torch-free).

An adapter is compatible with the majority when it has the same base model and the
same modules with the same shapes; ranks may differ. ``engine`` may grow a function
that partitions adapters into compatible sets; until then the TUI reads headers here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

Signature = tuple[str | None, tuple[tuple[str, int, int], ...]]


def summary_signature(summary: Any) -> Signature:
    """``(base model, ((module, out, in), …))`` of an ``AdapterSummary``."""
    modules = tuple(sorted((m.name, int(m.out_features), int(m.in_features)) for m in summary.modules))
    return (summary.base_model or None, modules)


def read_signature(spec: str) -> Signature | str:
    """The signature of a local adapter, or a one-line reason it cannot be read."""
    from engine.io.header import read_adapter_summary

    try:
        return summary_signature(read_adapter_summary(Path(spec)))
    except Exception as exc:  # a broken adapter is reported, never raised into the UI
        return f"cannot read: {exc}"


def _most_common(values: list[Any]) -> Any:
    """The most common value; ties go to the one seen first."""
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def incompatible(signatures: dict[str, Signature | str]) -> dict[str, str]:
    """Spec → why it differs from the majority (same modules and shapes, same base model where both name one).

    Specs whose signature is unknown (``hf://`` not yet downloaded) are left out by
    the caller; an unreadable adapter (a ``str`` reason) is always incompatible.
    """
    readable = {s: sig for s, sig in signatures.items() if not isinstance(sig, str)}
    out = {s: sig for s, sig in signatures.items() if isinstance(sig, str)}
    if not readable:
        return out
    modules = _most_common([mods for _, mods in readable.values()])
    bases = [b for b, mods in readable.values() if mods == modules and b]
    base = _most_common(bases) if bases else None
    shapes = {name: (o, i) for name, o, i in modules}
    for spec, (b, mods) in readable.items():
        theirs = {name: (o, i) for name, o, i in mods}
        missing = sorted(set(shapes) - set(theirs))
        extra = sorted(set(theirs) - set(shapes))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} module(s), e.g. {missing[0]}")
            if extra:
                parts.append(f"has {len(extra)} other module(s), e.g. {extra[0]}")
            out[spec] = "; ".join(parts)
        elif mods != modules:
            name = next(n for n in sorted(shapes) if theirs[n] != shapes[n])
            (o, i), (mo, mi) = theirs[name], shapes[name]
            out[spec] = f"{name} is {o}×{i} (the others: {mo}×{mi})"
        elif b and base and b != base:
            out[spec] = f"base model {b} (the others: {base})"
    return out
