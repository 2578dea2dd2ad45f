"""The ``compare`` job kind: output fidelity of a subspace's tasks against their original adapters on a real model."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ...progress import CancelLike, ProgressFn, tick
from ...registry import Param
from ..base import JobKind, JobOutput
from ..params import ADAPTERS, EXCLUDE
from ..results import Result, optional


@dataclass(frozen=True)
class CompareInputs(Result):
    """The inputs both sides ran on: ``source`` (``prompts``, ``built-in``, ``random``; ``data`` without adapters),
    whether a tokenizer encoded them, rows and valid tokens; ``labelled`` (without adapters): labels for accuracy."""

    source: str = ""
    tokenizer: bool = False
    rows: int = 0
    tokens: int = 0
    labelled: bool | None = optional()


@dataclass(frozen=True)
class FidelityRow(Result):
    """One task: its original adapter (PEFT) vs its reconstruction from the subspace.

    ``kl_*``: KL(original ‖ reconstruction) over ``positions`` (tokens, or examples for a classifier);
    ``ppl_*``: a causal LM only (``None`` there when no position has a next token).
    """

    task_id: str = ""
    adapter: str = ""
    kl_mean: float = 0.0
    kl_max: float = 0.0
    top1_agreement: float = 0.0
    positions: int = 0
    ppl_original: float | None = None
    ppl_reconstructed: float | None = None
    ppl_change: float | None = None
    delta_w_error: float | None = None


@dataclass(frozen=True)
class BaseChangeRow(Result):
    """One task vs ``reference`` (the base model, or it with the task's stored head): KL(task ‖ reference),
    top-1 agreement; ``ppl_*`` for a causal LM; ``accuracy_*`` with labelled data."""

    task_id: str = ""
    reference: str = ""
    kl_mean: float = 0.0
    kl_max: float = 0.0
    top1_agreement: float = 0.0
    positions: int = 0
    ppl_base: float | None = None
    ppl_task: float | None = None
    ppl_change: float | None = None
    accuracy_before: float | None = None
    accuracy_task: float | None = None


def _shaped(d: dict[str, Any], drop: tuple[str, ...]) -> dict[str, Any]:
    """``d`` with each task row's ``drop`` keys left out (columns the task type or inputs do not have)."""
    if drop:
        d["tasks"] = [{k: v for k, v in row.items() if k not in drop} for row in d["tasks"]]
    return d


_PPL_FIDELITY = ("ppl_original", "ppl_reconstructed", "ppl_change")
_PPL_BASE = ("ppl_base", "ppl_task", "ppl_change")
_ACCURACY = ("accuracy_before", "accuracy_task")


@dataclass(frozen=True)
class CompareResult(Result):
    """``compare`` with adapters: per task, original adapter vs reconstruction on the same inputs.

    The rows' ``ppl_*`` keys are in :meth:`to_dict` for a causal LM only (there even when ``None``).
    """

    subspace: str = ""
    base_model: str = ""
    task_type: str = ""
    inputs: CompareInputs = field(default_factory=CompareInputs)
    notes: list[str] = field(default_factory=list)
    mixed_batch: bool = False
    tasks: list[FidelityRow] = field(default_factory=list)
    mode: str = "adapters"

    def to_dict(self) -> dict[str, Any]:
        return _shaped(super().to_dict(), () if self.task_type == "CAUSAL_LM" else _PPL_FIDELITY)


@dataclass(frozen=True)
class BaseCompareResult(Result):
    """``compare`` without adapters: per task, how far it moves the base model's outputs.

    The rows' ``ppl_*`` keys are in :meth:`to_dict` for a causal LM only, ``accuracy_*`` with labelled inputs only.
    """

    mode: str = "base"
    subspace: str = ""
    base_model: str = ""
    task_type: str = ""
    inputs: CompareInputs = field(default_factory=CompareInputs)
    notes: list[str] = field(default_factory=list)
    tasks: list[BaseChangeRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        drop = (() if self.task_type == "CAUSAL_LM" else _PPL_BASE) + (() if self.inputs.labelled else _ACCURACY)
        return _shaped(super().to_dict(), drop)


class Compared:
    """The ``compare`` kind's result: :class:`CompareResult`, or :class:`BaseCompareResult` (``mode`` ``"base"``)."""

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> CompareResult | BaseCompareResult:
        return (BaseCompareResult if d.get("mode") == "base" else CompareResult).from_dict(d)

#: Rows of one mixed batch of reconstructions (tasks are grouped whole into batches of about this many rows).
MIXED_ROWS = 64
#: Random inputs when the base model folder has no tokenizer and no prompts are given: rows × tokens, seed.
RANDOM_INPUTS = (8, 16, 0)


def model_inputs(base_dir: Any, texts: list[str] | None, tok: Any, vocab: int, max_length: int, notes: list[str],
                 what: str) -> tuple[Any, Any, bool]:
    """``(input ids, attention mask, random)`` for ``texts`` (default: the built-in prompts).

    With no tokenizer the texts are encoded as UTF-8 bytes; with neither tokenizer nor texts,
    :data:`RANDOM_INPUTS` rows of seeded random token ids stand in (``random``). Each fallback adds a
    line to ``notes`` (``what``: how the texts are called there).
    """
    import torch

    from ..basemodel import DEFAULT_PROMPTS, encode

    if tok is None and texts is None:
        rows, length, seed = RANDOM_INPUTS
        ids = torch.randint(1, max(2, vocab), (rows, length), generator=torch.Generator().manual_seed(seed))
        notes.append(f"{base_dir} has no tokenizer: {rows} rows of {length} random token ids (seed {seed}) stand in for prompts")
        return ids, torch.ones_like(ids), True
    if tok is None:
        notes.append(f"{base_dir} has no tokenizer: the {what} are encoded as UTF-8 bytes")
    ids, mask = encode(list(texts or DEFAULT_PROMPTS), tok, vocab, max_length)
    return ids, mask, False


def _adapter_task_type(folder: Path) -> str | None:
    cfg = (folder.parent if folder.suffix == ".safetensors" else folder) / "adapter_config.json"
    try:
        value = json.loads(cfg.read_text(encoding="utf-8")).get("task_type")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


def _prompts(path: str) -> list[str]:
    """Prompts from a text file (one a line) or a JSONL file (a ``text`` field per line)."""
    from ..basemodel import read_jsonl

    p = Path(path)
    if p.suffix == ".jsonl":
        return [r["text"] for r in read_jsonl(p, ("text",), "prompts")]
    if not p.is_file():
        raise ValueError(f"prompts: {p}: no such file")
    try:
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"prompts: {p}: not readable as UTF-8 text ({exc})") from exc
    if not lines:
        raise ValueError(f"prompts: {p}: no prompts (one a line)")
    return lines


def _head_tensors(template: Any, model: Any) -> dict[str, Any]:
    """A task's ``modules_to_save`` tensors (a classifier head) under the base model's own names."""
    if template is None or not template.extra_tensors:
        return {}
    own = model.state_dict()
    out = {}
    for key, t in template.extra_tensors.items():
        name = key.removeprefix("base_model.model.")
        parts = name.split(".")
        if "modules_to_save" in parts:  # score.modules_to_save.default.weight -> score.weight
            i = parts.index("modules_to_save")
            parts = parts[:i] + parts[i + 2:]
            name = ".".join(parts)
        if name in own and tuple(own[name].shape) == tuple(t.shape):
            out[name] = t
    return out


def _metrics(ref: Any, rec: Any, ids: Any, mask: Any, causal: bool, per_token: bool) -> dict[str, Any]:
    """KL(original ‖ reconstruction) and top-1 agreement over the valid positions; perplexities for a causal LM."""
    import torch

    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(rec.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)
    agree = (ref.argmax(-1) == rec.argmax(-1)).double()
    if per_token:
        valid = mask.bool()
        kl, agree = kl[valid], agree[valid]
    out: dict[str, Any] = {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1_agreement": float(agree.mean()),
                           "positions": int(kl.numel())}
    if causal:
        nxt = ids[:, 1:]
        valid = (mask[:, 1:] * mask[:, :-1]).bool()

        def ppl(logp: Any) -> float | None:
            if not valid.any():
                return None
            nll = -logp[:, :-1].gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
            return float(torch.exp(nll[valid].mean()))

        po, pr = ppl(lp), ppl(lq)
        out.update(ppl_original=po, ppl_reconstructed=pr,
                   ppl_change=(pr / po - 1.0) if po and pr is not None else None)
    return out


def run_compare(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Run each original adapter (PEFT) and its reconstruction from the subspace (``VLoRAModel``) on the same inputs.

    The base model is loaded from a local folder with transformers as the adapters'
    ``task_type`` says (``CAUSAL_LM``, ``SEQ_CLS``, ``TOKEN_CLS``), else as its config's
    architecture says. Inputs: ``prompts`` (a text file, one prompt a line, or JSONL
    with ``text``), else a built-in set; tokenized by the model folder's tokenizer, or,
    without one, UTF-8 bytes for given prompts and random token ids (fixed seed) for
    the default. The reconstructions of all tasks run as mixed batches (one task per
    row); tasks with their own head (``modules_to_save``) run one at a time with it.

    Per task: KL(original ‖ reconstruction) of the output distributions, mean and max over
    tokens (causal LM, token classification) or examples (sequence classification), top-1
    agreement, and for a causal LM the perplexity of the prompts under each and its
    relative change (``ppl_reconstructed / ppl_original − 1``).

    data: :class:`CompareResult` (its ``to_dict``); without adapters :class:`BaseCompareResult`.
    """
    import torch

    from ...errors import UnknownTaskError
    from ...inference import VLoRAModel
    from ...subspace import SharedSubspace
    from ..basemodel import (check_model_dir, load_base_model, load_tokenizer, quiet,
                             require_transformers, task_type_of, vocab_size)
    from ..common import resolve_local_paths

    base_dir = check_model_dir(params["base_model"])
    require_transformers("compare")
    if not params["adapters"]:
        from .compare_base import run_compare_base

        return run_compare_base(params, base_dir, progress=progress, cancel=cancel)
    if params.get("data") or params.get("tasks"):
        raise ValueError("data, tasks: for the base-vs-task mode, given without ADAPTERS (with adapters: --prompts, --task-ids)")
    max_length = params["max_length"]
    texts = _prompts(params["prompts"]) if params["prompts"] else None
    pairs = resolve_local_paths(list(params["adapters"]), exclude=params["exclude"])
    ids_given = params["task_ids"]
    task_ids = list(ids_given) if ids_given else [n for n, _ in pairs]
    if len(task_ids) != len(pairs):
        raise ValueError(f"task_ids: got {len(task_ids)} id(s) for {len(pairs)} adapter(s)")
    n_steps = len(pairs) + 3
    tick(progress, cancel, 0, n_steps, f"loading {params['subspace']}")
    sub = SharedSubspace.load(params["subspace"])
    missing = [t for t in task_ids if t not in sub.tasks]
    if missing:
        raise UnknownTaskError(f"{params['subspace']}: holds no task {missing[0]!r} (it holds {', '.join(sub.task_ids)}); "
                               "name the adapters' tasks with --task-ids")
    task_type = task_type_of(base_dir, [_adapter_task_type(f) for _, f in pairs])
    tick(progress, cancel, 1, n_steps, f"loading {base_dir} ({task_type})")
    model = load_base_model(base_dir, task_type, "compare")
    tok = load_tokenizer(base_dir)
    vocab = vocab_size(model)
    notes: list[str] = []
    ids, mask, random_ids = model_inputs(base_dir, texts, tok, vocab, max_length, notes, "prompts")
    source = "random" if random_ids else ("prompts" if texts is not None else "built-in")
    if task_type == "SEQ_CLS" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = int(tok.pad_token_id) if tok is not None and tok.pad_token_id is not None else 0
    causal, per_token = task_type == "CAUSAL_LM", task_type != "SEQ_CLS"

    from peft import PeftModel

    ref: dict[str, Any] = {}
    for i, (t, (_, folder)) in enumerate(zip(task_ids, pairs)):
        tick(progress, cancel, 2 + i, n_steps, f"{t}: original adapter (PEFT)")
        with quiet():
            pm = PeftModel.from_pretrained(model, str(folder.parent if folder.suffix == ".safetensors" else folder))
            pm.eval()
            with torch.no_grad():
                ref[t] = pm(input_ids=ids, attention_mask=mask).logits.float()
            model = pm.unload()  # the base model as it was, LoRA layers (and wrapped heads) removed

    tick(progress, cancel, 2 + len(pairs), n_steps, f"reconstructions of {len(task_ids)} task(s) from the subspace")
    vm = VLoRAModel(model, sub, strict=True)
    rec: dict[str, Any] = {}
    heads = {t: _head_tensors(sub.tasks[t].template, model) for t in task_ids}
    mixed = [t for t in task_ids if not heads[t]]
    n = ids.shape[0]
    per_batch = max(1, MIXED_ROWS // n)
    with torch.no_grad():
        for start in range(0, len(mixed), per_batch):
            group = mixed[start:start + per_batch]
            rows = [t for t in group for _ in range(n)]
            out = vm(input_ids=ids.repeat(len(group), 1), attention_mask=mask.repeat(len(group), 1), task_ids=rows).logits
            for j, t in enumerate(group):
                rec[t] = out[j * n:(j + 1) * n].float()
            tick(None, cancel, 0, 1)
        own = model.state_dict()
        for t in [t for t in task_ids if heads[t]]:
            saved = {k: own[k].clone() for k in heads[t]}
            model.load_state_dict({k: v.to(own[k].dtype) for k, v in heads[t].items()}, strict=False)
            try:
                rec[t] = vm(input_ids=ids, attention_mask=mask, task_ids=[t] * n).logits.float()
            finally:
                model.load_state_dict(saved, strict=False)
            tick(None, cancel, 0, 1)
    vm.unwrap()
    if any(heads.values()):
        notes.append("tasks with their own head (modules_to_save) ran one at a time, the head swapped in")
    tasks = []
    for t, (_, folder) in zip(task_ids, pairs):
        m = _metrics(ref[t], rec[t], ids, mask, causal, per_token)
        tasks.append(FidelityRow.from_dict({"task_id": t, "adapter": str(folder), **m, "delta_w_error": sub.tasks[t].mean_error}))
    tick(progress, cancel, n_steps, n_steps, "done")
    worst = max(tasks, key=lambda r: r.kl_mean)
    summary = (f"compared {len(tasks)} task(s) on {ids.shape[0]} input(s) ({task_type}): KL mean "
               f"{sum(r.kl_mean for r in tasks) / len(tasks):.3g}, worst {worst.task_id} {worst.kl_mean:.3g}; "
               f"top-1 agreement min {min(r.top1_agreement for r in tasks):.3f}")
    result = CompareResult(subspace=str(params["subspace"]), base_model=str(base_dir), task_type=task_type,
                           inputs=CompareInputs(source, tok is not None, int(ids.shape[0]), int(mask.sum())),
                           notes=notes, mixed_batch=bool(mixed), tasks=tasks)
    return JobOutput(summary=summary, data=result.to_dict())


KIND = JobKind(
    "compare", "Compare outputs", "run each original adapter and its reconstruction on a base model: KL, top-1, perplexity",
    (
        Param("subspace", "path", required=True, help="saved subspace folder"),
        replace(ADAPTERS, required=False, help=ADAPTERS.help + "; none: compare each task with the base model"),
        Param("base_model", "path", required=True, help="local folder of the base model (transformers save_pretrained)"),
        Param("prompts", "path", None, "text file, one prompt a line (or JSONL with 'text'); default: a built-in set"),
        Param("task_ids", "strs", None, "the subspace's task of each adapter, in order (default: folder names)"),
        Param("tasks", "strs", None, "without ADAPTERS: the tasks to compare with the base model (default: all)"),
        Param("data", "path", None, "without ADAPTERS: JSONL inputs ('text', and 'label' for a classifier's accuracy)"),
        EXCLUDE,
        Param("max_length", "int", 64, "tokens per prompt at most", minimum=2),
    ),
    func=run_compare, positionals=("subspace", "adapters"), process=True, needs="subspace", form_rank=11, view="compare",
    result=Compared,
)
