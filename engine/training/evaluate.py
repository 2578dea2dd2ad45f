"""Held-out loss and accuracy of a model, before and after training a task (the ``train`` job and the benchmarks)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch


def evaluate(model: Any, batches: Iterable[Mapping[str, Any]], *, classify: bool) -> dict[str, Any]:
    """Mean cross-entropy over held-out batches, and for a classifier the accuracy, with no gradients.

    Each batch is the model's keyword arguments (``input_ids``, ``attention_mask``, …)
    plus ``labels``: class ids for a classifier (``classify=True``: loss and accuracy per
    example), else next-token targets with ``-100`` where there is none (loss per
    predicted token, as a causal LM's ``.loss`` averages, but over all batches at once).
    The model runs in eval mode (its mode is restored afterwards).

    Returns:
        ``{"loss", "accuracy" (None for a causal LM), "count"}`` (examples, or predicted tokens).
    """
    was_training = bool(getattr(model, "training", False))
    model.eval()
    total, count, right = 0.0, 0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                kw = {k: v for k, v in batch.items() if k != "labels"}
                labels = batch["labels"]
                logits = model(**kw).logits.double()
                if classify:
                    total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
                    right += int((logits.argmax(-1) == labels).sum())
                    count += int(labels.numel())
                else:
                    tgt = labels[:, 1:]
                    total += float(torch.nn.functional.cross_entropy(
                        logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="sum"))
                    count += int((tgt != -100).sum())
    finally:
        if was_training:
            model.train()
    return {"loss": total / count if count else None, "accuracy": (right / count if count else None) if classify else None,
            "count": count}
