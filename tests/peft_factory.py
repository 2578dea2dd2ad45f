"""Real PEFT-written adapters on a tiny transformers model built from a config (no downloads).

Used by the test-suite's fixtures (cached per session) and by benchmarks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_BASE = "tiny-llama-test"


def tiny_llama(hidden: int = 64, layers: int = 2, seed: int = 0) -> Any:
    """A tiny Llama-architecture causal LM with random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    model.config.name_or_path = TINY_BASE
    model.config._name_or_path = TINY_BASE
    model.eval()
    return model


def write_peft_adapter(
    out: Path,
    *,
    seed: int,
    r: int = 4,
    alpha: int = 8,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    family: int | None = None,
    hidden: int = 64,
    layers: int = 2,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    modules_to_save: list[str] | None = None,
    dtype: Any = None,
    train_steps: int = 0,
) -> Path:
    """Write one adapter with PEFT's own ``save_pretrained``.

    Weights are structured: with ``family`` set, B's column space and A's row space
    come from a per-family basis (so families are similar); otherwise random.
    ``train_steps`` > 0 also runs a few SGD steps on a synthetic next-token task.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(hidden, layers)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        modules_to_save=modules_to_save,
        init_lora_weights=True,
    )
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    fg = torch.Generator().manual_seed(1000 + (family if family is not None else seed))
    with torch.no_grad():
        for name, mod in model.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                A = mod.lora_A["default"].weight
                B = mod.lora_B["default"].weight
                rr, d_in = A.shape
                d_out = B.shape[0]
                if family is not None:
                    rows = torch.randn(rr + 2, d_in, generator=fg)
                    cols = torch.randn(d_out, rr + 2, generator=fg)
                    A.copy_(torch.randn(rr, rr + 2, generator=g) @ rows * 0.3 + 0.05 * torch.randn(rr, d_in, generator=g))
                    B.copy_(cols @ torch.randn(rr + 2, rr, generator=g) * 0.1 + 0.01 * torch.randn(d_out, rr, generator=g))
                else:
                    A.copy_(torch.randn(rr, d_in, generator=g) * 0.3)
                    B.copy_(torch.randn(d_out, rr, generator=g) * 0.1)
        if modules_to_save:
            for name, p in model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
    if train_steps:
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        for _ in range(train_steps):
            ids = torch.randint(0, 128, (4, 16), generator=g)
            loss = model(input_ids=ids, labels=(ids + seed) % 128).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(out))
    return out


def peft_logits(adapter_dir: Path, *, hidden: int = 64, layers: int = 2, seed_input: int = 0) -> Any:
    """Logits of the tiny base model with ``adapter_dir`` loaded by PEFT."""
    import torch
    from peft import PeftModel

    base = tiny_llama(hidden, layers)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed_input))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def save_tiny_base(out: Path, *, num_labels: int | None = None, hidden: int = 64, layers: int = 2) -> Path:
    """The tiny Llama of :func:`tiny_llama` saved with ``save_pretrained`` (no tokenizer), as a causal LM;
    with ``num_labels``, a ``LlamaForSequenceClassification`` over the same body (its head seeded)."""
    import torch

    model = tiny_llama(hidden, layers)
    if num_labels is not None:
        from transformers import LlamaForSequenceClassification

        cfg = model.config
        cfg.num_labels = num_labels
        cfg.pad_token_id = 0
        torch.manual_seed(1)
        cls = LlamaForSequenceClassification(cfg)
        cls.model.load_state_dict(model.model.state_dict())
        model = cls.eval()
    model.save_pretrained(str(out))
    return out
