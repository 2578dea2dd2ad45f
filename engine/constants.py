"""File names and key fragments shared with PEFT."""

from __future__ import annotations

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
#: Pickle-based weight files that PEFT may write; refused, never unpickled.
PICKLE_WEIGHTS_NAMES = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt", "adapter_model.pth")
SUBSPACE_MANIFEST_NAME = "subspace.json"
#: Prefix PEFT puts in front of module names in saved state dicts.
PEFT_PREFIX = "base_model.model."
#: Ranks vLLM's LoRA kernels accept (``--max-lora-rank`` choices).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
