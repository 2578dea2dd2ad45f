"""A built-in demo collection: PEFT-format adapters for a small Llama-shaped model.

The adapters come in families that share column and row spaces (as adapters
trained on related tasks from a common init do), plus outliers, so similarity,
clustering and compression all have something real to show. Deterministic and
fast (well under a second for the default size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .progress import CancelLike, ProgressFn, tick

#: Base model the demo adapters claim; :func:`demo_base_config` builds it.
DEMO_BASE_MODEL = "vlora-demo/tiny-llama-256"

#: Bumped whenever the generator's output changes: a cached demo of another version is rebuilt,
#: so the app never shows figures from an older generator.
DEMO_VERSION = 2

#: The stamp file written beside the demo adapters (JSON: version, seed).
DEMO_STAMP = ".vlora-demo.json"

#: family -> tasks. The last family members are the outliers.
DEMO_FAMILIES: dict[str, list[str]] = {
    "summarize": ["summarize-news", "summarize-legal", "summarize-medical", "summarize-code"],
    "sql": ["sql-postgres", "sql-sqlite", "sql-bigquery", "sql-duckdb"],
    "math": ["math-arithmetic", "math-algebra", "math-word-problems", "math-proofs"],
    "outlier": ["pirate-speak", "emoji-only"],
}


@dataclass(frozen=True)
class DemoShape:
    """Shape of the demo base model (Llama-style attention with grouped KV heads)."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    rank: int = 8
    alpha: int = 16

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def modules(self) -> dict[str, tuple[int, int]]:
        """Module name → (out_features, in_features)."""
        out: dict[str, tuple[int, int]] = {}
        for i in range(self.layers):
            p = f"model.layers.{i}.self_attn"
            out[f"{p}.q_proj"] = (self.hidden, self.hidden)
            out[f"{p}.k_proj"] = (self.kv_dim, self.hidden)
            out[f"{p}.v_proj"] = (self.kv_dim, self.hidden)
            out[f"{p}.o_proj"] = (self.hidden, self.hidden)
        return out


def demo_base_config(shape: DemoShape | None = None) -> dict[str, Any]:
    """Keyword arguments for ``transformers.LlamaConfig`` matching the demo adapters."""
    s = shape or DemoShape()
    return {
        "hidden_size": s.hidden,
        "intermediate_size": 2 * s.hidden,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "vocab_size": 512,
        "max_position_embeddings": 128,
    }


def make_demo_adapters(shape: DemoShape | None = None, *, seed: int = 0) -> list[Any]:
    """Build the demo adapters in memory as ``LoRAWeights`` (one per task)."""
    import torch

    from .types import LoRAWeights

    s = shape or DemoShape()
    g = torch.Generator().manual_seed(seed)
    r = s.rank

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    modules = s.modules()
    # one shared "init" row space per module (a common LoRA init), one column space per family
    shared_rows = {m: torch.linalg.qr(randn(i, 2 * r))[0] for m, (o, i) in modules.items()}
    fam_cols = {f: {m: torch.linalg.qr(randn(o, r))[0] for m, (o, i) in modules.items()} for f in DEMO_FAMILIES}
    fam_core = {f: {m: randn(r, r) for m in modules} for f in DEMO_FAMILIES}
    fam_mix = {f: {m: randn(r, 2 * r) for m in modules} for f in DEMO_FAMILIES}

    adapters = []
    for fam, tasks in DEMO_FAMILIES.items():
        for t_index, task in enumerate(tasks):
            lora_a, lora_b = {}, {}
            for m, (o, i) in modules.items():
                if fam == "outlier":
                    a = randn(r, i) / i**0.5
                    b = randn(o, r) * 0.02
                else:
                    mix = fam_mix[fam][m] + 0.25 * randn(r, 2 * r)
                    a = mix @ shared_rows[m].T / (2 * r) ** 0.5 + 0.01 * randn(r, i) / i**0.5
                    core = fam_core[fam][m] + 0.3 * randn(r, r)
                    b = fam_cols[fam][m] @ core * 0.02 * (1.0 + 0.15 * t_index) + 0.00005 * randn(o, r)
                lora_a[m], lora_b[m] = a.contiguous(), b.contiguous()
            config = {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": s.alpha,
                "target_modules": ["k_proj", "o_proj", "q_proj", "v_proj"],
                "base_model_name_or_path": DEMO_BASE_MODEL,
                "task_type": "CAUSAL_LM",
                "lora_dropout": 0.05,
                "bias": "none",
                "use_rslora": False,
                "fan_in_fan_out": False,
                "inference_mode": True,
            }
            adapters.append(
                LoRAWeights(
                    layer_names=sorted(modules),
                    lora_a=lora_a,
                    lora_b=lora_b,
                    rank=r,
                    metadata=config,
                    lora_alpha=float(s.alpha),
                    name=task,
                )
            )
    return adapters


def make_demo_collection(
    path: str | Path,
    *,
    shape: DemoShape | None = None,
    seed: int = 0,
    force: bool = False,
    progress: ProgressFn | None = None,
    cancel: CancelLike | None = None,
) -> list[Path]:
    """Write the demo collection: one PEFT folder per task under ``path``.

    Returns the adapter folders, in family order. An existing collection is kept
    unless ``force``; existing adapter folders raise ``OutputExistsError``.
    """
    from .io.local import save_adapter

    root = Path(path)
    adapters = make_demo_adapters(shape, seed=seed)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for n, w in enumerate(adapters):
        tick(progress, cancel, n, len(adapters), f"writing {w.name}")
        out.append(save_adapter(w, root / str(w.name), force=force))
    tick(progress, cancel, len(adapters), len(adapters), "done")
    import json

    (root / DEMO_STAMP).write_text(json.dumps({"version": DEMO_VERSION, "seed": seed}) + "\n", encoding="utf-8")
    (root / "README.txt").write_text(
        "vlora-tui demo collection: families summarize-*, sql-*, math-* share structure; "
        "pirate-speak and emoji-only are outliers.\n",
        encoding="utf-8",
    )
    return out


def demo_is_current(path: str | Path, *, seed: int = 0) -> bool:
    """Whether ``path`` holds a complete demo collection written by this version of the generator."""
    import json

    root = Path(path)
    try:
        stamp = json.loads((root / DEMO_STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(stamp, dict) or stamp.get("version") != DEMO_VERSION or stamp.get("seed") != seed:
        return False
    tasks = [t for ts in DEMO_FAMILIES.values() for t in ts]
    return all((root / t / "adapter_model.safetensors").is_file() for t in tasks)


def default_demo_dir() -> Path:
    """Where ``vlora-tui --demo`` caches the demo collection (``$VLORA_TUI_HOME`` or ~/.cache)."""
    import os

    base = os.environ.get("VLORA_TUI_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vlora-tui"
    )
    return Path(base) / "demo"
