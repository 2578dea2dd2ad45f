"""Parameters several job kinds share, and the method parameters a kind takes from the registry.

Torch-free: the TUI builds forms and ``--batch`` builds flags from these before torch loads.
"""

from __future__ import annotations

from typing import Any

from ..registry import Param


ADAPTERS = Param("adapters", "paths", required=True, help="adapter folders, parent folders of adapters, or hf://org/repo[@rev]")
FORCE = Param("force", "bool", default=False, help="overwrite an existing output")
EXCLUDE = Param("exclude", "strs", None, "leave out adapters whose folder name or path matches this glob pattern (repeatable)")


def output_param(help: str, required: bool = True) -> Param:
    """The ``output`` path parameter of a kind that writes one, with its own help."""
    return Param("output", "path", required=required, help=help)


#: Storage dtypes a job writes factors in.
STORAGE_DTYPES = ("float16", "bfloat16", "float32")


def method_params(kind: str, fixed: tuple[str, ...]) -> tuple[Param, ...]:
    """The union of the registered ``kind`` methods' parameters, as optional job parameters.

    Defaults differ between methods (``rank`` is ``exact`` for task arithmetic and
    ``auto`` for TIES), so each job parameter defaults to ``None``: the chosen
    method's own default applies, and its help names the methods it applies to.
    """
    from ..registry import methods

    seen: dict[str, Param] = {}
    used_by: dict[str, list[str]] = {}
    defaults: dict[str, dict[str, Any]] = {}
    for mname, info in methods(kind).items():
        for p in info.params:
            if p.name in fixed:
                continue
            used_by.setdefault(p.name, []).append(mname)
            defaults.setdefault(p.name, {})[mname] = p.default
            seen.setdefault(p.name, p)
    out = []
    for name, p in seen.items():
        who = used_by[name]
        text = p.help or ""
        shown = {m: d for m, d in defaults[name].items() if d is not None}
        if shown and len(set(map(repr, shown.values()))) == 1:
            text += f" (default {_show(next(iter(shown.values())))})"
        elif shown:
            text += " (default " + ", ".join(f"{_show(d)} for {m}" for m, d in shown.items()) + ")"
        if len(who) < len(methods(kind)):
            text += f" [{', '.join(who)}]"
        out.append(Param(p.name, p.type, None, text, p.choices, False, p.minimum, p.maximum, p.exclusive_minimum))
    return tuple(out)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def method_kwargs(kind: str, method: str, params: dict[str, Any], fixed: tuple[str, ...]) -> dict[str, Any]:
    """Keyword arguments for ``method`` from the job parameters; refuse ones it does not take.

    A parameter left unset gets the method's own registered default (the job's merged
    parameter defaults to ``None`` because methods disagree on it).
    """
    from ..registry import get_method

    info = get_method(kind, method)
    accepted = {p.name: p for p in info.params}
    kwargs: dict[str, Any] = {}
    for name, value in params.items():
        if name in fixed or value is None:
            continue
        if name not in accepted:
            raise ValueError(f"{name}: does not apply to {kind} method {method!r} (it takes {', '.join(accepted) or 'no parameters'})")
        kwargs[name] = accepted[name].validate(value)
    for name, p in accepted.items():  # unset: the method's own registered default (nf4 double-quantizes)
        if name not in fixed and name not in kwargs and p.default is not None:
            kwargs[name] = p.default
    return kwargs


def export_target() -> Param:
    from ..io.targets import EXPORT_TARGETS

    return Param("target", "choice", None, "what to write for: portable (default; the same ΔW in PEFT, vLLM and TGI), "
                 "peft (as is: rank/alpha patterns and heads kept), vllm/tgi/ollama (portable, heads dropped; "
                 "ollama: integer alpha, no rsLoRA)", EXPORT_TARGETS)


def check_targets() -> tuple[str, ...]:
    from ..io.targets import CHECK_TARGETS

    return CHECK_TARGETS


def method_choices(kind: str) -> tuple[str, ...]:
    """Registered method names of ``kind``."""
    from ..registry import methods

    return tuple(methods(kind))


def default_compress_method() -> str:
    from ..methods.compress import DEFAULT_COMPRESS_METHOD

    return DEFAULT_COMPRESS_METHOD
