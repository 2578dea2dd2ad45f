"""The seed's state-dict helpers: ``parse_state_dict`` and ``stack_lora_weights``.

Both keep the ``vlora`` package's meaning (same arguments, return shapes and errors) so
that code written for ``vlora.io`` runs on ``engine.io`` unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from ..constants import PEFT_PREFIX

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from ..types import LoRAWeights

# ``<module>.lora_A.weight`` and PEFT's multi-adapter ``<module>.lora_A.<adapter>.weight``
_LORA_KEY_RE = re.compile(r"^(.+)\.(lora_[AB])\.(?:[\w-]+\.)?weight$")


def parse_state_dict(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """Group a PEFT state dict's LoRA factors by module.

    Keys that are not LoRA factors are ignored; a module needs both its A and its B.

    Args:
        state_dict: Key → tensor, keys with or without PEFT's ``base_model.model.`` prefix.

    Returns:
        ``(lora_a, lora_b, layer_names)``: module → A ``(r, in)``, module → B ``(out, r)``,
        and the sorted module names that have both.
    """
    lora_a: dict[str, Tensor] = {}
    lora_b: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        m = _LORA_KEY_RE.match(key)
        if m is None:
            continue
        module = m.group(1)
        module = module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module
        (lora_a if m.group(2) == "lora_A" else lora_b)[module] = tensor
    names = sorted(set(lora_a) & set(lora_b))
    return {n: lora_a[n] for n in names}, {n: lora_b[n] for n in names}, names


def stack_lora_weights(adapters: Sequence[LoRAWeights], side: Literal["A", "B"]) -> dict[str, Tensor]:
    """Flatten each adapter's A (or B) per module and stack them: module → ``(N, numel)``.

    Only modules every adapter has are stacked (the seed's "factor data matrix").

    Raises:
        ValueError: no adapters, or ``side`` is neither ``"A"`` nor ``"B"``.
    """
    import torch

    if not adapters:
        raise ValueError("Need at least one adapter to stack")
    if side not in ("A", "B"):
        raise ValueError(f"side must be 'A' or 'B', got {side!r}")
    common = set(adapters[0].layer_names)
    for a in adapters[1:]:
        common &= set(a.layer_names)
    out: dict[str, Tensor] = {}
    for layer in sorted(common):
        out[layer] = torch.stack([(a.lora_a if side == "A" else a.lora_b)[layer].flatten() for a in adapters])
    return out
