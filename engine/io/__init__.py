"""Adapter I/O: local PEFT folders, the Hugging Face Hub, scanning.

Names resolve lazily so that torch-free parts (header reading, scanning) can be
imported without loading torch.
"""

from __future__ import annotations


from ..lazy import lazy_exports

_EXPORTS = {
    "LoRAWeights": "..types",
    "parse_state_dict": ".factors",
    "stack_lora_weights": ".factors",
    "load_adapter": ".local",
    "save_adapter": ".local",
    "check_compatible": ".compat",
    "CompatibilityReport": ".compat",
    "CompatibleSet": ".compat",
    "partition_compatible": ".compat",
    "describe_sets": ".compat",
    "common_modules": ".compat",
    "ModuleOverlap": ".compat",
    "incompatible_with_majority": ".compat",
    "spec_excluded": ".scan",
    "adapter_config_for": ".local",
    "atomic_dir": ".atomic",
    "load_adapter_from_hub": ".hub",
    "download_adapter": ".hub",
    "search_hub_adapters": ".hub",
    "list_cached_adapters": ".hub",
    "HubRepo": ".hub",
    "CachedAdapter": ".hub",
    "read_adapter_summary": ".header",
    "read_safetensors_header": ".header",
    "scan_local_adapters": ".scan",
    "expand_adapter_specs": ".scan",
    "is_adapter_dir": ".scan",
    "is_subspace_dir": ".scan",
    "validate_task_id": ".scan",
    "validate_repo_id": ".scan",
    "AdapterSpec": ".scan",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
