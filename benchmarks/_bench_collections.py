"""Adapter collections for benchmarks/compression.py, written to disk as fp16 PEFT folders.

* ``demo``: engine.demo's collection (families sharing row/column spaces + outliers).
* ``peft``: real PEFT adapters: a tiny Llama (from a config, no download), LoRA from
  PEFT's own default init under one seed (as most training scripts fix it), trained
  with Adam on distinct synthetic next-token tasks in families, saved by PEFT's
  ``save_pretrained``, then re-saved at fp16 through ``engine.io.save_adapter``.
* ``peft-seeds``: the same, each task with its own init seed (no shared row space).
* ``7b``: 7B-shaped synthetic (hidden 4096, r16, q_proj/v_proj on 32 layers): a row
  space shared by all tasks (a common init), a column space per family of
  ``family_size`` tasks, per-task cores, plus relative noise on both factors.

Every collection is ordered so that each prefix of it is a sensible collection
of that size (the benchmark takes the first N).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

SEVEN_B = {"hidden": 4096, "layers": 32, "rank": 16, "alpha": 32, "modules": ("q_proj", "v_proj")}


@dataclass
class Collection:
    name: str
    root: Path
    paths: list[Path]
    description: str
    streaming: bool = False  # build with from_adapters_streaming
    gen_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def tasks(self, n: int) -> list[str]:
        return [p.name for p in self.paths[:n]]

    def adapter_bytes(self, n: int) -> int:
        return sum(f.stat().st_size for p in self.paths[:n] for f in p.iterdir() if f.is_file())


def _save16(w: Any, path: Path) -> Path:
    import torch

    from engine.io import save_adapter

    return save_adapter(w, path, dtype=torch.float16, force=True)


# ---------------------------------------------------------------------------
def make_demo(root: Path, n_max: int) -> Collection:
    from engine.demo import DEMO_FAMILIES, make_demo_adapters

    t0 = time.perf_counter()
    adapters = {w.name: w for w in make_demo_adapters()}
    # round-robin over the families so that every prefix holds each family, with the two
    # outliers at positions 4 and 10: the 8-prefix has an outlier, and the last task of a
    # prefix (the held-out one) is a family member
    fams = [list(v) for k, v in DEMO_FAMILIES.items() if k != "outlier"]
    outliers = list(DEMO_FAMILIES["outlier"])
    order: list[str] = []
    while any(fams):
        for f in fams:
            if f:
                order.append(f.pop(0))
    order.insert(3, outliers[0])
    order.insert(9, outliers[1])
    paths = [_save16(adapters[t], root / t) for t in order[:n_max]]
    return Collection(
        "demo", root, paths,
        "engine.demo collection: tiny-llama-256, 4 layers × q/k/v/o, r8; 3 families of 4 + 2 outliers; fp16 on disk",
        gen_seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------
PEFT_SHAPE = {"hidden": 256, "layers": 4, "rank": 8, "alpha": 16, "modules": ("q_proj", "k_proj", "v_proj", "o_proj")}


def _tiny_llama(hidden: int, layers: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)  # the same base model for every task
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    model.config.name_or_path = "tiny-llama-bench"
    model.config._name_or_path = "tiny-llama-bench"
    return model


def _task_batch(task: int, family: int, g: Any, vocab: int = 128, bs: int = 16, seq: int = 24) -> tuple[Any, Any]:
    """A synthetic next-token task: family = a multiplier, task = an offset (related tasks in a family)."""
    import torch

    mult = [3, 5, 7, 11, 13, 17, 19, 23][family % 8]
    ids = torch.randint(0, vocab, (bs, seq), generator=g)
    labels = (ids * mult + 7 * task + family) % vocab
    return ids, labels


def train_peft_adapter(out: Path, *, task: int, family: int, init_seed: int, steps: int, shape: dict) -> Path:
    """Train one LoRA with PEFT (default init) and write it with PEFT's save_pretrained."""
    import torch
    from peft import LoraConfig, get_peft_model

    base = _tiny_llama(shape["hidden"], shape["layers"])
    cfg = LoraConfig(r=shape["rank"], lora_alpha=shape["alpha"], target_modules=list(shape["modules"]), lora_dropout=0.0)
    torch.manual_seed(init_seed)
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(10_000 + task)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        ids, labels = _task_batch(task, family, g)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(str(out))
    return out


PEFT_QUICK_SHAPE = {"hidden": 64, "layers": 2, "rank": 4, "alpha": 8, "modules": ("q_proj", "v_proj")}


def make_peft(root: Path, n_max: int, *, steps: int, distinct_init: bool = False, family_size: int = 4,
              shape: dict | None = None) -> Collection:
    """``n_max`` PEFT-trained adapters; tasks in families of ``family_size`` (family = t // family_size)."""
    import torch

    from engine.io import load_adapter

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    raw = root / "_peft_raw"
    paths = []
    for t in range(n_max):
        fam = t // family_size
        name = f"task{t:03d}-fam{fam}"
        p = raw / name
        train_peft_adapter(p, task=t, family=fam, init_seed=(100 + t) if distinct_init else 42, steps=steps,
                           shape=shape or PEFT_SHAPE)
        w = load_adapter(p, name=name)
        paths.append(_save16(w, root / name))
    shutil.rmtree(raw, ignore_errors=True)
    s = shape or PEFT_SHAPE
    init = "each task its own init seed" if distinct_init else "one init seed for all (shared A init)"
    return Collection(
        "peft-seeds" if distinct_init else "peft", root, paths,
        f"PEFT-trained: tiny Llama hidden {s['hidden']}, {s['layers']} layers × {'/'.join(m[0] for m in s['modules'])}, r{s['rank']}, "
        f"{steps} AdamW steps on synthetic next-token tasks, families of {family_size}; {init}; fp16 on disk",
        gen_seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------
def make_7b(root: Path, n_max: int, *, family_size: int = 8, noise: float = 0.02, seed: int = 0,
            shape: dict | None = None, structure: str = "families", start: int = 0,
            progress: Callable[[int, int], None] | None = None) -> Collection:
    """7B-shaped synthetic adapters streamed to disk one at a time (memory: the shared bases only).

    Per module m: a row basis R_m (in × 2r) shared by all tasks (common init); per task
    A = M_t R_mᵀ + noise. ``structure="families"``: per family f a column basis C_fm
    (out × r), B = C_fm K_t + noise, so the column space grows by r with every family.
    ``structure="shared"``: one column basis C_m (out × 2r) for all tasks, B = C_m K_t + noise
    (each family its own mean K): the collection the issue names, tasks sharing one
    low-rank structure. Noise is ``noise`` × the factor's norm (relative, per entry scale).

    ``start``: the first ``start`` adapters are already on disk (a shorter run with the
    same arguments wrote them): they are generated again (the random stream must advance
    the same way) but not written. ``progress(done, n_max)`` is called after each adapter.
    A family's bases are dropped after its last task, so memory stays at the shared bases
    plus one family's, whatever N.
    """
    if structure not in ("families", "shared"):
        raise ValueError(f"structure must be 'families' or 'shared', got {structure!r}")
    import torch

    s = dict(SEVEN_B if shape is None else shape)
    threads = torch.get_num_threads()
    # one thread: the products are tiny, and on a shared machine OpenMP's spinning made two
    # threads ~25× slower (1.2 s vs 0.05 s per adapter); the bytes written are the same
    torch.set_num_threads(1)
    try:
        return _make_7b(root, n_max, s, family_size=family_size, noise=noise, seed=seed, structure=structure,
                        start=start, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _make_7b(root: Path, n_max: int, s: dict, *, family_size: int, noise: float, seed: int, structure: str,
             start: int, progress: Callable[[int, int], None] | None) -> Collection:
    import torch

    from engine.types import LoRAWeights

    d, L, r = s["hidden"], s["layers"], s["rank"]
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(L) for p in s["modules"]]
    rows = {m: torch.randn(d, 2 * r, generator=g) / math.sqrt(d) for m in modules}  # ≈ orthonormal columns
    cols: dict[tuple[int, str], Any] = {}
    fam_core: dict[tuple[int, str], Any] = {}
    fam_mix: dict[tuple[int, str], Any] = {}
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": s["alpha"], "target_modules": list(s["modules"]),
        "base_model_name_or_path": "synthetic/llama-7b-shaped", "task_type": "CAUSAL_LM", "bias": "none",
        "lora_dropout": 0.0, "use_rslora": False, "fan_in_fan_out": False, "inference_mode": True,
    }
    paths = []
    for t in range(n_max):
        fam = t // family_size
        if fam > 0 and t % family_size == 0:  # the previous family is complete: free its bases
            for dct in ((cols, fam_core, fam_mix) if structure == "families" else (fam_core, fam_mix)):
                for key in [key for key in dct if key[0] == fam - 1]:
                    del dct[key]
        lora_a, lora_b = {}, {}
        for m in modules:
            width = r if structure == "families" else 2 * r
            ckey = (fam, m) if structure == "families" else (0, m)
            if ckey not in cols:
                cols[ckey] = torch.randn(d, width, generator=g) / math.sqrt(d)
            if (fam, m) not in fam_core:
                fam_core[(fam, m)] = torch.randn(width, r, generator=g)
                fam_mix[(fam, m)] = torch.randn(r, 2 * r, generator=g)
            mix = fam_mix[(fam, m)] + 0.5 * torch.randn(r, 2 * r, generator=g)
            a = mix @ rows[m].T  # entries ~ 1/sqrt(d)·O(1): a kaiming-like scale
            a = a + noise * a.norm() / math.sqrt(a.numel()) * torch.randn(r, d, generator=g)
            core = fam_core[(fam, m)] + 0.3 * torch.randn(width, r, generator=g)
            b = 0.05 * cols[ckey] @ core
            b = b + noise * b.norm() / math.sqrt(b.numel()) * torch.randn(d, r, generator=g)
            lora_a[m], lora_b[m] = a.contiguous(), b.contiguous()
        name = f"task{t:03d}-fam{fam:02d}"
        w = LoRAWeights(layer_names=sorted(modules), lora_a=lora_a, lora_b=lora_b, rank=r, metadata=dict(config),
                        lora_alpha=float(s["alpha"]), name=name)
        if t >= start:
            _save16(w, root / name)
        paths.append(root / name)
        del w, lora_a, lora_b
        if progress is not None:
            progress(t + 1, n_max)
    cols_text = (f"column space (r) per family of {family_size}" if structure == "families"
                 else f"one shared column space (2r), families of {family_size} in it")
    return Collection(
        "7b" if structure == "families" else "7b-shared", root, paths,
        f"7B-shaped synthetic: hidden {d}, r{r}, {'/'.join(s['modules'])} on {L} layers; shared row space (2r) for all, "
        f"{cols_text}, per-task cores, {noise:.0%} relative noise on A and B; fp16 on disk, streamed",
        streaming=True,
        gen_seconds=time.perf_counter() - t0,
        extra={"family_size": family_size, "noise": noise, "structure": structure},
    )


def quick_7b_shape() -> dict:
    """For --quick: the same structure at a size that runs in seconds."""
    return {"hidden": 256, "layers": 2, "rank": 16, "alpha": 32, "modules": ("q_proj", "v_proj")}


def write_manifest(c: Collection) -> None:
    (c.root / "COLLECTION.json").write_text(json.dumps({"name": c.name, "description": c.description,
                                                        "tasks": [p.name for p in c.paths]}, indent=1))


# ---------------------------------------------------------------------------
# a 7B-shaped collection kept on disk and reused across runs (streaming_memory.py, scale.py)
SEVEN_B_MARKER = "COLLECTION-7b.json"


def task_dirs(root: Path) -> list[Path]:
    """The adapter folders of a kept collection, in order (complete ones only: config and weights)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("task")
                  and (p / "adapter_model.safetensors").is_file() and (p / "adapter_config.json").is_file())


def ensure_7b(root: Path, n: int, *, structure: str = "families", log: Callable[[str], None] = print,
              every_s: float = 10.0, shape: dict | None = None) -> list[Path]:
    """The first ``n`` adapters of the 7B-shaped collection under ``root``, writing the missing ones.

    The folders a previous (shorter) run wrote are kept and reused: the generator is
    deterministic and each prefix is the same collection. ``root`` remembers its
    structure (``COLLECTION-7b.json``); asking for another one is an error rather than
    a silent mix. Progress goes to ``log`` every ``every_s`` seconds. ``shape``: another
    shape than the 7B one (e.g. a smaller hidden size; remembered like the structure).
    """
    root = Path(root)
    s = dict(SEVEN_B if shape is None else shape)
    want = {"structure": structure, "shape": {**s, "modules": list(s["modules"])}, "seed": 0,
            "family_size": 8, "noise": 0.02}
    marker = root / SEVEN_B_MARKER
    if marker.is_file():
        have = json.loads(marker.read_text())
        if have != want:
            raise SystemExit(f"{root}: holds a 7B-style collection with structure {have.get('structure')!r} and shape "
                             f"{have.get('shape')} (asked: {structure!r}, {want['shape']}); use another --root")
    have_dirs = task_dirs(root)
    if len(have_dirs) >= n:
        return have_dirs[:n]
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(want, indent=1))
    start = len(have_dirs)
    t0 = last = time.perf_counter()
    one = 2 * s["layers"] * len(s["modules"]) * s["hidden"] * s["rank"] * 2  # fp16 bytes

    def progress(done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if done > start and (now - last >= every_s or done == total):
            last = now
            rate = (done - start) / (now - t0)
            log(f"  {structure}: {done}/{total} adapters on disk ({done * one / 2**30:.1f} GiB), "
                f"{now - t0:.0f} s, {rate:.1f}/s, ~{(total - done) / rate:.0f} s left")

    log(f"writing {structure} adapters {start}..{n - 1} to {root} ({(n - start) * one / 2**30:.1f} GiB at fp16)")
    make_7b(root, n, structure=structure, start=start, progress=progress, shape=shape)
    log(f"wrote {n - start} adapters in {time.perf_counter() - t0:.1f} s")
    return task_dirs(root)[:n]
