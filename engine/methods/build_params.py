"""``BuildParams``: the parameters of a subspace build, checked once, and the default k rule.

Torch-free, so that the TUI's compress form and ``--batch`` check a build's parameters
before torch loads (as PEFT's ``LoraConfig`` checks its fields in ``__post_init__``).
:meth:`engine.subspace.SharedSubspace.from_adapters`, ``from_adapters_streaming`` and the
``compress`` job all build one.

The default k rule (when a build names none of ``num_components``, ``variance_threshold``,
``adaptive_k``, ``max_error``, ``mean_error``):

* a job (``--batch compress``, the TUI's form; :meth:`BuildParams.for_job`) promises
  fidelity: every task's ΔW error at most :data:`DEFAULT_MAX_ERROR`, with ``precision``
  ``auto`` (rank and precision chosen together) where the method and dtype allow it;
* Python (``from_adapters``) keeps the seed's meaning, forced by seed parity (the seed's own
  test suite, ``scripts/seed_parity.py``, calls ``from_adapters(adapters)`` and
  ``from_adapters(adapters, num_components=k)``): k explaining
  :data:`SEED_VARIANCE_THRESHOLD` of the variance, method ``pca`` unless a method or an
  error target is given, ``precision`` ``fp16``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

#: The job's k rule when none is given: a fidelity promise (relative ΔW error), not a variance share.
DEFAULT_MAX_ERROR = 0.05
#: The seed's default ``variance_threshold``, kept by ``from_adapters`` (see the module docstring).
SEED_VARIANCE_THRESHOLD = 0.6
#: The keys that make up a k rule.
K_RULE_KEYS = ("num_components", "variance_threshold", "adaptive_k", "max_error", "mean_error")
#: ``fp16``: every tensor at ``dtype``; ``auto``: with an error target, rank and precision chosen together.
PRECISIONS = ("fp16", "auto")
#: Storage dtype names and their aliases (a ``torch.dtype`` is read by its name).
DTYPE_NAMES = {"float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16",
               "bf16": "bfloat16", "float32": "float32", "fp32": "float32", "float": "float32",
               "float64": "float64"}


def dtype_name(dtype: Any) -> str:
    """``"float16"`` from ``"fp16"``, ``torch.float16``…; ``ValueError`` naming ``dtype`` otherwise."""
    text = str(dtype)
    if text.startswith("torch."):
        name = text.removeprefix("torch.")
        if name not in DTYPE_NAMES:
            raise ValueError(f"dtype: storage dtype must be a float type, got {text}")
        return DTYPE_NAMES[name]
    if text not in DTYPE_NAMES:
        raise ValueError(f"dtype: unknown storage dtype {dtype!r}; use float16, bfloat16 or float32")
    return DTYPE_NAMES[text]


def resolve_method(method: str | None, max_error: float | None, mean_error: float | None) -> str:
    """The method a build uses when ``method`` is not given.

    The seed's call, ``from_adapters(adapters, num_components=k)`` (or with
    ``variance_threshold``/``adaptive_k``), keeps the seed's meaning: ``pca`` of the
    flattened factors. With an error target (``max_error`` / ``mean_error``) the build is
    the default method (``joint``). Jobs always name the method.
    """
    if method is not None:
        return method
    from .compress import DEFAULT_COMPRESS_METHOD

    return DEFAULT_COMPRESS_METHOD if (max_error is not None or mean_error is not None) else "pca"


@dataclass(frozen=True)
class BuildParams:
    """What a subspace build depends on, checked in ``__post_init__`` (``ValueError`` naming the field).

    Attributes:
        method: A registered compression method (``joint``, ``share``, ``pca``, ``svd``); ``None``:
            :func:`resolve_method`.
        num_components: k for every module.
        variance_threshold: Share of variance (ΔW energy for joint) k must explain, in (0, 1].
        adaptive_k: Choose k per module by ``variance_threshold``.
        max_error: Per module the smallest k whose worst task error ‖ΔW−ΔŴ‖/‖ΔW‖ is at most this, in [0, 1).
        mean_error: The same for the mean error over tasks; with ``max_error`` k meets both.
        refine: Alternating refinement rounds of the joint basis (joint only).
        hybrid: With an error target, store a module per task when that is smaller (joint, share).
        sketch_rank: Width of the range sketch per module (joint, share): the largest k.
        dtype: Storage dtype name (``None``: float32 for pca, as the seed, else float16).
        precision: ``fp16`` or ``auto`` (joint, share, svd with dtype float16).
        block_size: Values per scale of the integer precisions (even, >= 2).
    """

    method: str | None = None
    num_components: int | None = None
    variance_threshold: float = SEED_VARIANCE_THRESHOLD
    adaptive_k: bool = False
    max_error: float | None = None
    mean_error: float | None = None
    refine: int = 1
    hybrid: bool = True
    sketch_rank: int = 256
    dtype: Any = None
    precision: str = "fp16"
    block_size: int = 64

    def __post_init__(self) -> None:
        from ..registry import methods

        method = resolve_method(self.method, self.max_error, self.mean_error)
        known = tuple(methods("compress"))
        if method not in known:
            raise ValueError(f"method: unknown compression method {method!r}; choose from {', '.join(known)}")
        object.__setattr__(self, "method", method)
        dtype = dtype_name(self.dtype if self.dtype is not None else ("float32" if method == "pca" else "float16"))
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "adaptive_k", bool(self.adaptive_k))
        object.__setattr__(self, "hybrid", bool(self.hybrid))
        problems: list[str] = []

        def number(name: str, ok: bool, want: str) -> None:
            value = getattr(self, name)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                problems.append(f"{name}: must be {want}, got {value!r}")

        n = self.num_components
        number("num_components", n is None or (_is_int(n) and n >= 1), ">= 1")
        v = self.variance_threshold
        number("variance_threshold", _is_num(v) and 0.0 < v <= 1.0, "in (0, 1]")
        for name in ("max_error", "mean_error"):
            e = getattr(self, name)
            number(name, e is None or (_is_num(e) and 0.0 <= e < 1.0), "in [0, 1)")
        number("refine", _is_int(self.refine) and self.refine >= 0, ">= 0")
        number("sketch_rank", _is_int(self.sketch_rank) and self.sketch_rank >= 1, ">= 1")
        number("block_size", _is_int(self.block_size) and self.block_size >= 2 and self.block_size % 2 == 0,
               "an even number >= 2")
        if self.precision not in PRECISIONS:
            problems.append(f"precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        elif self.precision == "auto" and method == "pca":
            problems.append("precision: 'auto' needs method joint, share or svd (pca stores its loadings at dtype)")
        elif self.precision == "auto" and dtype != "float16":
            problems.append(f"precision: 'auto' stores unquantised tensors at float16; got dtype {dtype} (use dtype float16)")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def for_job(cls, method: str, **given: Any) -> BuildParams:
        """The parameters of a job's build: ``given`` (``None`` = unset) plus the job's defaults.

        No k rule given: ``max_error`` = :data:`DEFAULT_MAX_ERROR`. No ``precision`` given:
        ``auto`` when there is an error target, the dtype is float16 and the method not pca
        (measured: 1.6–1.9× fewer bytes at the same target), else ``fp16``.
        """
        given = {k: v for k, v in given.items() if v is not None and not (k == "adaptive_k" and v is False)}
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{unknown[0]}: not a build parameter")
        if not given.keys() & set(K_RULE_KEYS):
            given["max_error"] = DEFAULT_MAX_ERROR
        if "precision" not in given and method != "pca":
            has_error_target = given.get("max_error") is not None or given.get("mean_error") is not None
            fp16 = dtype_name(given.get("dtype", "float16")) == "float16"
            given["precision"] = "auto" if has_error_target and fp16 else "fp16"
        return cls(method=method, **given)

    @classmethod
    def from_manifest(cls, method: str, params: dict[str, Any], dtype: Any) -> BuildParams:
        """The parameters a stored subspace was built with (its ``params``), to rebuild alike (``absorb``)."""
        names = {f.name for f in fields(cls)} - {"method", "dtype"}
        kept = {k: v for k, v in params.items() if k in names and v is not None}
        return cls(method=method, dtype=dtype, **kept)

    def manifest(self) -> dict[str, Any]:
        """The parameters a subspace stores (``SharedSubspace.params``, the manifest's ``params``)."""
        keys = ("num_components", "variance_threshold", "adaptive_k", "max_error", "mean_error", "refine", "hybrid",
                "sketch_rank", "precision", "block_size")
        out = {k: getattr(self, k) for k in keys}
        # mean_error per task over its modules where the build spends a budget (precision auto), else per module
        out["mean_over"] = "task" if self.precision == "auto" and self.method != "pca" else "module"
        return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) or (hasattr(v, "__index__") and not isinstance(v, (bool, float)))


def _is_num(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return not isinstance(v, (bool, str))
