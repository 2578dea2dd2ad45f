"""Renderers of the jobs that run a base model: ``compare`` (output fidelity) and ``train`` (a task trained in a subspace)."""

from __future__ import annotations

from typing import Any

from engine.jobs.kinds.compare import BaseCompareResult, CompareInputs, CompareResult
from engine.jobs.kinds.train import TrainResult

from .base import Block, fmt, renderer


def _pct(v: Any) -> str:
    return f"{v:+.2%}" if isinstance(v, (int, float)) else "-"


def _inputs_line(i: CompareInputs) -> str:
    return f"{i.rows} {i.source} ({i.tokens} tokens)"


def _render_compare_base(r: BaseCompareResult) -> list[Block]:
    causal = r.task_type == "CAUSAL_LM"
    acc = r.inputs.labelled
    kv = [("subspace", r.subspace), ("base model", r.base_model), ("task type", r.task_type), ("inputs", _inputs_line(r.inputs))]
    cols = ["task", "compared with", "KL(task ‖ base) mean", "KL max", "top-1 = base",
            *(["ppl base", "ppl task", "ppl change"] if causal else []), *(["accuracy before", "accuracy task"] if acc else [])]
    rows = [[t.task_id, t.reference, t.kl_mean, t.kl_max, f"{t.top1_agreement:.3f}",
             *([t.ppl_base, t.ppl_task, _pct(t.ppl_change)] if causal else []),
             *([f"{t.accuracy_before:.3f}", f"{t.accuracy_task:.3f}"] if acc else [])] for t in r.tasks]
    blocks: list[Block] = [("kv", "Output change: each task vs the base model", kv), ("table", "Per task", cols, rows)]
    if r.notes:
        blocks.append(("lines", "Notes", [f"- {n}" for n in r.notes]))
    return blocks


@renderer("compare")
def _render_compare(r: CompareResult | BaseCompareResult) -> list[Block]:
    if isinstance(r, BaseCompareResult):
        return _render_compare_base(r)
    causal = r.task_type == "CAUSAL_LM"
    kv = [("subspace", r.subspace), ("base model", r.base_model), ("task type", r.task_type),
          ("inputs", _inputs_line(r.inputs)), ("mixed batch", r.mixed_batch)]
    cols = ["task", "KL mean", "KL max", "top-1 agreement", *(["ppl original", "ppl ours", "ppl change"] if causal else []),
            "ΔW error"]
    rows = [[t.task_id, t.kl_mean, t.kl_max, f"{t.top1_agreement:.3f}",
             *([t.ppl_original, t.ppl_reconstructed, _pct(t.ppl_change)] if causal else []), t.delta_w_error]
            for t in r.tasks]
    blocks: list[Block] = [("kv", "Output fidelity: original adapter (PEFT) vs reconstruction (subspace)", kv),
                           ("table", "Per task (KL(original ‖ ours) over " + ("tokens" if r.task_type != "SEQ_CLS" else "examples") + ")",
                            cols, rows)]
    if r.notes:
        blocks.append(("lines", "Notes", [f"- {n}" for n in r.notes]))
    return blocks


def loss_sparkline(losses: list[float], width: int = 40) -> str:
    """The loss curve as one line of block characters (min → max), ``width`` points at most."""
    if not losses:
        return "-"
    step = max(1, len(losses) // width)
    pts = [sum(losses[i:i + step]) / len(losses[i:i + step]) for i in range(0, len(losses), step)]
    lo, hi = min(pts), max(pts)
    bars = "▁▂▃▄▅▆▇█"
    return "".join(bars[0 if hi == lo else round((p - lo) / (hi - lo) * (len(bars) - 1))] for p in pts)


@renderer("train")
def _render_train(r: TrainResult) -> list[Block]:
    t = r.task
    kv = [("path", r.path), ("task", r.task_id + (" (trained on)" if r.resumed else " (new)")),
          ("task type", r.task_type), ("base model", r.base_model),
          ("examples", f"{r.examples}" + ("" if r.tokenizer else " (no tokenizer: UTF-8 bytes)")),
          ("steps", r.steps), ("lr", r.lr), ("batch size", r.batch_size), ("num_expand", r.num_expand),
          ("trainable numbers", r.trainable_params), ("seconds", f"{r.seconds:.1f}"),
          ("loss", f"{fmt(r.loss_first)} → {fmt(r.loss_last)}"), ("loss curve", loss_sparkline(r.losses)),
          ("ΔW error (stored vs trained)", f"mean {fmt(t.mean_error)}, max {fmt(t.max_error)}"),
          ("tasks now", r.num_tasks)]
    if r.labels:
        kv.append(("labels", ", ".join(f"{k}={v}" for k, v in r.labels.items())))
    blocks: list[Block] = [("kv", "Task trained", kv)]
    ev = r.eval
    if ev:
        rows = [["loss (per " + ev.unit + ")", fmt(ev.before.loss), fmt(ev.after.loss)]]
        if ev.before.accuracy is not None:
            rows.append(["accuracy", f"{ev.before.accuracy:.3f}", f"{ev.after.accuracy:.3f}"])
        blocks.append(("table", f"Held out ({ev.examples} examples, not trained on): before → after",
                       ["metric", "before", "after"], rows))
        blocks.append(("lines", "Before / after", [f"- before: {ev.before_is}", f"- after: {ev.after_is}"]))
    return blocks
