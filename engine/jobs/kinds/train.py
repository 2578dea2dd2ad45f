"""The ``train`` job kind: train a new task inside a saved subspace on JSONL data, write the grown subspace."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from ...progress import CancelLike, Progress, ProgressFn, check_cancel, tick
from ...registry import Param
from ..base import JobKind, JobOutput
from ..params import FORCE, output_param
from ..reports import TaskReport, task_report
from ..results import Result


@dataclass(frozen=True)
class EvalFigures(Result):
    """Held-out loss (per ``HeldOut.unit``) and a classifier's accuracy (``None`` for a causal LM)."""

    loss: float | None = None
    accuracy: float | None = None


@dataclass(frozen=True)
class HeldOut(Result):
    """The held-out rows (not trained on): their figures before → after training, and what each side is."""

    examples: int = 0
    fraction: float = 0.0
    unit: str = "example"
    before: EvalFigures = field(default_factory=EvalFigures)
    after: EvalFigures = field(default_factory=EvalFigures)
    before_is: str = ""
    after_is: str = ""


@dataclass(frozen=True)
class TrainResult(Result):
    """``train``: the grown subspace written, the run (steps, losses, ``seconds``), the task's ΔW errors
    (``task``), the held-out figures (``eval``; ``None`` when no row is held out) and ``labels`` (a classifier:
    label → class id; ``None`` for a causal LM)."""

    path: str = ""
    subspace: str = ""
    task_id: str = ""
    task_type: str = ""
    base_model: str = ""
    examples: int = 0
    train_examples: int = 0
    tokenizer: bool = False
    labels: dict[str, int] | None = None
    steps: int = 0
    lr: float = 0.0
    num_expand: int = 0
    batch_size: int = 0
    losses: list[float] = field(default_factory=list)
    loss_first: float | None = None
    loss_last: float | None = None
    trainable_params: int = 0
    seconds: float = 0.0
    resumed: bool = False
    task: TaskReport = field(default_factory=TaskReport)
    num_tasks: int = 0
    eval: HeldOut | None = None

#: Task types the ``train`` job trains.
TRAIN_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")


def _labels(rows: list[dict[str, Any]], field: str, num_labels: int, path: str) -> tuple[list[int], dict[str, int]]:
    """Class ids of the rows: integer labels as they are, string labels numbered in sorted order."""
    values = [r[field] for r in rows]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        bad = next((v for v in values if not 0 <= v < num_labels), None)
        if bad is not None:
            raise ValueError(f"data: {path}: label {bad} is outside the base model's {num_labels} classes (0…{num_labels - 1})")
        return list(values), {str(v): v for v in sorted(set(values))}
    names = sorted({str(v) for v in values})
    if len(names) > num_labels:
        raise ValueError(f"data: {path}: {len(names)} distinct labels ({', '.join(names[:4])}…) but the base model has "
                         f"{num_labels} classes")
    index = {n: i for i, n in enumerate(names)}
    return [index[str(v)] for v in values], index


def split_eval(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train rows, held-out rows)``: a seeded permutation, ``round(n·fraction)`` rows held out (at least one when
    ``fraction > 0``, none when fewer than 2 rows), both sorted."""
    import torch

    k = min(n - 1, max(1, round(n * fraction))) if fraction > 0 and n >= 2 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


def run_train(params: dict[str, Any], *, progress: ProgressFn | None = None, cancel: CancelLike | None = None) -> JobOutput:
    """Train a task's coefficients inside a saved subspace (``SubspaceTrainer`` through ``VLoRAModel``) and save the result.

    The base model loads from a local folder with transformers, as a causal LM or a
    sequence classifier (its ``architectures``, else the subspace tasks' ``task_type``).
    Data: JSONL, one object a line: ``text_field`` for a causal LM (next-token loss on the
    text), ``text_field`` and ``label_field`` for a classifier (integer class ids, or
    strings numbered in sorted order). Tokenized by the model folder's tokenizer, or,
    without one, as UTF-8 bytes folded into the vocabulary. ``eval_fraction`` of the rows
    (a seeded split) is held out: the task does not train on them, and the data reports the
    held-out loss (and a classifier's accuracy) before and after: "before" is where training
    starts (the base model, the initial head and the task's initial update, zero for a new task),
    "after" the task as written back (served from the subspace, its stored head included). Every step reports its loss
    (``Progress.value``). The subspace with the new task (and, with ``num_expand``, the
    grown bases) is written to ``output`` through a temporary folder: the input subspace
    is never modified, and a cancelled job writes nothing.

    data: :class:`TrainResult` (its ``to_dict``).
    """
    import torch

    from ...errors import VloraError
    from ...io.scan import validate_task_id
    from ...subspace import SharedSubspace
    from ...training import SubspaceTrainer
    from ...training.evaluate import evaluate
    from ..basemodel import (check_model_dir, encode, load_base_model, load_tokenizer, read_jsonl, require_transformers,
                             task_type_of, vocab_size)

    task_id = validate_task_id(params["task_id"])
    base_dir = check_model_dir(params["base_model"])
    text_field, label_field = params["text_field"], params["label_field"]
    steps, batch_size, max_length = params["steps"], params["batch_size"], params["max_length"]
    total = steps + 2
    tick(progress, cancel, 0, total, f"loading {params['subspace']}")
    sub = SharedSubspace.load(params["subspace"])
    resumed = task_id in sub.tasks
    task_type = task_type_of(base_dir, [p.template.metadata.get("task_type") if p.template is not None else None
                                        for p in sub.tasks.values()])
    if task_type not in TRAIN_TASK_TYPES:
        raise ValueError(f"base_model: {base_dir}: a {task_type} model; train runs {' and '.join(TRAIN_TASK_TYPES)}")
    classify = task_type == "SEQ_CLS"
    rows = read_jsonl(params["data"], (text_field, label_field) if classify else (text_field,))
    require_transformers("train")
    tick(progress, cancel, 0, total, f"loading {base_dir} ({task_type})")
    model = load_base_model(base_dir, task_type, "train")
    tok = load_tokenizer(base_dir)
    vocab = vocab_size(model)
    texts = [str(r[text_field]) for r in rows]
    label_ids, label_map = (None, None)
    if classify:
        label_ids, label_map = _labels(rows, label_field, int(model.config.num_labels), str(params["data"]))
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = int(tok.pad_token_id) if tok is not None and tok.pad_token_id is not None else 0

    train_rows, eval_rows = split_eval(len(texts), params["eval_fraction"], params["seed"])

    def eval_batches() -> Any:
        for j in range(0, len(eval_rows), batch_size):
            chunk = eval_rows[j:j + batch_size]
            ids, mask = encode([texts[i] for i in chunk], tok, vocab, max_length)
            labels = (torch.tensor([label_ids[i] for i in chunk], dtype=torch.long)  # type: ignore[index]
                      if classify else ids.masked_fill(mask == 0, -100))
            yield {"input_ids": ids, "attention_mask": mask, "labels": labels}

    torch.manual_seed(params["seed"])
    trainer = SubspaceTrainer(sub, task_id, lr=params["lr"], num_expand=params["num_expand"], model=model,
                              seed=params["seed"], init_if_missing=True)
    vm = trainer.model
    before = trainer.evaluate(eval_batches(), classify=classify) if eval_rows else None
    vm.train()
    gen = torch.Generator().manual_seed(params["seed"])
    order: list[int] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        check_cancel(cancel)
        while len(order) < batch_size:  # a fresh shuffle per pass over the data
            order += [train_rows[i] for i in torch.randperm(len(train_rows), generator=gen).tolist()]
        batch, order = order[:batch_size], order[batch_size:]
        ids, mask = encode([texts[i] for i in batch], tok, vocab, max_length)
        if classify:
            labels = torch.tensor([label_ids[i] for i in batch], dtype=torch.long)  # type: ignore[index]
        else:
            labels = ids.masked_fill(mask == 0, -100)
        loss = trainer.step(vm(input_ids=ids, attention_mask=mask, labels=labels).loss)
        if not math.isfinite(loss):
            raise VloraError(f"the loss became {loss} at step {step + 1}; try a smaller --lr", title="Training diverged")
        losses.append(loss)
        check_cancel(cancel)
        if progress is not None:
            progress(Progress(step + 1, total, f"step {step + 1}/{steps} loss {loss:.4g}", value=loss))
    seconds = time.perf_counter() - t0
    vm.eval()
    trainer.write_back()
    after = None
    if eval_rows:
        vm.detach_trainable()
        vm.set_task(task_id)  # the task as stored (rounded to the subspace's precision), its stored head included
        after = evaluate(vm, eval_batches(), classify=classify)
    vm.unwrap()
    tick(progress, cancel, steps + 1, total, f"writing {params['output']}")
    out = sub.save(params["output"], force=params["force"])
    tick(progress, cancel, total, total, "done")
    task = task_report(sub, task_id)
    held = None
    if before is not None and after is not None:
        held = HeldOut(examples=len(eval_rows), fraction=params["eval_fraction"],
                       unit="example" if classify else "predicted token",
                       before=EvalFigures(before["loss"], before["accuracy"]), after=EvalFigures(after["loss"], after["accuracy"]),
                       before_is=("the stored task before training" if resumed else "the base model with a zero update")
                       + (" and the initial head" if classify else ""),
                       after_is="the task as written back to the subspace" + (" with its stored head" if trainer.num_head_params else ""))
    held_txt = ""
    if held is not None:
        held_txt = f"; held-out ({len(eval_rows)}) loss {held.before.loss:.4g} → {held.after.loss:.4g}"
        if classify:
            held_txt += f", accuracy {held.before.accuracy:.3f} → {held.after.accuracy:.3f}"
    result = TrainResult(
        path=str(out), subspace=str(params["subspace"]), task_id=task_id, task_type=task_type, base_model=str(base_dir),
        examples=len(rows), train_examples=len(train_rows), tokenizer=tok is not None, labels=label_map, steps=steps,
        lr=params["lr"], num_expand=params["num_expand"], batch_size=batch_size, losses=losses, loss_first=losses[0],
        loss_last=losses[-1], trainable_params=trainer.num_trainable_params, seconds=seconds, resumed=resumed, task=task,
        num_tasks=len(sub.tasks), eval=held)
    return JobOutput(
        summary=(f"trained {task_id!r} for {steps} steps ({trainer.num_trainable_params} trainable numbers): loss "
                 f"{losses[0]:.4g} → {losses[-1]:.4g}{held_txt}; wrote {out} ({len(sub.tasks)} tasks)"),
        outputs=[str(out)],
        data=result.to_dict(),
    )


KIND = JobKind(
    "train", "Train task", "train a new task inside a saved subspace on JSONL data (only its coefficients learn)",
    (
        Param("subspace", "path", required=True, help="saved subspace folder (not modified)"),
        Param("task_id", "str", required=True, help="id of the task to train (a stored one trains on from where it is)"),
        Param("base_model", "path", required=True, help="local folder of the base model (transformers save_pretrained)"),
        Param("data", "path", required=True, help="JSONL file, one example a line"),
        output_param("folder to write the subspace with the trained task into"),
        Param("text_field", "str", "text", "the JSONL field holding the text"),
        Param("label_field", "str", "label", "the JSONL field holding the class (sequence classification)"),
        Param("steps", "int", 100, "optimizer steps", minimum=1),
        Param("lr", "float", 1e-3, "learning rate", minimum=0.0, exclusive_minimum=True),
        Param("num_expand", "int", 0, "new directions per side of each shared module, orthogonal to its basis", minimum=0),
        Param("batch_size", "int", 8, "examples per step", minimum=1),
        Param("max_length", "int", 128, "tokens per example at most", minimum=2),
        Param("seed", "int", 0, "seed of the data order, the held-out split and the new task's initialisation"),
        Param("eval_fraction", "float", 0.1, "share of the rows held out to report loss (and accuracy) before → after training",
              minimum=0.0, maximum=0.9),
        FORCE,
    ),
    writes=("output",), func=run_train, view="trained",
    positionals=("subspace",), process=True, needs="subspace", form_rank=12, result=TrainResult,
)
