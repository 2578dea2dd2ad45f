"""The ``compare`` job without adapters: how far each task of a subspace moves a base model's outputs.

For tasks trained in the subspace (no original adapter to compare with), or to see what
each task does at all: per task, KL(task ‖ base) and top-1 agreement with the base, for a
causal LM the perplexity base → task, and for a classifier with labelled ``data`` the
accuracy before → task. A task that stores its own head (``modules_to_save``) is compared
with the base model carrying that head and no update ("before"): the base model's own head
is untrained for the task, so an accuracy or KL against it would say nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...progress import CancelLike, ProgressFn, tick
from ..base import JobOutput

#: What a task is compared with.
REF_BASE = "the base model"
REF_HEAD = "the base model with the task's stored head, no update"


def run_compare_base(params: dict[str, Any], base_dir: Path, *, progress: ProgressFn | None = None,
                     cancel: CancelLike | None = None) -> JobOutput:
    """Each task (``tasks``, default all) against the base model on the same inputs (see the module docstring).

    data: :class:`engine.jobs.kinds.compare.BaseCompareResult` (its ``to_dict``).
    """
    import torch

    from ...errors import UnknownTaskError
    from ...inference import VLoRAModel
    from ...subspace import SharedSubspace
    from ..basemodel import (load_base_model, load_tokenizer, read_jsonl, task_type_of,
                             vocab_size)
    from .compare import BaseChangeRow, BaseCompareResult, CompareInputs, _head_tensors, _metrics, _prompts, model_inputs
    from .train import _labels

    if params.get("data") and params.get("prompts"):
        raise ValueError("data, prompts: give one of them")
    if params.get("task_ids"):
        raise ValueError("task_ids: names the task of each adapter; without ADAPTERS use --tasks")
    tick(progress, cancel, 0, 3, f"loading {params['subspace']}")
    sub = SharedSubspace.load(params["subspace"])
    tasks = list(params.get("tasks") or sub.task_ids)
    missing = [t for t in tasks if t not in sub.tasks]
    if missing:
        raise UnknownTaskError(f"{params['subspace']}: holds no task {missing[0]!r} (it holds {', '.join(sub.task_ids)})")
    rows = read_jsonl(params["data"], ("text",)) if params.get("data") else None
    texts = [str(r["text"]) for r in rows] if rows is not None else (_prompts(params["prompts"]) if params["prompts"] else None)
    task_type = task_type_of(base_dir, [sub.tasks[t].template.metadata.get("task_type")
                                        if sub.tasks[t].template is not None else None for t in tasks])
    tick(progress, cancel, 1, 3, f"loading {base_dir} ({task_type})")
    model = load_base_model(base_dir, task_type, "compare")
    tok = load_tokenizer(base_dir)
    vocab = vocab_size(model)
    notes: list[str] = []
    ids, mask, random_ids = model_inputs(base_dir, texts, tok, vocab, params["max_length"], notes, "inputs")
    source = "random" if random_ids else ("data" if rows is not None else ("prompts" if texts is not None else "built-in"))
    classify = task_type == "SEQ_CLS"
    labels = None
    if classify:
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = int(tok.pad_token_id) if tok is not None and tok.pad_token_id is not None else 0
        if rows is not None and all("label" in r for r in rows):
            labels = torch.tensor(_labels(rows, "label", int(model.config.num_labels), str(params["data"]))[0])
    causal, per_token = task_type == "CAUSAL_LM", task_type != "SEQ_CLS"

    vm = VLoRAModel(model, sub, strict=True).eval()
    own = model.state_dict()
    out = []
    with torch.no_grad():
        plain = vm(input_ids=ids, attention_mask=mask).logits.float()
        for i, t in enumerate(tasks):
            tick(progress, cancel, 2, 3, f"{t} vs the base model ({i + 1}/{len(tasks)})")
            head = _head_tensors(sub.tasks[t].template, model) if classify else {}
            ref = plain
            if head:  # before = the task's own head on the base model, no update
                saved = {k: own[k].clone() for k in head}
                model.load_state_dict({k: v.to(own[k].dtype) for k, v in head.items()}, strict=False)
                try:
                    ref = vm(input_ids=ids, attention_mask=mask).logits.float()
                finally:
                    model.load_state_dict(saved, strict=False)
            got = vm(input_ids=ids, attention_mask=mask, task_ids=[t] * ids.shape[0]).logits.float()
            m = _metrics(got, ref, ids, mask, causal, per_token)  # KL(task ‖ reference)
            row: dict[str, Any] = {"task_id": t, "reference": REF_HEAD if head else REF_BASE,
                                   **{k: m[k] for k in ("kl_mean", "kl_max", "top1_agreement", "positions")}}
            if causal:
                row.update(ppl_base=m["ppl_reconstructed"], ppl_task=m["ppl_original"],
                           ppl_change=(m["ppl_original"] / m["ppl_reconstructed"] - 1.0)
                           if m["ppl_original"] is not None and m["ppl_reconstructed"] else None)
            if labels is not None:
                row.update(accuracy_before=float((ref.argmax(-1) == labels).double().mean()),
                           accuracy_task=float((got.argmax(-1) == labels).double().mean()))
            out.append(BaseChangeRow.from_dict(row))
    vm.unwrap()
    if any(r.reference == REF_HEAD for r in out):
        notes.append(f"tasks with their own head (modules_to_save) are compared with {REF_HEAD} ('before'), "
                     "not with the base model's own head")
    if classify and labels is None:
        notes.append("no labels (a 'label' field in --data): no accuracy")
    tick(progress, cancel, 3, 3, "done")
    far = max(out, key=lambda r: r.kl_mean)
    summary = (f"compared {len(out)} task(s) with the base model on {ids.shape[0]} input(s) ({task_type}): KL(task ‖ base) "
               f"mean {sum(r.kl_mean for r in out) / len(out):.3g}, largest {far.task_id} {far.kl_mean:.3g}")
    inputs = CompareInputs(source, tok is not None, int(ids.shape[0]), int(mask.sum()), labels is not None)
    result = BaseCompareResult(subspace=str(params["subspace"]), base_model=str(base_dir), task_type=task_type,
                               inputs=inputs, notes=notes, tasks=out)
    return JobOutput(summary=summary, data=result.to_dict())
