"""Which adapters can share a basis: the check on loaded adapters, and sets and outliers from headers.

:func:`check_compatible` checks loaded adapters before any math;
:func:`partition_compatible` and :func:`incompatible_with_majority` work on
headers too (torch-free), for mixed folders and for the Collection screen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import IncompatibleAdaptersError
from ..types import LoRAWeights


@dataclass
class CompatibilityReport:
    """Result of :func:`check_compatible`."""

    modules: list[str]
    shapes: dict[str, tuple[int, int]]
    ranks: dict[str, list[int]] = field(default_factory=dict)  # module -> rank per adapter
    base_model: str | None = None
    mixed_ranks: bool = False
    warnings: list[str] = field(default_factory=list)


def _label(a: LoRAWeights, i: int) -> str:
    return a.name or a.source or f"adapter #{i}"


@dataclass(frozen=True)
class _Facts:
    """What the compatibility checks read of one adapter: from its tensors or from its header."""

    label: str
    base_model: str | None
    modules: list[str]
    shapes: dict[str, tuple[int, int]]
    ranks: dict[str, int]


def _facts(item: Any, i: int) -> _Facts:
    """The facts of a ``LoRAWeights``, an ``AdapterSummary`` or an adapter path (header and config only)."""
    from ..types import AdapterSummary
    from .header import read_adapter_summary

    if isinstance(item, (str, Path)):
        label = str(item)
        item = read_adapter_summary(item)
    else:
        label = ""
    if isinstance(item, AdapterSummary):
        return _Facts(label or Path(item.path).name, item.base_model, [m.name for m in item.modules],
                      {m.name: (int(m.out_features), int(m.in_features)) for m in item.modules},
                      {m.name: int(m.rank) for m in item.modules})
    if isinstance(item, LoRAWeights):
        return _Facts(_label(item, i), item.base_model_name_or_path, list(item.layer_names),
                      {m: item.shapes(m) for m in item.layer_names}, {m: item.module_rank(m) for m in item.layer_names})
    raise TypeError(f"expected LoRAWeights, AdapterSummary or an adapter path, got {type(item).__name__}")


def check_compatible(adapters: Sequence[Any], *, allow_mixed_ranks: bool = True) -> CompatibilityReport:
    """Check that adapters can share a basis: same base model, modules and shapes.

    The one check for adapters in memory and for adapter folders (``from_adapters_streaming``):
    ``adapters`` are :class:`~engine.types.LoRAWeights`, or paths / ``AdapterSummary`` read
    from their headers and configs only (no tensors). Different ranks are reported
    (``mixed_ranks``) and refused only when ``allow_mixed_ranks`` is false.

    Raises:
        IncompatibleAdaptersError: naming the first adapter and module that differ.
        AdapterFormatError: an unreadable path.
        ValueError: empty input.
    """
    if not adapters:
        raise ValueError("no adapters given")
    facts = [_facts(a, i) for i, a in enumerate(adapters)]
    ref = facts[0]
    problems: list[str] = []
    bases = {f.base_model for f in facts if f.base_model}
    if len(bases) > 1:
        problems.append("different base models: " + ", ".join(sorted(bases)))
    ref_set = set(ref.modules)
    shapes = dict(ref.shapes)
    ranks: dict[str, list[int]] = {m: [] for m in ref.modules}
    for f in facts:
        s = set(f.modules)
        if s != ref_set:
            missing, added = sorted(ref_set - s), sorted(s - ref_set)
            detail = []
            if missing:
                detail.append(f"lacks {len(missing)} module(s) of {ref.label}, e.g. '{missing[0]}'")
            if added:
                detail.append(f"has {len(added)} module(s) {ref.label} lacks, e.g. '{added[0]}'")
            problems.append(f"{f.label} " + " and ".join(detail))
            continue
        for m in ref.modules:
            if f.shapes[m] != shapes[m]:
                problems.append(f"{f.label}: module '{m}' has shape {f.shapes[m]}, {ref.label} has {shapes[m]}")
                break
            ranks[m].append(f.ranks[m])
    if problems:
        raise IncompatibleAdaptersError("; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else ""))
    mixed = any(len(set(v)) > 1 for v in ranks.values())
    report = CompatibilityReport(
        modules=list(ref.modules), shapes=shapes, ranks=ranks, base_model=next(iter(bases), None), mixed_ranks=mixed
    )
    if mixed:
        rset = sorted({r for v in ranks.values() for r in v})
        msg = f"adapters have different ranks ({', '.join(map(str, rset))})"
        if not allow_mixed_ranks:
            raise IncompatibleAdaptersError(msg + "; this operation needs one rank")
        report.warnings.append(msg)
    return report


# -- mixed folders: which adapters go together ------------------------------------


@dataclass(frozen=True)
class CompatibleSet:
    """Adapters that can share a basis: same base model (or none named), modules and shapes.

    Attributes:
        name: A folder-safe name from the modules' suffixes, e.g. ``q_proj+v_proj``
            (``-2``, ``-3``… when two sets target the same suffixes).
        members: The adapters' names, in input order.
        indices: Their positions in the input.
        modules: Module → ``(out_features, in_features)``.
        base_model: The base model the members name, if any.
    """

    name: str
    members: list[str]
    indices: list[int]
    modules: dict[str, tuple[int, int]]
    base_model: str | None = None

    @property
    def target_modules(self) -> list[str]:
        """The modules' last name parts (``q_proj``, ``v_proj``…), sorted."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules})

    def describe(self, *, base_model: bool = False) -> str:
        """One line: ``[q_proj+v_proj] 4 modules (q_proj, v_proj): a, b`` (``base_model``: with the base model)."""
        base = f", base model {self.base_model or '(not named)'}" if base_model else ""
        return f"[{self.name}] {len(self.modules)} modules ({', '.join(self.target_modules)}){base}: {', '.join(self.members)}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: name, members, indices, target_modules, num_modules, modules {name: [out, in]}, base_model."""
        return {"name": self.name, "members": list(self.members), "indices": list(self.indices),
                "target_modules": self.target_modules, "num_modules": len(self.modules),
                "modules": {m: list(s) for m, s in self.modules.items()}, "base_model": self.base_model}


def _module_shapes(item: Any) -> tuple[str, str | None, dict[str, tuple[int, int]]]:
    """``(name, base model, {module: (out, in)})`` of a LoRAWeights, an AdapterSummary or a path."""
    from ..types import AdapterSummary
    from .header import read_adapter_summary

    if isinstance(item, (str, Path)):
        item = read_adapter_summary(item)
    if isinstance(item, AdapterSummary):
        return (Path(item.path).name, item.base_model,
                {m.name: (int(m.out_features), int(m.in_features)) for m in item.modules})
    if isinstance(item, LoRAWeights):
        return item.name or item.source or "adapter", item.base_model_name_or_path, {m: item.shapes(m) for m in item.layer_names}
    raise TypeError(f"partition_compatible: expected LoRAWeights, AdapterSummary or a path, got {type(item).__name__}")


def _set_name(suffixes: list[str], taken: set[str]) -> str:
    raw = "+".join(suffixes) or "set"
    base = "".join(c if c.isalnum() or c in "._+-" else "_" for c in raw).strip("._") or "set"
    if len(base) > 100:
        base = "set"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}-{k}"
    taken.add(name)
    return name


def _partition(facts: list[tuple[str, str | None, dict[str, tuple[int, int]]]]) -> list[CompatibleSet]:
    """The compatible sets of ``(name, base model, {module: (out, in)})`` facts, largest first."""
    groups: dict[tuple[Any, str | None], list[int]] = {}
    for i, (_, base, mods) in enumerate(facts):
        groups.setdefault((tuple(sorted(mods.items())), base or None), []).append(i)
    # unnamed base model: joins the one named set with the same modules, if exactly one
    for key in [k for k in groups if k[1] is None]:
        named = [k for k in groups if k[0] == key[0] and k[1] is not None]
        if len(named) == 1:
            groups[named[0]] = sorted(groups[named[0]] + groups.pop(key))
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))
    taken: set[str] = set()
    out = []
    for (mods, base), idx in ordered:
        shapes = dict(mods)
        suffixes = sorted({m.rsplit(".", 1)[-1] for m in shapes})
        out.append(CompatibleSet(name=_set_name(suffixes, taken), members=[facts[i][0] for i in idx], indices=list(idx),
                                 modules=shapes, base_model=base))
    return out


def _named(facts: list[tuple[str, str | None, dict[str, tuple[int, int]]]],
           names: Sequence[str] | None) -> list[tuple[str, str | None, dict[str, tuple[int, int]]]]:
    if names is None:
        return facts
    if len(names) != len(facts):
        raise ValueError(f"names: got {len(names)} name(s) for {len(facts)} adapter(s)")
    return [(str(n), b, m) for n, (_, b, m) in zip(names, facts)]


def partition_compatible(adapters: Sequence[Any], names: Sequence[str] | None = None) -> list[CompatibleSet]:
    """Split adapters into sets that :func:`check_compatible` accepts together.

    Two adapters go together when they have the same modules with the same shapes
    and do not name different base models (ranks may differ). An adapter naming
    no base model joins the set of the same modules whose members name one, when
    there is exactly one such set. Torch-free when given summaries or paths.

    Args:
        adapters: :class:`~engine.types.LoRAWeights`, :class:`~engine.types.AdapterSummary`
            (from :func:`engine.io.header.read_adapter_summary`, header only) or adapter paths.
        names: Display names, one per adapter (default: each adapter's name or folder name).

    Returns:
        The sets, largest first (ties: by first member's position); one set when
        everything is compatible.

    Raises:
        ValueError: ``names`` of the wrong length. AdapterFormatError: an unreadable path.
    """
    return _partition(_named([_module_shapes(a) for a in adapters], names))


def _difference(mods: dict[str, tuple[int, int]], base: str | None, ref: CompatibleSet) -> str | None:
    """Why an adapter's modules/base model keep it out of ``ref`` (None: nothing does)."""
    missing = sorted(set(ref.modules) - set(mods))
    extra = sorted(set(mods) - set(ref.modules))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks {len(missing)} module(s), e.g. {missing[0]}")
        if extra:
            parts.append(f"has {len(extra)} other module(s), e.g. {extra[0]}")
        return "; ".join(parts)
    for name in sorted(ref.modules):
        if mods[name] != ref.modules[name]:
            (o, i), (ro, ri) = mods[name], ref.modules[name]
            return f"{name} is {o}×{i} (the others: {ro}×{ri})"
    if base and ref.base_model and base != ref.base_model:
        return f"base model {base} (the others: {ref.base_model})"
    return None


def incompatible_with_majority(adapters: Sequence[Any], names: Sequence[str] | None = None) -> dict[str, str]:
    """Name → why that adapter cannot share a basis with the rest, in input order.

    "The rest" is the largest set of :func:`partition_compatible` (ties: the one
    seen first). An adapter that cannot be read is always listed
    (``cannot read: …``); one that names no base model but has the rest's modules
    and shapes belongs with them. Torch-free when given summaries or paths (the
    Collection screen marks adapters with it at start-up).

    Args:
        adapters: As for :func:`partition_compatible`.
        names: The keys of the result, one per adapter (default: each adapter's name).

    Raises:
        ValueError: ``names`` of the wrong length.
    """
    if names is not None and len(names) != len(adapters):
        raise ValueError(f"names: got {len(names)} name(s) for {len(adapters)} adapter(s)")
    found: dict[int, str] = {}
    facts: list[tuple[str, str | None, dict[str, tuple[int, int]]]] = []
    where: list[int] = []
    for i, item in enumerate(adapters):
        label = str(names[i]) if names is not None else str(item)
        try:
            _, base, mods = _module_shapes(item)
        except Exception as exc:  # an unreadable adapter is reported, never raised: the others are still compared
            found[i] = f"cannot read: {exc}"
            continue
        facts.append((label, base, mods))
        where.append(i)
    if facts:
        sets = _partition(facts)
        for s in sets[1:]:
            for j in s.indices:
                why = _difference(facts[j][2], facts[j][1], sets[0])
                if why is not None:
                    found[where[j]] = why
    label_of = (lambda i: str(names[i])) if names is not None else (lambda i: _label_any(adapters[i]))
    return {label_of(i): found[i] for i in sorted(found)}


def _label_any(item: Any) -> str:
    if isinstance(item, LoRAWeights):
        return item.name or item.source or "adapter"
    return str(getattr(item, "path", item))


def describe_sets(sets: Sequence[CompatibleSet]) -> str:
    """The sets on one line: ``2 sets: [q_proj+v_proj] 4 modules (…): a, b; [k_proj+…] …``.

    Base models are named when the sets do not all have the same one.
    """
    bases = len({s.base_model for s in sets}) > 1
    return f"{len(sets)} sets: " + "; ".join(s.describe(base_model=bases) for s in sets)


@dataclass(frozen=True)
class ModuleOverlap:
    """The modules every adapter has (same shape), and what each adapter has beyond them.

    Attributes:
        modules: Modules in every adapter with one shape, sorted.
        left_out: Adapter name → its modules not in ``modules`` (only adapters with some).
    """

    modules: list[str]
    left_out: dict[str, list[str]]

    @property
    def complete(self) -> bool:
        """True when no adapter has a module the others lack."""
        return not self.left_out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``compared_modules`` and ``left_out`` {adapter: [module…]}."""
        return {"compared_modules": list(self.modules), "left_out": {k: list(v) for k, v in self.left_out.items()}}


def common_modules(adapters: Sequence[LoRAWeights]) -> ModuleOverlap:
    """Modules that every adapter has with the same shape, for comparing mixed adapters on what they share.

    Use :func:`engine.subspace.common.restrict_modules` to cut adapters down to
    ``modules``; ``left_out`` says what that leaves out, per adapter.

    Raises:
        IncompatibleAdaptersError: no module is shared by all adapters (the
            message lists the compatible sets). ValueError: no adapters.
    """
    if not adapters:
        raise ValueError("no adapters given")
    shared: dict[str, tuple[int, int]] | None = None
    for a in adapters:
        mine = {m: a.shapes(m) for m in a.layer_names}
        shared = mine if shared is None else {m: s for m, s in shared.items() if mine.get(m) == s}
    assert shared is not None
    modules = sorted(shared)
    if not modules:
        raise IncompatibleAdaptersError(
            "no module is in every adapter with the same shape; " + describe_sets(partition_compatible(adapters))
            + "; choose adapters with --exclude PATTERN"
        )
    left = {_label(a, i): [m for m in a.layer_names if m not in shared] for i, a in enumerate(adapters)}
    return ModuleOverlap(modules=modules, left_out={k: v for k, v in left.items() if v})
